"""Gradient rows to and from a store's dtype (float16, bfloat16 as its uint16 bits, float32),
with the finiteness checks the writer applies. Plain functions of the storage dtype, used by
``GradientStore`` and ``verify``."""

from __future__ import annotations

import numpy as np
import torch

TORCH_DTYPE = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def encode_rows(dtype: str, data, shape, what: str) -> tuple[np.ndarray, np.ndarray]:
    """``(rows in the store dtype, [R] bool: the rows that hold a NaN/Inf or overflow it)``;
    ``what`` names the data in the shape error."""
    if isinstance(data, torch.Tensor) and data.dtype == TORCH_DTYPE[dtype]:
        return encode_staged(dtype, data, shape, what)
    x = to_numpy(data).astype(np.float32, copy=False)
    if x.shape != shape:
        raise ValueError(f"{what}: expected shape {list(shape)}, got {list(x.shape)}")
    bad = ~np.isfinite(x).all(axis=1)
    if dtype == "float32":
        return x.copy(), bad
    if dtype == "float16":
        with np.errstate(over="ignore"):
            y = x.astype(np.float16)
        return y, bad | ~np.isfinite(y).all(axis=1)  # overflow past 65504 counts too
    y = torch.from_numpy(np.ascontiguousarray(x)).to(torch.bfloat16)
    return y.view(torch.int16).numpy().view(np.uint16), bad


def encode_staged(dtype: str, t: torch.Tensor, shape, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Rows already in the store's dtype (the cache job stages them so): one contiguous host
    copy and a finiteness check, no round trip through float32.

    Both are numpy, not torch: the cache job calls this from its writer thread, and a torch op
    there gives that thread an OpenMP team of its own, which for as long as the thread lives
    slows every parallel op of the step loop (measured in ``tools/bench_capture.py --job``: the
    loop ran at 0.76 of the floor with torch here)."""
    if tuple(t.shape) != shape:
        raise ValueError(f"{what}: expected shape {list(shape)}, got {list(t.shape)}")
    t = t.detach().cpu()
    bits = t.view(torch.int16) if t.dtype == torch.bfloat16 else t  # numpy has no bf16
    rows = np.array(bits.numpy(), order="C")  # a copy: bad rows may be zeroed in place
    if dtype == "bfloat16":
        rows = rows.view(np.uint16)
    return rows, nonfinite_rows(rows, dtype)


def nonfinite_rows(rows: np.ndarray, dtype: str) -> np.ndarray:
    """``[R]`` bool: rows of a store-dtype array holding a NaN or an infinity (for the 16-bit
    types, every exponent bit set; ``rows`` of bfloat16 are its uint16 bits)."""
    if dtype == "float32":
        return ~np.isfinite(rows).all(axis=1)
    exponent = np.uint16(0x7C00 if dtype == "float16" else 0x7F80)
    return ((rows.view(np.uint16) & exponent) == exponent).any(axis=1)


def decode_rows(dtype: str, raw: np.ndarray) -> np.ndarray:
    """Stored rows as float32."""
    if dtype == "bfloat16":
        t = torch.from_numpy(raw.astype(np.uint16).view(np.int16)).view(torch.bfloat16)
        return t.float().numpy()
    return raw.astype(np.float32)


def to_numpy(x) -> np.ndarray:
    """A tensor (floating point as float32) or array-like as a host numpy array."""
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu", torch.float32 if x.is_floating_point() else x.dtype).numpy()
    return np.asarray(x)
