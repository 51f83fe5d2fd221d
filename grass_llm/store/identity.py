"""Identities a store records so it can be reused (and refused) without the original command:
the model (name + hash of config and weights), the tokenizer, and the dataset."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from torch import nn

from grass_llm.data.identity import tokenizer_identity  # noqa: F401  (re-exported: its home is
# the data package, whose corpus cache is keyed by it and must not import the store)


def _digest() -> hashlib.blake2b:
    return hashlib.blake2b(digest_size=16)


def hash_tensor(h: hashlib.blake2b, name: str, t: torch.Tensor) -> None:
    """Feed a tensor's name, dtype, shape and exact bytes to a hash."""
    h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
    data = t.detach().to("cpu").contiguous()
    if data.dtype == torch.bfloat16:  # numpy has no bfloat16: hash the bit patterns
        data = data.view(torch.int16)
    h.update(data.numpy().tobytes())


def model_identity(model: nn.Module, name: str | None = None, *,
                   sources: Sequence[Path] | None = None, key: str = "") -> dict:
    """``{"name", "class", "config_hash", "weights_hash", "n_params"}`` of a (local) model.

    The weights hash covers every parameter and buffer's exact bytes, so two checkpoints that
    differ anywhere get different identities. For a sharded model, call it on the full weights
    (e.g. before sharding) — the runner does.

    Hashing an 8B model's 16 GB takes tens of seconds, on every start and resume. With
    ``sources`` (the files the weights were read from) the result is cached under
    ``<cache root>/identity/``, keyed by each file's resolved path, size and modification time
    plus ``key`` (what else shapes the loaded bytes: dtype, seed), so an unchanged checkpoint is
    hashed once.
    """
    cache = _identity_cache_file(sources, key) if sources else None
    if cache is not None and cache.is_file():
        try:
            cached = json.loads(cache.read_text())
            return {**cached, "name": name or cached.get("name", "")}
        except (OSError, ValueError):
            pass  # a damaged cache entry: hash again
    ident = _model_identity(model, name)
    if cache is not None:
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_name(f"{cache.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(ident))
            tmp.replace(cache)  # atomic: readers never see half a file
        except OSError:
            pass  # a read-only cache only costs the hash next time
    return ident


def run_model_identity(model: nn.Module, name: str | None, *, spec: str, dtype: str,
                       seed: int, adapter: str | None) -> dict:
    """``model_identity`` of a model loaded from ``spec`` as a run config names it, with the
    hash cached by checkpoint file: the one key both ``cache`` (what it records) and queries
    (what they compare with it) use."""
    from grass_llm.models import weight_sources

    return model_identity(model, name, sources=weight_sources(spec, adapter=adapter),
                          key=f"{dtype}|seed={seed}")


def _identity_cache_file(sources: Sequence[Path], key: str) -> Path:
    from grass_llm.models import cache_root

    h = _digest()
    h.update(key.encode())
    for path in sorted(Path(p).resolve() for p in sources):
        st = path.stat()
        h.update(f"|{path}|{st.st_size}|{st.st_mtime_ns}".encode())
    return cache_root() / "identity" / f"{h.hexdigest()}.json"


def _model_identity(model: nn.Module, name: str | None) -> dict:
    cfg = getattr(model, "config", None)
    cfg_dict = cfg.to_dict() if cfg is not None and hasattr(cfg, "to_dict") else {}
    for volatile in ("transformers_version", "_name_or_path", "torch_dtype", "dtype"):
        cfg_dict.pop(volatile, None)
    h = _digest()
    for pname, t in sorted(model.state_dict().items()):
        hash_tensor(h, pname, t)
    return {
        "name": name or (getattr(cfg, "_name_or_path", "") or type(model).__name__),
        "class": type(model).__name__,
        "config_hash": hashlib.blake2b(json.dumps(cfg_dict, sort_keys=True, default=str)
                                       .encode(), digest_size=16).hexdigest(),
        "weights_hash": h.hexdigest(),
        "n_params": int(sum(p.numel() for p in model.parameters())),
    }


def dataset_fingerprint(examples: Iterable[tuple[str, Iterable[int], Iterable[int]]]) -> dict:
    """Hash of the tokenized dataset in order: each example's id, token ids and labels.

    Args:
        examples: ``(example_id, input_ids, labels)`` per example, in dataset order.
    """
    h = _digest()
    n = 0
    for ex_id, ids, labels in examples:
        h.update(json.dumps([str(ex_id), list(map(int, ids)), list(map(int, labels))])
                 .encode())
        n += 1
    return {"fingerprint": h.hexdigest(), "n_examples": n}
