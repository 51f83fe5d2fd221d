"""Where one capture step's time goes (``tools/bench_capture.py --profile``).

One step of the cache job = forward + backward of the model with the capture hooks, then the
host-side row handling and the store write. Measured per step, medians over the repeats:

  model forward      forward of the model alone: the floor run's forward (no hooks)
  model backward     backward of the model alone: the floor run's backward (no hooks)
  forward hooks      time inside the capture's forward hooks (feature gathers), all layers
  backward hooks     time inside the tensor hooks on each layer's output gradient (the
                     FactGraSS reduction, fused with its SJLT on the extension path), per layer
                     kind (q/k/v/o/gate/up/down)
  hook overhead      what the hooked forward + backward take beyond the floor and the hooks'
                     own time (autograd hook dispatch, Python between layers, lost overlap)
  row handling       cache_loop's stage_batch + placing the rows into the chunk's buffer
  store write        GradientStore.write_chunk of the batch's rows (float16, local disk; the
                     runner does this in a background thread)

The floor and the hooked step run on the same batches, interleaved within each repeat.
"""

from __future__ import annotations

import re
import statistics
import tempfile
import time
from collections import defaultdict

import numpy as np
import torch

from grass_llm.cache_loop import _ChunkBuffer, stage_batch
from grass_llm.capture import GradientCapture
from grass_llm.capture.hooks import _embedding_leaf
from grass_llm.capture.loss import per_example_loss
from grass_llm.store import LayerInfo, StoreLayout, create_store

_KIND = re.compile(r"\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)$")


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class _Timed(GradientCapture):
    """GradientCapture whose hooks and model forward are timed (same code, wrapped)."""

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.acc: dict[str, float] = defaultdict(float)

    def _forward_hook(self, name):
        inner = super()._forward_hook(name)

        def hook(*args):
            t = time.perf_counter()
            out = inner(*args)
            self.acc["forward hooks"] += time.perf_counter() - t
            return out

        return hook

    def _grad_hook(self, name):
        inner = super()._grad_hook(name)
        m = _KIND.search(name)
        label = f"backward hooks: {m.group(1) if m else 'other'}"

        def hook(grad):
            t = time.perf_counter()
            out = inner(grad)
            self.acc[label] += time.perf_counter() - t
            return out

        return hook


def _fwd_bwd(model, ids, acc: dict, hooked) -> object:
    """One forward + backward, timed apart; ``hooked`` = the capture (its own step) or None."""
    _sync()
    t0 = time.perf_counter()
    if hooked is not None:
        # the capture's own step, with the forward timed by hooks on the root module
        marks = {}
        pre = model.register_forward_pre_hook(lambda *a: marks.__setitem__("a", time.perf_counter()))
        post = model.register_forward_hook(lambda *a: marks.__setitem__("b", time.perf_counter()))
        try:
            out = hooked(ids)
        finally:
            pre.remove()
            post.remove()
        _sync()
        t1 = time.perf_counter()
        acc["hooked forward"] += marks["b"] - marks["a"]
        acc["hooked step"] += t1 - t0
        return out
    handle = model.get_input_embeddings().register_forward_hook(_embedding_leaf)
    try:
        loss, _ = per_example_loss(model(input_ids=ids, use_cache=False).logits, ids)
        _sync()
        t1 = time.perf_counter()
        loss.sum().backward()
        _sync()
    finally:
        handle.remove()
    acc["model forward"] += t1 - t0
    acc["model backward"] += time.perf_counter() - t1
    return None


def _store(cap, rows: int, tmp: str):
    layers = tuple(LayerInfo(n, c.spec, c.seed, c.k, cap.layers[n].in_features,
                             cap.layers[n].out_features, cap._bias[n])
                   for n, c in cap.compressors.items())
    layout = StoreLayout(n_examples=rows, layers=layers, chunk_rows=rows, dtype="float16")
    return create_store(f"{tmp}/p.zarr", layout, {"profile": True}, overwrite=True)


def profile(model, batches, spec: str, repeats: int) -> list[tuple[str, float]]:
    """``[(component, seconds per step)]`` (medians over repeats), plus the step total."""
    cap = _Timed(model, spec, seed=0)
    names = list(cap.compressors)
    pinned = next(model.parameters()).device.type == "cuda"
    per_repeat: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp, cap:
        store = _store(cap, batches[0].shape[0], tmp)
        for r in range(repeats + 1):  # the first pass warms up
            acc: dict[str, float] = defaultdict(float)
            cap.acc = acc
            for ids in batches:
                _fwd_bwd(model, ids, acc, None)
                out = _fwd_bwd(model, ids, acc, cap)
                B = ids.shape[0]
                t = time.perf_counter()
                buf = _ChunkBuffer(0, B, sum(c.k for c in cap.compressors.values()),
                                   torch.float16)
                buf.place(stage_batch(0, np.arange(B), out, names, torch.float16, pinned))
                acc["row handling"] += time.perf_counter() - t
                if B == store.layout.chunk_rows:
                    t = time.perf_counter()
                    offs = np.cumsum([0] + [cap.compressors[n].k for n in names])
                    store.write_chunk(0, {n: buf.rows[:, offs[j]:offs[j + 1]]
                                          for j, n in enumerate(names)},
                                      [str(i) for i in range(B)], buf.n, buf.loss)
                    acc["store write"] += time.perf_counter() - t
            if r:
                per_repeat.append({k: v / len(batches) for k, v in acc.items()})
    med = {k: statistics.median(d.get(k, 0.0) for d in per_repeat) for k in per_repeat[0]}
    fwd_hooks = med.get("forward hooks", 0.0)
    bwd = {k: v for k, v in med.items() if k.startswith("backward hooks")}
    hooked_bwd = med["hooked step"] - med["hooked forward"]
    overhead = (med["hooked forward"] - fwd_hooks - med["model forward"]) + (
        hooked_bwd - sum(bwd.values()) - med["model backward"])
    rows = [("model forward", med["model forward"]), ("model backward", med["model backward"]),
            ("forward hooks", fwd_hooks), *sorted(bwd.items()),
            ("hook overhead", overhead), ("row handling", med["row handling"]),
            ("store write", med.get("store write", 0.0))]
    rows.append(("step total (hooked step + rows + write)",
                 med["hooked step"] + med["row handling"] + med.get("store write", 0.0)))
    rows.append(("floor step (forward + backward)", med["model forward"] + med["model backward"]))
    return rows


def print_profile(rows: list[tuple[str, float]], title: str) -> None:
    total = rows[-2][1]
    print(f"\n{title}\n")
    print("| component | ms per step | share of the step |")
    print("|---|---:|---:|")
    for name, secs in rows:
        print(f"| {name} | {secs * 1e3:,.2f} | {secs / total:.1%} |")
