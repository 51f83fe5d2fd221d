"""The distributed code path on NCCL (GPU machines only; tools/gpu_check.sh runs this file).

One GPU is enough to exercise what the CPU tests cannot: a process started by torchrun gets a
process group even alone, so ``parallel=fsdp`` / ``tp`` build a one-rank NCCL mesh, the weights
travel through the broadcast path of ``parallel.loading``, every ``comm`` collective (agree,
broadcast_object, all_reduce of the run totals, the Fisher's reduce to owner ranks, the
scoring's gather) runs on NCCL with tensors on the GPU, and the strict collectives of
tests/strict_dist.py check each call's device. The stores must equal a CPU single-process
store of the same run.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from grass_llm.store import open_store, verify_store
from tests.test_cache import ROOT, CORPUS, _assert_same_store, _cache_args, _env, _free_port

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA GPU (NCCL); run by tools/gpu_check.sh")


def _run(args, *, gpu: bool, timeout=300):
    env = _env()
    if not gpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
    res = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=timeout)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-6000:]
    return res


def _torchrun(*cmd):
    return ["-m", "torch.distributed.run", "--nproc-per-node", "1", "--master-port",
            str(_free_port()), "-m", "tests.influence_ranks", *cmd]


@pytest.fixture(scope="module")
def cpu_store(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("cpu") / "cpu.zarr")
    _run(["-m", "grass_llm", *_cache_args(out)], gpu=False)
    return out


@pytest.mark.parametrize("mode", ["fsdp", "tp"])
def test_one_rank_nccl_mesh_store_equals_cpu(cpu_store, tmp_path, mode):
    out = str(tmp_path / f"{mode}.zarr")
    _run(_torchrun(*_cache_args(out, "--set", f"parallel={mode}")), gpu=True)
    assert verify_store(out) == []
    _assert_same_store(out, cpu_store)
    run = open_store(out).sessions[-1]["run"]
    assert run["device"] == "cuda" and run["world_size"] == 1


def test_fisher_and_query_on_nccl_equal_cpu(cpu_store, tmp_path):
    import shutil

    gpu_copy = str(tmp_path / "gpu.zarr")
    shutil.copytree(cpu_store, gpu_copy)
    queries = tmp_path / "q.jsonl"
    with open(CORPUS) as f:
        queries.write_text("".join(next(f) for _ in range(3)))
    cpu_out, gpu_out = tmp_path / "cpu.jsonl", tmp_path / "gpu.jsonl"
    _run(["-m", "grass_llm", "fisher", cpu_store], gpu=False)
    _run(["-m", "grass_llm", "query", cpu_store, "--queries", str(queries), "--out",
          str(cpu_out), "--top-k", "5"], gpu=False)
    _run(_torchrun("fisher", gpu_copy, "--next", "query", gpu_copy, "--queries", str(queries),
                   "--out", str(gpu_out), "--top-k", "5"), gpu=True)
    assert verify_store(gpu_copy) == []
    for a, b in zip(cpu_out.read_text().splitlines(), gpu_out.read_text().splitlines()):
        ra, rb = json.loads(a), json.loads(b)
        # float64 factors on both sides; the query gradients differ by float32 rounding of
        # the model on two devices, so scores agree to ~1e-4 relative and the order holds
        sa = np.array([e["score"] for e in ra["top"]])
        sb = np.array([e["score"] for e in rb["top"]])
        np.testing.assert_allclose(sb, sa, rtol=1e-3, atol=1e-6 * np.abs(sa).max())
        assert [e["id"] for e in ra["top"][:3]] == [e["id"] for e in rb["top"][:3]]
    assert os.path.getsize(gpu_out) > 0
