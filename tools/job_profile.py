"""The cache job's step loop against the floor (``tools/bench_capture.py --job``).

A job pass runs the batches through what ``grass_llm.cache_loop`` does per step: the capture,
the rows staged in the store's dtype (``stage_batch``) and placed in their chunk's buffer, and
each full chunk handed to the background ``ChunkWriter``, which writes it to a float16 Zarr
store on local disk, fsync included. Each pass covers two whole chunks with a writer of its
own, as the job has one for its whole loop, and ends by closing it, which waits for the last
chunk: every write is counted (the job itself waits only for its very last chunk). The floor
passes run with no writer alive: a writer thread can slow the loop just by existing (one that
had run a parallel torch op kept an OpenMP team, see ``GradientStore._encode_stored_dtype``).

A floor pass runs forward + loss + backward with frozen weights and no hooks, on a copy of the
model, over the same batches. Floor and job passes alternate, in turn order. The figure is the
median of the per-pair ratios floor / job.
"""

from __future__ import annotations

import math
import statistics
import tempfile
import time

import numpy as np
import torch

from grass_llm.cache_loop import _ChunkBuffer, stage_batch
from grass_llm.capture import GradientCapture
from grass_llm.store import create_store
from grass_llm.store.writer import ChunkWriter

from capture_profile import floor_copy, floor_step, store_layout, sync  # tools/, next to this file


def job(model, batches, spec: str, repeats: int, chunk_rows: int = 256) -> dict:
    """``{"floor": s/step, "job": s/step, "ratios": [floor / job per pair], "steps": n}``."""
    B = batches[0].shape[0]
    steps = 2 * math.ceil(chunk_rows / B)  # two whole chunks per pass
    order = [batches[i % len(batches)] for i in range(steps)]
    floor_model = floor_copy(model)
    pinned = next(model.parameters()).device.type == "cuda"
    times: dict[str, list[float]] = {"floor": [], "job": []}
    ratios = []
    with tempfile.TemporaryDirectory() as tmp, GradientCapture(model, spec, seed=0) as cap:
        names = list(cap.compressors)
        widths = [cap.compressors[n].k for n in names]
        splits = np.cumsum([0] + widths)
        store = create_store(f"{tmp}/job.zarr",
                             store_layout(cap, steps * B * (repeats + 1), chunk_rows),
                             {"bench": "job"}, overwrite=True)
        row = 0

        def job_pass() -> None:
            nonlocal row
            writer, buf = ChunkWriter(store), None
            for ids in order:
                out = cap(ids)
                idx = np.arange(row, row + ids.shape[0])
                row += ids.shape[0]
                c = int(idx[0]) // chunk_rows
                if buf is None:
                    buf = _ChunkBuffer(c * chunk_rows, (c + 1) * chunk_rows, sum(widths),
                                       torch.float16)
                if buf.place(stage_batch(c, idx, out, names, torch.float16, pinned)) == 0:
                    writer.submit(c, grads={n: buf.rows[:, splits[j]:splits[j + 1]]
                                            for j, n in enumerate(names)},
                                  example_ids=[str(i) for i in range(buf.a, buf.b)],
                                  n_targets=buf.n, loss=buf.loss)
                    buf = None
            writer.close()  # the pass's last chunk is on disk

        def floor_pass() -> None:
            for ids in order:
                floor_step(floor_model, ids)

        run = {"floor": floor_pass, "job": job_pass}
        for r in range(repeats + 1):  # the first pair warms up
            secs = {}
            for which in (("floor", "job") if r % 2 else ("job", "floor")):
                sync()
                t = time.perf_counter()
                run[which]()
                sync()
                secs[which] = time.perf_counter() - t
            if r:
                for which, s in secs.items():
                    times[which].append(s / steps)
                ratios.append(secs["floor"] / secs["job"])
    return {"floor": statistics.median(times["floor"]), "job": statistics.median(times["job"]),
            "ratios": ratios, "steps": steps}


def print_job(res: dict, title: str) -> None:
    r = sorted(res["ratios"])
    q = statistics.quantiles(r, n=4) if len(r) >= 2 else [r[0]] * 3
    print(f"\n{title}\n")
    print("| pass pairs | steps per pass | floor, ms/step | job, ms/step | median floor / job "
          "| quartiles |")
    print("|---:|---:|---:|---:|---:|---|")
    print(f"| {len(r)} | {res['steps']} | {res['floor'] * 1e3:,.1f} | {res['job'] * 1e3:,.1f} | "
          f"{statistics.median(r):.3f} | {q[0]:.3f} – {q[2]:.3f} |")
