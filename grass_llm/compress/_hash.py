"""Stable, counter-based randomness for every compressor.

Every random choice in grass_llm (mask coordinates, SJLT buckets and signs, Rademacher and Gaussian
entries, FJLT signs) is a pure function of an integer key and an integer counter, computed with
SplitMix64 in numpy's wrap-around ``uint64`` arithmetic. Nothing depends on a library's RNG stream,
on Python's ``hash()``, on the device or on the number of processes, so a map rebuilt later on
another machine or rank is bit-identical (integer-derived maps) or libm-rounding-identical
(Gaussian, which goes through ``log``/``cos``).

A CUDA kernel can evaluate the same hash per index without any table, which is why the scheme is
counter based rather than a sequential stream.
"""

from __future__ import annotations

import hashlib

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_TWO53 = float(2**53)


def derive_seed(seed: int, *names: str | int) -> int:
    """Derive a 64-bit key from a seed and a path of names (e.g. a layer name, "mask_in").

    Uses BLAKE2b, so the result is the same on every machine, Python version and process.

    Args:
        seed: the user's global seed (any int >= 0).
        *names: components that make the stream distinct (layer name, role, ...).

    Returns:
        An int in [0, 2**64).
    """
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    text = "/".join([str(int(seed))] + [str(n) for n in names])
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def _mix64(z: np.ndarray) -> np.ndarray:
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def hash64(key: int, counters: np.ndarray) -> np.ndarray:
    """SplitMix64 output number ``counters`` of the stream ``key``; uint64 array, same shape."""
    c = np.asarray(counters, dtype=np.uint64)
    with np.errstate(over="ignore"):
        return _mix64(np.uint64(key) + (c + np.uint64(1)) * _GOLDEN)


def uniform_index(key: int, counters: np.ndarray, n: int) -> np.ndarray:
    """Integers in [0, n) from the top 53 bits of the hash (exact in float64 for n < 2**53)."""
    top = (hash64(key, counters) >> np.uint64(11)).astype(np.float64)
    out = np.floor(top * (n / _TWO53)).astype(np.int64)
    return np.minimum(out, n - 1)  # guards the float rounding at the very top of the range


def random_signs(key: int, counters: np.ndarray) -> np.ndarray:
    """+1.0 / -1.0 (float64) from the lowest bit of the hash."""
    bit = (hash64(key, counters) & np.uint64(1)).astype(np.float64)
    return 1.0 - 2.0 * bit


def standard_normal(key: int, counters: np.ndarray) -> np.ndarray:
    """N(0, 1) samples by Box-Muller, entry i from hashes 2i and 2i+1 (float64)."""
    c = np.asarray(counters, dtype=np.uint64)
    with np.errstate(over="ignore"):
        h1 = hash64(key, c * np.uint64(2))
        h2 = hash64(key, c * np.uint64(2) + np.uint64(1))
    u1 = ((h1 >> np.uint64(11)).astype(np.float64) + 1.0) / _TWO53  # (0, 1]: log is finite
    u2 = (h2 >> np.uint64(11)).astype(np.float64) / _TWO53
    return np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)


def sample_indices(p: int, k: int, key: int) -> np.ndarray:
    """k distinct indices of range(p), sorted ascending, as int64.

    Sparse regime (k <= p/4): the first k distinct values of the stream ``uniform_index(key, 0..)``
    — O(k log k), independent of p, so masks of huge vectors stay cheap. Dense regime: the k
    smallest hash keys of 0..p-1 (a seeded partial permutation), which avoids coupon-collector
    slowdowns when k is close to p. Either way the result is a pure function of (p, k, key).
    """
    if k > p:
        raise ValueError(f"cannot sample k={k} distinct indices from p={p}")
    if k == 0:
        return np.zeros(0, dtype=np.int64)
    if 4 * k <= p:
        chosen = np.zeros(0, dtype=np.int64)
        start = 0
        while chosen.size < k:
            n_new = 2 * (k - chosen.size) + 64
            cand = uniform_index(key, np.arange(start, start + n_new, dtype=np.uint64), p)
            start += n_new
            merged = np.concatenate([chosen, cand])
            _, first = np.unique(merged, return_index=True)
            chosen = merged[np.sort(first)]  # first occurrences, in stream order
        return np.sort(chosen[:k])
    keys = hash64(key, np.arange(p, dtype=np.uint64))
    order = np.argsort(keys, kind="stable")
    return np.sort(order[:k]).astype(np.int64)
