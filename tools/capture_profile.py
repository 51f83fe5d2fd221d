"""Where one capture step's time goes (``tools/bench_capture.py --profile``).

One step of the cache job = forward + backward of the model with the capture hooks, then the
host-side row handling and the store write. Measured per step, medians over the repeats:

  model forward      forward of the model alone: the floor run's forward (no hooks)
  loss               the per-example loss on the logits (the floor run's)
  model backward     backward of the model alone: the floor run's backward (no hooks)
  forward hooks      time inside the capture's forward hooks (feature gathers), all layers;
                     the profile runs the Python hooks (GradientCapture.native_hooks = False)
                     so that it can time them: the C++ hooks of the cache job do the same
                     gathers and kernels with less Python around them
  backward hooks     time inside the tensor hooks on each layer's output gradient (the
                     FactGraSS reduction, fused with its SJLT on the extension path), per layer
                     kind (q/k/v/o/gate/up/down)
  hook overhead      what the hooked step takes beyond the floor and the hooks' own time
                     (autograd hook dispatch, Python between layers, the capture's set-up)
  row handling       cache_loop's stage_batch + placing the rows into the chunk's buffer
  store write        GradientStore.write_chunk of one chunk (float16, local disk, fsync),
                     spread over the steps that fill it (the runner writes in a background
                     thread)

The floor and the hooked step run on the same batches, interleaved within each repeat.

``machinery`` measures what the hooks cost before they do any work, side by side with the floor
and the cut floor: the capture with forward hooks that only mark their layer (module hook
dispatch and the capture's per-batch set-up), then with each forward hook also registering a
tensor hook that does nothing (autograd's per-layer Python callback), then the whole capture.
The capture's backward stops at the outputs of the first hooked layers (``grad_leaf``), and so
do these rows' and the cut floor's; the floor's runs down to the input embedding.

``paired`` runs the floor, the cut floor (its backward stopped at the first hooked layers, as
the capture's is) and the whole capture back to back on each batch (order rotating) and gives
the medians of the ratios floor / capture and cut floor / capture.
"""

from __future__ import annotations

import copy
import re
import resource
import statistics
import tempfile
import time
from collections import defaultdict

import numpy as np
import torch

from grass_llm.cache_loop import _ChunkBuffer, stage_batch
from grass_llm.capture import GradientCapture
from grass_llm.capture.setup import embedding_leaf, grad_leaf
from grass_llm.capture.loss import per_example_loss
from grass_llm.store import LayerInfo, StoreLayout, create_store

_KIND = re.compile(r"\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)$")


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class _Timed(GradientCapture):
    """GradientCapture whose hooks and model forward are timed (same code, wrapped). Its
    layers run on the Python hooks, which can be wrapped (with their direct extension calls;
    the capture's C++ hooks do the same work without the Python around it)."""

    native_hooks = False

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

    def _grad_hook(self, name, *args):
        inner = super()._grad_hook(name, *args)
        m = _KIND.search(name)
        label = f"backward hooks: {m.group(1) if m else 'other'}"

        def hook(grad):
            t = time.perf_counter()
            out = inner(grad)
            self.acc[label] += time.perf_counter() - t
            return out

        return hook


def _fwd_bwd(model, ids, acc: dict, hooked) -> object:
    """One forward + loss + backward, timed apart by hooks on the root module; ``hooked`` = the
    capture (its own step) or None (the floor: frozen weights, no hooks)."""
    marks = {}
    pre = model.register_forward_pre_hook(lambda *a: marks.__setitem__("a", time.perf_counter()))
    post = model.register_forward_hook(lambda *a: marks.__setitem__("b", time.perf_counter()))
    sync()
    t0 = time.perf_counter()
    try:
        if hooked is not None:
            out = hooked(ids)
            sync()
            acc["hooked step"] += time.perf_counter() - t0
            return out
        handle = model.get_input_embeddings().register_forward_hook(embedding_leaf)
        try:
            loss, _ = per_example_loss(model(input_ids=ids, use_cache=False).logits, ids)
            sync()
            t1 = time.perf_counter()
            loss.sum().backward()
            sync()
        finally:
            handle.remove()
    finally:
        pre.remove()
        post.remove()
    acc["model forward"] += marks["b"] - marks["a"]
    acc["loss"] += t1 - marks["b"]
    acc["model backward"] += time.perf_counter() - t1
    return None


# ------------------------------------------------ the cache job's host-side row handling
def _encode(rows: torch.Tensor) -> np.ndarray:
    """What GradientStore.write_chunk does to a float16 store's rows before writing them: rows
    already in float16 get one contiguous host copy and a finiteness check; others (the former
    per-example path's float32 rows) a float32 check and a conversion."""
    if rows.dtype == torch.float16:
        out = torch.empty(rows.shape, dtype=rows.dtype)
        out.copy_(rows)
        torch.isfinite(out).all(dim=1)
        return out.numpy()
    x = rows.detach().to("cpu", torch.float32).numpy()
    np.isfinite(x).all(axis=1)
    return x.astype(np.float16)


def rows_per_example(out) -> None:
    """The runner's row handling before the one-buffer change: per example and per layer a
    float32 host copy and a dict, then per layer a stack, then the store's encode."""
    B = next(iter(out.grads.values())).shape[0]
    rows = [{"loss": float(out.loss[j]), "n": int(out.n_targets[j]),
             "grads": {k: v[j].float().cpu() for k, v in out.grads.items()}} for j in range(B)]
    for k in out.grads:
        _encode(torch.stack([r["grads"][k] for r in rows]))


def rows_one_buffer(out, names, pinned: bool) -> None:
    """cache_loop's row handling: one [B, sum K] float16 buffer per batch staged to the host and
    placed into the chunk's buffer, then the writer's encode (here in the same thread)."""
    B = next(iter(out.grads.values())).shape[0]
    width = sum(out.grads[n].shape[1] for n in names)
    buf = _ChunkBuffer(0, B, width, torch.float16)
    buf.place(stage_batch(0, np.arange(B), out, names, torch.float16, pinned))
    off = 0
    for n in names:
        k = out.grads[n].shape[1]
        _encode(buf.rows[:, off:off + k])
        off += k


def floor_copy(model, cut_at=None):
    """A copy of ``model`` (the same weights) that runs the floor: every parameter frozen,
    whatever the caller's model has, so that backward runs through the activations only.

    ``cut_at=None``: the input embedding's output is the leaf that requires grad, and backward
    runs down to it (the floor of issue 16 and the tables). ``cut_at`` = the capture's layer
    names: the backward stops where the capture's does, at the outputs of the first of those
    layers (``capture.setup.grad_leaf``), with a hook on those layers alone (found by one
    forward), so that the capture's own cost is what this floor leaves out."""
    floor_model = copy.deepcopy(model)
    for p in floor_model.parameters():
        p.requires_grad_(False)
    if cut_at is None:
        floor_model.get_input_embeddings().register_forward_hook(embedding_leaf)
        return floor_model
    mods = dict(floor_model.named_modules())
    first = set()
    probe = [mods[n].register_forward_hook(
        lambda m, a, o, n=n: first.add(n) if not o.requires_grad else None) for n in cut_at]
    with torch.enable_grad():
        floor_model(input_ids=torch.zeros(1, 2, dtype=torch.long, device=model.device),
                    use_cache=False)
    for h in probe:
        h.remove()
    for n in first:
        mods[n].register_forward_hook(lambda m, a, o: grad_leaf(o))
    return floor_model


def floor_step(floor_model, ids) -> None:
    """One floor step on a ``floor_copy``: forward, per-example loss, backward."""
    logits = floor_model(input_ids=ids, use_cache=False).logits
    per_example_loss(logits, ids)[0].sum().backward()


def store_layout(cap, n_rows: int, chunk_rows: int) -> StoreLayout:
    """A float16 store layout for the capture's layers."""
    layers = tuple(LayerInfo(n, c.spec, c.seed, c.k, cap.layers[n].in_features,
                             cap.layers[n].out_features, cap._bias[n])
                   for n, c in cap.compressors.items())
    return StoreLayout(n_examples=n_rows, layers=layers, chunk_rows=chunk_rows, dtype="float16")


def _store(cap, rows: int, tmp: str):
    return create_store(f"{tmp}/p.zarr", store_layout(cap, rows, rows), {"profile": True},
                        overwrite=True)


def _write_seconds(cap, chunk_rows: int, repeats: int) -> float:
    """Median seconds of writing one chunk of ``chunk_rows`` rows (float16, local disk)."""
    names = list(cap.compressors)
    gen = torch.Generator().manual_seed(0)
    grads = {n: torch.randn(chunk_rows, cap.compressors[n].k, generator=gen).half()
             for n in names}
    times = []
    with tempfile.TemporaryDirectory() as tmp:
        store = _store(cap, chunk_rows, tmp)
        for _ in range(repeats):
            t = time.perf_counter()
            store.write_chunk(0, grads, [str(i) for i in range(chunk_rows)],
                              np.ones(chunk_rows), np.zeros(chunk_rows))
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def profile(model, batches, spec: str, repeats: int,
            chunk_rows: int = 256) -> list[tuple[str, float]]:
    """``[(component, seconds per step)]`` (medians over repeats), plus the step total. The
    store write is one ``chunk_rows``-row chunk's write spread over the steps that fill it."""
    cap = _Timed(model, spec, seed=0)
    names = list(cap.compressors)
    pinned = next(model.parameters()).device.type == "cuda"
    per_repeat: list[dict] = []
    for r in range(repeats + 1):  # the first pass warms up
        acc: dict[str, float] = defaultdict(float)
        for ids in batches:  # the floor, with the capture's hooks off
            _fwd_bwd(model, ids, acc, None)
        with cap:
            cap.acc = acc
            for ids in batches:
                out = _fwd_bwd(model, ids, acc, cap)
                B = ids.shape[0]
                t = time.perf_counter()
                buf = _ChunkBuffer(0, B, sum(c.k for c in cap.compressors.values()),
                                   torch.float16)
                buf.place(stage_batch(0, np.arange(B), out, names, torch.float16, pinned))
                acc["row handling"] += time.perf_counter() - t
        if r:
            per_repeat.append({k: v / len(batches) for k, v in acc.items()})
    med = {k: statistics.median(d.get(k, 0.0) for d in per_repeat) for k in per_repeat[0]}
    write = _write_seconds(cap, chunk_rows, max(3, repeats)) * batches[0].shape[0] / chunk_rows
    fwd_hooks = med.get("forward hooks", 0.0)
    bwd = {k: v for k, v in med.items() if k.startswith("backward hooks")}
    floor = med["model forward"] + med["loss"] + med["model backward"]
    overhead = med["hooked step"] - floor - fwd_hooks - sum(bwd.values())
    rows = [("model forward", med["model forward"]), ("loss", med["loss"]),
            ("model backward", med["model backward"]), ("forward hooks", fwd_hooks),
            *sorted(bwd.items()), ("hook overhead", overhead),
            ("row handling", med["row handling"]),
            (f"store write (one {chunk_rows}-row chunk, per step)", write)]
    rows.append(("step total (hooked step + rows + write)",
                 med["hooked step"] + med["row handling"] + write))
    rows.append(("floor step (forward + loss + backward)", floor))
    return rows


def print_profile(rows: list[tuple[str, float]], title: str) -> None:
    total = rows[-2][1]
    print(f"\n{title}\n")
    print("| component | ms per step | share of the step |")
    print("|---|---:|---:|")
    for name, secs in rows:
        print(f"| {name} | {secs * 1e3:,.2f} | {secs / total:.1%} |")


class _Empty(GradientCapture):
    """The capture's machinery without its work: forward hooks that mark their layer as done,
    optionally registering a tensor hook that does nothing."""

    register = False

    def _forward_hook(self, name):
        def hook(module, args, output):
            leaf = grad_leaf(output)  # where backward stops, as in the capture
            if self.register:
                (output if leaf is None else leaf).register_hook(_nothing)
            self._results[name] = None
            return leaf

        return hook


class _EmptyRegistering(_Empty):
    register = True


def _nothing(grad):
    return None


def machinery(model, batches, spec: str, repeats: int) -> list[tuple[str, float]]:
    """``[(what, seconds per step)]``, medians of interleaved repeats (see the docstring)."""
    caps = {"capture, forward hooks that do nothing": _Empty(model, spec, seed=0),
            "  + a tensor hook per layer that does nothing": _EmptyRegistering(model, spec,
                                                                               seed=0),
            "capture (all of it)": GradientCapture(model, spec, seed=0)}
    cut = floor_copy(model, list(caps["capture (all of it)"].layers))
    times: dict[str, list[float]] = defaultdict(list)
    for r in range(repeats + 1):  # the first pass warms up
        acc: dict[str, float] = defaultdict(float)
        for ids in batches:
            _fwd_bwd(model, ids, acc, None)
        floor = acc["model forward"] + acc["loss"] + acc["model backward"]
        step = {"floor (forward + loss + backward)": floor}
        sync()
        t = time.perf_counter()
        for ids in batches:
            floor_step(cut, ids)
        sync()
        step["cut floor (backward stopped where the capture's is)"] = time.perf_counter() - t
        for name, cap in caps.items():
            with cap:
                sync()
                t = time.perf_counter()
                for ids in batches:
                    cap(ids)
                sync()
                step[name] = time.perf_counter() - t
        if r:
            for name, secs in step.items():
                times[name].append(secs / len(batches))
    return [(name, statistics.median(ts)) for name, ts in times.items()]


def print_machinery(rows: list[tuple[str, float]], title: str) -> None:
    floor = rows[0][1]
    print(f"\n{title}\n")
    print("| step | ms per step | over the floor, ms | vs floor |")
    print("|---|---:|---:|---:|")
    for name, secs in rows:
        print(f"| {name} | {secs * 1e3:,.2f} | {(secs - floor) * 1e3:,.2f} | "
              f"{floor / secs:.2f} |")


def paired(model, batches, spec: str, repeats: int) -> dict:
    """``{"ratios": {"floor": [floor / capture per triple], "cut floor": [...]}, "faults":
    {"floor": [...], "cut floor": [...], "capture": [...]}}``, with the minor page faults of each
    run. The floor (backward down to the input embedding), the cut floor (backward stopped where
    the capture's stops: ``floor_copy(cut_at=...)``) and the whole capture run back to back on
    the same batch, in rotating order, so that the machine's drift (seconds long on a shared
    host) hits all three alike. The median of these ratios is steadier than a ratio of medians
    taken over separate passes. The floors run on copies of the model (the same weights), so
    the capture stays entered as in the cache job (entering it for every triple made its next
    step measurably slower)."""
    cap = GradientCapture(model, spec, seed=0)
    runs = {"floor": floor_copy(model), "cut floor": floor_copy(model, list(cap.layers))}
    order = ["floor", "cut floor", "capture"]
    ratios, faults = {"floor": [], "cut floor": []}, {k: [] for k in order}
    with cap:
        for r in range(repeats + 1):  # the first pass warms up
            for i, ids in enumerate(batches):
                secs = {}
                turn = (r + i) % 3
                for which in order[turn:] + order[:turn]:
                    sync()
                    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                    t = time.perf_counter()
                    if which == "capture":
                        cap(ids)
                    else:
                        floor_step(runs[which], ids)
                    sync()
                    secs[which] = time.perf_counter() - t
                    if r:
                        faults[which].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                                             - f0)
                if r:
                    for k in ratios:
                        ratios[k].append(secs[k] / secs["capture"])
    del runs
    return {"ratios": ratios, "faults": faults}


def print_paired(got: dict, title: str) -> None:
    fl = {k: statistics.median(v) for k, v in got["faults"].items()}
    print(f"\n{title}\n")
    print("| against | triples | median floor / capture | quartiles |")
    print("|---|---:|---:|---|")
    for k, what in (("floor", "the floor (backward down to the input embedding)"),
                    ("cut floor", "the cut floor (backward stopped where the capture's is)")):
        q1, q2, q3 = statistics.quantiles(got["ratios"][k], n=4)
        print(f"| {what} | {len(got['ratios'][k])} | {q2:.3f} | {q1:.3f} – {q3:.3f} |")
    print("\npage faults per step: " + ", ".join(f"{k} {v:,.0f}" for k, v in fl.items()))
