"""Scores streamed over a store in one pass: top-k, full score rows, the score matrix,
self-influence and valuation, on the GPU when there is one and split over ranks.

``s(q, i) = sum_l q~_l^T g_il`` with ``q~_l = (F_l + lambda_l I)^-1 q_l`` precomputed. Every
set of query rows a run asks for (example-level queries, per-token query rows, a valuation
target) is concatenated into one ``[Q, K_l]`` matrix per layer, so each row chunk is read once
and scored by one GEMM per layer (float32, the rows are stored in at most 32 bits; the sum over
layers in float64); the score columns are then split back per request. Normalized scores
(``ScoreRequest.normalize``, defined in ``grass_llm.influence.normalize``) come from the same
pass: a query row is scaled once before it, and each training row's norm (over all layers) is
summed from the rows the pass reads anyway.

Memory: the preconditioned queries (``Q * sum_l K_l`` float32 on the device), ``depth + 1`` jobs
of rows in flight (a job is a row chunk of a few layers, at most 64 MiB decoded), a ``[Q, R]``
score block per job and each request's top-k; nothing grows with the store, except the
``[Q, n]`` rows a request keeps in full (``keep_all``, e.g. valuation: Q = 1).

On the CPU each job is scored in its worker thread (one per core, torch ops single-threaded
during the pass): many small GEMMs in parallel beat one multi-threaded GEMM at a time, whose
OpenMP team would wait on cores the readers hold. On a GPU the workers read and copy; the
GEMMs run on the current stream.

Ranks (torchrun / accelerate launch): chunks go round robin; each rank keeps its own top-k and
rank 0 merges them (``merge_top_k``), the same result as one process. Shapes: Q queries, R rows
of a chunk, K a layer's size, n rows of the store.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch

from grass_llm.influence.factors import load_factors
from grass_llm.influence.fisher import precondition
from grass_llm.influence.normalize import (
    SELF_INFLUENCE_NORMALIZATIONS,
    check_normalize,
    inverse,
    row_norms,
    scale_rows,
)
from grass_llm.influence.reader import (
    Job,
    chunk_jobs,
    cpu_workers,
    read_ahead,
    resolve_device,
    single_threaded_ops,
)
from grass_llm.influence.topk import TopK, merge_top_k
from grass_llm.parallel import comm
from grass_llm.store import GradientStore

Progress = Callable[[int, int], None]


@dataclass
class ScoreRequest:
    """One set of preconditioned query rows and what to keep of their scores.

    Attributes:
        pre: ``{layer: [Q, K]}`` preconditioned query rows (every layer of the store).
        top_k: keep each row's top-k training rows (None: no top-k).
        keep_all: keep every score, ``[Q, n]`` float64 in memory (valuation).
        matrix_out: an array-like ``[Q, n]`` (e.g. a chunked Zarr array) each row chunk's
            float32 scores are written into; under several ranks each writes its own chunks.
        normalize: ``"none"``, ``"cosine"`` or ``"train-unit"`` (``NORMALIZATIONS``; the
            definitions are in ``grass_llm.influence.normalize``): every kept score of the
            request (top-k, kept rows, matrix) is the normalized one.
        query_norms: ``cosine`` only: ``[Q]`` norms to divide the query rows by instead of
            each row's own norm over all layers; the per-token rows of a query pass the query's
            norm, so that they still add up to the query's cosine.
    """

    pre: Mapping[str, torch.Tensor]
    top_k: int | None = None
    keep_all: bool = False
    matrix_out: object = None
    normalize: str = "none"
    query_norms: torch.Tensor | np.ndarray | None = None


@dataclass
class ScoreResult:
    """What a request kept (on rank 0): ``values``/``indices`` ``[Q, k]`` (best first, ties by
    lower row) and/or ``scores`` ``[Q, n]``."""

    values: np.ndarray | None = None
    indices: np.ndarray | None = None
    scores: np.ndarray | None = None


def _query_matrix(store: GradientStore, requests: Mapping[str, ScoreRequest],
                  device: torch.device) -> tuple[dict[str, torch.Tensor], dict[str, slice]]:
    """Concatenate every request's rows per layer: ``{layer: [Q_total, K] float32}``."""
    names = store.layer_names
    rows, start = {}, 0
    for key, req in requests.items():
        if set(req.pre) != set(names):
            missing = sorted(set(names) - set(req.pre))[:3]
            raise ValueError(f"request {key!r}: query rows must cover every layer of the store "
                             f"(missing {missing}, extra {sorted(set(req.pre) - set(names))[:3]})")
        q = req.pre[names[0]].shape[0]
        for name in names:
            k = next(x.k for x in store.layout.layers if x.name == name)
            if tuple(req.pre[name].shape) != (q, k):
                raise ValueError(f"request {key!r}, layer {name}: rows of shape "
                                 f"{list(req.pre[name].shape)}, expected [{q}, {k}]")
        if req.top_k is not None and req.top_k < 1:
            raise ValueError(f"request {key!r}: top-k must be >= 1, got {req.top_k}")
        rows[key] = slice(start, start + q)
        start += q
    scaled = [_query_rows(key, req) for key, req in requests.items()]
    mats = {name: torch.cat([r[name].to(device, torch.float32) for r in scaled])
            for name in names}
    return mats, rows


def _query_rows(key: str, req: ScoreRequest) -> Mapping[str, torch.Tensor]:
    """The request's query rows as they enter the GEMMs: for ``cosine``, each divided by its
    norm (or by ``query_norms``), in float64 before the cast."""
    check_normalize(req.normalize)
    if req.normalize != "cosine":
        if req.query_norms is not None:
            raise ValueError(f"request {key!r}: query_norms applies to normalize='cosine' only")
        return req.pre
    q = next(iter(req.pre.values())).shape[0]
    norms = row_norms(req.pre) if req.query_norms is None \
        else torch.as_tensor(req.query_norms, dtype=torch.float64)
    if tuple(norms.shape) != (q,):
        raise ValueError(f"request {key!r}: query_norms of shape {list(norms.shape)}, "
                         f"expected [{q}]")
    return scale_rows(req.pre, inverse(norms))


def score_store(store: GradientStore, requests: Mapping[str, ScoreRequest], *,
                device: str | torch.device = "auto", depth: int | None = None,
                backend: str = "auto", progress: Progress | None = None
                ) -> dict[str, ScoreResult] | None:
    """Score every request against every row of the store in one pass.

    Call it on every rank under torch.distributed (a collective): each rank scores its round
    robin share of the row chunks; the results are merged on rank 0.

    Args:
        store: a complete store.
        requests: ``{name: ScoreRequest}``.
        device: ``"auto"`` (this rank's GPU if any, else CPU) or a device.
        depth: jobs in flight (default: CPU, one per core plus one, each scored in its worker
            thread with single-threaded torch ops; GPU, 2 read ahead).
        backend: the top-k backend (``"auto"``, ``"numba"``, ``"torch"``; see ``TopK``).
        progress: ``progress(chunks_done, chunks_of_this_rank)``.

    Returns:
        ``{name: ScoreResult}`` on rank 0, None on the other ranks.
    """
    store.require_complete()
    dev = resolve_device(device)
    mats, rows = _query_matrix(store, requests, dev)
    n = store.n_examples
    tops = {key: TopK(rows[key].stop - rows[key].start, min(req.top_k, n), backend, dev)
            for key, req in requests.items() if req.top_k is not None}
    kept = {key: torch.zeros(rows[key].stop - rows[key].start, n, dtype=torch.float64)
            for key, req in requests.items() if req.keep_all}
    rank, world = comm.rank(), comm.world_size()
    mine = list(range(rank, store.layout.n_chunks, world))
    on_cpu = dev.type == "cpu"
    depth = depth or (cpu_workers() if on_cpu else 2)
    norms = any(req.normalize != "none" for req in requests.values())
    with comm.guarded("scoring the store"), \
            (single_threaded_ops() if on_cpu else nullcontext()):
        jobs = chunk_jobs(store, mine, store.layer_names)
        s, sq, done = None, None, 0
        for job, out in read_ahead(store, jobs, device=dev, depth=depth,
                                   then=(lambda j, r: _chunk_scores(mats, r, norms)) if on_cpu
                                   else None):
            part, part_sq = out if on_cpu else _chunk_scores(mats, out, norms)
            if s is None:
                s, sq = part, part_sq
            else:  # the layer groups of a chunk, in order
                s.add_(part)
                if norms:
                    sq.add_(part_sq)
            if not job.last:
                continue
            inv = inverse(sq.sqrt()) if norms else None  # [R]: 1 / ||g_i|| over all layers
            for key, req in requests.items():
                block = s[rows[key]]
                if req.normalize != "none":
                    block = block * inv
                if key in tops:
                    tops[key].update(block, job.start)
                if req.matrix_out is not None:
                    req.matrix_out[:, job.start: job.stop] = block.float().cpu().numpy()
                if key in kept:
                    kept[key][:, job.start: job.stop] = block.cpu()
            s, sq, done = None, None, done + 1
            if progress is not None:
                progress(done, len(mine))
    return _merge(requests, tops, kept)


def _chunk_scores(mats: Mapping[str, torch.Tensor], chunk: Mapping[str, torch.Tensor],
                  norms: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``sum_l Q_l @ G_l^T`` over the layers of one job: ``[Q, R]`` float64 (a float32 GEMM per
    layer), and with ``norms`` the rows' squared norms over these layers, ``[R]`` float64
    (float32 per layer: ~1e-7 relative, below the GEMMs' own rounding)."""
    s, sq = None, None
    for name, g in chunk.items():
        part = mats[name] @ g.T
        s = part.double() if s is None else s.add_(part)
        if norms:
            part_sq = torch.linalg.vector_norm(g, dim=1).double().square()
            sq = part_sq if sq is None else sq.add_(part_sq)
    return s, sq


def _merge(requests, tops, kept) -> dict[str, ScoreResult] | None:
    """Every rank's top-k lists to rank 0 and merged there; kept rows summed there."""
    local = {key: top.result() for key, top in tops.items()}
    gathered = comm.gather_object(local, dst=0)
    for key in kept:  # each rank filled only its own columns: the sum is the whole row
        kept[key] = comm.reduce(kept[key], dst=0)
    if comm.rank() != 0:
        return None
    out = {}
    for key in requests:
        res = ScoreResult()
        if key in tops:
            k = tops[key].k
            res.values, res.indices = merge_top_k([g[key] for g in gathered], k)
        if key in kept:
            res.scores = kept[key].numpy()
        out[key] = res
    return out


def stream_top_k(store: GradientStore, pre: Mapping[str, torch.Tensor], k: int, *,
                 matrix_out=None, normalize: str = "none", backend: str = "auto",
                 device: str | torch.device = "auto", depth: int | None = None,
                 progress: Progress | None = None):
    """Top-k training rows per query over the whole store: ``(values [Q, k], rows [Q, k])``
    (on rank 0; None elsewhere); optionally every score into ``matrix_out``."""
    res = score_store(store, {"q": ScoreRequest(pre, top_k=k, matrix_out=matrix_out,
                                                normalize=normalize)},
                      device=device, depth=depth, backend=backend, progress=progress)
    return None if res is None else (res["q"].values, res["q"].indices)


def self_influence(store: GradientStore, *, factors=None, normalize: str = "none",
                   device: str | torch.device = "auto", depth: int = 2,
                   progress: Progress | None = None) -> np.ndarray | None:
    """``s(i, i) = sum_l ||L_l^-1 g_il||^2 = sum_l g_il^T (F_l + lambda_l I)^-1 g_il`` for every
    row: ``[n]`` float64 on rank 0 (None elsewhere; a collective under torch.distributed).

    ``normalize="train-unit"``: ``s(i, i) / ||g_i||^2`` (the training row normalized on both
    sides; ``"cosine"`` is refused, see ``grass_llm.influence.normalize``). Layer by layer, so
    that one factor is in memory at a time; float64 throughout.
    """
    check_normalize(normalize, SELF_INFLUENCE_NORMALIZATIONS)
    store.require_complete()
    dev = resolve_device(device)
    fac = factors if factors is not None else load_factors(store)
    rank, world = comm.rank(), comm.world_size()
    mine = list(range(rank, store.layout.n_chunks, world))
    out = torch.zeros(2, store.n_examples, dtype=torch.float64, device=dev)  # s(i,i), ||g_i||^2
    jobs = [Job(c, *store.layout.chunk_range(c), (x.name,))
            for x in store.layout.layers for c in mine]
    with comm.guarded("computing self-influence"):
        L, current = None, None
        for done, (job, rows) in enumerate(read_ahead(store, jobs, device=dev,
                                                      dtype=torch.float64, depth=depth)):
            (name, g), = rows.items()
            if name != current:
                L, current = fac[name].to(dev), name
            z = torch.linalg.solve_triangular(L, g.T, upper=False)  # L^-1 g^T: [K, R]
            out[0, job.start: job.stop] += (z * z).sum(0)
            if normalize != "none":
                out[1, job.start: job.stop] += (g * g).sum(1)
            if progress is not None:
                progress(done + 1, len(jobs))
    out = comm.reduce(out, dst=0)  # each rank filled only its own rows
    if out is None:
        return None
    if normalize != "none":
        out[0] *= inverse(out[1])  # 1 / ||g_i||^2, 0 for a zero row
    return out[0].cpu().numpy()


def valuation(store: GradientStore, target_grads: Mapping[str, torch.Tensor], *, factors=None,
              normalize: str = "none", device: str | torch.device = "auto",
              depth: int | None = None, progress: Progress | None = None) -> np.ndarray | None:
    """``v_i = sum_q s(q, i)`` over the targets q, in one pass: ``[n]`` float64 on rank 0
    (None elsewhere; a collective under torch.distributed).

    ``none`` and ``train-unit``: the targets' summed gradient, preconditioned once (the score is
    linear in the query). ``cosine``: every target preconditioned and unit-normalized, then
    summed, so that each target weighs the same (``sum_q q~_q^T g_i / (||q~_q|| ||g_i||)``).
    """
    check_normalize(normalize)
    dev = resolve_device(device)
    fac = factors if factors is not None else load_factors(store)
    if normalize == "cosine":
        each = precondition(fac, {k: v.double() for k, v in target_grads.items()}, device=dev)
        each = scale_rows(each, inverse(row_norms(each)))
        pre = {k: v.sum(0, keepdim=True) for k, v in each.items()}
    else:
        summed = {k: v.double().sum(0, keepdim=True) for k, v in target_grads.items()}
        pre = precondition(fac, summed, device=dev)
    train = "none" if normalize == "none" else "train-unit"  # the query side is done above
    res = score_store(store, {"value": ScoreRequest(pre, keep_all=True, normalize=train)},
                      device=dev, depth=depth, progress=progress)
    return None if res is None else res["value"].scores[0]
