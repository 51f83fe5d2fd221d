"""Fisher fits against a plain numpy float64 Gram + Cholesky; the condition estimate against
numpy's exact eigenvalues; atomic refits; the factor checks of load_factors and verify."""

import numpy as np
import pytest
import torch

from grass_llm.influence import compute_fisher, load_factors, precondition
from grass_llm.influence import factors as factors_mod
from grass_llm.influence.fisher import ILL_CONDITIONED, gram_dtype
from grass_llm.influence.spectrum import condition_number
from grass_llm.store import LayerInfo, StoreError, open_store, verify_store
from tests.test_influence import LAYERS, random_store, raw


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no GPU: the CUDA path runs where one is lent"))]


def reference_factor(g: np.ndarray, damping: float, mode: str) -> tuple[np.ndarray, float]:
    """The definition, in plain numpy float64: chol(G^T G / n + lambda I), lambda."""
    fisher = g.T @ g / g.shape[0]
    lam = damping * np.trace(fisher) / g.shape[1] if mode == "relative" else damping
    return np.linalg.cholesky(fisher + lam * np.eye(g.shape[1])), lam


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode,damping", [("relative", 0.1), ("absolute", 0.37)])
def test_factors_equal_numpy_float64_gram_and_cholesky(tmp_path, mode, damping, device):
    """On CUDA with precision auto: float64 on A100/H100/H200/B200, else float32 tiles (the
    tolerance below then is that of test_float32_tile_path_matches_float64)."""
    store = random_store(tmp_path)  # 23 rows in chunks of 4: uneven last chunk
    report = compute_fisher(store, damping=damping, mode=mode, device=device)
    exact = store.group["fisher"][store.group["fisher"].attrs["current"]].attrs[
        "gram_dtype"] == "float64"
    if not exact:
        pytest.skip("this GPU computes the Gram in float32 tiles: see the float32 test")
    factors = load_factors(open_store(store.url))
    gen = torch.Generator().manual_seed(3)
    q = {x.name: torch.randn(3, x.k, dtype=torch.float64, generator=gen) for x in LAYERS}
    solved = precondition(factors, q)
    for x in LAYERS:
        g = raw(store, x.name)
        ref, lam = reference_factor(g, damping, mode)
        assert report[x.name]["lambda"] == pytest.approx(lam, rel=1e-12)
        # float64 sums of the same float32 rows in another order: round-off ~1e-16 relative
        np.testing.assert_allclose(factors[x.name].numpy(), ref, rtol=1e-12, atol=1e-14)
        damped = g.T @ g / g.shape[0] + lam * np.eye(x.k)
        expected = np.linalg.solve(damped, q[x.name].numpy().T).T
        np.testing.assert_allclose(solved[x.name].numpy(), expected, rtol=1e-10, atol=1e-12)
        eig = np.linalg.eigvalsh(damped)
        assert report[x.name]["condition"] == pytest.approx(eig[-1] / eig[0], rel=1e-8)


def test_float32_tile_path_matches_float64(tmp_path):
    """The GPU fallback (float32 Gram tiles summed in float64), run on the CPU."""
    lays = (LayerInfo("w", "factgrass:c=1,k=64,k_in=8,k_out=8", 1, 64, 8, 8, False),)
    store = random_store(tmp_path, n=601, chunk_rows=300, layers=lays, dtype="float16")
    compute_fisher(store, device="cpu", precision="float32")
    L = load_factors(store)["w"].numpy()
    g = raw(store, "w")
    ref, lam = reference_factor(g, 0.1, "relative")
    # float16 values multiply exactly in float32; each 256-row tile sum rounds to float32
    # (~256 * 6e-8 relative in the worst case), then sums in float64: 1e-5 of the largest
    # entry bounds it, while a missed tile or a wrong row shows up at 1e-2.
    damped = g.T @ g / g.shape[0] + lam * np.eye(64)
    np.testing.assert_allclose(L @ L.T, damped, atol=1e-5 * np.abs(damped).max())


def test_gram_precision_is_float64_on_cpu_and_where_gpus_are_fast(monkeypatch):
    assert gram_dtype(torch.device("cpu")) == torch.float64
    assert gram_dtype(torch.device("cpu"), "float32") == torch.float32
    for cap, want in [((9, 0), torch.float64), ((8, 0), torch.float64), ((8, 9), torch.float32),
                      ((12, 0), torch.float32)]:
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d, c=cap: c)
        assert gram_dtype(torch.device("cuda", 0)) == want, cap
    with pytest.raises(ValueError, match="precision"):
        gram_dtype(torch.device("cpu"), "tf32")


def _spd(k, n, damping_rel, seed):
    rng = np.random.default_rng(seed)
    g = rng.standard_normal((n, k)) * np.exp(rng.uniform(-3, 3, k))  # spread-out spectrum
    fisher = g.T @ g / n
    damped = fisher + damping_rel * np.trace(fisher) / k * np.eye(k)
    return torch.from_numpy(damped)


@pytest.mark.parametrize("k,n,damping_rel", [(7, 30, 0.1), (300, 100, 1e-3), (600, 1200, 1e-6)])
def test_condition_estimate_equals_exact_eigenvalues(k, n, damping_rel):
    damped = _spd(k, n, damping_rel, seed=k)
    L = torch.linalg.cholesky(damped)
    eig = np.linalg.eigvalsh(damped.numpy())
    exact = eig[-1] / eig[0]
    lam = damping_rel * float(torch.trace(damped)) / k / (1 + damping_rel)  # F's damping
    for tol in (1e-4, 1e-8):  # the default, and a tight one
        est = condition_number(damped, L, floor=lam, method="lanczos", tol=tol)
        # honest: within its own error bound, and the bound is as tight as asked (two bounds
        # of tol each, plus rounding)
        assert abs(est["condition"] / exact - 1) <= max(est["rel_error"], 1e-12)
        assert est["rel_error"] < 2.1 * tol
    if k > 512:  # what compute_fisher uses there
        assert condition_number(damped, L, floor=lam, tol=1e-8) == est
    assert est["lambda_max"] == pytest.approx(eig[-1], rel=1e-8)
    assert est["lambda_min"] == pytest.approx(eig[0], rel=1e-6)


def test_ill_conditioning_is_seen_where_the_cholesky_diagonal_misses_it():
    """Eigenvalues 1 ... 1e-12 in a random basis (k = 500): condition 1e12. The old estimate,
    (max L_ii / min L_ii)^2 from the Cholesky diagonal, says ~2e9 here and would not warn."""
    k = 500
    rng = np.random.default_rng(1)
    basis, _ = np.linalg.qr(rng.standard_normal((k, k)))
    damped = (basis * np.geomspace(1, 1e-12, k)) @ basis.T
    damped = torch.from_numpy((damped + damped.T) / 2)
    L = torch.linalg.cholesky(damped)
    est = condition_number(damped, L, method="lanczos")
    eig = np.linalg.eigvalsh(damped.numpy())
    assert est["condition"] > ILL_CONDITIONED and eig[-1] / eig[0] > ILL_CONDITIONED
    # float64 methods know lambda_min to ~condition * eps relative (2e-4 here); the estimate's
    # own bound says so too
    assert abs(est["condition"] / (eig[-1] / eig[0]) - 1) <= est["rel_error"] < 0.05
    assert float((L.diagonal().max() / L.diagonal().min()) ** 2) < ILL_CONDITIONED


def test_crashed_refit_leaves_the_previous_fit_current(tmp_path, monkeypatch):
    store = random_store(tmp_path)
    compute_fisher(store, damping=0.1, device="cpu")
    before = {k: v.clone() for k, v in load_factors(store).items()}
    real_write = factors_mod.write_factor
    calls = []

    def crash_after_one(*args):
        if calls:
            raise OSError("disk full (simulated)")
        calls.append(args[2])
        real_write(*args)

    monkeypatch.setattr("grass_llm.influence.fisher.write_factor", crash_after_one)
    with pytest.raises(OSError, match="simulated"):
        compute_fisher(store, damping=0.5, device="cpu")
    assert calls == [LAYERS[0].name]  # the new fit was half written
    after = load_factors(open_store(store.url))
    for name, L in before.items():
        torch.testing.assert_close(after[name], L, rtol=0, atol=0)
    assert verify_store(store.url) == []
    monkeypatch.setattr("grass_llm.influence.fisher.write_factor", real_write)
    compute_fisher(store, damping=0.5, device="cpu")  # a good refit replaces both
    fits = list(store.group["fisher"].keys())
    assert fits == [store.group["fisher"].attrs["current"]]
    ref, _ = reference_factor(raw(store, LAYERS[1].name), 0.5, "relative")
    np.testing.assert_allclose(load_factors(store)[LAYERS[1].name].numpy(), ref, rtol=1e-12,
                               atol=1e-14)


def test_first_fit_crash_leaves_no_usable_fit(tmp_path, monkeypatch):
    store = random_store(tmp_path)

    def crash(*args):
        raise OSError("killed (simulated)")

    monkeypatch.setattr("grass_llm.influence.fisher.write_factor", crash)
    with pytest.raises(OSError):
        compute_fisher(store, device="cpu")
    with pytest.raises(StoreError, match="no complete fit"):
        load_factors(store)
    assert any("no complete fit" in p for p in verify_store(store.url, quick=True))


def test_partial_or_damaged_fits_are_refused(tmp_path):
    store = random_store(tmp_path)
    compute_fisher(store, device="cpu")
    fit = store.group["fisher"][store.group["fisher"].attrs["current"]]
    fit[LAYERS[0].name][0, 0] = np.nan  # damaged values: only a full verify decodes them
    assert verify_store(store.url, quick=True) == []
    assert any("NaN" in p for p in verify_store(store.url))
    fit[LAYERS[0].name][0, 0] = 1.0
    fit[LAYERS[0].name][0, 1] = 1.0  # an upper-triangle entry
    assert any("not a Cholesky factor" in p for p in verify_store(store.url))
    del fit[LAYERS[1].name]  # a missing layer: refused by load_factors and quick verify
    with pytest.raises(StoreError, match=f"no factor for layer {LAYERS[1].name}"):
        load_factors(open_store(store.url))
    assert any("no factor" in p for p in verify_store(store.url, quick=True))
    fit.attrs["complete"] = False
    with pytest.raises(StoreError, match="not complete"):
        load_factors(open_store(store.url))


def test_factors_are_read_lazily_once_per_layer(tmp_path, monkeypatch):
    store = random_store(tmp_path)
    compute_fisher(store, device="cpu")
    factors = load_factors(store)
    reads = []
    real = factors_mod.Factors.__getitem__
    monkeypatch.setattr(factors_mod.Factors, "__getitem__",
                        lambda self, name: reads.append(name) or real(self, name))
    assert LAYERS[0].name in factors and reads == []  # membership reads nothing
    q = {x.name: torch.ones(2, x.k, dtype=torch.float64) for x in LAYERS}
    precondition(factors, q)
    assert reads == [x.name for x in LAYERS]  # each factor read once, when its layer is solved
