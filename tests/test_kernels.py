"""The fused kernels (csrc/, grass_llm.kernels) against the pure-torch reference.

The CPU extension is built here (JIT, cached); CUDA kernels are compiled in CI by
tools/check_cuda_build.sh and checked on a GPU by tools/gpu_check.sh.
"""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest
import torch

from grass_llm import kernels
from grass_llm.compress.factorized import FactGraSS
from grass_llm.compress.sparse import SJLT, sjlt_csr, sjlt_tables
from grass_llm.kernels import build, reference

if os.environ.get("GRASS_LLM_KERNELS", "auto") == "reference":
    pytest.skip("GRASS_LLM_KERNELS=reference: the extension is switched off", allow_module_level=True)


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a GPU (tools/gpu_check.sh runs these)"))]


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


def test_factgrass_mixed_input_dtypes(ext, device):
    # capture passes float32 features with the model's raw (here bfloat16) delta
    x, d, idx_in, idx_out, indptr, src, sgn = _to(device, *_case(torch.float32))
    d = d.to(torch.bfloat16)
    got = ext.factgrass(x, d, idx_in, idx_out, indptr, src, sgn, 1.0, False)
    want = reference.factgrass(x, d, idx_in, idx_out, indptr, src, sgn, 1.0, False)
    torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5 * want.abs().max().item())


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


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
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


def test_cuda_results_are_bitwise_reproducible(ext, device):
    x, d, idx_in, idx_out, indptr, src, sgn = _to(device, *_case(torch.bfloat16, B=2, T=700))
    a = ext.factgrass(x, d, idx_in, idx_out, indptr, src, sgn, 1.0, False)
    b = ext.factgrass(x, d, idx_in, idx_out, indptr, src, sgn, 1.0, False)
    assert torch.equal(a, b)  # no atomics anywhere: same bits every run


def test_results_do_not_depend_on_thread_count(ext):
    x, d, idx_in, idx_out, indptr, src, sgn = _case(torch.float32, B=2, T=700)
    before = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2, 3):
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
    (lambda a: {**a, "idx_in": a["idx_in"].int()}, "idx_in must be a 1-D int64"),
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
