"""Blockwise (per-layer) Fisher of the stored compressed gradients, damped, Cholesky-factored,
on the accelerator when there is one and split over ranks by layer.

``F_l = (1/n) sum_i g_il g_il^T`` accumulated in float64 while streaming row chunks;
``lambda_l = damping * tr(F_l) / k_l`` (relative, default) or ``damping`` (absolute); the lower
Cholesky factor of ``F_l + lambda_l I`` is stored as one layer of a new fit
(``grass_llm.influence.factors``), with damping, trace and a condition estimate per layer.

Work split under torchrun / accelerate launch: every rank streams its own row chunks (round
robin) of a group of layers and forms their partial Gram matrices; each block is then reduced
(``comm.reduce``) to its owner rank (layer index mod world size), which damps, factors, writes
and frees it. The ranks factor their blocks of a group in parallel; no rank ever holds more than
``group_size`` blocks (default min(world size, 8)).

Precision: CPU float64. CUDA: float64 where the GPU runs it at full speed (compute capability
8.0, 9.0, 10.0: A100, H100/H200, B200, whose float64 tensor cores match or beat their IEEE
float32 rate, so float64 costs nothing), else float32 tiles of 256 rows (exact products of
16-bit stored values; sums over 256 rows, ~1e-6 relative) accumulated in float64. TF32 is never
used (its 10-bit mantissa would change the factors at 1e-3). Shapes: R rows, K layer size.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager

import torch

from grass_llm.influence.factors import begin_fit, commit_fit, load_factors, write_factor
from grass_llm.influence.reader import Job, read_ahead, resolve_device
from grass_llm.influence.spectrum import condition_number
from grass_llm.parallel import comm
from grass_llm.store import GradientStore, LayerInfo, StoreError

DAMPING_MODES = ("relative", "absolute")
PRECISIONS = ("auto", "float64", "float32")
ILL_CONDITIONED = 1e10
FAST_FP64_CAPABILITIES = {(8, 0), (9, 0), (10, 0)}
TILE_ROWS = 256  # rows per float32 Gram tile before it is added into the float64 sum

__all__ = ["DAMPING_MODES", "ILL_CONDITIONED", "accumulate_gram", "compute_fisher",
           "gram_dtype", "load_factors", "precondition"]


def gram_dtype(device: torch.device, precision: str = "auto") -> torch.dtype:
    """The dtype of the Gram GEMMs on ``device`` (the sum is float64 either way)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision != "auto":
        return getattr(torch, precision)
    if device.type == "cuda":
        fast = torch.cuda.get_device_capability(device) in FAST_FP64_CAPABILITIES
        return torch.float64 if fast else torch.float32
    return torch.float64


@contextmanager
def _ieee_float32():
    """float32 GEMMs in IEEE float32 on CUDA (no TF32), whatever the user's global setting."""
    if not torch.cuda.is_available():
        yield
        return
    matmul = torch.backends.cuda.matmul
    try:
        key, old, new = "fp32_precision", matmul.fp32_precision, "ieee"
    except RuntimeError:  # the process set TF32 through the legacy flag: torch refuses a mix
        key, old, new = "allow_tf32", matmul.allow_tf32, False
    setattr(matmul, key, new)
    try:
        yield
    finally:
        setattr(matmul, key, old)


def _add_gram(gram: torch.Tensor, g: torch.Tensor) -> None:
    """``gram += g^T g``: in one float64 GEMM, or float32 tiles added into float64."""
    if g.dtype == torch.float64:
        gram.addmm_(g.T, g)
        return
    for r0 in range(0, g.shape[0], TILE_ROWS):
        tile = g[r0: r0 + TILE_ROWS]
        gram.add_(tile.T @ tile)


def _partial_grams(store: GradientStore, layers: Sequence[LayerInfo], chunks: Sequence[int],
                   device: torch.device, dtype: torch.dtype,
                   depth: int) -> dict[str, torch.Tensor]:
    """``sum_i g_i g_i^T`` over ``chunks`` for each layer: ``{layer: [K, K] float64}``."""
    grams = {x.name: torch.zeros(x.k, x.k, dtype=torch.float64, device=device) for x in layers}
    jobs = []
    for x in layers:  # layer by layer: one block's rows stream while the others wait
        for c in chunks:
            a, b = store.layout.chunk_range(c)
            jobs.append(Job(c, a, b, (x.name,)))
    with _ieee_float32():
        for _, rows in read_ahead(store, jobs, device=device, dtype=dtype, depth=depth):
            (name, g), = rows.items()
            _add_gram(grams[name], g)
    return grams


def accumulate_gram(store: GradientStore, layer: str, chunks: Sequence[int], *,
                    device: str | torch.device = "cpu", precision: str = "float64",
                    depth: int = 2) -> torch.Tensor:
    """``sum_i g_i g_i^T`` over the given row chunks of one layer: float64 ``[K, K]``."""
    dev = resolve_device(device)
    lay = next(x for x in store.layout.layers if x.name == layer)
    return _partial_grams(store, [lay], chunks, dev, gram_dtype(dev, precision), depth)[layer]


def _factor(gram: torch.Tensor, n: int, lay: LayerInfo, damping: float,
            mode: str) -> tuple[torch.Tensor, dict]:
    """Damp ``gram / n`` in place and factor it: ``(L, report entry)``."""
    fisher = gram.div_(n)
    trace = float(torch.trace(fisher))
    lam = damping * trace / lay.k if mode == "relative" else damping
    if not lam > 0:
        raise ValueError(f"layer {lay.name}: the Fisher trace is {trace} (all-zero gradients?), "
                         "so relative damping is 0; use --damping-mode absolute")
    fisher.diagonal().add_(lam)
    chol, info = torch.linalg.cholesky_ex(fisher)
    if int(info) != 0:
        raise ValueError(f"layer {lay.name}: F + lambda I is not positive definite (trace "
                         f"{trace}); are there non-finite rows? (`grass-llm verify`)")
    est = condition_number(fisher, chol, floor=lam)
    return chol, {"lambda": lam, "trace": trace, "condition": est["condition"],
                  "condition_rel_error": est["rel_error"], "lambda_max": est["lambda_max"],
                  "lambda_min": est["lambda_min"],
                  "ill_conditioned": est["condition"] > ILL_CONDITIONED}


def compute_fisher(store: GradientStore, *, damping: float = 0.1, mode: str = "relative",
                   device: str | torch.device = "auto", precision: str = "auto",
                   group_size: int | None = None, depth: int = 2,
                   progress: Callable[[str, int, int], None] | None = None) -> dict:
    """Fit every layer's damped Fisher factor as a new fit, make it current; returns the
    per-layer report ``{layer: {lambda, trace, condition, ...}}`` (on every rank).

    Call it on every rank under torch.distributed (see the module docstring for the split).

    Args:
        store: a complete store opened with ``mode="r+"``.
        damping: relative multiple of ``tr(F)/k``, or the absolute lambda.
        mode: ``"relative"`` or ``"absolute"``.
        device: ``"auto"`` (this rank's GPU if any, else CPU), ``"cpu"``, ``"cuda"``...
        precision: Gram GEMM dtype, ``"auto"`` (see module docstring), ``"float64"`` or
            ``"float32"`` (tiles summed in float64).
        group_size: layers whose partial Gram matrices are formed before one round of
            reductions (their owners factor in parallel); memory is that many blocks per rank.
        depth: row chunks read ahead.
        progress: ``progress(layer, done, total)`` after each group.
    """
    if mode not in DAMPING_MODES:
        raise ValueError(f"damping mode must be one of {DAMPING_MODES}, got {mode!r}")
    if not damping > 0:
        raise ValueError(f"damping must be > 0, got {damping}")
    if store.mode != "r+":
        raise StoreError("open the store with mode='r+' to write the Fisher factors")
    store.require_complete()
    dev = resolve_device(device)
    dtype = gram_dtype(dev, precision)
    rank, world = comm.rank(), comm.world_size()
    group_size = group_size or min(world, 8)
    fit_id = None
    with comm.guarded("starting the Fisher fit"):
        if rank == 0:
            fit_id = begin_fit(store, {"damping": damping, "mode": mode, "n": store.n_examples,
                                       "gram_dtype": str(dtype).removeprefix("torch.")})
    fit_id = comm.broadcast_object(fit_id)
    mine = list(range(rank, store.layout.n_chunks, world))
    layers = store.layout.layers
    report: dict[str, dict] = {}
    for g0 in range(0, len(layers), group_size):
        group = layers[g0: g0 + group_size]
        grams: dict[str, torch.Tensor] = {}
        with comm.guarded(f"streaming the rows of {group[0].name}"):
            grams = _partial_grams(store, group, mine, dev, dtype, depth)
        owned = {}
        for i, lay in enumerate(group):
            owner = (g0 + i) % world
            total = comm.reduce(grams.pop(lay.name), dst=owner)
            if rank == owner:
                owned[lay.name] = (lay, total)
        with comm.guarded(f"factoring the Fisher blocks of {group[0].name}"):
            for name, (lay, gram) in owned.items():
                chol, report[name] = _factor(gram, store.n_examples, lay, damping, mode)
                write_factor(store, fit_id, name, chol)
                del chol, gram
        owned.clear()
        if progress is not None:
            progress(group[-1].name, min(g0 + group_size, len(layers)), len(layers))
    merged: dict[str, dict] = {}
    for part in comm.all_gather_object(report):
        merged.update(part)
    full = {x.name: merged[x.name] for x in layers}
    with comm.guarded("committing the Fisher fit"):
        if rank == 0:
            commit_fit(store, fit_id, full)
    return full


def precondition(factors: Mapping[str, torch.Tensor], grads: Mapping[str, torch.Tensor], *,
                 device: str | torch.device | None = None) -> dict[str, torch.Tensor]:
    """``(F_l + lambda_l I)^-1 g`` for every layer: ``{layer: [Q, K]}`` float64 on ``device``
    (default: where each ``g`` is).

    ``factors`` may be ``load_factors(store)`` (read one layer at a time) or a dict. Under
    torch.distributed this is a collective (call it on every rank with the same ``grads``):
    layer i is solved by rank i mod world size, which alone reads its factor, and broadcast.
    """
    for name, g in grads.items():
        if name not in factors:
            raise ValueError(f"no Fisher factor for layer {name}")
        if g.dim() != 2:
            raise ValueError(f"layer {name}: query gradients must be [Q, K], got "
                             f"{list(g.shape)}")
    rank, world = comm.rank(), comm.world_size()
    out = {}
    for i, (name, g) in enumerate(grads.items()):
        dev = torch.device(device) if device is not None else g.device
        owner = i % world
        sol = None
        with comm.guarded(f"preconditioning layer {name}"):
            if rank == owner:
                L = factors[name].to(dev)
                if L.shape != (g.shape[1], g.shape[1]):
                    raise ValueError(f"layer {name}: factor {list(L.shape)} does not fit "
                                     f"gradients of size {g.shape[1]}")
                sol = torch.cholesky_solve(g.to(dev, torch.float64).T, L).T.contiguous()
                del L
        if sol is None:
            sol = torch.empty(g.shape, dtype=torch.float64, device=dev)
        out[name] = comm.broadcast(sol, src=owner)
    return out
