"""FSDP2: ``fully_shard`` each decoder layer, then the root (torchtitan's order)."""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import fully_shard

from grass_llm.parallel.plan import decoder_layers


def apply_fsdp2(model: nn.Module, dp_mesh: DeviceMesh) -> nn.Module:
    """Shard parameters over ``dp_mesh``; forward hooks still see full activations and tensor
    hooks full output gradients (DESIGN.md, measured), so capture needs no change.

    A 1-D mesh shards over all its ranks; a 2-D ``("replicate", "shard")`` mesh is HSDP: each
    parameter sharded within a row of the mesh (one node) and replicated across rows, so the
    per-layer all-gathers never leave a node. Works on a meta-device model (the shards are
    allocated afterwards: ``parallel.loading``)."""
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=dp_mesh)
    fully_shard(model, mesh=dp_mesh)
    return model
