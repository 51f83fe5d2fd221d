"""Base classes and input checks shared by every compressor.

Shape legend used in this package: B = batch (examples), T = tokens, P = input dimension of a
vector compressor, K = output dimension, I = d_in of a Linear layer (plus one with bias),
O = d_out, KI/KO = factor sizes.

Precision contract: float16/bfloat16/float32 inputs are computed and returned in float32;
float64 inputs stay float64 (the exact-reference tests run in float64).
"""

from __future__ import annotations

import abc

import torch

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_size(name: str, value: int, *, minimum: int = 1) -> int:
    """Validate a size argument; returns it as int or raises ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_sizes(p: int, k: int) -> tuple[int, int]:
    """Validate a vector compressor's ``p`` and ``k`` (both >= 1, k <= p)."""
    check_size("p", p)
    check_size("k", k)
    if k > p:
        raise ValueError(f"k={k} must be <= p={p}")
    return p, k


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """float64 stays float64; every other float dtype accumulates in float32."""
    if t.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"expected a floating-point tensor, got dtype {t.dtype}")
    return torch.float64 if t.dtype == torch.float64 else torch.float32


class Compressor(abc.ABC):
    """Common part: an output size, a seed and a canonical spec string."""

    #: registry name; set by ``register_compressor``
    name: str = ""
    k: int
    seed: int

    def spec_params(self) -> dict[str, object]:
        """The parameters (besides the seed and the layer sizes) that rebuild this compressor."""
        return {}

    @property
    def spec(self) -> str:
        """Canonical spec string, e.g. ``"grass:c=1,k=64,k_prime=256"``; see ``registry``."""
        params = self.spec_params()
        body = ",".join(f"{key}={_fmt(params[key])}" for key in sorted(params))
        return f"{self.name}:{body}" if body else self.name

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec!r}, seed={self.seed})"


def _fmt(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


class VectorCompressor(Compressor):
    """A linear map R^P -> R^K applied row-wise to a batch of materialized gradients."""

    kind = "vector"
    p: int

    def __call__(self, g_BP: torch.Tensor) -> torch.Tensor:
        """Compress a batch of vectors: ``[B, P] -> [B, K]``."""
        return self.apply_unchecked(self._check(g_BP))

    @abc.abstractmethod
    def apply_unchecked(self, g_BP: torch.Tensor) -> torch.Tensor:
        """``__call__`` without input checks: g is ``[B, P]`` already in the compute dtype."""

    @abc.abstractmethod
    def dense_matrix(self) -> torch.Tensor:
        """The equivalent ``[K, P]`` float64 matrix: ``self(g) == g @ dense_matrix().T``."""

    def _check(self, g_BP: torch.Tensor) -> torch.Tensor:
        if not isinstance(g_BP, torch.Tensor):
            raise ValueError(f"g must be a torch.Tensor, got {type(g_BP).__name__}")
        if g_BP.dim() != 2 or g_BP.shape[1] != self.p:
            raise ValueError(f"g must have shape [B, {self.p}], got {list(g_BP.shape)}")
        return g_BP.to(compute_dtype(g_BP))


def reduce_unfused(op, xf_BTK: torch.Tensor, delta_BTO: torch.Tensor,
                   per_token: bool) -> torch.Tensor:
    """``combine`` (or ``combine_per_token``) of ``op.output_features(delta)``: the backward
    half for maps with no fused kernel (factorized compressors and their shard views)."""
    df = op.output_features(delta_BTO)
    return op.combine_per_token(xf_BTK, df) if per_token else op.combine(xf_BTK, df)


class FactorizedCompressor(Compressor):
    """Compresses the per-example gradient ``G = sum_t delta_t x_t^T`` of a Linear layer.

    ``G`` has the layout of ``W.grad`` (``[d_out, d_in]``, plus a last column for the bias when
    ``bias=True``) and is never formed; ``dense_matrix()`` acts on its row-major ``vec``.
    """

    kind = "factorized"
    d_in: int
    d_out: int
    bias: bool

    @property
    def d_in_eff(self) -> int:
        """Columns of G: d_in, plus one for the bias (a constant 1 appended to x)."""
        return self.d_in + int(self.bias)

    def __call__(self, x_BTI: torch.Tensor, delta_BTO: torch.Tensor) -> torch.Tensor:
        """Compressed per-example gradients ``[B, K]`` from layer inputs and output gradients.

        Args:
            x_BTI: layer inputs ``[B, T, d_in]`` (or ``[B, d_in]`` for T = 1).
            delta_BTO: gradients of the loss w.r.t. the layer outputs ``[B, T, d_out]``
                (or ``[B, d_out]``).
        """
        x, d = self._check(x_BTI, delta_BTO)
        return self.combine(self.input_features(x), self.output_features(d))

    def per_token(self, x_BTI: torch.Tensor, delta_BTO: torch.Tensor) -> torch.Tensor:
        """Compressed gradient of each token's own term ``delta_t x_t^T``: ``[B, T, K]``.

        Summing over T gives ``self(x, delta)`` (both maps are linear in the outer products).
        """
        x, d = self._check(x_BTI, delta_BTO)
        return self.combine_per_token(self.input_features(x), self.output_features(d))

    # The three stages below are what gradient-capture hooks use: the forward hook keeps only
    # ``input_features(x)`` (k_in columns, never the full activation) and the backward side
    # reduces delta as soon as it exists. They take raw layer tensors in any float dtype (shape
    # already checked) and return features in the compute dtype.

    @abc.abstractmethod
    def input_features(self, x_BTI: torch.Tensor) -> torch.Tensor:
        """Raw layer input ``[B, T, d_in]`` (no bias column) -> ``[B, T, KI]``."""

    @abc.abstractmethod
    def output_features(self, delta_BTO: torch.Tensor) -> torch.Tensor:
        """Raw output gradient ``[B, T, d_out]`` -> ``[B, T, KO]``."""

    @abc.abstractmethod
    def combine(self, xf_BTK: torch.Tensor, df_BTK: torch.Tensor) -> torch.Tensor:
        """``sum_t df_t xf_t^T`` reduced to the output: ``[B, K]``."""

    def reduce(self, xf_BTK: torch.Tensor, delta_BTO: torch.Tensor,
               per_token: bool = False) -> torch.Tensor:
        """The backward half in one call: stored input features and the raw output gradient
        -> ``[B, K]`` (or ``[B, T, K]`` with ``per_token``). Subclasses with a fused kernel
        override this to skip materializing ``output_features``."""
        return reduce_unfused(self, xf_BTK, delta_BTO, per_token)

    def combine_per_token(self, xf_BTK: torch.Tensor, df_BTK: torch.Tensor) -> torch.Tensor:
        """Like ``combine`` but one row per token: ``[B, T, K]``."""
        B, T = xf_BTK.shape[:2]
        out = self.combine(xf_BTK.reshape(B * T, 1, -1), df_BTK.reshape(B * T, 1, -1))
        return out.reshape(B, T, self.k)

    def with_bias_column(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` in the compute dtype, with the constant-1 bias column appended if ``bias``."""
        x = x.to(compute_dtype(x))
        if self.bias:
            x = torch.cat([x, x.new_ones(*x.shape[:-1], 1)], dim=-1)
        return x

    @abc.abstractmethod
    def dense_matrix(self) -> torch.Tensor:
        """The equivalent ``[K, d_out * d_in_eff]`` float64 matrix acting on row-major vec(G)."""

    def _check(self, x: torch.Tensor, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        for name, t in (("x", x), ("delta", d)):
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if t.dim() not in (2, 3):
                raise ValueError(f"{name} must be [B, T, d] or [B, d], got {list(t.shape)}")
        if x.dim() != d.dim():
            raise ValueError(f"x and delta must both be 2-D or both 3-D, got "
                             f"{list(x.shape)} and {list(d.shape)}")
        if x.dim() == 2:
            x, d = x.unsqueeze(1), d.unsqueeze(1)
        if x.shape[-1] != self.d_in:
            raise ValueError(f"x has last dimension {x.shape[-1]}, expected d_in={self.d_in}")
        if d.shape[-1] != self.d_out:
            raise ValueError(f"delta has last dimension {d.shape[-1]}, "
                             f"expected d_out={self.d_out}")
        if x.shape[:2] != d.shape[:2]:
            raise ValueError(f"x and delta disagree on [B, T]: {list(x.shape[:2])} vs "
                             f"{list(d.shape[:2])}")
        if torch.float64 in (x.dtype, d.dtype):  # one float64 input makes it all float64
            x, d = x.to(torch.float64), d.to(torch.float64)
        return x, d
