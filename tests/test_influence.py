"""Fisher solves, streaming scores, token-level influence, self-influence and valuation against
plain numpy references computed from the raw arrays."""

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from grass_llm.cli import app
from grass_llm.influence import (
    TopK,
    compute_fisher,
    from_file,
    from_store,
    load_factors,
    precondition,
    self_influence,
    stream_top_k,
    valuation,
)
from grass_llm.influence.score import HAVE_NUMBA
from grass_llm.store import LayerInfo, StoreError, StoreLayout, create_store, open_store
from tests.test_cache import CONFIG, CORPUS

LAYERS = (LayerInfo("l.a", "factgrass:c=1,k=5,k_in=3,k_out=2", 1, 5, 4, 3, False),
          LayerInfo("l.b", "logra:k_in=1,k_out=3", 2, 3, 4, 6, True))


def random_store(tmp_path, n=23, chunk_rows=4, seed=0, name="s.zarr"):
    url = str(tmp_path / name)
    store = create_store(url, StoreLayout(n_examples=n, layers=LAYERS, chunk_rows=chunk_rows,
                                          dtype="float32"), {"config": {}})
    rng = np.random.default_rng(seed)
    for c in store.pending_chunks():
        a, b = store.layout.chunk_range(c)
        store.write_chunk(c, {x.name: rng.standard_normal((b - a, x.k)) for x in LAYERS},
                          [f"e{i}" for i in range(a, b)], [1] * (b - a), [0.0] * (b - a))
    return open_store(url, mode="r+")


def raw(store, name):
    return np.asarray(store.group[f"grads/{name}"][:], dtype=np.float64)


@pytest.mark.parametrize("mode,damping", [("relative", 0.1), ("absolute", 0.37)])
def test_blockwise_cholesky_solve_equals_dense_numpy_solve(tmp_path, mode, damping):
    store = random_store(tmp_path)
    report = compute_fisher(store, damping=damping, mode=mode)
    factors = load_factors(open_store(store.url))
    gen = torch.Generator().manual_seed(3)
    q = {x.name: torch.randn(3, x.k, dtype=torch.float64, generator=gen) for x in LAYERS}
    solved = precondition(factors, q)
    for x in LAYERS:
        g = raw(store, x.name)
        fisher = g.T @ g / g.shape[0]
        lam = damping * np.trace(fisher) / x.k if mode == "relative" else damping
        assert report[x.name]["lambda"] == pytest.approx(lam, rel=1e-12)
        expected = np.linalg.solve(fisher + lam * np.eye(x.k), q[x.name].numpy().T).T
        np.testing.assert_allclose(solved[x.name].numpy(), expected, rtol=1e-10, atol=1e-12)
        eig = np.linalg.eigvalsh(fisher + lam * np.eye(x.k))
        assert report[x.name]["condition"] == pytest.approx(eig[-1] / eig[0], rel=1e-8)


@pytest.mark.parametrize("backend", ["torch"] + (["numba"] if HAVE_NUMBA else []))
@pytest.mark.parametrize("k", [1, 5, 40])
def test_streaming_top_k_equals_full_sort(tmp_path, backend, k):
    store = random_store(tmp_path)
    compute_fisher(store)
    gen = torch.Generator().manual_seed(k)
    q = {x.name: torch.randn(4, x.k, generator=gen) for x in LAYERS}
    pre = precondition(load_factors(store), q)
    vals, idx = stream_top_k(store, pre, k, backend=backend)
    full = sum(pre[x.name].numpy() @ raw(store, x.name).T for x in LAYERS)  # brute force
    k_eff = min(k, store.n_examples)
    order = np.argsort(-full, axis=1, kind="stable")[:, :k_eff]
    assert vals.shape == (4, k_eff)
    np.testing.assert_array_equal(idx, order)
    # per-layer GEMMs run in float32 (rows are stored in at most 32 bits): ~1e-7 relative
    np.testing.assert_allclose(vals, np.take_along_axis(full, order, 1), rtol=1e-5,
                               atol=1e-6 * np.abs(full).max())  # scores near 0 cancel


def test_top_k_backends_agree_with_ties_and_unfilled_slots():
    scores = np.array([[1.0, 3.0, 3.0, -2.0], [0.5, 0.5, 0.5, 0.5]])
    results = []
    for backend in ["torch"] + (["numba"] if HAVE_NUMBA else []):
        top = TopK(2, 6, backend)
        top.update(scores[:, :2], 0)
        top.update(scores[:, 2:], 2)
        results.append(top.result())
    for vals, idx in results:
        assert idx[0].tolist() == [1, 2, 0, 3, -1, -1]  # ties: lower row first; 4 rows < k
        assert idx[1].tolist() == [0, 1, 2, 3, -1, -1]


def test_self_influence_and_valuation_match_the_full_matrix(tmp_path):
    store = random_store(tmp_path)
    compute_fisher(store)
    q = from_store(store, store)  # every training row as a query
    pre = precondition(load_factors(store), q.grads)
    full = sum(pre[x.name].numpy() @ raw(store, x.name).T for x in LAYERS)
    np.testing.assert_allclose(self_influence(store), np.diag(full), rtol=1e-9)
    targets = {k: v[[2, 5, 11]] for k, v in q.grads.items()}
    # valuation scores through the float32 chunk GEMM (see above): 1e-5 relative
    np.testing.assert_allclose(valuation(store, targets), full[[2, 5, 11]].sum(0), rtol=1e-5,
                               atol=1e-6 * np.abs(full).max())


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("infl") / "tiny.zarr")
    res = CliRunner().invoke(app, ["cache", "--config", CONFIG, "--set", f"data={CORPUS}",
                                   "--set", f"out={out}", "--quiet"], terminal_width=200)
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(app, ["fisher", out], terminal_width=200)
    assert res.exit_code == 0, res.output
    return out


def test_query_per_token_scores_sum_to_query_score(tiny_store, tmp_path):
    qfile = tmp_path / "q.jsonl"
    qfile.write_text(json.dumps({"id": "q1", "prompt": "What is the capital of France?",
                                 "completion": " Paris."}) + "\n"
                     + json.dumps({"id": "q2", "text": "Ice melts."}) + "\n")
    store = open_store(tiny_store)
    q = from_file(store, str(qfile), per_token=True)
    factors = load_factors(store)
    pre_q = precondition(factors, q.grads)
    pre_t = precondition(factors, q.tokens)
    n = store.n_examples
    full_q = np.asarray(stream_top_k(store, pre_q, n)[0])  # values sorted; recompute by index
    vq, iq = stream_top_k(store, pre_q, n)
    vt, it = stream_top_k(store, pre_t, n)
    by_index_q = np.zeros((2, n))
    np.put_along_axis(by_index_q, iq, vq, 1)
    by_index_t = np.zeros((vt.shape[0], n))
    np.put_along_axis(by_index_t, it, vt, 1)
    for j in range(2):
        a, b = q.offsets[j], q.offsets[j + 1]
        # The query row is the fp32 sum of its token rows; scores are linear in it, so they
        # agree up to fp32 rounding of that sum (~1e-7 of the largest score).
        np.testing.assert_allclose(by_index_t[a:b].sum(0), by_index_q[j], rtol=1e-6,
                                   atol=1e-6 * np.abs(by_index_q[j]).max())
    assert full_q.shape == (2, n)
    out = tmp_path / "infl.jsonl"
    res = CliRunner().invoke(app, ["query", tiny_store, "--queries", str(qfile), "--per-token",
                                   "--top-k", "3", "--out", str(out)], terminal_width=200)
    assert res.exit_code == 0, res.output
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x["query"] for x in lines] == ["q1", "q2"] and len(lines[0]["top"]) == 3
    assert len(lines[0]["tokens"]) == q.offsets[1] and lines[0]["top"][0]["text"]


def test_clear_errors(tiny_store, tmp_path):
    runner = CliRunner()
    no_fisher = random_store(tmp_path, name="nofisher.zarr")
    res = runner.invoke(app, ["query", no_fisher.url, "--queries", CORPUS], terminal_width=200)
    assert res.exit_code == 2 and "grass-llm fisher" in res.output
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    res = runner.invoke(app, ["query", tiny_store, "--queries", str(empty)], terminal_width=200)
    assert res.exit_code == 2 and "no query" in res.output
    other = str(tmp_path / "other.zarr")  # the same corpus, cached with another compressor
    res = runner.invoke(app, ["cache", "--config", CONFIG, "--set", f"data={CORPUS}", "--set",
                              f"out={other}", "--set", "compressor=factgrass:k=8,k_in=4,k_out=4",
                              "--quiet"], terminal_width=200)
    assert res.exit_code == 0
    with pytest.raises(StoreError, match="built with 'factgrass:c=1,k=16"):
        from_store(open_store(tiny_store), open_store(other))
    res = runner.invoke(app, ["query", tiny_store, "--query-store", other], terminal_width=200)
    assert res.exit_code == 2 and "query with the store's own configuration" in res.output


def _spearman(a, b):
    ra = np.argsort(np.argsort(a)).astype(float)
    rb = np.argsort(np.argsort(b)).astype(float)
    return float(np.corrcoef(ra, rb)[0, 1])


def test_compressed_influence_tracks_exact_influence_and_improves_with_k(tmp_path):
    """Exact influence = the `identity` compressor (uncompressed per-layer gradients) with the
    same relative damping (0.1 tr(F)/k per block). Measured Spearman over all (query, train)
    pairs, 48 docs x 4 queries, tiny random Llama, seed 0: k=16 -> 0.353, k=64 -> 0.575,
    k=256 -> 0.771 per layer. The run is deterministic (fixed seeds, fp32 CPU); the assertions
    keep a margin below those figures and require the rise with k."""
    topics = [("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"),
              ("Spain", "Madrid"), ("Japan", "Tokyo"), ("Egypt", "Cairo")]
    docs = []
    for t, (country, city) in enumerate(topics):
        for v, tmpl in enumerate(["The capital of {c} is {x}.", "{x} is the capital of {c}.",
                                  "People in {c} often visit {x}.", "{x}, {c}: a big city.",
                                  "Many trains in {c} go to {x}.", "A map of {c} shows {x}.",
                                  "The river of {x} crosses {c}.", "{c} has its parliament "
                                  "in {x}."]):
            docs.append({"id": f"{country}-{v}", "text": tmpl.format(c=country, x=city)})
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(d) + "\n" for d in docs))
    qfile = tmp_path / "q.jsonl"
    qfile.write_text("".join(json.dumps({"id": f"q{i}", "prompt": f"Capital of {c}?",
                                         "completion": f" {x}."}) + "\n"
                             for i, (c, x) in enumerate(topics[:4])))
    scores = {}
    for spec in ["identity", "factgrass:k=16,k_in=8,k_out=4", "factgrass:k=64,k_in=16,k_out=8",
                 "factgrass:k=256,k_in=32,k_out=16"]:
        out = str(tmp_path / f"{spec.split(':')[0]}-{len(scores)}.zarr")
        res = CliRunner().invoke(app, ["cache", "--config", CONFIG, "--set", f"data={corpus}",
                                       "--set", f"out={out}", "--set", f"compressor={spec}",
                                       "--set", "chunk_rows=16", "--quiet"],
                                 terminal_width=200)
        assert res.exit_code == 0, res.output
        store = open_store(out, mode="r+")
        compute_fisher(store, damping=0.1)
        pre = precondition(load_factors(store), from_file(store, str(qfile)).grads)
        vals, idx = stream_top_k(store, pre, store.n_examples)
        full = np.zeros_like(vals)
        np.put_along_axis(full, idx, vals, 1)
        scores[spec] = full.ravel()
    exact = scores.pop("identity")
    rho = [_spearman(s, exact) for s in scores.values()]
    print("Spearman vs exact influence, k = 16, 64, 256:", [round(r, 3) for r in rho])
    assert rho[0] > 0.2 and rho[2] > 0.65
    assert rho[0] < rho[1] < rho[2]


@pytest.mark.skipif(not HAVE_NUMBA, reason="numba not installed")
def test_fused_fp16_numba_scores_equal_torch_scores(tmp_path):
    from grass_llm.influence.score import chunk_scores

    url = str(tmp_path / "h.zarr")
    store = create_store(url, StoreLayout(n_examples=9, layers=LAYERS, chunk_rows=5,
                                          dtype="float16"), {"config": {}})
    rng = np.random.default_rng(1)
    for c in store.pending_chunks():
        a, b = store.layout.chunk_range(c)
        store.write_chunk(c, {x.name: rng.standard_normal((b - a, x.k)) for x in LAYERS},
                          [f"e{i}" for i in range(a, b)], [1] * (b - a), [0.0] * (b - a))
    gen = torch.Generator().manual_seed(4)
    pre = {x.name: torch.randn(3, x.k, dtype=torch.float64, generator=gen) for x in LAYERS}
    for c in range(store.layout.n_chunks):
        # both accumulate float32 products of the same decoded values: ~1e-7 relative
        np.testing.assert_allclose(chunk_scores(store, pre, c, backend="numba"),
                                   chunk_scores(store, pre, c, backend="torch"), rtol=1e-5,
                                   atol=1e-6)


def test_fisher_split_over_two_processes_equals_one(tiny_store, tmp_path):
    import shutil
    import subprocess
    import sys

    from tests.test_cache import ROOT, _env, _free_port

    copy = str(tmp_path / "copy.zarr")
    shutil.copytree(tiny_store, copy)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-port", str(_free_port()), "-m", "tests.strict_main", "fisher", copy]
    res = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]
    one, two = load_factors(open_store(tiny_store)), load_factors(open_store(copy))
    for name in one:  # the same float64 sums, added in another order
        torch.testing.assert_close(two[name], one[name], rtol=1e-10, atol=1e-12)
