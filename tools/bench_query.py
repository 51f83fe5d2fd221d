"""Scoring throughput over a store against the raw read rate of the same run, and peak memory
against store size.

1. Builds a synthetic store (random float16 rows; --rows x --layers x --k).
2. Raw read rate: every chunk file of the gradient arrays read sequentially (bytes only).
3. Zarr decode rate: the same rows through Zarr (CRC32C check), no arithmetic.
4. Scoring (`score_store`, top-10): --queries example-level rows alone; the same plus --tokens
   per-token rows in one pass; the same two sets in two passes (what `query --per-token` did
   before); --queries rows and one row (valuation's single summed target) with normalized
   scores (`train-unit`: each training row's norm summed in the same pass) beside the plain
   ones; each on 1 process and on 2 (torchrun, gloo on CPU). Reported as store MiB/s and as a
   fraction of the raw read rate.
5. Peak RSS of a scoring process (example + per-token rows) for stores of 1x, 2x and 4x
   --rows, measured from just before the pass (Linux: VmHWM reset through clear_refs): flat
   when memory does not grow with the store.

Every timing is the median of --repeats runs. Prints markdown tables.
Usage: python tools/bench_query.py [--rows 8192] [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from grass_llm.influence import ScoreRequest, score_store  # noqa: E402
from grass_llm.store import LayerInfo, StoreLayout, create_store, open_store  # noqa: E402


def build(url: str, rows: int, layers: int, k: int, chunk: int, codec: str = "none"):
    lays = tuple(LayerInfo(f"layer.{i}", f"factgrass:c=1,k={k},k_in=64,k_out=64", i, k, 1024,
                           1024, False) for i in range(layers))
    store = create_store(url, StoreLayout(n_examples=rows, layers=lays, chunk_rows=chunk,
                                          dtype="float16", codec=codec),
                         {"config": {"bench": True}})
    rng = np.random.default_rng(0)
    for c in store.pending_chunks():
        a, b = store.layout.chunk_range(c)
        grads = {x.name: rng.standard_normal((b - a, k), dtype=np.float32) for x in lays}
        store.write_chunk(c, grads, [str(i) for i in range(a, b)], [1] * (b - a), [0] * (b - a))
    return open_store(url)


def requests(store, n_q: int, n_tok: int, one_pass: bool, normalize: str = "none"
             ) -> list[dict]:
    """The score requests of one run: [{...}] for one pass, [{ex}, {tok}] for two."""
    gen = torch.Generator().manual_seed(0)
    ex = {x.name: torch.randn(n_q, x.k, generator=gen) for x in store.layout.layers}
    if not n_tok:
        return [{"ex": ScoreRequest(ex, top_k=10, normalize=normalize)}]
    tok = {x.name: torch.randn(n_tok, x.k, generator=gen) for x in store.layout.layers}
    both = {"ex": ScoreRequest(ex, top_k=10), "tok": ScoreRequest(tok, top_k=10)}
    return [both] if one_pass else [{"ex": both["ex"]}, {"tok": both["tok"]}]


def timed(fn, repeats: int) -> float:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def _status_kib(key: str) -> int:
    """A line of /proc/self/status (VmRSS: now, VmHWM: peak), KiB; ru_maxrss elsewhere."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux: write 5 to clear_refs), so that the peak measured
    next is the scoring's own, not an import-time transient."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def worker(args) -> None:
    """One scoring run in this process (or this rank); rank 0 prints JSON."""
    from grass_llm.parallel import comm, init_distributed

    init_distributed()
    store = open_store(args.store)
    reqs = requests(store, args.queries, args.tokens, not args.two_pass, args.normalize)

    def run():
        for r in reqs:
            score_store(store, r, device=args.device)
        comm.barrier()

    run()  # warm-up (numba compiles, page cache)
    before = _status_kib("VmRSS")
    reset = _reset_peak()
    t = timed(run, args.repeats)
    peak = _status_kib("VmHWM")
    if comm.rank() == 0:
        print(json.dumps({"seconds": t, "peak_kib": peak, "before_kib": before,
                          "peak_is_scoring_only": reset}))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args, url: str, procs: int, *extra: str) -> dict:
    """Run `worker` in a fresh process (procs=1) or under torchrun (procs > 1)."""
    base = [str(Path(__file__).resolve()), "--worker", "--store", url, "--device", args.device,
            "--repeats", str(args.repeats), "--queries", str(args.queries), *extra]
    # a later --queries in extra overrides the default (argparse keeps the last)
    if procs == 1:
        cmd = [sys.executable, *base]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(procs),
               "--master-port", str(_free_port()), *base]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def store_bytes(url: str) -> int:
    return sum(p.stat().st_size for p in Path(url, "grads").rglob("*") if p.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=8192)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--k", type=int, default=1024)
    ap.add_argument("--chunk-rows", type=int, default=512)
    ap.add_argument("--queries", type=int, default=16, help="example-level query rows")
    ap.add_argument("--tokens", type=int, default=256, help="per-token query rows")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--procs", type=int, default=2, help="ranks of the multi-process runs")
    ap.add_argument("--codec", default="none", help="the store's chunk codec: none or zstd")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--store", help=argparse.SUPPRESS)
    ap.add_argument("--two-pass", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--normalize", default="none", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        url = str(Path(tmp) / "bench.zarr")
        t0 = time.perf_counter()
        store = build(url, args.rows, args.layers, args.k, args.chunk_rows, args.codec)
        files = sorted(p for p in Path(url, "grads").rglob("*") if p.is_file())
        nbytes = store_bytes(url)
        print(f"store: {args.rows} rows x {args.layers} layers x k={args.k} float16, "
              f"{nbytes / 2**20:,.0f} MiB of chunk files (built in "
              f"{time.perf_counter() - t0:.0f} s); torch {torch.__version__}, "
              f"{torch.get_num_threads()} threads, {os.cpu_count()} CPUs, device {args.device}; "
              f"{args.queries} query rows, {args.tokens} token rows, top-10")
        rate = {"raw read": nbytes / timed(lambda: [p.read_bytes() for p in files],
                                           args.repeats)}

        def decode():
            for c in range(store.layout.n_chunks):
                a, b = store.layout.chunk_range(c)
                for x in store.layout.layers:
                    store.read_raw(x.name, a, b)

        rate["zarr decode"] = nbytes / timed(decode, args.repeats)
        print("\n| what | processes | MiB/s of store | vs raw read |")
        print("|---|---:|---:|---:|")
        for name, r in rate.items():
            print(f"| {name} | 1 | {r / 2**20:,.0f} | {r / rate['raw read']:.2f} |")
        runs = [("example rows alone", ["--tokens", "0"]),
                ("example + token rows, one pass", ["--tokens", str(args.tokens)]),
                ("example + token rows, two passes", ["--tokens", str(args.tokens),
                                                      "--two-pass"]),
                ("example rows alone, train-unit", ["--tokens", "0", "--normalize",
                                                    "train-unit"]),
                ("1 row (valuation)", ["--tokens", "0", "--queries", "1"]),
                ("1 row (valuation), train-unit", ["--tokens", "0", "--queries", "1",
                                                   "--normalize", "train-unit"])]
        for procs in sorted({1, args.procs}):
            for label, extra in runs:
                r = nbytes / launch(args, url, procs, *extra)["seconds"]
                print(f"| score: {label} | {procs} | {r / 2**20:,.0f} | "
                      f"{r / rate['raw read']:.2f} |")
        print("\n| store rows | store MiB | RSS before scoring, MiB | peak RSS while scoring, "
              "MiB | peak - before, MiB |")
        print("|---:|---:|---:|---:|---:|")
        for mult in (1, 2, 4):
            big = url if mult == 1 else str(Path(tmp) / f"bench{mult}.zarr")
            if mult > 1:
                build(big, args.rows * mult, args.layers, args.k, args.chunk_rows, args.codec)
            m = launch(args, big, 1, "--tokens", str(args.tokens))
            note = "" if m["peak_is_scoring_only"] else " (peak since start)"
            print(f"| {args.rows * mult:,} | {store_bytes(big) / 2**20:,.0f} | "
                  f"{m['before_kib'] / 1024:,.0f} | {m['peak_kib'] / 1024:,.0f}{note} | "
                  f"{(m['peak_kib'] - m['before_kib']) / 1024:,.0f} |")


if __name__ == "__main__":
    main()
