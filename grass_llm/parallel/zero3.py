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
_ENGINES: list = []  # every engine apply_zero3 made, destroyed by release_engines()


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
    _ENGINES.append(engine)
    return engine.module, anchor


def release_engines() -> None:
    """Destroy every engine ``apply_zero3`` made and drop what DeepSpeed keeps of it, so that
    its process groups can go when ``parallel.shutdown`` destroys them (tests/test_scale.py
    counts the gloo threads left). Collective-free; a no-op when no engine was made.

    DeepSpeed keeps three references that ``engine.destroy()`` does not drop (found with
    ``gc.get_referents`` after a ZeRO-3 load; deepspeed 0.19):
    - its module stays on ``parameter_offload.FWD_MODULE_STACK`` (pushed at initialization,
      never popped), which keeps the module, its hooks and through them the engine;
    - ``utils.groups._WORLD_GROUP`` caches the world group it built;
    - ``TorchBackend.barrier`` and ``monitored_barrier`` take ``GroupMember.WORLD`` as a
      default argument, bound when DeepSpeed is imported: the default group itself. Both
      treat ``None`` as that group, so the defaults become ``None``.
    All three are private; an attribute another DeepSpeed lacks only leaves its groups alive."""
    if not _ENGINES:
        return
    while _ENGINES:
        engine = _ENGINES.pop()
        engine.destroy()
        try:
            from deepspeed.runtime.zero import parameter_offload

            stack = parameter_offload.FWD_MODULE_STACK
            stack[:] = [m for m in stack if m is not engine.module]
        except (ImportError, AttributeError):
            pass
    try:
        from torch.distributed import ProcessGroup

        from deepspeed.comm.torch import TorchBackend
        from deepspeed.utils import groups
    except ImportError:
        return
    for name, value in list(vars(groups).items()):
        if name.startswith("_") and isinstance(value, ProcessGroup):
            setattr(groups, name, None)
    for fn in vars(TorchBackend).values():
        defaults = getattr(fn, "__defaults__", None)
        if defaults and any(isinstance(d, ProcessGroup) for d in defaults):
            fn.__defaults__ = tuple(None if isinstance(d, ProcessGroup) else d for d in defaults)
