"""Linear datamodeling score (LDS) of the product's compressors on a tiny trained Llama.

Recipe (the GraSS paper's, after TRAK):

1. train a model on the full synthetic training set (``corpus.py``, ``train.py``);
2. retrain M models from the same initialization on random subsets holding ``fraction`` of the
   training examples, and record each one's loss on every held-out query, ``L[m, q]``;
3. per method, attribute with the full model: compressed per-example gradients from the
   product's ``GradientCapture`` hooks and compressors, one damped Fisher per layer exactly as
   ``grass_llm.influence.fisher.compute_fisher`` defines it, and the product's ``precondition``:
   ``s(q, i) = sum_l g_ql^T (F_l + lambda_l I)^-1 g_il``;
4. predicted effect of subset m on query q: ``sum_{i in S_m} s(q, i)``; per query, Spearman's
   rank correlation over the M subsets between that prediction and ``-L[m, q]`` (a positive
   score means "training on i lowers q's loss", so higher LDS is better); LDS = the mean over
   queries, with the standard error over queries.

Shapes: N training examples, Q queries, M subset models, K a layer's compressed size.
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from grass_llm.capture import GradientCapture, select_layers
from grass_llm.compress import derive_seed
from grass_llm.evaluation.corpus import Corpus, CorpusConfig, make_corpus
from grass_llm.evaluation.selective import calibration_batches, fit_masks
from grass_llm.evaluation.train import TrainConfig, example_losses, train
from grass_llm.influence.fisher import DAMPING_MODES, precondition

METHODS = ("exact", "factgrass", "factgrass_sm", "logra", "grass", "sjlt", "mask", "gaussian")
#: FactGraSS / GraSS blow-up k'/k, the paper's setting (REFERENCE.md: 128x128 -> 4096)
BLOWUP = 4


@dataclass
class LayerPlan:
    """The spec one group of same-shaped layers gets for a (method, k), and why it differs
    from the request (clipping to the layer's sizes), if it does."""

    spec: str
    k: int
    layers: list[str]
    shape: tuple[int, int]
    note: str | None = None


def layer_spec(method: str, k: int, d_out: int, d_in: int) -> tuple[str, int, str | None]:
    """The compressor spec of ``method`` at ``k`` numbers for a ``d_out x d_in`` layer.

    Sizes that exceed the layer are clipped (never silently: the third element says how).
    FactGraSS masks ``2 sqrt(k)`` rows and columns (blow-up 4), LoGra projects to
    ``sqrt(k) x sqrt(k)``, GraSS masks ``4 k`` coordinates.

    Returns:
        ``(spec, compressed size, note or None)``.
    """
    p = d_out * d_in
    if method == "exact":
        return "identity", p, None
    if method in ("factgrass", "factgrass_sm", "logra"):
        side = math.isqrt(k)
        if side * side != k:
            raise ValueError(f"{method} needs k to be a perfect square (k_in = k_out), got {k}")
        want = side if method == "logra" else BLOWUP // 2 * side
        k_in, k_out = min(want, d_in), min(want, d_out)
        if method == "logra":
            kk = k_in * k_out
            note = None if kk == k else f"logra {want}x{want} clipped to {k_out}x{k_in} (k={kk})"
            return f"logra:k_in={k_in},k_out={k_out}", kk, note
        kk = min(k, k_in * k_out)
        note = (None if (k_in, k_out) == (want, want) else
                f"factgrass mask {want}x{want} clipped to {k_out}x{k_in} "
                f"(blow-up {k_in * k_out / kk:g}{', k=' + str(kk) if kk != k else ''})")
        return f"factgrass:k={kk},k_in={k_in},k_out={k_out}", kk, note
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {list(METHODS)}")
    kk = min(k, p)
    note = None if kk == k else f"k={k} > p={p}: clipped to k=p"
    if method == "grass":
        kp = min(BLOWUP * kk, p)
        if kp != BLOWUP * kk:
            note = ((note + "; ") if note else "") + f"k'={BLOWUP * kk} clipped to p={p}"
        return f"grass:k={kk},k_prime={kp}", kk, note
    if kk == p and note is None:
        note = f"k = p = {p}" + (": the mask keeps every coordinate (exact)"
                                 if method == "mask" else "")
    return f"{method}:k={kk}", kk, note


def check_methods(methods: Sequence[str], ks: Sequence[int]) -> None:
    """Raise ValueError, before any training, for unknown methods or k they cannot take."""
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise ValueError(f"unknown method(s) {bad or 'none given'}; choose from "
                         f"{list(METHODS)}")
    if not ks or min(ks) < 1:
        raise ValueError(f"k values must be positive integers, got {list(ks)}")
    for m in set(methods) & {"factgrass", "factgrass_sm", "logra"}:
        odd = [k for k in ks if math.isqrt(k) ** 2 != k]
        if odd:
            raise ValueError(f"{m} needs every k to be a perfect square (k_in = k_out), got "
                             f"{odd}")


def plan_layers(model: torch.nn.Module, method: str, k: int) -> list[LayerPlan]:
    """Group the decoder's Linear layers by shape and give each group its spec."""
    groups: dict[tuple[int, int], list[str]] = {}
    for name, mod in select_layers(model).items():  # the capture's default selection
        if mod.bias is not None:
            raise ValueError(f"layer {name} has a bias; the LDS tool assumes bias-free Linear "
                             "layers (Llama)")
        groups.setdefault((mod.out_features, mod.in_features), []).append(name)
    plans = []
    for shape, names in groups.items():
        spec, kk, note = layer_spec(method, k, *shape)
        plans.append(LayerPlan(spec, kk, names, shape, note))
    return plans


def capture_grads(model: torch.nn.Module, plans: list[LayerPlan], batch: tuple[torch.Tensor, ...],
                  *, seed: int, batch_size: int) -> dict[str, torch.Tensor]:
    """``{layer: [N, K]}`` compressed per-example gradients through the product's hooks."""
    ids, mask, labels = batch
    out: dict[str, list[torch.Tensor]] = {}
    for plan in plans:
        with GradientCapture(model, plan.spec, layers=plan.layers, seed=seed) as cap:
            for a in range(0, ids.shape[0], batch_size):
                sl = slice(a, a + batch_size)
                for name, g in cap(ids[sl], mask[sl], labels[sl]).grads.items():
                    out.setdefault(name, []).append(g)
    return {name: torch.cat(v) for name, v in out.items()}


def damped_factor(g_NK: torch.Tensor, damping: float = 0.1,
                  mode: str = "relative") -> torch.Tensor:
    """Lower Cholesky factor of ``F + lambda I``, ``F = g^T g / N`` (float64), with
    ``lambda = damping * tr(F) / K`` (relative) or ``damping`` (absolute): the definition of
    ``grass_llm.influence.fisher.compute_fisher``, on in-memory rows instead of a store."""
    if mode not in DAMPING_MODES:
        raise ValueError(f"damping mode must be one of {DAMPING_MODES}, got {mode!r}")
    g = g_NK.double()
    fisher = g.T @ g / g.shape[0]
    lam = damping * float(torch.trace(fisher)) / g.shape[1] if mode == "relative" else damping
    if not lam > 0:
        raise ValueError(f"damping is {lam} (all-zero gradients?)")
    return torch.linalg.cholesky(fisher + lam * torch.eye(g.shape[1], dtype=torch.float64))


def influence_scores(train_grads: dict[str, torch.Tensor], query_grads: dict[str, torch.Tensor],
                     *, damping: float = 0.1, mode: str = "relative") -> torch.Tensor:
    """``[Q, N]`` ``sum_l g_ql^T (F_l + lambda_l I)^-1 g_il`` with a per-layer Fisher of the
    training rows, preconditioned by the product's ``precondition``."""
    scores = None
    for name, g_NK in train_grads.items():
        factor = {name: damped_factor(g_NK, damping, mode)}
        part = precondition(factor, {name: query_grads[name]})[name] @ g_NK.double().T
        scores = part if scores is None else scores + part
    return scores


def subset_masks(n_subsets: int, n: int, fraction: float, seed: int) -> torch.Tensor:
    """``[M, N]`` bool: each row holds exactly ``round(fraction * N)`` random examples."""
    if not 0 < fraction < 1:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    size = round(fraction * n)
    if not 0 < size < n:
        raise ValueError(f"fraction={fraction} of {n} examples leaves an empty or full subset")
    gen = torch.Generator().manual_seed(seed)
    masks = torch.zeros(n_subsets, n, dtype=torch.bool)
    for m in range(n_subsets):
        masks[m, torch.randperm(n, generator=gen)[:size]] = True
    return masks


def _ranks(x_QM: torch.Tensor) -> torch.Tensor:
    """Ranks along the last dim, ties sharing their average rank (as scipy's spearmanr)."""
    ranks = torch.empty_like(x_QM, dtype=torch.float64)
    for q in range(x_QM.shape[0]):
        order = x_QM[q].argsort(stable=True)
        _, inv, counts = torch.unique_consecutive(x_QM[q, order], return_inverse=True,
                                                  return_counts=True)
        start = torch.cumsum(counts, 0) - counts
        ranks[q, order] = (start + (counts - 1) / 2.0)[inv].double()
    return ranks


def spearman(a_QM: torch.Tensor, b_QM: torch.Tensor) -> torch.Tensor:
    """``[Q]`` Spearman correlation of each row pair; NaN where a row is constant."""
    ra, rb = _ranks(a_QM.double()), _ranks(b_QM.double())
    ra, rb = ra - ra.mean(-1, keepdim=True), rb - rb.mean(-1, keepdim=True)
    denom = ra.norm(dim=-1) * rb.norm(dim=-1)
    return torch.where(denom > 0, (ra * rb).sum(-1) / denom.clamp_min(1e-300),
                       torch.full_like(denom, float("nan")))


@dataclass
class Score:
    """LDS of one attribution: the mean over queries and its standard error."""

    lds: float
    se: float
    n_valid: int
    per_query: list[float | None] = field(repr=False)
    """Each query's correlation (None where undefined)."""


def lds(scores_QN: torch.Tensor, masks_MN: torch.Tensor, losses_MQ: torch.Tensor) -> Score:
    """LDS of ``scores`` against the retrained models' query losses (see the module doc)."""
    if scores_QN.shape != (losses_MQ.shape[1], masks_MN.shape[1]):
        raise ValueError(f"scores {list(scores_QN.shape)} must be [Q={losses_MQ.shape[1]}, "
                         f"N={masks_MN.shape[1]}]")
    predicted_QM = scores_QN.double() @ masks_MN.double().T
    rho = spearman(predicted_QM, -losses_MQ.T.double())
    ok = rho[~rho.isnan()]
    if ok.numel() == 0:
        raise ValueError("every query's correlation is undefined (constant predictions?)")
    se = float(ok.std() / math.sqrt(ok.numel())) if ok.numel() > 1 else float("nan")
    return Score(float(ok.mean()), se, int(ok.numel()),
                 [None if math.isnan(r) else round(float(r), 6) for r in rho])


def fact_match_scores(corpus: Corpus) -> torch.Tensor:
    """``[Q, N]`` 1 where the training example states the query's fact: a gradient-free
    reference for how much of the signal is plain "did the model see this fact"."""
    return torch.tensor([[float(f in facts) for facts in corpus.train_facts]
                         for f in corpus.query_facts], dtype=torch.float64)


def random_scores(q: int, n: int, seed: int) -> torch.Tensor:
    """``[Q, N]`` i.i.d. normal scores: the LDS of no attribution at all (expect ~0)."""
    return torch.randn(q, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def paired_difference(a: Score, b: Score) -> tuple[float, float]:
    """Mean and standard error of ``a - b`` per query (same queries): tighter than comparing
    the two LDS values, because both share each query's difficulty."""
    nan = float("nan")
    d = (torch.tensor([nan if x is None else x for x in a.per_query])
         - torch.tensor([nan if x is None else x for x in b.per_query]))
    d = d[~d.isnan()]
    return float(d.mean()), float(d.std() / math.sqrt(d.numel()))


# ----------------------------------------------------------------------------- the whole run
Track = Callable[[Iterable, str], Iterable]


def _no_track(it: Iterable, desc: str) -> Iterable:
    return it


@dataclass(kw_only=True)
class LDSConfig:
    """One LDS evaluation: corpus, training recipe, subsets and influence settings."""

    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    """The generated corpus."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Model sizes and training recipe (full model and every subset model)."""
    n_subsets: int = 32
    """M, retrained models on random subsets."""
    fraction: float = 0.5
    """Share of the training set in each subset."""
    subset_seed: int = 1
    """Seed of the subsets; subset model m shuffles its batches with seed ``subset_seed + m``
    (the full model with seed 0)."""
    damping: float = 0.1
    """Relative Fisher damping, ``lambda_l = damping * tr(F_l) / k_l`` (the product default)."""
    capture_seed: int = 0
    """Global seed of the compressors (per layer through ``derive_seed``)."""
    capture_batch: int = 64
    """Examples per capture step."""
    max_exact: int = 8192
    """Largest layer (d_out * d_in) the exact method handles: its Fisher is p x p float64."""
    mask_train: int = 128
    """factgrass_sm: training examples on the train side of the mask calibration."""
    mask_targets: int = 64
    """factgrass_sm: other training examples, in query form, on its target side (the
    evaluation queries are never used)."""
    mask_steps: int = 300
    """factgrass_sm: Adam steps of each layer's mask fit (``grass-llm fit-mask``'s default)."""
    mask_lr: float = 0.01
    """factgrass_sm: the fit's learning rate (fit-mask's default)."""
    mask_l1: float = 0.01
    """factgrass_sm: the fit's sparsity penalty (fit-mask's default)."""

    def __post_init__(self):
        if self.n_subsets < 3:
            raise ValueError(f"n_subsets must be >= 3 for a rank correlation, got "
                             f"{self.n_subsets}")
        if not 0 < self.fraction < 1:
            raise ValueError(f"fraction must be in (0, 1), got {self.fraction}")
        if not self.damping > 0:
            raise ValueError(f"damping must be > 0, got {self.damping}")
        if self.capture_batch < 1:
            raise ValueError(f"capture_batch must be >= 1, got {self.capture_batch}")
        if self.mask_train < 3 or self.mask_targets < 1 or self.mask_steps < 0:
            raise ValueError(f"mask_train must be >= 3, mask_targets >= 1 and mask_steps >= 0, "
                             f"got {self.mask_train}, {self.mask_targets}, {self.mask_steps}")


@dataclass
class Retrained:
    """The full model and the subset models' ground truth."""

    model: torch.nn.Module
    masks_MN: torch.Tensor
    losses_MQ: torch.Tensor
    full_query_loss: float


def retrain(cfg: LDSConfig, corpus: Corpus, track: Track = _no_track) -> Retrained:
    """Train the full model and the M subset models; record the subset models' query losses."""
    tb, qb = corpus.train_batch(), corpus.query_batch()
    full = train(cfg.train, tb, None, len(corpus.vocab), seed=0)
    masks = subset_masks(cfg.n_subsets, len(corpus.train), cfg.fraction, cfg.subset_seed)
    losses = []
    for m in track(range(cfg.n_subsets), "retraining on subsets"):
        sub = train(cfg.train, tb, masks[m], len(corpus.vocab), seed=cfg.subset_seed + m)
        losses.append(example_losses(sub, qb))
    return Retrained(full, masks, torch.stack(losses),
                     float(example_losses(full, qb).mean()))


def evaluate_method(cfg: LDSConfig, corpus: Corpus, ret: Retrained, method: str,
                    k: int | None) -> dict:
    """One row of the results: specs per layer shape, LDS, standard error, seconds."""
    t0 = time.perf_counter()
    plans = plan_layers(ret.model, method, k or 0)
    row = {"method": method, "k": k,
           "layers": [{"shape": list(pl.shape), "n_layers": len(pl.layers), "spec": pl.spec,
                       "k": pl.k, "note": pl.note} for pl in plans],
           "total_k": sum(pl.k * len(pl.layers) for pl in plans)}
    too_big = [pl.shape for pl in plans if method == "exact" and pl.k > cfg.max_exact]
    if too_big:
        row["skipped"] = (f"exact gradients of {too_big} exceed max_exact={cfg.max_exact} "
                          "numbers per layer (a p x p float64 Fisher)")
        return row
    kw = {"seed": cfg.capture_seed, "batch_size": cfg.capture_batch}
    with tempfile.TemporaryDirectory() as tmp:
        if method == "factgrass_sm":  # fit the masks; the plans then name the mask file
            exact = plan_layers(ret.model, "exact", 0)
            cal = calibration_batches(corpus, cfg.mask_train, cfg.mask_targets,
                                      derive_seed(cfg.subset_seed, "mask") % 2**63)
            row["mask"] = fit_masks(plans, *(capture_grads(ret.model, exact, b, **kw)
                                             for b in cal), cfg, Path(tmp) / "mask.safetensors")
        g_train = capture_grads(ret.model, plans, corpus.train_batch(), **kw)
        g_query = capture_grads(ret.model, plans, corpus.query_batch(), **kw)
    score = lds(influence_scores(g_train, g_query, damping=cfg.damping), ret.masks_MN,
                ret.losses_MQ)
    row.update(lds=score.lds, se=score.se, n_valid=score.n_valid, per_query=score.per_query,
               seconds=time.perf_counter() - t0)
    return row


def run(cfg: LDSConfig, methods: Sequence[str], ks: Sequence[int],
        track: Track = _no_track) -> dict:
    """The whole evaluation: retraining, every (method, k), and the two references.

    Returns:
        A JSON-serializable report: ``rows`` (one per method and k; ``exact`` once, k=None),
        ``references`` (random scores, fact match) and ``ground_truth`` statistics.
    """
    check_methods(methods, ks)
    corpus = make_corpus(cfg.corpus)
    t0 = time.perf_counter()
    ret = retrain(cfg, corpus, track)
    t_train = time.perf_counter() - t0
    jobs = [(m, None) if m == "exact" else (m, k) for m in methods
            for k in ([None] if m == "exact" else ks)]
    rows = [evaluate_method(cfg, corpus, ret, m, k)
            for m, k in track(jobs, "attributing (method, k)")]
    n_q, n = ret.losses_MQ.shape[1], len(corpus.train)
    refs = {"random": lds(random_scores(n_q, n, cfg.subset_seed), ret.masks_MN, ret.losses_MQ),
            "fact_match": lds(fact_match_scores(corpus), ret.masks_MN, ret.losses_MQ)}
    return {"rows": rows, "references": {k: vars(v) for k, v in refs.items()},
            "ground_truth": {"n_train": n, "n_queries": n_q, "vocab": len(corpus.vocab),
                             "n_params": sum(p.numel() for p in ret.model.parameters()),
                             "full_model_query_loss": ret.full_query_loss,
                             "subset_query_loss": float(ret.losses_MQ.mean()),
                             "subset_query_loss_std_over_subsets":
                                 float(ret.losses_MQ.std(0).mean()),
                             "train_seconds": t_train}}
