"""Setting a model up for capture: deterministic modes, the embedding leaf, each layer's
tensor-parallel view."""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from grass_llm.compress import FactorizedCompressor
from grass_llm.compress.sharded import shard_compressor
from grass_llm.parallel import comm


def local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (tensor-parallel activations), or the tensor itself."""
    return t.to_local() if isinstance(t, DTensor) else t


def embedding_leaf(module, args, output):
    """Make the embedding output a grad-requiring leaf, so backward skips every weight."""
    return output.detach().requires_grad_(True)


def grad_leaf(output: torch.Tensor) -> torch.Tensor | None:
    """A hooked layer's output made the leaf where backward stops, when nothing upstream
    requires grad (it is among the first hooked layers): the same values, requiring grad, to
    replace the module's output. None when the output already requires grad."""
    return None if output.requires_grad else output.detach().requires_grad_(True)


def checkpointed_modules(model: nn.Module) -> list[nn.Module]:
    """The modules of ``model`` with gradient checkpointing on (transformers' flag)."""
    return [m for m in model.modules() if getattr(m, "gradient_checkpointing", False) is True]


def checkpointed(model: nn.Module) -> bool:
    """Whether any module of ``model`` has gradient checkpointing on."""
    return bool(checkpointed_modules(model))


def deterministic_mode(model: nn.Module) -> list[tuple[nn.Module, float]]:
    """Eval mode, except decoder layers with gradient checkpointing on (transformers only
    checkpoints in training mode), which stay in train mode with every dropout disabled.

    Returns the modules whose float ``attention_dropout`` was zeroed, with the old values.
    """
    model.eval()
    saved = []
    for layer in checkpointed_modules(model):
        layer.train()
        for sub in layer.modules():
            if isinstance(sub, nn.Dropout):
                sub.eval()
            drop = getattr(sub, "attention_dropout", None)
            if isinstance(drop, float) and drop != 0.0:
                saved.append((sub, drop))
                sub.attention_dropout = 0.0
    return saved



def shard_view(comp, module: nn.Module, tp_group):
    """The compressor, or (tensor parallel) the view of it that this rank's shard computes."""
    weight = module.weight
    if tp_group is None or not isinstance(weight, DTensor):
        return comp
    if not isinstance(comp, FactorizedCompressor):
        raise ValueError(f"tensor parallelism needs a factorized compressor (factgrass, logra); "
                         f"{comp.name!r} needs each layer's whole gradient")
    try:  # private torch API, imported only here: its absence must not break plain capture
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    except ImportError as err:
        raise RuntimeError(
            "tensor-parallel capture needs torch.distributed.tensor._utils."
            f"compute_local_shape_and_global_offset, which torch {torch.__version__} does not "
            "have; use a torch version grass_llm supports for tensor parallelism, or capture "
            "without tp_group (FSDP2 / ZeRO-3 / a single device)") from err
    local_shape, offset = compute_local_shape_and_global_offset(
        weight.shape, weight.device_mesh, weight.placements)
    out_range = (offset[0], offset[0] + local_shape[0])
    in_range = (offset[1], offset[1] + local_shape[1])
    rowwise = in_range != (0, module.in_features)
    # A rowwise layer's bias is replicated: only the group's first rank counts its column.
    own_bias = not rowwise or comm.rank(tp_group) == 0
    return shard_compressor(comp, out_range, in_range, own_bias)
