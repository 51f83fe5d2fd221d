"""Every compressor against its plain reference: the dense matrix, and explicit vec(G)."""

import numpy as np
import pytest
import torch

from grass_llm.compress import (
    FJLT,
    SJLT,
    FactGraSS,
    Gaussian,
    GraSS,
    Identity,
    LoGra,
    Rademacher,
    RandomMask,
    SelectiveMask,
    build_compressor,
)
from grass_llm.compress import dense as dense_mod

# float64 throughout: the maps and the reference differ only by summation order, so 1e-12
# relative to the size of the values is far above round-off and far below any real bug.
TOL = dict(rtol=1e-12, atol=1e-12)

P = 301  # odd, not a power of two (FJLT pads to 512)


def vector_compressors():
    return [
        RandomMask(P, 37, seed=1),
        SJLT(P, 41, c=1, seed=2),
        SJLT(P, 41, c=4, seed=3),
        GraSS(P, 29, 113, seed=4),
        GraSS(P, 29, 113, c=3, seed=5),
        Gaussian(P, 23, seed=6),
        Rademacher(P, 23, seed=7),
        FJLT(P, 31, seed=8),
        SelectiveMask(P, np.arange(0, P, 7)),
        Identity(P),
    ]


@pytest.mark.parametrize("comp", vector_compressors(), ids=lambda c: c.spec)
def test_vector_equals_dense_matrix(comp):
    g = torch.randn(5, P, dtype=torch.float64)
    out = comp(g)
    m = comp.dense_matrix()
    assert m.shape == (comp.k, P) and m.dtype == torch.float64
    assert out.shape == (5, comp.k) and out.dtype == torch.float64
    torch.testing.assert_close(out, g @ m.T, **TOL)


def test_gaussian_streamed_blocks_equal_cached(monkeypatch):
    """Maps too big to cache are regenerated per column block; the result must not change."""
    g = torch.randn(3, P, dtype=torch.float64)
    cached = Gaussian(P, 17, seed=9)
    monkeypatch.setattr(dense_mod, "CACHE_ENTRIES", 0)
    monkeypatch.setattr(dense_mod, "_BLOCK_ENTRIES", 17 * 10)  # 31 blocks, the last one partial
    streamed = Gaussian(P, 17, seed=9)
    assert streamed._cache is None
    torch.testing.assert_close(streamed(g), cached(g), **TOL)


def explicit_vec_grad(x_BTI, d_BTO, bias):
    """vec(sum_t delta_t x_t^T), row-major, by a plain loop over examples and tokens."""
    B, T, _ = x_BTI.shape
    rows = []
    for b in range(B):
        G = torch.zeros(d_BTO.shape[2], x_BTI.shape[2] + int(bias), dtype=torch.float64)
        for t in range(T):
            xt = x_BTI[b, t]
            if bias:
                xt = torch.cat([xt, xt.new_ones(1)])
            G += torch.outer(d_BTO[b, t], xt)
        rows.append(G.reshape(-1))
    return torch.stack(rows)


def factorized_compressors(bias):
    return [
        FactGraSS(17, 11, k=23, k_in=7, k_out=5, seed=1, bias=bias),
        FactGraSS(17, 11, k=23, k_in=7, k_out=5, c=2, seed=2, bias=bias),
        FactGraSS(17, 11, k=77, k_in=11, k_out=7, seed=3, bias=bias),  # k = k' (dense regime)
        LoGra(17, 11, k_in=5, k_out=3, seed=4, bias=bias),
    ]


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("T", [1, 9])
def test_factorized_equals_dense_on_explicit_gradient(bias, T):
    x = torch.randn(4, T, 17, dtype=torch.float64)
    d = torch.randn(4, T, 11, dtype=torch.float64)
    vec_g = explicit_vec_grad(x, d, bias)
    for comp in factorized_compressors(bias):
        m = comp.dense_matrix()
        assert m.shape == (comp.k, 11 * (17 + int(bias)))
        torch.testing.assert_close(comp(x, d), vec_g @ m.T, **TOL)
        if T == 1:  # 2-D inputs mean T = 1
            torch.testing.assert_close(comp(x[:, 0], d[:, 0]), comp(x, d), **TOL)


@pytest.mark.parametrize("bias", [False, True])
def test_factgrass_is_grass_with_product_mask(bias):
    """The paper's central identity: FactGraSS(x, delta) = SJLT(Mask_{S_out x S_in}(vec G))."""
    fg = FactGraSS(19, 13, k=31, k_in=8, k_out=6, c=2, seed=11, bias=bias)
    d_in_eff = 19 + int(bias)
    # The product mask, built independently of FactGraSS.mask_indices: G[i, j] is at i*I + j.
    product = sorted(i * d_in_eff + j for i in fg.idx_out for j in fg.idx_in)
    np.testing.assert_array_equal(fg.mask_indices(), product)
    mask = RandomMask(13 * d_in_eff, len(product), indices=np.array(product))
    x = torch.randn(3, 10, 19, dtype=torch.float64)
    d = torch.randn(3, 10, 13, dtype=torch.float64)
    vec_g = explicit_vec_grad(x, d, bias)
    torch.testing.assert_close(fg(x, d), fg.sjlt(mask(vec_g)), **TOL)


def test_logra_is_kronecker_projection():
    lg = LoGra(17, 11, k_in=5, k_out=3, seed=4)
    p_in, p_out = lg.proj_in.dense_matrix(), lg.proj_out.dense_matrix()
    x = torch.randn(2, 6, 17, dtype=torch.float64)
    d = torch.randn(2, 6, 11, dtype=torch.float64)
    G = explicit_vec_grad(x, d, False).reshape(2, 11, 17)
    expected = (p_out @ G @ p_in.T).reshape(2, -1)  # vec(P_out G P_in^T)
    torch.testing.assert_close(lg(x, d), expected, **TOL)
    torch.testing.assert_close(lg.dense_matrix(), torch.kron(p_out, p_in), **TOL)


@pytest.mark.parametrize("bias", [False, True])
def test_per_token_sums_to_per_example(bias):
    x = torch.randn(3, 7, 17, dtype=torch.float64)
    d = torch.randn(3, 7, 11, dtype=torch.float64)
    for comp in factorized_compressors(bias):
        tok = comp.per_token(x, d)
        assert tok.shape == (3, 7, comp.k)
        torch.testing.assert_close(tok.sum(1), comp(x, d), **TOL)
        # token t's row is the compression of delta_t x_t^T alone
        torch.testing.assert_close(tok[:, 2], comp(x[:, 2], d[:, 2]), **TOL)


def test_spec_roundtrip_rebuilds_identical_maps():
    for comp in vector_compressors():
        if isinstance(comp, SelectiveMask):
            again = build_compressor(comp.spec, seed=comp.seed, p=P, indices=comp.indices)
        else:
            again = build_compressor(comp.spec, seed=comp.seed, p=P)
        assert type(again) is type(comp) and again.spec == comp.spec
        torch.testing.assert_close(again.dense_matrix(), comp.dense_matrix(), rtol=0, atol=0)
    for comp in factorized_compressors(True):
        again = build_compressor(comp.spec, seed=comp.seed, d_in=17, d_out=11, bias=True)
        torch.testing.assert_close(again.dense_matrix(), comp.dense_matrix(), rtol=0, atol=0)
