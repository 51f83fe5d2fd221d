"""The identity "compressor": exact gradients, for small models and as a quality ceiling."""

from __future__ import annotations

import torch

from grass_llm.compress.base import VectorCompressor, check_size


class Identity(VectorCompressor):
    """``g -> g`` (k = p)."""

    name = "identity"

    def __init__(self, p: int, seed: int = 0):
        self.p = self.k = check_size("p", p)
        self.seed = seed

    def apply_unchecked(self, g_BP: torch.Tensor) -> torch.Tensor:
        return g_BP

    def dense_matrix(self) -> torch.Tensor:
        return torch.eye(self.p, dtype=torch.float64)
