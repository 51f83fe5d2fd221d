"""Identities a store records so it can be reused (and refused) without the original command:
the model (name + hash of config and weights), the tokenizer, and the dataset."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable

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


def model_identity(model: nn.Module, name: str | None = None) -> dict:
    """``{"name", "class", "config_hash", "weights_hash", "n_params"}`` of a (local) model.

    The weights hash covers every parameter and buffer's exact bytes, so two checkpoints that
    differ anywhere get different identities. For a sharded model, call it on the full weights
    (e.g. before sharding) — the runner does.
    """
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
