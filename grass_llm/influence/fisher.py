"""Blockwise (per-layer) Fisher of the stored compressed gradients, damped, Cholesky-factored.

``F_l = (1/n) sum_i g_il g_il^T`` accumulated in float64 while streaming row chunks;
``lambda_l = damping * tr(F_l) / k_l`` (relative, default) or ``damping`` (absolute); the lower
Cholesky factor of ``F_l + lambda_l I`` is written into the store as ``fisher/<layer>``
(float64), with per-layer damping, trace and condition number in ``fisher`` attrs.
Shapes: R rows of a chunk, K a layer's compressed size.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from zarr.codecs import Crc32cCodec

from grass_llm.parallel import comm
from grass_llm.store import GradientStore, StoreError

DAMPING_MODES = ("relative", "absolute")
ILL_CONDITIONED = 1e10


def accumulate_gram(store: GradientStore, layer: str, chunks: list[int]) -> torch.Tensor:
    """``sum_i g_i g_i^T`` over the given row chunks, float64 ``[K, K]``."""
    k = next(x.k for x in store.layout.layers if x.name == layer)
    gram = torch.zeros(k, k, dtype=torch.float64)
    for c in chunks:
        a, b = store.layout.chunk_range(c)
        g = torch.from_numpy(store.read_rows(layer, a, b)).double()
        gram.addmm_(g.T, g)
    return gram


def compute_fisher(store: GradientStore, *, damping: float = 0.1, mode: str = "relative",
                   progress: Callable[[str, int, int], None] | None = None) -> dict:
    """Fit and store every layer's damped Fisher factor; returns the per-layer report.

    With torch.distributed initialized, the ranks split the row chunks and all-reduce the
    Gram matrices; rank 0 writes.
    """
    if mode not in DAMPING_MODES:
        raise ValueError(f"damping mode must be one of {DAMPING_MODES}, got {mode!r}")
    if not damping > 0:
        raise ValueError(f"damping must be > 0, got {damping}")
    store.require_complete()
    rank, world = comm.rank(), comm.world_size()
    mine = list(range(rank, store.layout.n_chunks, world))
    n = store.n_examples
    report = {}
    factors = {}
    for i, lay in enumerate(store.layout.layers):
        if progress is not None:
            progress(lay.name, i, len(store.layout.layers))
        gram = accumulate_gram(store, lay.name, mine)
        if world > 1:
            comm.all_reduce(gram)
        fisher = gram / n
        trace = float(torch.trace(fisher))
        lam = damping * trace / lay.k if mode == "relative" else damping
        if lam <= 0:
            raise ValueError(f"layer {lay.name}: the Fisher trace is {trace} (all-zero "
                             "gradients?), so relative damping is 0; use --damping-mode absolute")
        damped = fisher + lam * torch.eye(lay.k, dtype=torch.float64)
        factors[lay.name] = torch.linalg.cholesky(damped)
        cond = _condition(damped, factors[lay.name])
        report[lay.name] = {"lambda": lam, "trace": trace, "condition": cond,
                            "ill_conditioned": cond > ILL_CONDITIONED}
    if rank == 0:
        _write(store, factors, report, damping, mode)
    if world > 1:
        comm.barrier()
    return report


def _condition(damped: torch.Tensor, chol: torch.Tensor) -> float:
    """Exact condition number for blocks up to 1024 wide; above that (eigvalsh is O(k^3) and
    slow at k = 4096) the lower bound (max L_ii / min L_ii)^2 from the Cholesky diagonal."""
    if damped.shape[0] <= 1024:
        eig = torch.linalg.eigvalsh(damped)
        return float(eig[-1] / eig[0])
    d = torch.diagonal(chol)
    return float((d.max() / d.min()) ** 2)


def _write(store, factors, report, damping, mode) -> None:
    if store.mode != "r+":
        raise StoreError("open the store with mode='r+' to write the Fisher factors")
    grp = store.group.require_group("fisher")
    for name, L in factors.items():
        arr = grp.create_array(name, shape=L.shape, chunks=L.shape, dtype="float64",
                               compressors=[Crc32cCodec()], overwrite=True)
        arr[:] = L.numpy()
    grp.attrs.update({"damping": damping, "mode": mode, "n": store.n_examples,
                      "identity": store.identity, "layers": report})


def load_factors(store: GradientStore) -> dict[str, torch.Tensor]:
    """Each layer's lower Cholesky factor of ``F_l + lambda_l I`` (float64)."""
    if "fisher" not in store.group:
        raise StoreError(f"{store.url} has no Fisher factors; run `grass-llm fisher "
                         f"{store.url}` first")
    grp = store.group["fisher"]
    if grp.attrs.get("identity") != store.identity:
        raise StoreError(f"the Fisher factors in {store.url} belong to another run; rerun "
                         "`grass-llm fisher`")
    out = {}
    for lay in store.layout.layers:
        if lay.name not in grp:
            raise StoreError(f"{store.url}: no Fisher factor for layer {lay.name}; rerun "
                             "`grass-llm fisher`")
        out[lay.name] = torch.from_numpy(np.asarray(grp[lay.name][:]))
    return out


def precondition(factors: dict[str, torch.Tensor],
                 grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``(F_l + lambda_l I)^-1 g`` for every layer: ``{layer: [Q, K]}`` in float64."""
    out = {}
    for name, g in grads.items():
        if name not in factors:
            raise ValueError(f"no Fisher factor for layer {name}")
        g64 = g.double()
        out[name] = torch.cholesky_solve(g64.T, factors[name]).T
    return out
