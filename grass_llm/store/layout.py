"""The layout of a gradient store: which arrays exist, their shapes, chunks and dtypes.

A store is one Zarr v3 group (docs/store-format.md):

    grads/<layer>      [n_examples, k_layer]   storage dtype, chunks (chunk_rows, k_layer)
    example_id         [n_examples]            str, the dataset's ids (or the row index)
    n_targets          [n_examples]            int32, target tokens per example
    loss               [n_examples]            float32, each example's loss
    row_flags          [n_examples]            uint8, bit 0: the row had NaN/Inf
    chunk_done         [n_chunks]              uint8, 1 once a row chunk is complete; one
                                               chunk (file) per element, so writers never
                                               share one
    token mode only:
    tokens/<layer>     [n_token_rows, k_layer] per-token rows, chunks (token_chunk_rows, k)
    token_offsets      [n_examples + 1]        int64, example i has token rows
                                               offsets[i]:offsets[i+1] (logical numbering)
    token_chunk_base   [n_chunks]              int64, storage row of row chunk c's first token
                                               row; logical row r of chunk c is stored at
                                               token_chunk_base[c] + r - offsets[c * chunk_rows]
    token_position     [n_token_rows]          int32, each row's position in its sequence

Token rows of row chunk c start at a multiple of ``token_chunk_rows`` (the rows after a chunk's
last token row are padding that nothing points into), so every row chunk owns whole token chunks
and two writers never touch one chunk file. Shape legend: R rows, K compressed size.
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass, field

import numpy as np

FORMAT_NAME = "grass_llm.gradient_store"
FORMAT_VERSION = 1
STORAGE_DTYPES = ("float16", "bfloat16", "float32")
CODECS = ("none", "zstd")
NONFINITE_POLICIES = ("fail", "record")
TOKEN_MODES = (None, "loss", "position")


@dataclass(frozen=True)
class LayerInfo:
    """One hooked layer: its name, compressor spec + seed (enough to rebuild the map) and sizes."""

    name: str
    spec: str
    seed: int
    k: int
    d_in: int
    d_out: int
    bias: bool


@dataclass(frozen=True, kw_only=True)
class StoreLayout:
    """Everything that fixes the shapes of a store's arrays."""

    n_examples: int
    """Rows (examples), in dataset order."""
    layers: tuple[LayerInfo, ...]
    """Layers in the order they are stored."""
    chunk_rows: int = 256
    """Rows per chunk of every per-example array; a writer's unit of work and of resume."""
    dtype: str = "float16"
    """Storage dtype of gradient rows: float16, bfloat16 (stored as raw uint16) or float32."""
    codec: str = "none"
    """Compression of chunks: "none" (default) or "zstd". Every chunk also carries a CRC32C
    checksum. Measured (``tools/bench_query.py --codec zstd``, synthetic float16 rows): zstd
    saved 8% of the bytes (rows in float16 are mostly noise in their low bits), decoded 1.5x
    slower and scored ~6% fewer rows per second on 2 cores, so it is off by default."""
    token_mode: str | None = None
    """None, "loss" or "position" (see GradientCapture); per-token arrays exist when set."""
    token_counts: tuple[int, ...] | None = field(default=None, repr=False)
    """Token mode: rows per example (known from tokenization before any gradient exists)."""
    token_chunk_rows: int = 1024
    """Token mode: rows per chunk of the per-token arrays."""

    def __post_init__(self):
        if self.n_examples < 1:
            raise ValueError(f"n_examples must be >= 1, got {self.n_examples}")
        if self.chunk_rows < 1:
            raise ValueError(f"chunk_rows must be >= 1, got {self.chunk_rows}")
        if self.dtype not in STORAGE_DTYPES:
            raise ValueError(f"dtype must be one of {STORAGE_DTYPES}, got {self.dtype!r}")
        if self.codec not in CODECS:
            raise ValueError(f"codec must be one of {CODECS}, got {self.codec!r}")
        if not self.layers:
            raise ValueError("a store needs at least one layer")
        names = [lay.name for lay in self.layers]
        if len(set(names)) != len(names):
            raise ValueError("layer names must be unique")
        for lay in self.layers:
            if "/" in lay.name or lay.name.startswith("__") or lay.name in (".", ".."):
                raise ValueError(f"layer name {lay.name!r} cannot be a Zarr node name")
        if self.token_mode not in TOKEN_MODES:
            raise ValueError(f"token_mode must be one of {TOKEN_MODES}, got {self.token_mode!r}")
        if self.token_mode is not None:
            if self.token_counts is None or len(self.token_counts) != self.n_examples:
                raise ValueError("token mode needs token_counts, one per example")
            if min(self.token_counts) < 0:
                raise ValueError("token_counts must be >= 0")
            if self.token_chunk_rows < 1:
                raise ValueError("token_chunk_rows must be >= 1")

    @property
    def n_chunks(self) -> int:
        return math.ceil(self.n_examples / self.chunk_rows)

    def chunk_range(self, c: int) -> tuple[int, int]:
        """Example rows ``[start, stop)`` of row chunk c."""
        if not 0 <= c < self.n_chunks:
            raise IndexError(f"chunk {c} out of range [0, {self.n_chunks})")
        return c * self.chunk_rows, min(self.n_examples, (c + 1) * self.chunk_rows)

    def token_offsets(self) -> np.ndarray:
        """``[n_examples + 1]`` logical offsets: rows of example i are offsets[i]:offsets[i+1]
        (no padding; add ``token_chunk_base`` to reach storage rows)."""
        return self._offsets

    @functools.cached_property
    def _offsets(self) -> np.ndarray:
        assert self.token_counts is not None
        offsets = np.zeros(self.n_examples + 1, dtype=np.int64)
        offsets[1:] = np.cumsum(np.asarray(self.token_counts, dtype=np.int64))
        return offsets

    def token_chunk_base(self) -> np.ndarray:
        """``[n_chunks]`` storage row where row chunk c's token rows start: a multiple of
        ``token_chunk_rows``, so that each row chunk owns whole token chunks."""
        return self._chunk_base

    @functools.cached_property
    def _chunk_base(self) -> np.ndarray:
        off = self.token_offsets()
        base = np.zeros(self.n_chunks, dtype=np.int64)
        for c in range(1, self.n_chunks):
            a, b = self.chunk_range(c - 1)
            used = int(off[b] - off[a])
            base[c] = base[c - 1] + math.ceil(used / self.token_chunk_rows) * self.token_chunk_rows
        return base

    def token_storage_range(self, c: int) -> tuple[int, int]:
        """Storage rows ``[start, stop)`` holding row chunk c's token rows."""
        a, b = self.chunk_range(c)
        off = self.token_offsets()
        start = int(self.token_chunk_base()[c])
        return start, start + int(off[b] - off[a])

    def example_token_rows(self, i: int) -> tuple[int, int]:
        """Storage rows ``[start, stop)`` of example i's token rows."""
        c = i // self.chunk_rows
        off = self.token_offsets()
        start = int(self.token_chunk_base()[c]) + int(off[i] - off[c * self.chunk_rows])
        return start, start + int(off[i + 1] - off[i])

    def n_token_rows(self) -> int:
        """Storage rows of the per-token arrays (padding between row chunks included)."""
        _, stop = self.token_storage_range(self.n_chunks - 1)
        padded = math.ceil(stop / self.token_chunk_rows) * self.token_chunk_rows
        return max(padded, 1)  # a zero-length array would have no chunk grid

    def to_attrs(self) -> dict:
        d = asdict(self)
        d["layers"] = [asdict(lay) for lay in self.layers]
        d["token_counts"] = None  # lives in the token_offsets array, not in the attrs
        return d

    @classmethod
    def from_attrs(cls, d: dict, token_counts: tuple[int, ...] | None = None) -> StoreLayout:
        d = dict(d)
        d["layers"] = tuple(LayerInfo(**lay) for lay in d["layers"])
        d["token_counts"] = token_counts
        return cls(**d)
