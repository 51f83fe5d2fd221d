"""Process-group and device-mesh set-up: the one place that creates process groups.

`accelerate launch` and `torchrun` only start the processes and export RANK / WORLD_SIZE /
LOCAL_RANK / LOCAL_WORLD_SIZE / MASTER_ADDR / MASTER_PORT (DESIGN.md: without GPUs accelerate
does not turn on its own FSDP); the runner initializes torch.distributed itself: NCCL on GPUs
(with gloo mapped for CPU tensors), gloo on CPU. A process started by a launcher gets a process
group even when it is the only rank, so a one-GPU run exercises the same sharded code path as
eight.
"""

from __future__ import annotations

import datetime
import gc
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from grass_llm.parallel.zero3 import release_engines


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: global rank and size, its node's share, its device."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    initialized: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """More than one process."""
        return self.world_size > 1

    @property
    def n_nodes(self) -> int:
        return max(1, self.world_size // max(1, self.local_world_size))


def launched() -> bool:
    """Started by torchrun / accelerate launch (they export RANK and WORLD_SIZE)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_distributed(timeout_s: float = 1800.0) -> DistInfo:
    """Initialize torch.distributed from the launcher's environment (nothing to do for a
    plain single process)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if (world > 1 or launched()) and not dist.is_initialized():
        dist.init_process_group(backend_for(device.type),
                                timeout=datetime.timedelta(seconds=timeout_s))
    return DistInfo(rank, world, local_rank, local_world, device, dist.is_initialized())


def backend_for(device_type: str) -> str:
    """The process-group backend for a run on ``device_type``.

    On GPUs, NCCL carries the tensors and gloo stays mapped for CPU tensors, so a collective on
    a CPU tensor (a library's bookkeeping, say) is legal instead of a crash; grass_llm's own
    collectives all run on the GPU (``parallel.comm``)."""
    return "cpu:gloo,cuda:nccl" if device_type == "cuda" else "gloo"


def inner_size(info: DistInfo, requested: int, what: str) -> int:
    """The size of the inner (intra-node) mesh dimension: ``requested``, or the ranks of one
    node when 0; it must divide the world size."""
    size = requested or min(info.local_world_size, info.world_size)
    if size < 1 or info.world_size % size:
        raise ValueError(f"{what}={size} must divide the number of processes "
                         f"({info.world_size})")
    return size


def build_mesh(info: DistInfo, inner: int, names: tuple[str, str]) -> DeviceMesh:
    """A 2-D mesh ``(world / inner, inner)`` named ``names``: the inner dimension holds
    consecutive ranks (one node by default), the outer one spans nodes."""
    if not info.initialized:
        raise ValueError("a device mesh needs torch.distributed (run under torchrun or "
                         "accelerate launch)")
    if info.world_size % inner:
        raise ValueError(f"{names[1]} size {inner} must divide the number of processes "
                         f"({info.world_size})")
    return init_device_mesh(info.device.type, (info.world_size // inner, inner),
                            mesh_dim_names=names)


def shutdown() -> None:
    """Destroy every process group, and free them now rather than at the interpreter's exit.

    DTensor's sharding-propagation caches (torch's C++ one and its Python one) keep the specs
    of every DTensor op they have seen, and each spec its device mesh and the mesh its process
    groups. After an FSDP2 or tensor-parallel run, ``destroy_process_group`` alone therefore
    leaves the gloo groups and their threads alive until teardown, where a thread destroyed
    while joinable aborts the finished process (``terminate called without an active
    exception``, exit -6 under torchrun). Clearing the caches lets the groups go with their
    last user (tests/test_scale.py counts the threads). A DeepSpeed ZeRO-3 engine, and its
    groups with it, would outlive its module for other reasons; ``release_engines`` drops
    those first."""
    if not dist.is_initialized():
        return
    release_engines()
    clear = getattr(torch._C, "_clear_DTensor_sharding_propagator_cache", None)  # private API
    if clear is not None:
        clear()
    try:
        from torch.distributed.tensor import DTensor

        DTensor._op_dispatcher.sharding_propagator.propagate_op_sharding.cache_clear()
    except (ImportError, AttributeError):  # private API: another torch keeps its cache elsewhere
        pass
    dist.destroy_process_group()
    gc.collect()  # the meshes and groups in reference cycles go now, with their threads
