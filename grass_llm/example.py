"""A small end-to-end example of the compression core on real per-example gradients.

Model: a two-layer token classifier ``z_t = W2 tanh(W1 x_t)`` over sequences of T tokens. The
example compresses the gradient of the hidden Linear layer W1 (d_in -> d_out), the kind of layer
FactGraSS targets in a transformer (q/k/v/o, gate/up/down). Its per-example gradient is exactly
``G = sum_t delta_t x_t^T`` with ``delta_t = (W2^T (softmax(z_t) - onehot(y_t))) * tanh'``, so the
factorized compressors (FactGraSS, LoGra) work from (x, delta) without forming G, while the vector
compressors (GraSS, SJLT, FJLT, Gaussian, random mask) need G materialized. Each method is scored
on what attribution needs from it: how well compressed train-test inner products track the exact
ones (Pearson r), and how many of each test example's exact top-10 training examples it recovers.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from grass_llm.compress import build_compressor, derive_seed
from grass_llm.compress.base import FactorizedCompressor


@dataclass(frozen=True, kw_only=True)
class ExampleConfig:
    """Sizes of the example problem."""

    d_in: int = 512
    """Input features of the Linear layer."""
    d_out: int = 256
    """Output features of the Linear layer (the hidden width)."""
    classes: int = 32
    """Output classes of the second layer."""
    tokens: int = 16
    """Tokens per example."""
    n_train: int = 256
    """Training examples."""
    n_test: int = 16
    """Test (query) examples."""
    k: int = 1024
    """Compressed size for every method."""
    seed: int = 0
    """Seed for the data and for every compressor."""

    def __post_init__(self):
        for name in ("d_in", "d_out", "classes", "tokens", "n_train", "n_test", "k"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        side = int(round(self.k ** 0.5))
        if side * side != self.k:
            raise ValueError(f"k={self.k} must be a perfect square (LoGra uses sqrt(k) x sqrt(k))")
        if 2 * side > min(self.d_in, self.d_out) or self.k * 4 > self.d_in * self.d_out:
            raise ValueError(f"k={self.k} is too large for d_in={self.d_in}, d_out={self.d_out}")


@dataclass
class MethodResult:
    method: str
    spec: str
    materializes: bool
    pearson: float
    top10_recall: float
    us_per_example: float


def make_problem(cfg: ExampleConfig) -> dict[str, torch.Tensor]:
    """Clustered token features, a trained-looking W, and (x, delta) for train and test sets."""
    gen = torch.Generator().manual_seed(cfg.seed)
    n = cfg.n_train + cfg.n_test
    n_topics = 8
    topic_dirs = torch.randn(n_topics, cfg.d_in, generator=gen)
    topic = torch.randint(0, n_topics, (n,), generator=gen)
    x = (topic_dirs[topic][:, None, :]
         + 0.7 * torch.randn(n, cfg.tokens, cfg.d_in, generator=gen)) / cfg.d_in ** 0.5
    w1 = torch.randn(cfg.d_out, cfg.d_in, generator=gen)
    w2 = torch.randn(cfg.classes, cfg.d_out, generator=gen) / cfg.d_out ** 0.5
    a = torch.tanh(x @ w1.T)
    z = a @ w2.T
    y = z.argmax(-1)  # labels mostly follow the model ...
    flip = torch.rand(n, cfg.tokens, generator=gen) < 0.3  # ... with 30% noise
    y = torch.where(flip, torch.randint(0, cfg.classes, y.shape, generator=gen), y)
    dz = torch.softmax(z, -1) - torch.nn.functional.one_hot(y, cfg.classes).float()
    delta = (dz @ w2) * (1 - a * a)  # back through W2 and tanh: dLoss/d(W1 x)
    return {"x_train": x[: cfg.n_train], "d_train": delta[: cfg.n_train],
            "x_test": x[cfg.n_train:], "d_test": delta[cfg.n_train:]}


def _vec_grads(x_BTI: torch.Tensor, d_BTO: torch.Tensor) -> torch.Tensor:
    return torch.einsum("bto,bti->boi", d_BTO, x_BTI).reshape(x_BTI.shape[0], -1)


def method_specs(cfg: ExampleConfig) -> dict[str, str]:
    side = int(round(cfg.k ** 0.5))
    return {
        "FactGraSS": f"factgrass:k={cfg.k},k_in={2 * side},k_out={2 * side}",
        "LoGra": f"logra:k_in={side},k_out={side}",
        "GraSS": f"grass:k={cfg.k},k_prime={4 * cfg.k}",
        "SJLT": f"sjlt:k={cfg.k}",
        "FJLT": f"fjlt:k={cfg.k}",
        "Gaussian": f"gaussian:k={cfg.k}",
        "RandomMask": f"mask:k={cfg.k}",
    }


def run_example(cfg: ExampleConfig, progress=None) -> tuple[list[MethodResult], float]:
    """Run every method; returns the results and the time to materialize the exact gradients."""
    data = make_problem(cfg)
    t0 = time.perf_counter()
    g_train = _vec_grads(data["x_train"], data["d_train"])
    g_test = _vec_grads(data["x_test"], data["d_test"])
    t_materialize = (time.perf_counter() - t0) / (cfg.n_train + cfg.n_test)
    exact = g_test.double() @ g_train.double().T
    exact_top = exact.topk(10, dim=1).indices
    results = []
    for method, spec in method_specs(cfg).items():
        if progress is not None:
            progress(method)
        comp = build_compressor(spec, seed=derive_seed(cfg.seed, "example", method),
                                p=cfg.d_out * cfg.d_in, d_in=cfg.d_in, d_out=cfg.d_out)
        fact = isinstance(comp, FactorizedCompressor)
        t0 = time.perf_counter()
        if fact:
            c_train = comp(data["x_train"], data["d_train"])
            c_test = comp(data["x_test"], data["d_test"])
        else:
            c_train, c_test = comp(g_train), comp(g_test)
        per_ex = (time.perf_counter() - t0) / (cfg.n_train + cfg.n_test)
        if not fact:
            per_ex += t_materialize  # a vector method pays for forming G first
        approx = c_test.double() @ c_train.double().T
        pearson = float(torch.corrcoef(torch.stack([approx.flatten(), exact.flatten()]))[0, 1])
        top = approx.topk(10, dim=1).indices
        recall = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(top, exact_top))
        results.append(MethodResult(method, comp.spec, not fact, pearson,
                                    recall / (10 * cfg.n_test), per_ex * 1e6))
    return results, t_materialize * 1e6
