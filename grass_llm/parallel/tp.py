"""Tensor parallelism with DTensor: attention and MLP projections column/row parallel."""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    RowwiseParallel,
    parallelize_module,
)

from grass_llm.parallel.plan import COLWISE, ROWWISE, decoder_layers


def apply_tp(model: nn.Module, tp_mesh: DeviceMesh) -> nn.Module:
    """Megatron-style split of every decoder layer over ``tp_mesh``.

    q/k/v and gate/up are column parallel (each rank computes a slice of the heads / of the
    intermediate features), o and down are row parallel (their partial outputs are all-reduced).
    The attention reshapes infer the local head count, so heads and key/value heads must divide
    by the group size. Embeddings, norms and the head stay replicated.
    """
    size = tp_mesh.size()
    cfg = getattr(model, "config", None)
    for attr in ("num_attention_heads", "num_key_value_heads"):
        n = getattr(cfg, attr, None)
        if n is not None and n % size:
            raise ValueError(f"tensor parallel over {size} ranks needs {attr}={n} to be "
                             f"divisible by {size}")
    for layer in decoder_layers(model):
        names = {n for n, _ in layer.named_modules()}
        missing = [p for p in COLWISE + ROWWISE if p not in names]
        if missing:
            raise ValueError(f"tensor parallelism supports Llama-style layers "
                             f"(q/k/v/o_proj, gate/up/down_proj); {type(layer).__name__} lacks "
                             f"{missing}")
        plan = {p: ColwiseParallel() for p in COLWISE if p.startswith("self_attn.")}
        # The MLP keeps DTensors between gate/up and down: RowwiseParallel builds its input
        # with DTensor.from_local, which assumes even shards, so an intermediate size that does
        # not divide by the group size (uneven shards) needs the true global shape carried along.
        plan.update({p: ColwiseParallel(use_local_output=False)
                     for p in COLWISE if p.startswith("mlp.")})
        plan.update({p: RowwiseParallel() for p in ROWWISE})
        parallelize_module(layer, tp_mesh, plan)
    return model
