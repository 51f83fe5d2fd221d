"""Streamed scoring against brute-force numpy over the raw arrays: top-k (both backends, ties),
rank merges, one pass for several query sets, self-influence, valuation, the read-ahead."""

import numpy as np
import pytest
import torch

from grass_llm.influence import (
    ScoreRequest,
    TopK,
    compute_fisher,
    from_store,
    load_factors,
    merge_top_k,
    precondition,
    score_store,
    self_influence,
    stream_top_k,
    valuation,
)
from grass_llm.influence.reader import chunk_jobs, read_ahead
from grass_llm.influence.topk import HAVE_NUMBA
from grass_llm.store import StoreError
from tests.test_influence import LAYERS, random_store, raw

BACKENDS = ["torch"] + (["numba"] if HAVE_NUMBA else [])
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no GPU: the CUDA path runs where one is lent"))]


def full_scores(store, pre):
    """Brute force: every score, float64 numpy over the raw arrays."""
    return sum(pre[x.name].numpy() @ raw(store, x.name).T for x in LAYERS)


def reference_top_k(scores, k):
    """Full sort: score descending, lower row first on ties."""
    rows = np.broadcast_to(np.arange(scores.shape[1]), scores.shape)
    order = np.lexsort((rows, -scores), axis=1)[:, :k]
    return np.take_along_axis(scores, order, 1), order


# per-layer GEMMs run in float32 (rows are stored in at most 32 bits): ~1e-7 relative; scores
# near 0 cancel, hence the absolute part
def assert_scores_close(got, want):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * np.abs(want).max())


@pytest.fixture
def fitted(tmp_path):
    store = random_store(tmp_path)
    compute_fisher(store, device="cpu")
    return store


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k", [1, 5, 40])
def test_streaming_top_k_equals_full_sort(fitted, backend, k):
    gen = torch.Generator().manual_seed(k)
    q = {x.name: torch.randn(4, x.k, generator=gen) for x in LAYERS}
    pre = precondition(load_factors(fitted), q)
    vals, idx = stream_top_k(fitted, pre, k, backend=backend, device="cpu")
    want_v, want_i = reference_top_k(full_scores(fitted, pre), min(k, fitted.n_examples))
    np.testing.assert_array_equal(idx, want_i)
    assert_scores_close(vals, want_v)


@pytest.mark.parametrize("backend", BACKENDS)
def test_top_k_ties_keep_the_lower_row_whatever_the_chunking(backend):
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 4, size=(5, 37)).astype(np.float64)  # many ties
    # k = 12, 20: the k-th score lies inside a block of ties, where an eviction must drop the
    # higher row (the old kernels dropped whichever tied slot came first)
    for k in (1, 3, 8, 12, 20, 40):
        want_v, want_i = reference_top_k(scores, min(k, 37))
        for cuts in ([37], [3, 10, 24], list(range(1, 37))):
            top = TopK(5, k, backend)
            start = 0
            for stop in cuts + [37]:
                if stop > start:
                    top.update(scores[:, start:stop], start)
                start = stop
            vals, idx = top.result()
            got = idx[:, : min(k, 37)]
            np.testing.assert_array_equal(got, want_i, err_msg=f"k={k} cuts={cuts}")
            np.testing.assert_array_equal(vals[:, : min(k, 37)], want_v)
            if k > 37:  # unfilled slots last
                assert (idx[:, 37:] == -1).all() and np.isneginf(vals[:, 37:]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_top_k_evicts_the_higher_of_two_tied_rows(backend):
    top = TopK(1, 2, backend)
    top.update(np.array([[1.0, 1.0, 2.0]]), 0)
    assert top.result()[1].tolist() == [[2, 0]]


def test_top_k_refuses_rows_out_of_order():
    top = TopK(1, 2, "torch")
    top.update(np.zeros((1, 3)), 3)
    with pytest.raises(ValueError, match="increasing order"):
        top.update(np.zeros((1, 3)), 0)


def test_merged_rank_top_k_equals_one_pass():
    rng = np.random.default_rng(1)
    scores = rng.integers(0, 5, size=(3, 50)).astype(np.float64)
    want = reference_top_k(scores, 7)
    parts = []
    for rank in range(3):  # chunks of 4 rows round robin over 3 "ranks"
        top = TopK(3, 7, "torch")
        for start in range(rank * 4, 50, 12):
            top.update(scores[:, start: start + 4], start)
        parts.append(top.result())
    vals, idx = merge_top_k(parts, 7)
    np.testing.assert_array_equal(idx, want[1])
    np.testing.assert_array_equal(vals, want[0])


@pytest.mark.parametrize("device", DEVICES)
def test_one_pass_serves_every_request(fitted, device):
    gen = torch.Generator().manual_seed(7)
    factors = load_factors(fitted)
    pre_q = precondition(factors, {x.name: torch.randn(3, x.k, generator=gen) for x in LAYERS})
    pre_t = precondition(factors, {x.name: torch.randn(11, x.k, generator=gen) for x in LAYERS})
    pre_v = precondition(factors, {x.name: torch.randn(1, x.k, generator=gen) for x in LAYERS})
    matrix = np.zeros((3, fitted.n_examples), dtype=np.float32)
    reads = []
    real = fitted.read_raw
    fitted.read_raw = lambda *a: reads.append(a) or real(*a)
    res = score_store(fitted, {"q": ScoreRequest(pre_q, top_k=4, matrix_out=matrix),
                               "tok": ScoreRequest(pre_t, top_k=2),
                               "value": ScoreRequest(pre_v, keep_all=True)}, device=device)
    # one read per (chunk, layer): the three query sets share the pass
    assert sorted(reads) == sorted((x.name, *fitted.layout.chunk_range(c))
                                   for c in range(fitted.layout.n_chunks) for x in LAYERS)
    for key, pre, k in (("q", pre_q, 4), ("tok", pre_t, 2)):
        want_v, want_i = reference_top_k(full_scores(fitted, pre), k)
        np.testing.assert_array_equal(res[key].indices, want_i)
        assert_scores_close(res[key].values, want_v)
    assert_scores_close(matrix, full_scores(fitted, pre_q))
    assert_scores_close(res["value"].scores, full_scores(fitted, pre_v))


@pytest.mark.parametrize("device", DEVICES)
def test_self_influence_and_valuation_match_the_full_matrix(fitted, device):
    q = from_store(fitted, fitted)  # every training row as a query
    pre = precondition(load_factors(fitted), q.grads)
    full = full_scores(fitted, pre)
    # float64 throughout (triangular solves of float32 rows): round-off only
    np.testing.assert_allclose(self_influence(fitted, device=device), np.diag(full), rtol=1e-9)
    targets = {k: v[[2, 5, 11]] for k, v in q.grads.items()}
    assert_scores_close(valuation(fitted, targets, device=device), full[[2, 5, 11]].sum(0))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_read_ahead_yields_every_chunk_in_order_exactly_decoded(tmp_path, dtype, device):
    store = random_store(tmp_path, n=29, chunk_rows=5, dtype=dtype)
    jobs = chunk_jobs(store, [4, 0, 5, 2], store.layer_names)
    seen = []
    for job, rows in read_ahead(store, jobs, device=torch.device(device), depth=3):
        seen.append(job.c)
        for name, t in rows.items():
            assert t.dtype == torch.float32 and t.device.type == device
            # decoding is exact (every storage dtype fits float32): the store's own decoder
            np.testing.assert_array_equal(t.cpu().numpy(),
                                          store.read_rows(name, job.start, job.stop))
    assert seen == [4, 0, 5, 2]


def test_float16_decoder_is_exact_for_every_bit_pattern():
    from types import SimpleNamespace

    from grass_llm.influence.reader import decode_rows

    store = SimpleNamespace(layout=SimpleNamespace(dtype="float16"))
    bits = np.arange(65536, dtype=np.uint16)
    want = bits.view(np.float16).astype(np.float64)
    finite = np.isfinite(want)
    for dtype in (torch.float32, torch.float64):
        got = decode_rows(store, bits[finite].view(np.float16).reshape(-1, 8), dtype).ravel()
        assert got.dtype == (np.float32 if dtype == torch.float32 else np.float64)
        np.testing.assert_array_equal(got, want[finite])  # bit for bit, -0.0 and subnormals
        assert (np.signbit(got) == np.signbit(want[finite])).all()
    with_inf = decode_rows(store, bits.view(np.float16), torch.float32)  # inf/NaN: exact too
    np.testing.assert_array_equal(np.isnan(with_inf), np.isnan(want))
    np.testing.assert_array_equal(with_inf[~np.isnan(want)], want[~np.isnan(want)])


def test_chunks_split_into_layer_groups_score_the_same(fitted, monkeypatch):
    from grass_llm.influence import score as score_mod

    gen = torch.Generator().manual_seed(9)
    pre = precondition(load_factors(fitted),
                       {x.name: torch.randn(3, x.k, generator=gen) for x in LAYERS})
    whole = stream_top_k(fitted, pre, 6, device="cpu")
    jobs = []
    real = score_mod.chunk_jobs

    def one_layer_per_job(*a, **kw):
        jobs.extend(real(*a, max_bytes=1))
        return jobs

    monkeypatch.setattr(score_mod, "chunk_jobs", one_layer_per_job)
    split = stream_top_k(fitted, pre, 6, device="cpu")
    assert len(jobs) == len(LAYERS) * fitted.layout.n_chunks
    np.testing.assert_array_equal(split[1], whole[1])
    assert_scores_close(split[0], whole[0])


# ----------------------------------------------------------------------------- normalized scores


def dense_scores(store, q, normalize):
    """Reference scores from scratch: each layer's damped Fisher rebuilt from the raw rows
    (float64), the queries solved by numpy, the rows and queries concatenated over layers, the
    norms taken explicitly (a zero row scores 0)."""
    lam = load_factors(store).report
    n = store.n_examples
    pre, rows = [], []
    for x in LAYERS:
        g = raw(store, x.name)
        fisher = g.T @ g / n + lam[x.name]["lambda"] * np.eye(x.k)
        pre.append(np.linalg.solve(fisher, q[x.name].double().numpy().T).T)
        rows.append(g)
    pre, rows = np.concatenate(pre, 1), np.concatenate(rows, 1)  # [Q, sum K], [n, sum K]
    s = pre @ rows.T
    if normalize in ("cosine", "train-unit"):
        nrm = np.linalg.norm(rows, axis=1)
        s = np.divide(s, nrm, out=np.zeros_like(s), where=nrm > 0)
    if normalize == "cosine":
        nrm = np.linalg.norm(pre, axis=1)[:, None]
        s = np.divide(s, nrm, out=np.zeros_like(s), where=nrm > 0)
    return s


@pytest.fixture
def with_zero_row(tmp_path):
    store = random_store(tmp_path, n=23, chunk_rows=4, zero_rows=(6,))
    compute_fisher(store, device="cpu")
    return store


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("normalize", ["none", "cosine", "train-unit"])
def test_normalized_scores_equal_a_dense_numpy_reference(with_zero_row, normalize, device):
    gen = torch.Generator().manual_seed(3)
    q = {x.name: torch.randn(5, x.k, generator=gen) for x in LAYERS}
    for x in LAYERS:
        q[x.name][2] = 0  # a zero query row: no direction, scores 0 under cosine
    pre = precondition(load_factors(with_zero_row), q)
    matrix = np.zeros((5, with_zero_row.n_examples), dtype=np.float32)
    res = score_store(with_zero_row, {"q": ScoreRequest(pre, top_k=7, keep_all=True,
                                                        matrix_out=matrix,
                                                        normalize=normalize)},
                      device=device)["q"]
    want = dense_scores(with_zero_row, q, normalize)
    assert_scores_close(res.scores, want)
    assert_scores_close(matrix, want)
    want_v, want_i = reference_top_k(want, 7)
    np.testing.assert_array_equal(res.indices, want_i)
    assert_scores_close(res.values, want_v)
    # the zero row: 0 whatever the normalization (not 0/0)
    assert np.isfinite(res.scores).all() and (res.scores[:, 6] == 0).all()
    if normalize == "cosine":
        assert np.abs(res.scores).max() <= 1 + 1e-6  # float32 GEMMs: a cosine up to 1e-6 past 1


def test_none_is_the_plain_score_and_cosine_ranks_as_train_unit(fitted):
    gen = torch.Generator().manual_seed(4)
    pre = precondition(load_factors(fitted),
                       {x.name: torch.randn(4, x.k, generator=gen) for x in LAYERS})
    res = score_store(fitted, {key: ScoreRequest(pre, top_k=9, normalize=norm)
                               for key, norm in (("plain", "none"), ("cos", "cosine"),
                                                 ("unit", "train-unit"))}, device="cpu")
    default = stream_top_k(fitted, pre, 9, device="cpu")  # no normalize argument at all
    np.testing.assert_array_equal(res["plain"].indices, default[1])
    # Same values up to float32 GEMM rounding, not bit for bit: the three requests run as one
    # stacked query matrix (12 rows here, 4 alone), and BLAS may block a GEMM differently by its
    # row count (measured: bit-equal on one CI machine, up to 2e-7 relative on another).
    np.testing.assert_allclose(res["plain"].values, default[0], rtol=1e-6)
    # per query, cosine = train-unit / ||q~||: the same order, values scaled by the norm (the
    # scaled query rounds differently to float32 before the GEMMs)
    np.testing.assert_array_equal(res["cos"].indices, res["unit"].indices)
    norms = np.sqrt(sum(np.square(p.numpy()).sum(1) for p in pre.values()))[:, None]
    assert_scores_close(res["cos"].values, res["unit"].values / norms)


def test_token_rows_divided_by_their_querys_norm_add_up_to_its_cosine(fitted):
    gen = torch.Generator().manual_seed(5)
    tok = {x.name: torch.randn(7, x.k, generator=gen, dtype=torch.float64) for x in LAYERS}
    owner = np.array([0, 0, 0, 1, 1, 1, 1])  # tokens of query 0, then of query 1
    whole = {k: torch.stack([v[:3].sum(0), v[3:].sum(0)]) for k, v in tok.items()}
    fac = load_factors(fitted)
    pre_q, pre_t = precondition(fac, whole), precondition(fac, tok)
    norms = np.sqrt(sum(np.square(p.numpy()).sum(1) for p in pre_q.values()))
    res = score_store(fitted, {
        "q": ScoreRequest(pre_q, keep_all=True, normalize="cosine"),
        "t": ScoreRequest(pre_t, keep_all=True, normalize="cosine", query_norms=norms[owner])},
        device="cpu")
    sums = np.stack([res["t"].scores[owner == j].sum(0) for j in (0, 1)])
    assert_scores_close(sums, res["q"].scores)
    with pytest.raises(ValueError, match="query_norms of shape"):
        score_store(fitted, {"t": ScoreRequest(pre_t, normalize="cosine", top_k=1,
                                               query_norms=norms)})
    with pytest.raises(ValueError, match="normalize must be one of"):
        score_store(fitted, {"t": ScoreRequest(pre_t, normalize="unit", top_k=1)})


@pytest.mark.parametrize("device", DEVICES)
def test_normalized_self_influence_and_valuation_equal_numpy(with_zero_row, device):
    store = with_zero_row
    g = np.concatenate([raw(store, x.name) for x in LAYERS], 1)
    fac = load_factors(store)
    h = [raw(store, x.name).T @ raw(store, x.name) / store.n_examples
         + fac.report[x.name]["lambda"] * np.eye(x.k) for x in LAYERS]
    hinv = np.zeros((g.shape[1],) * 2)  # block-diagonal H^-1, by explicit inverses
    start = 0
    for x, block in zip(LAYERS, h):
        hinv[start: start + x.k, start: start + x.k] = np.linalg.inv(block)
        start += x.k
    plain = np.einsum("ik,kl,il->i", g, hinv, g)
    sq = np.square(g).sum(1)
    want = np.divide(plain, sq, out=np.zeros_like(plain), where=sq > 0)
    got = self_influence(store, normalize="train-unit", device=device)
    # float64 throughout (triangular solves vs explicit inverses): round-off only
    np.testing.assert_allclose(got, want, rtol=1e-9)
    assert got[6] == 0
    with pytest.raises(ValueError, match="cosine of an example with itself is 1"):
        self_influence(store, normalize="cosine")
    gen = torch.Generator().manual_seed(6)
    targets = {x.name: torch.randn(3, x.k, generator=gen) for x in LAYERS}
    for normalize in ("none", "cosine", "train-unit"):
        got = valuation(store, targets, normalize=normalize, device=device)
        assert_scores_close(got, dense_scores(store, targets, normalize).sum(0))


# ----------------------------------------------------------------------------- train-side tokens


def test_train_token_scores_equal_a_direct_per_token_reference_and_sum_to_the_score(tmp_path):
    from grass_llm.influence.train_tokens import train_token_scores

    counts = [3, 7, 1, 4, 9, 2, 5, 6, 1, 8, 3, 4, 2]  # odd sizes: examples straddle token chunks
    store = random_store(tmp_path, n=len(counts), chunk_rows=4, token_counts=counts,
                         token_chunk_rows=5, zero_rows=(3,))
    compute_fisher(store, device="cpu")
    gen = torch.Generator().manual_seed(8)
    q = {x.name: torch.randn(3, x.k, generator=gen) for x in LAYERS}
    pre = precondition(load_factors(store), q)
    off = np.concatenate([[0], np.cumsum(counts)])
    base = store.group["token_chunk_base"][:]
    for normalize in ("none", "train-unit", "cosine"):
        qnorm = torch.cat(list(pre.values()), 1).norm(dim=1, keepdim=True)
        scored = pre if normalize != "cosine" else {k: v / qnorm for k, v in pre.items()}
        res = score_store(store, {"q": ScoreRequest(pre, top_k=6, keep_all=True,
                                                    normalize=normalize)}, device="cpu")["q"]
        idx = res.indices.copy()
        idx[1, 4:] = -1  # unfilled slots are passed over
        got = train_token_scores(store, scored, idx, normalize=normalize)
        for j in range(3):
            for r, i in enumerate(idx[j]):
                if i < 0:
                    assert got[j][r] is None
                    continue
                # the reference: straight from the raw arrays by the documented layout
                c = i // 4
                s = base[c] + off[i] - off[c * 4]
                tok = np.concatenate([np.asarray(store.group[f"tokens/{x.name}"][:],
                                                 np.float64)[s: s + counts[i]] for x in LAYERS], 1)
                qrow = np.concatenate([scored[x.name][j].numpy() for x in LAYERS])
                g = np.concatenate([raw(store, x.name)[i] for x in LAYERS])
                scale = 1.0 if normalize == "none" else (1 / np.linalg.norm(g) if g.any() else 0)
                want = tok @ qrow * scale
                # float64 from the same float32 rows, summed in another order
                np.testing.assert_allclose(got[j][r].scores, want, rtol=1e-12, atol=1e-14)
                assert got[j][r].positions.tolist() == list(range(1, counts[i] + 1))
                # the token scores add up to the example's score q~ . g_i in float64, up to
                # the float32 rounding of the stored row g_i = fl32(sum_s g_is): at most
                # (T - 1) u sum_s |g_is| per coordinate (u = 2^-24, recursive summation), plus
                # float64's own rounding of the dot products (1e-13 of the same scale)
                mag = np.abs(qrow) @ np.abs(tok).sum(0) * scale
                bound = ((counts[i] - 1) * 2.0**-24 + 1e-13) * mag
                assert abs(got[j][r].scores.sum() - qrow @ g * scale) <= bound
                # and the pass's float32 GEMMs agree (assert_scores_close's tolerance)
                assert_scores_close(got[j][r].scores.sum(), res.scores[j, i])
                assert got[j][r].token_ids is None  # no tokenized corpus behind this store


def test_train_tokens_need_token_rows(fitted):
    from grass_llm.influence.train_tokens import train_token_scores

    with pytest.raises(StoreError, match="token_mode=loss"):
        train_token_scores(fitted, {}, np.zeros((1, 1), dtype=np.int64))
