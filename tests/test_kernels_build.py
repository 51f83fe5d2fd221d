"""The kernels' safety net, on CPU: table validation, GPU targets and flags, the build cache
shared between checkouts, and the fallback when a kernel cannot launch.

A fake extension whose every entry point fails the test stands in where a test must prove that
a bad input is refused *before* any kernel runs.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from grass_llm import kernels
from grass_llm.compress.factorized import FactGraSS
from grass_llm.compress.sparse import SJLT, CsrTables
from grass_llm.kernels import __main__ as cli
from grass_llm.kernels import build, reference, tables
from tests.test_kernels import _case

NO_KERNEL_IMAGE = ("CUDA error: no kernel image is available for execution on the device\n"
                   "CUDA kernel errors might be asynchronously reported at some other API call")


class _Fake:
    """An extension stand-in: ``with_cuda`` set, every entry point runs ``behaviour``."""

    with_cuda = True

    def __init__(self, behaviour):
        self.calls = 0
        self._behaviour = behaviour

    def _call(self, *args):
        self.calls += 1
        return self._behaviour(*args)

    factgrass = sjlt = sjlt_t = gather_columns = _call


def _no_image(*args):
    raise RuntimeError(NO_KERNEL_IMAGE)


def _no_kernel(*args):
    raise AssertionError("a kernel ran on a table that should have been refused")


@pytest.fixture
def fake_ext(monkeypatch):
    """Install a fake extension (``fake_ext(behaviour)``); the real state comes back after."""
    def install(behaviour=_no_kernel):
        fake = _Fake(behaviour)
        monkeypatch.setattr(build, "extension", lambda: fake)
        return fake

    build.reset()
    yield install
    monkeypatch.undo()
    build.reset()


def _args(**changes):
    x, d, idx_in, idx_out, indptr, src, sgn = _case(torch.float32, T=4)
    args = dict(x=x, delta=d, idx_in=idx_in, idx_out=idx_out, indptr=indptr, src=src, sgn=sgn,
                scale=1.0, per_token=False)
    for key, fn in changes.items():
        args[key] = fn(args[key])
    return args


@pytest.mark.parametrize("change,message", [
    (dict(idx_in=lambda t: t + 1), r"idx_in entries must lie in \[0, 30\)"),
    (dict(idx_in=lambda t: t.index_fill(0, torch.tensor([0]), -1)), "idx_in entries"),
    (dict(idx_out=lambda t: t + 100), r"idx_out entries must lie in \[0, 23\)"),
    (dict(src=lambda t: t.index_fill(0, torch.tensor([3]), 35)), r"src entries .*\[0, 35\)"),
    (dict(indptr=lambda t: t.index_fill(0, torch.tensor([t.numel() - 1]), 5)), "indptr must"),
    (dict(indptr=lambda t: t.flip(0)), "indptr must"),
])
def test_corrupted_factgrass_tables_are_refused_before_any_kernel_runs(fake_ext, change,
                                                                       message):
    fake = fake_ext()
    with pytest.raises(ValueError, match=message):
        kernels.factgrass(**_args(**change))
    assert fake.calls == 0


def test_corrupted_sjlt_tables_are_refused_before_any_kernel_runs(fake_ext):
    fake = fake_ext()
    comp = SJLT(40, 9, c=2, seed=0)
    indptr, src, sgn = comp.csr.on(torch.device("cpu"))
    with pytest.raises(ValueError, match=r"src entries must lie in \[0, 39\)"):
        kernels.sjlt(torch.randn(2, 39), indptr, src, sgn, 1.0)  # a vector too short for it
    rows = torch.from_numpy(comp.rows).clone()
    rows[1, 7] = 9
    with pytest.raises(ValueError, match=r"rows entries must lie in \[0, 9\)"):
        kernels.sjlt_t(torch.randn(2, 9), rows, torch.ones(2, 40), 1.0)
    assert fake.calls == 0


def test_compressor_table_edited_in_place_is_checked_again(fake_ext):
    fg = FactGraSS(29, 23, k=17, k_in=7, k_out=5, c=2, seed=1, bias=True)
    x, d = torch.randn(3, 11, 29), torch.randn(3, 11, 23)
    want = fg(x, d)  # the real extension (the fake is installed below)
    fake = fake_ext()
    table = fg._out.get(x.device)
    good = int(table[2])
    table[2] = 23  # one past the last column of delta
    with pytest.raises(ValueError, match="idx_out entries"):
        fg(x, d)
    assert int(fg.idx_out[2]) == good  # the host array is not shared with the device copy
    table[2] = good  # repaired: accepted again
    fake._behaviour = lambda *a: want
    torch.testing.assert_close(fg(x, d), want)
    assert fake.calls == 1


def test_tables_are_measured_once_not_per_call():
    fg = FactGraSS(29, 23, k=17, k_in=7, k_out=5, c=2, seed=2, bias=True)
    x, d = torch.randn(3, 11, 29), torch.randn(3, 11, 23)
    before = tables.measured
    for _ in range(3):
        fg(x, d)
        fg.per_token(x, d)
    assert tables.measured == before  # a compressor's tables are known from their host arrays
    args = _args()
    kernels.factgrass(**args)
    first = tables.measured - before
    kernels.factgrass(**args)
    assert first == 4 and tables.measured - before == 4  # idx_in, idx_out, indptr, src: once


# A garbage collection that frees a remembered table runs its weakref callback, which takes
# the tables' lock. Here a collection is forced inside _store (in version), as any allocation
# there can trigger one; with the lock held there, the old code hung on the second remember.
_GC_UNDER_THE_LOCK = """
import gc, numpy as np, torch
from grass_llm.kernels import tables
real_version = tables.version
def collecting(t):
    gc.collect()
    return real_version(t)
tables.version = collecting
class Cycle:
    pass
for _ in range(3):
    c = Cycle()
    c.me, c.t = c, torch.arange(5)  # freed only by the collector
    tables.remember(c.t, np.arange(5))
    del c
    tables.remember(torch.arange(5), np.arange(5))
print("done")
"""


def test_a_garbage_collection_while_a_table_is_remembered_does_not_deadlock():
    try:
        res = subprocess.run([sys.executable, "-c", _GC_UNDER_THE_LOCK], capture_output=True,
                             text=True, timeout=30, cwd=Path(__file__).resolve().parents[1])
    except subprocess.TimeoutExpired:
        pytest.fail("remembering a table deadlocked when a collection freed another one")
    assert res.returncode == 0 and res.stdout.strip() == "done", res.stderr[-2000:]


def test_csr_tables_refuse_rows_outside_the_outputs():
    rows = np.array([[0, 3, 1], [2, 4, 0]])
    with pytest.raises(ValueError, match=r"rows must lie in \[0, k=4\)"):
        CsrTables(rows, np.ones((2, 3)), 4)
    with pytest.raises(ValueError, match="shape of rows"):
        CsrTables(rows, np.ones((3, 2)), 5)


def test_launch_failure_falls_back_with_one_warning(fake_ext, monkeypatch):
    monkeypatch.setenv("GRASS_LLM_KERNELS", "auto")
    fake = fake_ext(_no_image)
    args = _args()
    with pytest.warns(RuntimeWarning, match="could not launch on cpu") as rec:
        out = kernels.factgrass(**args)
    assert len(rec) == 1 and fake.calls == 1
    torch.testing.assert_close(out, reference.factgrass(*args.values()))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning, no second launch
        kernels.factgrass(**args)
        kernels.sjlt(torch.randn(2, 35), args["indptr"], args["src"], args["sgn"], 1.0)
    assert fake.calls == 1 and kernels.backend_name(args["x"]) == "reference"
    assert "no kernel image" in build.info()["launch_failures"]["cpu"]


def test_prepared_call_refuses_what_the_op_refuses_before_any_kernel_runs(fake_ext):
    fake = fake_ext()
    a = _args()
    tabs = (a["idx_in"], a["idx_out"], a["indptr"], a["src"], a["sgn"])
    narrow = int(a["idx_out"].max())  # a delta without the last kept column
    with pytest.raises(ValueError, match=rf"idx_out entries must lie in \[0, {narrow}\)"):
        kernels.FactGraSSCall(*tabs, 1.0, 29, narrow)
    call = kernels.FactGraSSCall(*tabs, 1.0, 29, 23)
    for x, d, message in [(a["x"][:, :, :28], a["delta"], "idx_in entries"),
                          (a["x"][:0], a["delta"][:0], "empty batch"),
                          (a["x"], a["delta"][:, :3], "disagree on"),
                          (a["x"].double(), a["delta"], "both float64"),
                          (a["x"][0], a["delta"][0], "must be 3-D")]:
        with pytest.raises(ValueError, match=message):
            call(x, d, False)
    tabs[1][0] = 23  # edited in place after the call was built: checked again, refused
    with pytest.raises(ValueError, match="idx_out entries"):
        call(a["x"], a["delta"], False)
    assert fake.calls == 0


def test_prepared_call_launch_failure_falls_back_with_one_warning(fake_ext, monkeypatch):
    monkeypatch.setenv("GRASS_LLM_KERNELS", "auto")
    fake = fake_ext(_no_image)
    a = _args()
    call = kernels.FactGraSSCall(a["idx_in"], a["idx_out"], a["indptr"], a["src"], a["sgn"],
                                 0.5, 29, 23)
    want = reference.factgrass(a["x"], a["delta"], a["idx_in"], a["idx_out"], a["indptr"],
                               a["src"], a["sgn"], 0.5, True)
    with pytest.warns(RuntimeWarning, match="could not launch on cpu") as rec:
        got = call(a["x"], a["delta"], True)
    assert len(rec) == 1 and fake.calls == 1
    torch.testing.assert_close(got, want)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning, no second launch
        torch.testing.assert_close(call(a["x"], a["delta"], True), want)
    assert fake.calls == 1


def test_launch_failure_raises_in_extension_mode_and_other_errors_propagate(fake_ext,
                                                                          monkeypatch):
    def bug(*a):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setenv("GRASS_LLM_KERNELS", "extension")
    fake_ext(_no_image)
    with pytest.raises(RuntimeError, match="GRASS_LLM_KERNELS=extension .* failed to launch"):
        kernels.factgrass(**_args())
    monkeypatch.setenv("GRASS_LLM_KERNELS", "auto")
    fake_ext(bug)  # not a launch failure: the context may be poisoned, never hide it
    with pytest.raises(RuntimeError, match="illegal memory access"):
        kernels.factgrass(**_args())
    assert build.launch_failures() == {}


def _fake_gpus(monkeypatch, caps, nvcc_archs=(75, 80, 86, 89, 90, 100, 120)):
    monkeypatch.delenv("GRASS_LLM_CUDA_ARCHS", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: bool(caps))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(caps))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i: caps[i])
    monkeypatch.setattr(build, "_nvcc_archs", lambda: nvcc_archs)


def _targets():
    return [f for f in build._flags(True)["extra_cuda_cflags"] if f.startswith("-gencode")]


def test_cuda_targets_are_the_visible_gpus_plus_ptx(monkeypatch):
    sass = "-gencode=arch=compute_{0},code=sm_{0}".format
    ptx = "-gencode=arch=compute_{0},code=compute_{0}".format
    _fake_gpus(monkeypatch, [])
    assert _targets() == [sass(80), sass(90), ptx(90)]  # no GPU: the compile check's targets
    _fake_gpus(monkeypatch, [(7, 5)])  # a T4: its own SASS (sm_80 code would not run)
    assert _targets() == [sass(75), ptx(75)]
    name_t4 = build.build_name(True)
    _fake_gpus(monkeypatch, [(10, 0), (9, 0)])  # mixed node: both, PTX of the newest
    assert _targets() == [sass(90), sass(100), ptx(100)]
    _fake_gpus(monkeypatch, [(12, 0)], nvcc_archs=(75, 80, 90))  # GPU newer than the toolkit
    assert _targets() == [sass(90), ptx(90)]  # its driver compiles the PTX at load time
    assert build.build_name(True) != name_t4  # the targets are part of the cache key
    monkeypatch.setenv("GRASS_LLM_CUDA_ARCHS", "8.6;sm_90")
    assert _targets() == [sass(86), sass(90), ptx(90)]
    monkeypatch.setenv("GRASS_LLM_CUDA_ARCHS", "ampere")
    with pytest.raises(ValueError, match="GRASS_LLM_CUDA_ARCHS"):
        _targets()


def test_flags_command_prints_what_the_jit_build_passes(capsys):
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS

    assert cli.main(["flags"]) == 0
    nvcc = capsys.readouterr().out.splitlines()
    jit = build._flags(True)
    assert nvcc[-len(jit["extra_cuda_cflags"]):] == jit["extra_cuda_cflags"]
    assert all(f in nvcc for f in COMMON_NVCC_FLAGS) and f"-I{build.csrc_dir()}" in nvcc
    assert cli.main(["flags", "cxx"]) == 0
    cxx = capsys.readouterr().out.splitlines()
    assert cxx[-len(jit["extra_cflags"]):] == jit["extra_cflags"]
    assert cli.main(["flags", "ptx"]) == 2


def test_two_checkouts_share_one_build_without_recompiling(tmp_path, monkeypatch):
    with_cuda = build.want_cuda()
    build.build(with_cuda=with_cuda)  # built (or cached) from this checkout
    trees = []
    for name in ("checkout_a", "checkout_b"):
        shutil.copytree(build.csrc_dir(), tmp_path / name / "csrc")
        trees.append(tmp_path / name / "csrc")
    folder = build.cache_dir() / build.build_name(with_cuda)
    so = next(folder.glob("*.so"))
    state = (so.stat().st_mtime_ns, (folder / ".ninja_log").read_bytes())
    for tree in trees * 2:  # a, b, a, b: each switch used to recompile everything
        monkeypatch.setattr(build, "csrc_dir", lambda tree=tree: tree)
        assert build.build_name(with_cuda) == folder.name
        build.build(with_cuda=with_cuda)
        assert (so.stat().st_mtime_ns, (folder / ".ninja_log").read_bytes()) == state
    assert str(tmp_path) not in (folder / "build.ninja").read_text()


def test_capture_imports_without_the_private_tensor_parallel_helper():
    # The GPU machine's torch may lack (or rename) this private helper; only tensor-parallel
    # capture needs it, so plain capture must still import and run.
    # Simulated: torch's and transformers' own modules are imported first (a renamed helper
    # would be renamed there too), then the name is removed before grass_llm.capture is.
    code = ("import torch, torch.distributed.fsdp\n"
            "from grass_llm.models import tiny_model\n"
            "m = tiny_model('llama', num_layers=1)\n"
            "import torch.distributed.tensor._utils as u\n"
            "u.__dict__.pop('compute_local_shape_and_global_offset', None)\n"
            "from grass_llm.capture import GradientCapture\n"
            "with GradientCapture(m, 'factgrass:k=8,k_in=4,k_out=4') as cap:\n"
            "    out = cap(torch.randint(0, 101, (2, 5)))\n"
            "print(len(out.grads))\n")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
           "GRASS_LLM_KERNELS": "reference"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert int(res.stdout.strip()) == 7  # q, k, v, o, gate, up, down


def test_reference_mode_leaves_the_hooks_no_direct_extension_path(monkeypatch):
    """GRASS_LLM_KERNELS=reference means the pure-torch path everywhere, the capture hooks'
    direct CPU calls (FactGraSS.host_calls) and C++ hooks (FactGraSS.native_hook) included."""
    from grass_llm.capture import GradientCapture
    from grass_llm.compress import FactGraSS
    from grass_llm.models import tiny_model

    comp = FactGraSS(d_in=40, d_out=30, k=16, k_in=6, k_out=5, seed=1)
    monkeypatch.setenv("GRASS_LLM_KERNELS", "reference")
    build.reset()
    try:
        assert comp.host_calls() is None
        assert comp.native_hook("layer", lambda *a: None) is None
        with GradientCapture(tiny_model("llama"), "factgrass:k=16,k_in=6,k_out=5") as cap:
            assert cap._native.hooks == {}
    finally:
        monkeypatch.undo()
        build.reset()
    if build.extension() is not None:  # auto mode with the extension built: the direct path
        gather, reduce = comp.host_calls()
        x, d = torch.randn(3, 4, 40, dtype=torch.float64), torch.randn(3, 4, 30,
                                                                        dtype=torch.float64)
        g = torch.einsum("bto,bti->boi", d, x).reshape(3, -1)  # each example's exact gradient
        # float64 throughout: only the summation order differs from the dense map's
        torch.testing.assert_close(reduce(gather(x), d, False), g @ comp.dense_matrix().T,
                                   rtol=1e-10, atol=1e-12)
