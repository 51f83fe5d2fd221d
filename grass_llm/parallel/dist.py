"""Process-group and device-mesh set-up: the one place that creates process groups.

`accelerate launch` and `torchrun` only start the processes and export RANK / WORLD_SIZE /
LOCAL_RANK / MASTER_ADDR / MASTER_PORT (DESIGN.md: without GPUs accelerate does not turn on its
own FSDP); the runner initializes torch.distributed itself: NCCL on GPUs, gloo on CPU.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: global rank and size, local rank, its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(timeout_s: float = 1800.0) -> DistInfo:
    """Initialize torch.distributed from the launcher's environment (a no-op single-process)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend_for(device.type),
                                timeout=datetime.timedelta(seconds=timeout_s))
    return DistInfo(rank, world, local_rank, device)


def backend_for(device_type: str) -> str:
    """The process-group backend for a run on ``device_type``.

    On GPUs, NCCL carries the tensors and gloo stays mapped for CPU tensors, so a collective on
    a CPU tensor (a library's bookkeeping, say) is legal instead of a crash; grass_llm's own
    collectives all run on the GPU (``parallel.comm``)."""
    return "cpu:gloo,cuda:nccl" if device_type == "cuda" else "gloo"


def build_mesh(info: DistInfo, tp_size: int = 1) -> DeviceMesh | None:
    """A ("dp", "tp") mesh over all ranks; None when single-process.

    Args:
        info: from ``init_distributed``.
        tp_size: ranks per tensor-parallel group (must divide the world size).
    """
    if not info.distributed:
        return None
    if info.world_size % tp_size:
        raise ValueError(f"tp_size={tp_size} must divide the number of processes "
                         f"({info.world_size})")
    return init_device_mesh(info.device.type, (info.world_size // tp_size, tp_size),
                            mesh_dim_names=("dp", "tp"))


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
