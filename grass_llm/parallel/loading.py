"""Loading a model for a sharded run without a full copy of the weights on every rank.

Rank 0 reads the weights (``grass_llm.models.load_model``); the other ranks never do. Rank 0
turns its model into a *skeleton* on the meta device (no storage: the architecture, config,
tied weights, adapters) and sends that to the others, so every rank holds the identical module
tree. Then, per mode:

- FSDP2 / tensor parallel: the sharding is applied to the skeleton (``apply_fsdp2`` /
  ``apply_tp`` on meta tensors), every rank allocates only its shards (``to_empty``), and rank
  0's full weights are streamed to the others one tensor at a time by PyTorch's own
  ``set_model_state_dict(..., full_state_dict=True, broadcast_from_rank0=True)``, each rank
  keeping its slice. Buffers outside the state dict (rotary frequencies) follow by broadcast.
- ZeRO-3 (``load_zero3``): DeepSpeed's mechanism: every rank constructs the model under
  ``deepspeed.zero.Init`` (each parameter partitioned as it is created), then each parameter
  is gathered with ``GatheredParameters(modifier_rank=0)`` and rank 0 writes its value.

Peak host memory of a rank other than 0: its shards plus one full tensor (the largest:
the embedding). Rank 0 holds the full weights until the broadcast ends.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from grass_llm.parallel import comm


def non_persistent_buffers(model: nn.Module) -> list[str]:
    """Names of the buffers a state dict leaves out (e.g. rotary ``inv_freq``), sorted."""
    return sorted(f"{mn}.{bn}" if mn else bn for mn, mod in model.named_modules()
                  for bn in mod._non_persistent_buffers_set)


def skeleton_from_rank0(model: nn.Module | None) -> tuple[nn.Module, dict | None, dict | None]:
    """Collective: every rank gets rank 0's model as a meta-device skeleton.

    Args:
        model: rank 0's loaded model (ignored elsewhere: pass None).

    Returns:
        ``(skeleton, full_state_dict, extra_buffers)``; the last two are rank 0's real tensors
        (kept alive by reference, so turning the model into a skeleton copies nothing) and None
        on the other ranks.
    """
    full, extra, skeleton = None, None, None
    if comm.rank() == 0:
        full = dict(model.state_dict())
        buffers = dict(model.named_buffers())
        extra = {n: buffers[n] for n in non_persistent_buffers(model) if n in buffers}
        skeleton = model.to("meta")  # the tensors live on in `full` / `extra`
    skeleton = comm.broadcast_object(skeleton, src=0)
    return skeleton, full, extra


@torch.no_grad()
def fill_from_rank0(model: nn.Module, full: dict | None, extra: dict | None,
                    device: torch.device) -> nn.Module:
    """Collective: allocate a sharded skeleton's local storage on ``device`` and fill it with
    rank 0's weights (``full``) and extra buffers (``extra``), one tensor at a time."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    model.to_empty(device=device)
    set_model_state_dict(model, full if comm.rank() == 0 else {},
                         options=StateDictOptions(full_state_dict=True,
                                                  broadcast_from_rank0=True, strict=True))
    buffers = dict(model.named_buffers())
    for name in non_persistent_buffers(model):
        buf = buffers[name]
        if comm.rank() == 0:
            buf.copy_(extra[name])
        comm.broadcast(buf, src=0)
    return model


def load_sharded(model: nn.Module | None, shard: Callable[[nn.Module], nn.Module],
                 device: torch.device) -> nn.Module:
    """Rank 0's model, sharded by ``shard`` (applied to the meta skeleton on every rank), with
    only the local shards ever allocated on the other ranks."""
    skeleton, full, extra = skeleton_from_rank0(model)
    del model
    sharded = shard(skeleton)
    fill_from_rank0(sharded, full, extra, device)
    del full, extra
    return sharded


@torch.no_grad()
def load_zero3(model: nn.Module | None, ds_config: dict) -> nn.Module:
    """Collective: rank 0's model rebuilt on every rank under ``deepspeed.zero.Init`` (each
    rank allocates only its partitions), the weights written by rank 0 parameter by parameter
    through ``GatheredParameters(modifier_rank=0)``; returns the partitioned model."""
    import deepspeed

    skeleton, full, extra = skeleton_from_rank0(model)
    del model
    try:  # transformers' own "skip the random init" (rank 0's values overwrite everything)
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4.x
        from transformers.modeling_utils import no_init_weights
    config, cls = skeleton.config, type(skeleton)
    with deepspeed.zero.Init(config_dict_or_path=ds_config), no_init_weights():
        built = cls._from_config(config, dtype=next(iter(skeleton.parameters())).dtype)
    if {n for n, _ in built.named_parameters()} != {n for n, _ in skeleton.named_parameters()}:
        raise ValueError(f"{cls.__name__}: rebuilding the model from its config under ZeRO-3 "
                         "gives other parameters than the loaded one (an adapter or a custom "
                         "model?); use parallel=fsdp")
    for name, param in built.named_parameters():
        with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
            if comm.rank() == 0:
                param.data.copy_(full[name])
    buffers = dict(built.named_buffers())
    for name in non_persistent_buffers(built):
        buf = buffers[name]
        if comm.rank() == 0:
            buf.copy_(extra[name].to(buf.device, buf.dtype))
        comm.broadcast(buf, src=0)
    return built.eval()
