"""Where the decoder layers and their projections live in the supported model families."""

from __future__ import annotations

from torch import nn

# Linear layers whose output dimension is split (colwise) or input dimension (rowwise).
COLWISE = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj",
           "mlp.up_proj")
ROWWISE = ("self_attn.o_proj", "mlp.down_proj")


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated decoder blocks (``model.model.layers`` for Llama/Qwen2/Mistral,
    ``gpt_neox.layers`` for GPT-NeoX)."""
    for path in ("model.layers", "gpt_neox.layers", "transformer.h", "layers",
                 "base_model.model.model.layers"):  # the last: a PEFT-wrapped Llama
        obj = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, nn.ModuleList):
            return list(obj)
    raise ValueError(f"cannot find the decoder layers of {type(model).__name__}; supported: "
                     "Llama-style (model.layers) and GPT-NeoX (gpt_neox.layers) models")
