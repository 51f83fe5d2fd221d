"""DeepSpeed ZeRO-3 through ``deepspeed.initialize``.

Measured (DESIGN.md): ZeRO-3 refuses ``backward`` when every parameter is frozen (it then has no
optimizer), and an inference-only engine cannot backward at all. One unused trainable "anchor"
parameter with a no-op optimizer (``zero_allow_untested_optimizer``) makes a plain
``loss.backward()`` work with exact output gradients; the anchor never enters the forward, so it
never gets a gradient either.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

ANCHOR = "grass_llm_zero3_anchor"


def load_ds_config(path: str | Path | None, *, dtype: torch.dtype) -> dict:
    """Read a DeepSpeed JSON config (``launch/deepspeed_zero3.json`` by default) and fill what
    attribution needs: stage 3, untested optimizer allowed, the model's precision."""
    cfg = json.loads(Path(path).read_text()) if path else {}
    cfg.setdefault("train_micro_batch_size_per_gpu", 1)
    zero = cfg.setdefault("zero_optimization", {})
    if zero.setdefault("stage", 3) != 3:
        raise ValueError(f"{path}: zero_optimization.stage must be 3 for parallel=deepspeed")
    cfg["zero_allow_untested_optimizer"] = True
    cfg.setdefault("bf16", {})["enabled"] = dtype == torch.bfloat16
    cfg.setdefault("fp16", {})["enabled"] = dtype == torch.float16
    return cfg


def apply_zero3(model: nn.Module, ds_config: dict) -> tuple[nn.Module, nn.Parameter]:
    """Partition ``model`` with ZeRO-3; returns (the module to run, the anchor parameter that
    must stay trainable during capture)."""
    import deepspeed  # optional dependency: pip install grass-llm[deepspeed]

    anchor = nn.Parameter(torch.zeros(1))
    model.register_parameter(ANCHOR, anchor)
    for p in model.parameters():
        p.requires_grad_(p is anchor)
    optimizer = torch.optim.SGD([anchor], lr=0.0)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    return engine.module, anchor
