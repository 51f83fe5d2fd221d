"""Factorized compressors for Linear layers: FactGraSS and LoGra (DESIGN.md, contract).

Both compress ``G = sum_t delta_t x_t^T`` (``[O, I]``, I including the bias column) without
forming it:

- ``FactGraSS``: masks S_out (k_out of O) and S_in (k_in of I), ``M = sum_t delta_t[S_out]
  x_t[S_in]^T`` (``[KO, KI]``), then ``SJLT_k(vec(M))``. Because both masks are sorted, vec(M) is
  exactly ``vec(G)[S]`` for the sorted flat mask ``S = {i * I + j : i in S_out, j in S_in}``, so
  FactGraSS *is* GraSS with that mask, applied at O(T k') cost instead of O(T I O).
  The masks are random (from the seed), or learned ones read from a mask file (``mask=PATH``,
  written by ``grass-llm fit-mask``; see ``mask_file``): the file's indices for this layer
  replace the random draw, the SJLT stays seeded, and the canonical spec records the file's
  SHA-256 (``mask_sha256``) so a later rebuild can check it has the same file.
- ``LoGra``: ``M = sum_t (P_out delta_t)(P_in x_t)^T`` with Gaussian P's (entries N(0, 1/k_*)),
  i.e. ``vec(M) = (P_out kron P_in) vec(G)``; no second stage, k = k_in * k_out.
"""

from __future__ import annotations

import numpy as np
import torch

from grass_llm import kernels
from grass_llm.compress._hash import derive_seed, sample_indices
from grass_llm.compress.base import FactorizedCompressor, check_size, compute_dtype
from grass_llm.compress.dense import Gaussian
from grass_llm.compress.mask_file import read_mask_file
from grass_llm.compress.sparse import SJLT, _DeviceCache
from grass_llm.kernels.reference import gather_last as _gather_last


def _project_last(proj: Gaussian, t: torch.Tensor) -> torch.Tensor:
    """Apply a dense projection to the last dimension: ``[..., p] -> [..., k]``."""
    return proj.apply_unchecked(t.reshape(-1, t.shape[-1])).view(*t.shape[:-1], proj.k)


def _check_factor(name: str, value: int, limit_name: str, limit: int) -> int:
    check_size(name, value)
    if value > limit:
        raise ValueError(f"{name}={value} must be <= {limit_name}={limit}")
    return value


def _prepared(calls: dict, idx_in: _DeviceCache, idx_out: _DeviceCache, csr, scale: float,
              device: torch.device, I: int, O: int) -> kernels.FactGraSSCall:
    """The ``kernels.FactGraSSCall`` kept in ``calls`` per table pair, device and widths: its
    tables are checked once, not on every layer's every step."""
    key = (id(idx_in), id(idx_out), device, I, O)
    call = calls.get(key)
    if call is None:
        call = calls[key] = kernels.FactGraSSCall(idx_in.get(device), idx_out.get(device),
                                                  *csr.on(device), scale, I, O)
    return call


def _call(calls: dict, x: torch.Tensor, d: torch.Tensor, idx_in: _DeviceCache,
          idx_out: _DeviceCache, csr, scale: float, per_token: bool) -> torch.Tensor:
    """The fused kernel on ``[B, T, I]`` x and ``[B, T, O]`` delta (see ``_prepared``)."""
    call = _prepared(calls, idx_in, idx_out, csr, scale, x.device, x.shape[-1], d.shape[-1])
    return call(x, d, per_token)


class FactGraSS(FactorizedCompressor):
    """Factorized GraSS for one Linear layer: factor masks, outer-product sum, SJLT to k.

    Args (besides the layer sizes and the seed): ``k`` output size, ``k_in`` / ``k_out`` mask
    sizes, ``c`` SJLT nonzeros per column; ``mask`` a learned-mask file whose masks for
    ``layer`` replace the random ones; ``mask_sha256`` the file's expected SHA-256 (a recorded
    spec carries it: a different file is refused).
    """

    name = "factgrass"

    def __init__(self, d_in: int, d_out: int, k: int, k_in: int, k_out: int, c: int = 1,
                 seed: int = 0, bias: bool = False, mask: str | None = None,
                 mask_sha256: str | None = None, layer: str | None = None):
        self.d_in = check_size("d_in", d_in)
        self.d_out = check_size("d_out", d_out)
        self.bias = bool(bias)
        self.k = check_size("k", k)
        self.k_in = _check_factor("k_in", k_in, "d_in" + ("+1" if bias else ""), self.d_in_eff)
        self.k_out = _check_factor("k_out", k_out, "d_out", d_out)
        self.k_prime = k_in * k_out
        if k > self.k_prime:
            raise ValueError(f"k={k} must be <= k_in*k_out={self.k_prime}")
        self.c = c
        self.seed = seed
        key = derive_seed(seed, "factgrass")
        self.mask_sha256: str | None = None
        if mask is None:
            if mask_sha256 is not None:
                raise ValueError(f"the spec records a learned mask (mask_sha256="
                                 f"{str(mask_sha256)[:12]}...) but names no mask file: add "
                                 "mask=PATH with the file the store was built with")
            self.idx_in = sample_indices(self.d_in_eff, k_in, derive_seed(key, "in"))
            self.idx_out = sample_indices(d_out, k_out, derive_seed(key, "out"))
        else:
            self.idx_in, self.idx_out, self.mask_sha256 = self._learned(
                str(mask), mask_sha256, layer)
        self.sjlt = SJLT(self.k_prime, k, c, derive_seed(key, "sjlt"))
        self._in = _DeviceCache(self.idx_in)
        self._out = _DeviceCache(self.idx_out)
        self._all_in = _DeviceCache(np.arange(k_in, dtype=np.int64))
        self._all_out = _DeviceCache(np.arange(k_out, dtype=np.int64))
        self._calls: dict = {}

    def _learned(self, path: str, want_sha: str | None, layer: str | None):
        """This layer's masks from a mask file, checked against the file's hash and the
        layer's shape and the spec's sizes."""
        if layer is None:
            raise ValueError(f"mask={path} holds per-layer masks: the compressor needs its "
                             "layer's name (build_compressor(..., layer=NAME))")
        mf = read_mask_file(path)
        if want_sha is not None and mf.sha256 != str(want_sha):
            raise ValueError(f"mask file {path} has SHA-256 {mf.sha256[:12]}... but the spec "
                             f"records {str(want_sha)[:12]}...: it is not the file the maps "
                             "were built with")
        lm = mf.layer(layer)
        if (lm.d_in, lm.d_out, lm.bias) != (self.d_in, self.d_out, self.bias):
            raise ValueError(f"mask file {path}: layer {layer} was fitted as {lm.d_out} x "
                             f"{lm.d_in}{' + bias' if lm.bias else ''}, but the layer is "
                             f"{self.d_out} x {self.d_in}{' + bias' if self.bias else ''}")
        if (lm.k_in, lm.k_out) != (self.k_in, self.k_out):
            raise ValueError(f"mask file {path}: layer {layer} has k_in={lm.k_in}, "
                             f"k_out={lm.k_out} but the spec asks k_in={self.k_in}, "
                             f"k_out={self.k_out}; fit the mask with this spec's sizes")
        return (np.array(lm.idx_in, dtype=np.int64), np.array(lm.idx_out, dtype=np.int64),
                mf.sha256)

    def spec_params(self) -> dict[str, object]:
        params = {"k": self.k, "k_in": self.k_in, "k_out": self.k_out, "c": self.c}
        if self.mask_sha256 is not None:  # the map's identity is the file's content, not path
            params["mask_sha256"] = self.mask_sha256
        return params

    def mask_indices(self) -> np.ndarray:
        """The equivalent flat mask on row-major vec(G): sorted, ``k_in * k_out`` entries."""
        return (self.idx_out[:, None] * self.d_in_eff + self.idx_in[None, :]).reshape(-1)

    def _keeps_bias(self) -> bool:
        """Whether the mask keeps the bias column (index d_in; the mask is sorted, so it is the
        last entry when kept)."""
        return self.bias and int(self.idx_in[-1]) == self.d_in

    def input_features(self, x_BTI: torch.Tensor) -> torch.Tensor:
        # Gather in the input's own dtype, then upcast only the k_in kept columns.
        keep_bias = self._keeps_bias()
        n = self.k_in - int(keep_bias)
        if n == self.d_in:  # every column kept: no gather
            xs = x_BTI
        elif (xs := kernels.host_gather(x_BTI, self._in.get(x_BTI.device))) is not None:
            return xs  # the CPU extension: gathered, upcast and the bias column in one pass
        else:
            xs = _gather_last(x_BTI, self._in.get(x_BTI.device)[:n])
        xs = xs.to(compute_dtype(x_BTI))
        if keep_bias:
            xs = torch.cat([xs, xs.new_ones(*xs.shape[:-1], 1)], dim=-1)
        return xs

    def host_calls(self):
        """``(gather, reduce)``: ``input_features`` and ``reduce`` bound straight to the CPU
        extension (``kernels.host_calls``), for the capture's hooks; None where they do not
        apply (no extension; every input column kept, so there is nothing to gather)."""
        host = self._host()
        return kernels.host_calls(*host) if host else None

    def native_hook(self, name: str, fallback):
        """The capture's per-example hooks for this layer in C++ (``kernels.native_hook``), with
        ``fallback`` for the inputs they do not take; None where they do not apply (as
        ``host_calls``)."""
        host = self._host()
        return kernels.native_hook(name, *host, fallback) if host else None

    def _host(self):
        """``(idx_in, call)`` on the CPU for the direct paths, or None: every input column kept."""
        if self.k_in - int(self._keeps_bias()) == self.d_in:
            return None
        cpu = torch.device("cpu")
        call = _prepared(self._calls, self._all_in, self._out, self.sjlt.csr, self.sjlt.scale,
                         cpu, self.k_in, self.d_out)
        return self._in.get(cpu), call

    def output_features(self, delta_BTO: torch.Tensor) -> torch.Tensor:
        if self.k_out == self.d_out:
            return delta_BTO.to(compute_dtype(delta_BTO))
        out = _gather_last(delta_BTO, self._out.get(delta_BTO.device))
        return out.to(compute_dtype(delta_BTO))

    # The fused kernel (grass_llm.kernels.factgrass) does gather + outer-product sum + SJLT in
    # one call; the methods below feed it raw tensors or features, with identity indices for
    # what is already gathered.
    def _fused(self, x, d, idx_in, idx_out, per_token: bool) -> torch.Tensor:
        if x.shape[0] == 0:
            return x.new_zeros(*x.shape[:2 if per_token else 1], self.k,
                               dtype=compute_dtype(x))
        return _call(self._calls, x, d, idx_in, idx_out, self.sjlt.csr, self.sjlt.scale,
                     per_token)

    def __call__(self, x_BTI: torch.Tensor, delta_BTO: torch.Tensor) -> torch.Tensor:
        x, d = self._check(x_BTI, delta_BTO)
        return self._fused(x, d, self._in, self._out, False)

    def per_token(self, x_BTI: torch.Tensor, delta_BTO: torch.Tensor) -> torch.Tensor:
        x, d = self._check(x_BTI, delta_BTO)
        return self._fused(x, d, self._in, self._out, True)

    def reduce(self, xf_BTK: torch.Tensor, delta_BTO: torch.Tensor,
               per_token: bool = False) -> torch.Tensor:
        return self._fused(xf_BTK, delta_BTO, self._all_in, self._out, per_token)

    def combine(self, xf_BTK: torch.Tensor, df_BTK: torch.Tensor) -> torch.Tensor:
        return self._fused(xf_BTK, df_BTK, self._all_in, self._all_out, False)

    def combine_per_token(self, xf_BTK: torch.Tensor, df_BTK: torch.Tensor) -> torch.Tensor:
        return self._fused(xf_BTK, df_BTK, self._all_in, self._all_out, True)

    def dense_matrix(self) -> torch.Tensor:
        p = self.d_out * self.d_in_eff
        mask = torch.zeros(self.k_prime, p, dtype=torch.float64)
        mask[torch.arange(self.k_prime), torch.from_numpy(self.mask_indices())] = 1.0
        return self.sjlt.dense_matrix() @ mask


class LoGra(FactorizedCompressor):
    """LoGra: Gaussian projections of x and delta, outer-product sum; k = k_in * k_out."""

    name = "logra"

    def __init__(self, d_in: int, d_out: int, k_in: int, k_out: int, seed: int = 0,
                 bias: bool = False):
        self.d_in = check_size("d_in", d_in)
        self.d_out = check_size("d_out", d_out)
        self.bias = bool(bias)
        self.k_in = _check_factor("k_in", k_in, "d_in" + ("+1" if bias else ""), self.d_in_eff)
        self.k_out = _check_factor("k_out", k_out, "d_out", d_out)
        self.k = k_in * k_out
        self.seed = seed
        key = derive_seed(seed, "logra")
        self.proj_in = Gaussian(self.d_in_eff, k_in, derive_seed(key, "in"))
        self.proj_out = Gaussian(d_out, k_out, derive_seed(key, "out"))

    def spec_params(self) -> dict[str, object]:
        return {"k_in": self.k_in, "k_out": self.k_out}

    def input_features(self, x_BTI: torch.Tensor) -> torch.Tensor:
        return _project_last(self.proj_in, self.with_bias_column(x_BTI))

    def output_features(self, delta_BTO: torch.Tensor) -> torch.Tensor:
        return _project_last(self.proj_out, delta_BTO.to(compute_dtype(delta_BTO)))

    def combine(self, xf_BTK: torch.Tensor, df_BTK: torch.Tensor) -> torch.Tensor:
        return torch.bmm(df_BTK.transpose(1, 2), xf_BTK).reshape(xf_BTK.shape[0], self.k)

    def dense_matrix(self) -> torch.Tensor:
        return torch.kron(self.proj_out.dense_matrix(), self.proj_in.dense_matrix())
