"""The collectives discipline: every collective package code issues goes through
``grass_llm.parallel.comm`` (which places tensors on the backend's device), enforced in the
multi-process tests by ``tests/strict_dist.py``; these tests check the rules themselves."""

import ast
from pathlib import Path

import pytest
import torch

from grass_llm.parallel.dist import backend_for
from tests.strict_dist import StrictCollectiveError, check_call

PKG = Path(__file__).resolve().parents[1] / "grass_llm"
COLLECTIVES = {"all_reduce", "reduce", "broadcast", "all_gather", "all_gather_into_tensor",
               "reduce_scatter", "reduce_scatter_tensor", "gather", "scatter", "all_to_all",
               "all_to_all_single", "send", "recv", "isend", "irecv", "broadcast_object_list",
               "all_gather_object", "gather_object", "scatter_object_list", "barrier"}


def test_no_package_module_but_comm_calls_a_torch_collective():
    offenders = []
    for path in PKG.rglob("*.py"):
        if path == PKG / "parallel" / "comm.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in COLLECTIVES \
                    and isinstance(node.value, ast.Name) and node.value.id == "dist":
                offenders.append(f"{path.relative_to(PKG)}:{node.lineno} dist.{node.attr}")
    assert offenders == []


def test_strict_rules_reject_a_direct_call_from_package_code():
    t = torch.zeros(3)
    with pytest.raises(StrictCollectiveError, match="grass_llm.parallel.comm"):
        check_call("all_reduce", str(PKG / "runner.py"), (t,), expected_device=t.device)
    check_call("all_reduce", str(PKG / "parallel" / "comm.py"), (t,), expected_device=t.device)
    # torch's own internals (FSDP2, DTensor) are checked by the tensor rules only
    check_call("all_reduce", torch.__file__, (t,), expected_device=t.device)


def test_strict_rules_reject_what_nccl_rejects():
    comm_py = str(PKG / "parallel" / "comm.py")
    t = torch.zeros(4, 4)
    with pytest.raises(StrictCollectiveError, match="on cpu"):
        check_call("all_reduce", comm_py, (t,), expected_device=torch.device("meta"))
    with pytest.raises(StrictCollectiveError, match="non-contiguous"):
        check_call("all_reduce", comm_py, (t.T,), expected_device=t.device)
    with pytest.raises(StrictCollectiveError, match="dtype"):
        check_call("all_reduce", comm_py, (torch.zeros(2, dtype=torch.complex64),),
                   expected_device=t.device)
    with pytest.raises(StrictCollectiveError, match="bitwise"):
        check_call("all_reduce", comm_py, (t,), {"op": torch.distributed.ReduceOp.BOR},
                   expected_device=t.device)


def test_gpu_runs_map_cpu_tensors_to_gloo_beside_nccl():
    # a library's CPU-tensor collective on a GPU run is then legal rather than a crash
    assert backend_for("cuda") == "cpu:gloo,cuda:nccl"
    assert backend_for("cpu") == "gloo"
