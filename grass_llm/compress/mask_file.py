"""The learned-mask file: per-layer FactGraSS masks that a spec names with ``mask=PATH``.

A safetensors file (no pickle, readable from any language):

    <layer>/idx_in    int64 [k_in]    sorted S_in, indices into d_in (+1: the bias column d_in)
    <layer>/idx_out   int64 [k_out]   sorted S_out, indices into d_out

and its string metadata ``{"format": "grass_llm.factorized_mask", "version": "1",
"layers": JSON, "meta": JSON}``; ``layers`` maps each layer name to its ``d_in``, ``d_out``,
``bias``, ``objective`` (the fitted masks' value of the objective on the calibration set) and
``random_objective`` (the random mask's, for comparison); ``meta`` is free-form provenance
(calibration fingerprints, fit settings). A store built with a mask records the file's SHA-256
in every layer's spec (``mask_sha256=...``), so a query refuses a file that changed.

This module is the one place in ``grass_llm.compress`` that reads or writes a file.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

FORMAT = "grass_llm.factorized_mask"
VERSION = "1"
_CACHE: dict[str, MaskFile] = {}  # parsed files by content hash: every layer reads the same one


@dataclass(frozen=True)
class LayerMask:
    """One layer's learned masks and the layer shape they were fitted on."""

    idx_in: np.ndarray = field(repr=False)
    idx_out: np.ndarray = field(repr=False)
    d_in: int
    d_out: int
    bias: bool
    objective: float | None = None
    random_objective: float | None = None

    def __post_init__(self):
        for name, idx, size in (("idx_in", self.idx_in, self.d_in + int(self.bias)),
                                ("idx_out", self.idx_out, self.d_out)):
            idx = np.asarray(idx)
            if idx.ndim != 1 or idx.size == 0 or not np.issubdtype(idx.dtype, np.integer):
                raise ValueError(f"{name} must be a non-empty 1-D integer array")
            if np.any(np.diff(idx) <= 0) or idx[0] < 0 or idx[-1] >= size:
                raise ValueError(f"{name} must be sorted, distinct and in [0, {size})")

    @property
    def k_in(self) -> int:
        return int(np.asarray(self.idx_in).size)

    @property
    def k_out(self) -> int:
        return int(np.asarray(self.idx_out).size)


@dataclass(frozen=True)
class MaskFile:
    """A read mask file: its layers, content hash and provenance."""

    path: str
    sha256: str
    layers: dict[str, LayerMask]
    meta: dict

    def layer(self, name: str) -> LayerMask:
        """The masks of layer ``name``; ValueError naming the file when it has none."""
        if name not in self.layers:
            some = ", ".join(sorted(self.layers)[:3])
            raise ValueError(f"mask file {self.path} has no masks for layer {name!r} (it has "
                             f"{len(self.layers)} layer(s), e.g. {some}); fit it with the same "
                             "layer selection as the run (grass-llm fit-mask --layers/--exclude)")
        return self.layers[name]


def write_mask_file(path: str | os.PathLike, layers: Mapping[str, LayerMask],
                    meta: Mapping | None = None) -> str:
    """Write ``layers`` (and JSON-serializable ``meta``) to ``path``; returns its SHA-256."""
    from safetensors.numpy import save_file

    if not layers:
        raise ValueError("a mask file needs at least one layer")
    tensors, info = {}, {}
    for name, lm in layers.items():
        tensors[f"{name}/idx_in"] = np.ascontiguousarray(lm.idx_in, dtype=np.int64)
        tensors[f"{name}/idx_out"] = np.ascontiguousarray(lm.idx_out, dtype=np.int64)
        info[name] = {k: v for k, v in asdict(lm).items() if k not in ("idx_in", "idx_out")}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    save_file(tensors, str(tmp), metadata={"format": FORMAT, "version": VERSION,
                                           "layers": json.dumps(info, sort_keys=True),
                                           "meta": json.dumps(dict(meta or {}),
                                                              sort_keys=True)})
    os.replace(tmp, path)  # a reader never sees half a file
    return hashlib.sha256(path.read_bytes()).hexdigest()


def read_mask_file(path: str | os.PathLike) -> MaskFile:
    """Read and validate a mask file; ValueError (naming the file) when it is missing, not a
    mask file, or inconsistent."""
    from safetensors import SafetensorError
    from safetensors.numpy import load

    path = str(path)
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise ValueError(f"cannot read mask file {path}: {err.strerror or err}; write it with "
                         "`grass-llm fit-mask`") from err
    sha = hashlib.sha256(data).hexdigest()
    if sha in _CACHE:
        return MaskFile(path, sha, _CACHE[sha].layers, _CACHE[sha].meta)
    try:
        tensors = load(data)
        header = _metadata(data)
        if header.get("format") != FORMAT:
            raise ValueError(f"format {header.get('format')!r}, expected {FORMAT!r}")
        if header.get("version") != VERSION:
            raise ValueError(f"version {header.get('version')!r}; this grass_llm reads "
                             f"version {VERSION}")
        info = json.loads(header["layers"])
        meta = json.loads(header.get("meta", "{}"))
        layers = {name: LayerMask(tensors[f"{name}/idx_in"], tensors[f"{name}/idx_out"],
                                  **lay) for name, lay in info.items()}
    except (SafetensorError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path} is not a valid grass_llm mask file ({err}); rewrite it with "
                         "`grass-llm fit-mask`") from err
    out = MaskFile(path, sha, layers, meta)
    _CACHE[sha] = out
    return out


def _metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors byte string (8-byte length, then a JSON header)."""
    if len(data) < 8:
        raise ValueError("file too short")
    n = int.from_bytes(data[:8], "little")
    if n > len(data) - 8:
        raise ValueError("truncated header")
    return json.loads(data[8:8 + n]).get("__metadata__") or {}
