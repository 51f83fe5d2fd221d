"""Loading and sharding a model on every rank: the one path ``grass-llm cache`` and the query
gradients (``grass-llm query`` / ``value``) share.

Rank 0 reads the model and tokenizer; the other ranks receive the tokenizer and, in the sharded
modes, a meta skeleton whose shards are streamed from rank 0 (``parallel.loading``); one
``apply_*`` per mode shards it (STYLE.md 1). ``Sharded`` says how a step loop must split its
batches over the result: data-parallel ranks, whether every forward/backward is a collective
(lockstep), the tensor-parallel group the capture sums its partial rows over.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from grass_llm.models import load_model
from grass_llm.parallel import apply_fsdp2, apply_tp, apply_zero3, build_mesh, comm
from grass_llm.parallel import load_ds_config
from grass_llm.parallel.dist import inner_size
from grass_llm.parallel.loading import load_sharded, load_zero3


@dataclass
class Sharded:
    """A model placed for this rank, and how a step loop splits work over it."""

    module: torch.nn.Module
    """The model to run (sharded in place under fsdp / deepspeed / tp)."""
    tp_group: object
    """The tensor-parallel process group (``GradientCapture(tp_group=...)``), else None."""
    keep: tuple
    """Parameters the capture must leave trainable (ZeRO-3's anchor)."""
    dp_rank: int
    """This rank's index among the data-parallel ranks (ranks that take different batches)."""
    dp_size: int
    """Number of data-parallel ranks."""
    writer: bool
    """This rank reports its batches' rows (the first rank of a tensor-parallel group)."""
    lockstep: bool
    """Every forward/backward is a collective over all ranks (FSDP2, ZeRO-3): all ranks must
    take the same number of steps."""


def load_on_ranks(info, parallel: str, *, model: str, dtype: str, tokenizer: str | None = None,
                  seed: int = 0, adapter: str | None = None):
    """Collective: ``(model, tokenizer, name)``. Rank 0 reads model and tokenizer; the others
    get the tokenizer, and the model itself only with ``parallel="none"`` (data parallel, where
    every rank needs all of it, loaded after rank 0 so that a GGUF file converts once); in the
    sharded modes their model is None until ``shard_model``."""
    kw = {"dtype": getattr(torch, dtype), "tokenizer": tokenizer, "seed": seed,
          "adapter": adapter}
    loaded = tok = name = None
    with comm.guarded("loading the model"):
        if info.is_main:
            loaded, tok, name = load_model(model, **kw)
    tok, name = comm.broadcast_object((tok, name) if info.is_main else None)
    if parallel == "none" and info.initialized:
        with comm.guarded("loading the model"):
            if not info.is_main:
                loaded, _, _ = load_model(model, **kw)
    return loaded, tok, name


def shard_model(model, info, parallel: str, *, dtype: str, shard_size: int = 0,
                tp_size: int = 0, deepspeed_config: str | None = None) -> Sharded:
    """Collective: apply ``parallel`` (``model``: rank 0's full model, None elsewhere in the
    sharded modes) and say how to split work over the result.

    Args:
        parallel: ``none`` (every rank its own full copy on its device), ``fsdp`` (FSDP2, HSDP
            over ``shard_size`` ranks), ``deepspeed`` (ZeRO-3 with ``deepspeed_config``) or
            ``tp`` (tensor parallel over ``tp_size`` ranks); a size of 0 means the ranks of one
            node.
    """
    if parallel == "none" or not info.initialized:
        if parallel != "none" and info.is_main:
            print(f"note: parallel={parallel} without a launcher runs unsharded")
        return Sharded(model.to(info.device), None, (), info.rank, info.world_size, True, False)
    if parallel == "fsdp":
        mesh = build_mesh(info, inner_size(info, shard_size, "shard_size"),
                          ("replicate", "shard"))
        module = load_sharded(model, lambda m: apply_fsdp2(m, mesh), info.device)
        return Sharded(module, None, (), info.rank, info.world_size, True, True)
    if parallel == "deepspeed":
        ds = load_ds_config(deepspeed_config, dtype=getattr(torch, dtype))
        module, anchor = apply_zero3(load_zero3(model, ds), ds)
        return Sharded(module, None, (anchor,), info.rank, info.world_size, True, True)
    if parallel != "tp":
        raise ValueError(f"parallel must be none, fsdp, deepspeed or tp, got {parallel!r}")
    mesh = build_mesh(info, inner_size(info, tp_size, "tp_size"), ("dp", "tp"))
    module = load_sharded(model, lambda m: apply_tp(m, mesh["tp"]), info.device)
    # TP groups never wait on each other (no collective crosses data-parallel ranks in a step)
    return Sharded(module, mesh["tp"].get_group(), (), mesh["dp"].get_local_rank(),
                   mesh["dp"].size(), mesh["tp"].get_local_rank() == 0, False)
