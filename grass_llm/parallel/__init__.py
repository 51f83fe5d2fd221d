"""Sharding a model for gradient caching: one small ``apply_*`` function per mode, composed by
the runner in one place (STYLE.md 1). None of them creates process groups (``dist.py`` does)."""

from grass_llm.parallel import comm
from grass_llm.parallel.comm import barrier
from grass_llm.parallel.dist import DistInfo, build_mesh, init_distributed, shutdown
from grass_llm.parallel.fsdp import apply_fsdp2
from grass_llm.parallel.tp import apply_tp
from grass_llm.parallel.zero3 import apply_zero3, load_ds_config

MODES = ("none", "fsdp", "deepspeed", "tp")

__all__ = ["comm", "DistInfo", "init_distributed", "build_mesh", "barrier", "shutdown", "apply_fsdp2",
           "apply_tp", "apply_zero3", "load_ds_config", "MODES"]
