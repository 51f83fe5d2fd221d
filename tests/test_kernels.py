"""The fused kernels (csrc/, grass_llm.kernels) against the pure-torch reference.

The CPU extension is built here (JIT, cached); CUDA kernels are compiled in CI by
tools/check_cuda_build.sh and checked on a GPU by tools/gpu_check.sh, which runs this file
there: every ``device``-parametrized test runs on CUDA too, and the ``test_cuda_*`` tests (grid
limits, every per-token block shape, a whole capture on GPU against CPU) only there.
Table validation, GPU targets, the build cache and the launch fallback: test_kernels_build.py.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from grass_llm import kernels
from grass_llm.compress.factorized import FactGraSS
from grass_llm.compress.sparse import SJLT, sjlt_csr, sjlt_tables
from grass_llm.kernels import build, reference

if os.environ.get("GRASS_LLM_KERNELS", "auto") == "reference":
    pytest.skip("GRASS_LLM_KERNELS=reference: the extension is switched off", allow_module_level=True)


cuda_only = pytest.mark.skipif(not torch.cuda.is_available(),
                               reason="needs a GPU (tools/gpu_check.sh runs these)")
DEVICES = ["cpu", pytest.param("cuda", marks=cuda_only)]
# float32 results of the kernels and of the reference differ only in summation order: relative
# round-off of a few 1e-7 over up to T * c terms; 2e-5 of the largest entry leaves margin.
RTOL32 = 2e-5


@pytest.fixture(scope="module")
def ext():
    mod = build.extension()
    assert mod is not None, f"the extension did not build: {build.info()['error']}"
    return mod


@pytest.fixture(params=DEVICES)
def device(request, ext):
    if request.param == "cuda":
        assert ext.with_cuda, "a GPU is visible but the extension was built without CUDA"
    return torch.device(request.param)


def _to(device, *tensors):
    return [t.to(device) for t in tensors]


def _tables(KI: int, KO: int, K: int, c: int, seed: int):
    """Masks (one picks the bias column, index I) and an SJLT's CSR for odd sizes."""
    rows, signs = sjlt_tables(KI * KO, K, c, seed)
    return [torch.from_numpy(a) for a in sjlt_csr(rows, signs, K)]


def _case(dtype, B=3, T=37, I=29, O=23, KI=7, KO=5, K=17, c=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, I, generator=g, dtype=torch.float64).to(dtype)
    d = torch.randn(B, T, O, generator=g, dtype=torch.float64).to(dtype)
    rng = np.random.default_rng(seed)
    idx_in = torch.from_numpy(np.sort(rng.choice(I, KI - 1, replace=False))).long()
    idx_in = torch.cat([idx_in, torch.tensor([I])])  # the bias column
    idx_out = torch.from_numpy(np.sort(rng.choice(O, KO, replace=False))).long()
    return x, d, idx_in, idx_out, *_tables(KI, KO, K, c, seed + 1)


@pytest.mark.parametrize("per_token", [False, True])
@pytest.mark.parametrize("dtype,rtol", [
    (torch.float64, 1e-12),  # only the summation order differs
    (torch.float32, 2e-5),   # same, at float32 rounding over up to T * c terms
])
@pytest.mark.parametrize("T", [1, 37, 300])  # 300 > one 256-token chunk
def test_factgrass_matches_reference(ext, device, dtype, rtol, per_token, T):
    x, d, idx_in, idx_out, indptr, src, sgn = _to(device, *_case(dtype, T=T))
    got = ext.factgrass(x, d, idx_in, idx_out, indptr, src, sgn, 0.7, per_token)
    want = reference.factgrass(x, d, idx_in, idx_out, indptr, src, sgn, 0.7, per_token)
    assert got.dtype == want.dtype == dtype and got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * want.abs().max().item())


# The CPU kernel tiles M into register blocks of 4 x 64, 8 x 32 and 16 x 16 float32 entries
# (half the columns for float64): these widths use every block kind, a partial last one, and
# KO not a multiple of any row count. "direct" is the capture's own call: x holds features that
# keep every column (idx_in = 0..I-1), read in place instead of gathered.
@pytest.mark.parametrize("direct", [False, True])
@pytest.mark.parametrize("KI,KO", [(16, 1), (32, 5), (48, 9), (112, 17), (128, 67), (131, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_factgrass_every_tile_shape_matches_reference(ext, device, direct, KI, KO, dtype):
    T, O = 260, 70
    g = torch.Generator().manual_seed(KI * 100 + KO)
    I = KI if direct else KI + 9
    x = torch.randn(2, T, I, generator=g, dtype=torch.float64).to(dtype)
    d = torch.randn(2, T, O, generator=g, dtype=torch.float64).to(dtype)
    if direct:
        idx_in = torch.arange(KI)
    else:
        idx_in = torch.from_numpy(np.sort(np.random.default_rng(KI).choice(I + 1, KI, False)))
    idx_out = torch.from_numpy(np.sort(np.random.default_rng(KO).choice(O, KO, False)))
    tabs = _to(device, x, d, idx_in.long(), idx_out.long(), *_tables(KI, KO, 37, 2, KI))
    got = ext.factgrass(*tabs, 0.5, False)
    want = reference.factgrass(*tabs, 0.5, False)
    _close(got, want, 1e-12 if dtype == torch.float64 else RTOL32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_host_gather_matches_reference_with_the_bias_column(ext, dtype):
    x = torch.randn(3, 5000, 41, dtype=torch.float64).to(dtype)  # > one task of rows
    idx = torch.tensor([0, 3, 4, 17, 40, 41])  # 41 = I: the bias column, read as 1
    got = kernels.host_gather(x, idx)
    want = reference.gather_columns(x, idx)
    assert got.dtype == want.dtype == reference.acc_dtype(x) and got.shape == (3, 5000, 6)
    torch.testing.assert_close(got, want, rtol=0, atol=0)  # a copy: exact
    with pytest.raises(RuntimeError, match="idx entries must lie in"):
        kernels.host_gather(x, torch.tensor([0, 42]))


# With AVX-512 the float32 gather assembles each 16-column output vector from the 32-value
# windows of the row its columns lie in (csrc/cpu/common.h), 8 rows at a time, and keeps the
# scalar loop where the columns spread too far (a few of a very wide row) or are not sorted.
# Row widths around the window and vector sizes, masks dense, sparse and unsorted, a bias
# column first or last, and row counts that leave a partial block of 8.
@pytest.mark.parametrize("I,KI", [(7, 3), (16, 16), (31, 17), (32, 32), (33, 20), (128, 32),
                                  (130, 129), (576, 128), (1000, 5), (4096, 40)])
@pytest.mark.parametrize("order", ["sorted", "bias first", "shuffled"])
@pytest.mark.parametrize("rows", [1, 13, 2048])
def test_host_gather_is_exact_for_every_mask_layout(ext, I, KI, order, rows):
    rng = np.random.default_rng(I * 1000 + KI)
    idx = np.sort(rng.choice(I + 1, KI, replace=False))  # may hold I: the bias column
    if order == "bias first":
        idx = np.concatenate([[I], idx[idx != I]])
    elif order == "shuffled":
        idx = rng.permutation(idx)
    x = torch.from_numpy(rng.standard_normal((rows, I), dtype=np.float32))
    idx = torch.from_numpy(idx).long()
    assert torch.equal(kernels.host_gather(x, idx), reference.gather_columns(x, idx))


def _close(got, want, rtol=RTOL32):
    assert got.dtype == want.dtype and got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * want.abs().max().item())


# Llama-8B's masks are 128 x 128; 130 x 67 gives the CUDA kernel 3 x 2 tiles of 64, the last one
# partial on both sides, and T = 300 five 64-token chunks (two 256-token ones on the CPU), the
# last partial. k = 1031 spreads the SJLT over several blocks of outputs.
PRODUCTION = dict(B=2, T=300, I=301, O=257, KI=130, KO=67, K=1031, c=2, seed=5)


@pytest.mark.parametrize("per_token", [False, True])
def test_production_tiling_matches_reference(ext, device, per_token):
    x, d, idx_in, idx_out, indptr, src, sgn = _to(device, *_case(torch.float32, **PRODUCTION))
    got = ext.factgrass(x, d, idx_in, idx_out, indptr, src, sgn, 0.5, per_token)
    _close(got, reference.factgrass(x, d, idx_in, idx_out, indptr, src, sgn, 0.5, per_token))


LOW = [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
       (torch.bfloat16, torch.float16), (torch.float32, torch.bfloat16),  # capture: fp32
       (torch.float16, torch.float32), (torch.float32, torch.float16)]  # features, raw delta


@pytest.mark.parametrize("per_token", [False, True])
@pytest.mark.parametrize("x_dtype,d_dtype", LOW)
def test_low_precision_inputs_equal_float32_on_the_same_values(ext, device, x_dtype, d_dtype,
                                                              per_token):
    # The kernels upcast each input once and accumulate in float32. A product of two bf16 or
    # fp16 values is exact in float32, so on the same values upcast, the float32 reference
    # differs from the kernel by summation order alone: float32's tolerance, not bf16's.
    x, d, idx_in, idx_out, indptr, src, sgn = _to(device, *_case(
        torch.float32, **{**PRODUCTION, "T": 150, "seed": 6}))
    x, d = x.to(x_dtype), d.to(d_dtype)
    got = ext.factgrass(x, d, idx_in, idx_out, indptr, src, sgn, 0.5, per_token)
    want = reference.factgrass(x.float(), d.float(), idx_in, idx_out, indptr, src, sgn, 0.5,
                               per_token)
    _close(got, want)


@pytest.mark.parametrize("per_token", [False, True])
@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16])
def test_low_precision_error_at_most_twice_torch(ext, device, low, per_token):
    # Both against float32 on the same float32 inputs: the kernel rounds only its inputs to
    # `low` and accumulates in float32; plain PyTorch in `low` also rounds every product and
    # partial sum. The kernel's error may be at most 2x PyTorch's own (STYLE.md, item 8).
    x, d, idx_in, idx_out, indptr, src, sgn = _to(device, *_case(
        torch.float32, B=4, T=200, I=301, O=257, KI=33, KO=31, K=129, c=2, seed=3))
    exact = reference.factgrass(x, d, idx_in, idx_out, indptr, src, sgn, 0.5, per_token)
    got = ext.factgrass(x.to(low), d.to(low), idx_in, idx_out, indptr, src, sgn, 0.5, per_token)
    xs = reference.gather_columns(x, idx_in).to(low)
    ds = reference.gather_last(d, idx_out).to(low)
    if per_token:
        m = (ds.unsqueeze(-1) * xs.unsqueeze(-2)).reshape(*ds.shape[:2], -1)
    else:
        m = torch.bmm(ds.transpose(1, 2), xs).reshape(ds.shape[0], -1)
    torch_low = torch.zeros(*m.shape[:-1], 129, dtype=low, device=device)
    torch_low.index_add_(-1, reference.csr_row_ids(indptr), m.index_select(-1, src) * sgn.to(low))
    torch_low = torch_low * 0.5
    err_kernel = (got - exact).abs().max().item()
    err_torch = (torch_low.float() - exact).abs().max().item()
    assert err_kernel <= 2 * err_torch, (err_kernel, err_torch)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_sjlt_and_transpose(ext, device, dtype):
    comp = SJLT(1001, 97, c=3, seed=4)
    g = torch.randn(5, 1001, dtype=torch.float64).to(dtype).to(device)
    y = torch.randn(5, 97, dtype=torch.float64).to(dtype).to(device)
    indptr, src, sgn = comp.csr.on(device)
    rows = torch.from_numpy(comp.rows).to(device)
    signs = torch.from_numpy(comp.signs.astype(np.float32)).to(device)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    got = ext.sjlt(g, indptr, src, sgn, comp.scale)
    torch.testing.assert_close(got, reference.sjlt(g, indptr, src, sgn, comp.scale),
                               rtol=tol, atol=tol)
    dense = comp.dense_matrix().to(device)
    torch.testing.assert_close(got.double(), g.double() @ dense.T, rtol=tol, atol=tol)
    got_t = ext.sjlt_t(y, rows, signs, comp.scale)
    torch.testing.assert_close(got_t, reference.sjlt_t(y, rows, signs, comp.scale),
                               rtol=tol, atol=tol)
    torch.testing.assert_close(got_t.double(), y.double() @ dense, rtol=tol, atol=tol)


def test_sjlt_t_of_no_coordinates_is_empty(ext, device):
    y = torch.randn(3, 5, device=device)
    rows = torch.zeros(2, 0, dtype=torch.long, device=device)
    signs = torch.zeros(2, 0, device=device)
    assert ext.sjlt_t(y, rows, signs, 1.0).shape == (3, 0)  # no zero-sized grid on CUDA
    assert kernels.sjlt_t(y, rows, signs, 1.0).shape == (3, 0)


@pytest.mark.parametrize("per_token", [False, True])
def test_results_are_bitwise_reproducible(ext, device, per_token):
    x, d, idx_in, idx_out, indptr, src, sgn = _to(device, *_case(torch.bfloat16, B=3, T=700))
    a = ext.factgrass(x, d, idx_in, idx_out, indptr, src, sgn, 1.0, per_token)
    b = ext.factgrass(x, d, idx_in, idx_out, indptr, src, sgn, 1.0, per_token)
    assert torch.equal(a, b)  # no atomics anywhere: same bits every run
    if device.type == "cuda":  # fixed chunks: an example's bits do not depend on its batch
        one = ext.factgrass(x[1:2].contiguous(), d[1:2].contiguous(), idx_in, idx_out, indptr,
                            src, sgn, 1.0, per_token)
        assert torch.equal(one[0], a[1])


@pytest.mark.parametrize("B, T", [(2, 700), (37, 100)])  # token chunks summed; many tasks
def test_results_do_not_depend_on_thread_count(ext, B, T):
    # the CPU kernel's threads take tasks from a shared counter: which thread ran which
    # example must not show in the bits
    x, d, idx_in, idx_out, indptr, src, sgn = _case(torch.float32, B=B, T=T)
    before = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2, 3, 2):
            torch.set_num_threads(n)
            outs.append(ext.factgrass(x, d, idx_in, idx_out, indptr, src, sgn, 1.0, False))
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(outs[0], o) for o in outs[1:])


def test_compressors_dispatch_to_the_extension(ext):
    fg = FactGraSS(29, 23, k=17, k_in=7, k_out=5, c=2, seed=1, bias=True)
    x = torch.randn(3, 11, 29, dtype=torch.float64)
    d = torch.randn(3, 11, 23, dtype=torch.float64)
    assert kernels.backend_name(x) == "cpu"
    g = torch.einsum("bto,bti->boi", d, torch.cat([x, torch.ones(3, 11, 1, dtype=x.dtype)], -1))
    torch.testing.assert_close(fg(x, d), g.reshape(3, -1) @ fg.dense_matrix().T)
    torch.testing.assert_close(fg.reduce(fg.input_features(x), d), fg(x, d))
    torch.testing.assert_close(fg.reduce(fg.input_features(x), d, per_token=True).sum(1),
                               fg(x, d))


def test_custom_ops_pass_opcheck(ext):
    x, d, idx_in, idx_out, indptr, src, sgn = _case(torch.float32, T=5)
    torch.library.opcheck(torch.ops.grass_llm.factgrass.default,
                          (x, d, idx_in, idx_out, indptr, src, sgn, 0.5, True))
    g = torch.randn(3, 35)
    torch.library.opcheck(torch.ops.grass_llm.sjlt.default, (g, indptr, src, sgn, 0.5))
    comp = SJLT(35, 9, c=2, seed=0)
    torch.library.opcheck(torch.ops.grass_llm.sjlt_t.default,
                          (torch.randn(3, 9), torch.from_numpy(comp.rows),
                           torch.from_numpy(comp.signs.astype(np.float32)), 0.5))


@pytest.mark.parametrize("mutate,message", [
    (lambda a: {**a, "x": a["x"][:0], "delta": a["delta"][:0]}, "empty batch"),
    (lambda a: {**a, "x": a["x"][:, :0], "delta": a["delta"][:, :0]}, "T = 0"),
    (lambda a: {**a, "delta": a["delta"][:, :3]}, "disagree on"),
    (lambda a: {**a, "idx_in": a["idx_in"].int()}, "idx_in must be a contiguous 1-D int64"),
    (lambda a: {**a, "delta": a["delta"].double()}, "both float64"),
    (lambda a: {**a, "x": a["x"].int()}, "x must be float16"),
])
def test_bad_inputs_rejected(ext, mutate, message):
    x, d, idx_in, idx_out, indptr, src, sgn = _case(torch.float32, T=4)
    args = dict(x=x, delta=d, idx_in=idx_in, idx_out=idx_out, indptr=indptr, src=src, sgn=sgn,
                scale=1.0, per_token=False)
    bad = mutate(args)
    with pytest.raises(ValueError, match=message):
        kernels.factgrass(**bad)
    # the C++ entry point checks the same things itself (RuntimeError from TORCH_CHECK)
    with pytest.raises(RuntimeError):
        ext.factgrass(*bad.values())


def test_extension_rejects_out_of_range_tables(ext):
    x, d, idx_in, idx_out, indptr, src, sgn = _case(torch.float32, T=4)
    with pytest.raises(RuntimeError, match="idx_out entries"):
        ext.factgrass(x, d, idx_in, idx_out + 100, indptr, src, sgn, 1.0, False)
    with pytest.raises(RuntimeError, match="idx_in entries"):
        ext.factgrass(x, d, idx_in + 1, idx_out, indptr, src, sgn, 1.0, False)


def test_failed_build_falls_back_with_one_warning(monkeypatch):
    def broken(*a, **k):
        raise RuntimeError("simulated compiler failure")

    monkeypatch.setattr(build, "build", broken)
    monkeypatch.setenv("GRASS_LLM_KERNELS", "auto")  # the default, whatever the caller set
    build.reset()
    try:
        x, d, idx_in, idx_out, indptr, src, sgn = _case(torch.float32, T=3)
        with pytest.warns(RuntimeWarning, match="pure-torch reference") as rec:
            out = kernels.factgrass(x, d, idx_in, idx_out, indptr, src, sgn, 1.0, False)
        assert len(rec) == 1
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no second warning
            kernels.factgrass(x, d, idx_in, idx_out, indptr, src, sgn, 1.0, False)
        torch.testing.assert_close(
            out, reference.factgrass(x, d, idx_in, idx_out, indptr, src, sgn, 1.0, False))
        assert kernels.backend_name(x) == "reference"
        build.reset()
        monkeypatch.setenv("GRASS_LLM_KERNELS", "extension")
        with pytest.raises(RuntimeError, match="simulated compiler failure"):
            build.extension()
        build.reset()
        monkeypatch.setenv("GRASS_LLM_KERNELS", "bogus")
        with pytest.raises(ValueError, match="GRASS_LLM_KERNELS"):
            build.extension()
    finally:
        build.reset()


def test_reference_switch(monkeypatch):
    monkeypatch.setenv("GRASS_LLM_KERNELS", "reference")
    build.reset()
    try:
        assert build.extension() is None
        assert kernels.backend_name(torch.zeros(1)) == "reference"
    finally:
        monkeypatch.undo()  # the caller's GRASS_LLM_KERNELS back before the state is reset
        build.reset()


# ------------------------------------------------------- CUDA kernels, emulated on the CPU
EMULATION = Path(__file__).resolve().parent / "cuda_emulation"
SANITIZERS = {"address": ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined"],
              "thread": ["-fsanitize=thread"]}


def _emulation_binary(sanitizer: str) -> Path:
    """tests/cuda_emulation/check_kernels.cpp built with a sanitizer, cached by content."""
    cxx = os.environ.get("CXX", "c++")
    flags = ["-std=c++20", "-O1", "-g", "-pthread", "-Wno-unknown-pragmas",
             *SANITIZERS[sanitizer]]
    sources = sorted(EMULATION.glob("*")) + sorted((build.csrc_dir() / "cuda").glob("*.cuh"))
    h = hashlib.sha256(repr((cxx, flags)).encode())
    for f in sources:
        h.update(f.name.encode() + f.read_bytes())
    exe = build.cache_dir() / "emulation" / f"check_kernels_{sanitizer}_{h.hexdigest()[:12]}"
    if not exe.is_file():
        exe.parent.mkdir(parents=True, exist_ok=True)
        tmp = exe.with_suffix(f".{os.getpid()}.tmp")
        res = subprocess.run([cxx, *flags, str(EMULATION / "check_kernels.cpp"), "-o", str(tmp)],
                             capture_output=True, text=True, timeout=600)
        if res.returncode != 0 and ("lasan" in res.stderr or "ltsan" in res.stderr or
                                    "lubsan" in res.stderr):
            pytest.skip(f"{cxx} has no {sanitizer} sanitizer runtime")
        assert res.returncode == 0, res.stderr[-3000:]
        tmp.replace(exe)
    return exe


@pytest.mark.skipif(shutil.which(os.environ.get("CXX", "c++")) is None,
                    reason="needs a C++ compiler")
@pytest.mark.parametrize("sanitizer", sorted(SANITIZERS))
def test_cuda_kernels_are_correct_in_a_cpu_emulation(sanitizer):
    # csrc/cuda's kernels compiled for the CPU (tests/cuda_emulation): every kernel against a
    # float64 reference at the production tiling, with the launchers' grids and with grids of
    # 1-3 blocks (every stride loop runs). AddressSanitizer catches an out-of-bounds read or
    # write, ThreadSanitizer a missing __syncthreads() (a race on shared memory).
    args = ["--quick"] if sanitizer == "thread" else []  # threads are slow under TSan
    res = subprocess.run([str(_emulation_binary(sanitizer)), *args], capture_output=True,
                         text=True, timeout=600)
    if sanitizer == "thread" and "unexpected memory mapping" in res.stderr:
        pytest.skip("ThreadSanitizer cannot run on this kernel's memory layout")
    assert res.returncode == 0 and "all passed" in res.stdout, res.stdout + res.stderr[-3000:]
    assert "WARNING: ThreadSanitizer" not in res.stderr, res.stderr[-3000:]


# ----------------------------------------------------------------------- GPU only
def _dense_case(B, T, seed=0, device="cuda", KI=3, KO=3, K=5):
    """Inputs made on the GPU (too large to draw on the CPU), tiny masks, a 2-nonzero SJLT."""
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(B, T, 8, generator=g, device=device)
    d = torch.randn(B, T, 8, generator=g, device=device)
    idx_in = torch.tensor([1, 4, 8], device=device)[:KI]  # 8 = the bias column
    idx_out = torch.tensor([0, 3, 7], device=device)[:KO]
    return x, d, idx_in, idx_out, *_to(device, *_tables(KI, KO, K, 2, seed + 1))


@cuda_only
def test_cuda_grids_stride_past_their_limits(ext):
    # Grid y/z hold at most 65,535 blocks and the per-token grid at most 65,536 blocks of 16
    # rows: every kernel strides past those, and the entries beyond them must be computed.
    comp = SJLT(64, 17, c=2, seed=7)
    g = torch.randn(70_001, 64, device="cuda")
    y = torch.randn(70_001, 17, device="cuda")
    indptr, src, sgn = comp.csr.on(g.device)
    rows = torch.from_numpy(comp.rows).cuda()
    signs = torch.from_numpy(comp.signs.astype(np.float32)).cuda()
    _close(ext.sjlt(g, indptr, src, sgn, 0.5), reference.sjlt(g, indptr, src, sgn, 0.5))
    _close(ext.sjlt_t(y, rows, signs, 0.5), reference.sjlt_t(y, rows, signs, 0.5))
    # per example: 70,001 examples (grid z), then one sequence of 65,537 64-token chunks
    # (grid y) whose last 100 tokens dominate, so dropping the chunks past the grid shows
    for B, T in ((70_001, 1), (1, 65_536 * 64 + 65)):
        x, d, *tabs = _dense_case(B, T)
        x[:, -100:] *= 1000
        got = ext.factgrass(x, d, *tabs, 1.0, False)
        want = reference.factgrass(x.double(), d.double(), *tabs, 1.0, False)
        # float32 sums of up to 4M terms: a few 1e-5 relative; a dropped chunk is ~1
        _close(got.double(), want, rtol=1e-3)
    x, d, *tabs = _dense_case(1, 2**20 + 37)  # per token: more than 2^20 rows
    _close(ext.factgrass(x, d, *tabs, 1.0, True), reference.factgrass(x, d, *tabs, 1.0, True))


# k_in + k_out features of 16 token rows per block fill shared memory fast: 1,001 float32
# columns need the opt-in above 48 KiB, 1,500 float64 ones 4 rows per block and 7,300 float64
# ones 1 row per block (on an H200's 227 KiB; other GPUs switch at other sizes, always correct).
@cuda_only
@pytest.mark.parametrize("dtype,KI,KO", [(torch.float32, 700, 301), (torch.float64, 800, 700),
                                         (torch.float64, 3700, 3600)])
def test_cuda_per_token_every_block_shape(ext, dtype, KI, KO):
    x, d, idx_in, idx_out, indptr, src, sgn = _to("cuda", *_case(
        dtype, B=2, T=3, I=KI + 5, O=KO + 2, KI=KI, KO=KO, K=257, c=1, seed=8))
    got = ext.factgrass(x, d, idx_in, idx_out, indptr, src, sgn, 1.0, True)
    want = reference.factgrass(x, d, idx_in, idx_out, indptr, src, sgn, 1.0, True)
    _close(got, want, rtol=1e-12 if dtype == torch.float64 else RTOL32)


@cuda_only
@pytest.mark.parametrize("token_mode", [None, "position"])
def test_cuda_capture_equals_cpu_capture(ext, token_mode):
    from grass_llm.capture import GradientCapture
    from grass_llm.models import tiny_model

    ids = torch.randint(0, 101, (3, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    outs = {}
    for dev in ("cpu", "cuda"):  # qwen2: q/k/v have biases, so the bias column is used too
        model = tiny_model("qwen2", dtype=torch.float64, attn_implementation="eager").to(dev)
        with GradientCapture(model, "factgrass:k=24,k_in=8,k_out=7,c=2", seed=3,
                             token_mode=token_mode) as cap:
            outs[dev] = cap(ids.to(dev), mask.to(dev))
    assert kernels.backend_name(torch.zeros(1, device="cuda")) == "cuda"
    for name, want in outs["cpu"].grads.items():
        got = outs["cuda"].grads[name].cpu()
        # float64 model, but transformers' RMSNorm rounds to float32 (6e-8 relative) on each
        # device in its own order: rows agree to ~1e-7; a kernel bug is of order 1
        scale = want.norm(dim=-1)
        err = (got - want).norm(dim=-1) / scale.clamp_min(1e-9 * float(scale.max()))
        assert got.shape == want.shape and float(err.max()) < 1e-5, (name, float(err.max()))
