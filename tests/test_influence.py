"""Query gradients (per example and per token, batched, against for-loops of single backward()
calls in float64), the query / self-influence / value commands, and 2-process runs equal to one
process. Shared fixtures: ``random_store`` (random rows, float32) and ``tiny_store`` (a tiny Llama
cached with configs/tiny.yaml). The Fisher and the scoring are tested in test_fisher.py and
test_scoring.py."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import zarr
from typer.testing import CliRunner

from grass_llm.capture import GradientCapture
from grass_llm.capture.loss import IGNORE
from grass_llm.cli import app
from grass_llm.data import Example
from grass_llm.data.corpus import TokenizedCorpus
from grass_llm.influence import (
    compute_fisher,
    from_file,
    from_store,
    load_factors,
    precondition,
    query_gradients,
    stream_top_k,
)
from grass_llm.influence.texts import row_ids, row_texts
from grass_llm.models import load_model, tiny_model
from grass_llm.store import LayerInfo, StoreError, StoreLayout, create_store, open_store
from tests.test_cache import CONFIG, CORPUS, ROOT, _env, _free_port
from tests.test_capture import make_examples, reference_vec_grads

LAYERS = (LayerInfo("l.a", "factgrass:c=1,k=5,k_in=3,k_out=2", 1, 5, 4, 3, False),
          LayerInfo("l.b", "logra:k_in=1,k_out=3", 2, 3, 4, 6, True))


def random_store(tmp_path, n=23, chunk_rows=4, seed=0, name="s.zarr", layers=LAYERS,
                 dtype="float32", zero_rows=(), token_counts=None, token_chunk_rows=5):
    """Random rows (``zero_rows`` all zeros, as a non-finite row is stored). With
    ``token_counts`` (``[n]``), per-token rows ("loss" mode) and example rows equal to their
    float32 sum, as the cache job writes them."""
    url = str(tmp_path / name)
    mode = None if token_counts is None else "loss"
    store = create_store(url, StoreLayout(n_examples=n, layers=layers, chunk_rows=chunk_rows,
                                          dtype=dtype, token_mode=mode,
                                          token_counts=None if mode is None
                                          else tuple(token_counts),
                                          token_chunk_rows=token_chunk_rows), {"config": {}})
    rng = np.random.default_rng(seed)
    off = np.concatenate([[0], np.cumsum(token_counts)]) if mode else None
    for c in store.pending_chunks():
        a, b = store.layout.chunk_range(c)
        kw = {}
        if mode:
            t = int(off[b] - off[a])
            tok = {x.name: rng.standard_normal((t, x.k)).astype(np.float32) for x in layers}
            for x in layers:
                tok[x.name][np.isin(np.repeat(np.arange(a, b), token_counts[a:b]),
                                    zero_rows)] = 0
            ex = np.repeat(np.arange(b - a), token_counts[a:b])
            grads = {x.name: np.stack([tok[x.name][ex == i].sum(0, dtype=np.float32)
                                       for i in range(b - a)]) for x in layers}
            kw = {"token_grads": tok, "token_positions": np.concatenate(
                [np.arange(1, m + 1) for m in token_counts[a:b]])}
        else:
            grads = {x.name: rng.standard_normal((b - a, x.k)) for x in layers}
            for x in layers:
                grads[x.name][[i - a for i in zero_rows if a <= i < b]] = 0
        store.write_chunk(c, grads, [f"e{i}" for i in range(a, b)], [1] * (b - a),
                          [0.0] * (b - a), **kw)
    return open_store(url, mode="r+")


def raw(store, name):
    return np.asarray(store.group[f"grads/{name}"][:], dtype=np.float64)


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("infl") / "tiny.zarr")
    res = CliRunner().invoke(app, ["cache", "--config", CONFIG, "--set", f"data={CORPUS}",
                                   "--set", f"out={out}", "--quiet"], terminal_width=200)
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(app, ["fisher", out], terminal_width=200)
    assert res.exit_code == 0, res.output
    return out


SPEC = "factgrass:k=16,k_in=6,k_out=5"


def _examples(lengths=(7, 3, 9, 5, 2)):
    """Queries of mixed lengths; the third has a 4-token prompt that is not a target."""
    return [Example(f"q{i}", ids.tolist(), lab.tolist(), "")
            for i, (ids, lab) in enumerate(make_examples(lengths=list(lengths)))]


def _sums(q):
    return {k: torch.stack([v[a:b].sum(0) for a, b in zip(q.offsets[:-1], q.offsets[1:])])
            for k, v in q.tokens.items()}


def assert_rows_match(got, ref, rel=1e-6):
    """Row-wise ``||got - ref|| <= rel (||ref_row|| + 1e-6 max_row ||ref||)``: float64, but
    transformers' RMSNorm rounds through float32 (see test_capture), so 1e-6 of a row's norm;
    and some rows are zero in exact arithmetic (a position attending only to itself passes no
    gradient to q/k: the softmax's derivative is 0) but 1e-19 noise in both computations, so
    they are held to the scale of the layer's other rows."""
    norms = ref.norm(dim=-1)
    err = (got - ref).norm(dim=-1)
    bound = rel * (norms + 1e-6 * norms.max())
    assert bool((err <= bound).all()), float((err / bound).max())


def test_per_token_loss_rows_equal_one_backward_per_token_in_float64():
    model = tiny_model("qwen2", dtype=torch.float64)  # q/k/v biases: bias columns too
    examples = _examples()
    # a budget of 20 tokens: the truncated single-target rows share batches of 2 to 10 rows
    q = query_gradients(model, SPEC, examples, 0, capture={"seed": 1}, token_mode="loss",
                        max_tokens=20)
    with GradientCapture(model, SPEC, seed=1) as cap:
        comps = cap.compressors
    n_targets = [sum(1 for t in range(1, len(e.labels)) if e.labels[t] != IGNORE)
                 for e in examples]
    assert np.diff(q.offsets).tolist() == n_targets
    refs = []
    for j, ex in enumerate(examples):
        ids, labels = torch.tensor(ex.input_ids), torch.tensor(ex.labels)
        for r in range(q.offsets[j], q.offsets[j + 1]):
            t = int(q.positions[r])
            assert labels[t] != IGNORE
            refs.append(reference_vec_grads(model, ids, labels, comps, token=t)[0])
    for name, comp in comps.items():
        ref = torch.stack([comp.dense_matrix() @ g[name] for g in refs])
        assert_rows_match(q.tokens[name], ref)


@pytest.mark.parametrize("mode", ["loss", "position"])
def test_token_rows_sum_to_the_ordinary_query_gradient(mode):
    model = tiny_model("llama", dtype=torch.float64)
    examples = _examples()
    plain = query_gradients(model, SPEC, examples, 0, capture={"seed": 0},  # one backward
                            max_tokens=24)
    q = query_gradients(model, SPEC, examples, 0, capture={"seed": 0}, token_mode=mode,
                        max_tokens=24)
    for name, rows in _sums(q).items():
        # each token row rounds through float32 in RMSNorm (see test_capture): 1e-6
        assert_rows_match(rows, plain.grads[name])
        torch.testing.assert_close(q.grads[name], plain.grads[name], rtol=0, atol=0)


def reference_position_terms(model, ids, labels, comps):
    """``delta_t x_t^T`` of every hooked layer at every position t, from one plain backward()
    with the layer outputs' gradients retained, compressed by each layer's dense matrix."""
    mods = dict(model.named_modules())
    seen = {}

    def keep(name):
        def hook(mod, args, out):
            out.retain_grad()
            seen[name] = (args[0].detach()[0], out)
        return hook

    handles = [mods[n].register_forward_hook(keep(n)) for n in comps]
    for p in model.parameters():
        p.requires_grad_(True)
    logits = model(input_ids=ids[None]).logits[0]
    torch.nn.functional.cross_entropy(logits[:-1], labels[1:], ignore_index=IGNORE,
                                      reduction="sum").backward()
    for h in handles:
        h.remove()
    for p in model.parameters():
        p.requires_grad_(False)
    out = {}
    for name, comp in comps.items():
        x, z = seen[name]
        if mods[name].bias is not None:
            x = torch.cat([x, x.new_ones(x.shape[0], 1)], dim=1)
        terms = torch.einsum("to,ti->toi", z.grad[0], x).reshape(x.shape[0], -1)
        out[name] = terms @ comp.dense_matrix().T
    return out


def test_per_position_rows_equal_delta_x_outer_products():
    model = tiny_model("qwen2", dtype=torch.float64)
    examples = _examples()
    q = query_gradients(model, SPEC, examples, 0, capture={"seed": 2}, token_mode="position",
                        max_tokens=18)
    with GradientCapture(model, SPEC, seed=2) as cap:
        comps = cap.compressors
    refs = []
    for j, ex in enumerate(examples):
        a, b = int(q.offsets[j]), int(q.offsets[j + 1])
        assert q.positions[a:b].tolist() == list(range(len(ex.input_ids)))
        refs.append(reference_position_terms(model, torch.tensor(ex.input_ids),
                                             torch.tensor(ex.labels), comps))
    for name in comps:
        assert_rows_match(q.tokens[name], torch.cat([r[name] for r in refs]))


def test_cli_query_scores_queries_and_tokens_in_one_pass(tiny_store, tmp_path):
    qfile = tmp_path / "q.jsonl"
    qfile.write_text(json.dumps({"id": "q1", "prompt": "What is the capital of France?",
                                 "completion": " Paris."}) + "\n"
                     + json.dumps({"id": "q2", "text": "Ice melts."}) + "\n")
    out = tmp_path / "infl.jsonl"
    res = CliRunner().invoke(app, ["query", tiny_store, "--queries", str(qfile), "--per-token",
                                   "--top-k", "3", "--out", str(out), "--device", "cpu"],
                             terminal_width=200)
    assert res.exit_code == 0, res.output
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    store = open_store(tiny_store)
    q = from_file(store, str(qfile), per_token=True, device="cpu")
    pre = precondition(load_factors(store), q.grads)
    vals, idx = stream_top_k(store, pre, 3, device="cpu")
    ids = [str(i) for i in store.example_ids()]
    assert [x["query"] for x in lines] == ["q1", "q2"]
    for j, line in enumerate(lines):
        assert [e["index"] for e in line["top"]] == idx[j].tolist()
        assert [e["id"] for e in line["top"]] == [ids[i] for i in idx[j]]
        assert line["top"][0]["text"]
        assert len(line["tokens"]) == q.offsets[j + 1] - q.offsets[j]
        assert [t["position"] for t in line["tokens"]] == \
            q.positions[q.offsets[j]: q.offsets[j + 1]].tolist()
    pre_t = precondition(load_factors(store), q.tokens)
    tv, ti = stream_top_k(store, pre_t, 3, device="cpu")
    assert [e["index"] for e in lines[0]["tokens"][0]["top"]] == ti[0].tolist()


def test_snippets_from_the_corpus_file_are_only_the_rows_asked_for(tiny_store):
    store = open_store(tiny_store)
    ids = row_ids(store, [2, 0, 2, -1])  # duplicates and unfilled top-k slots are dropped
    assert sorted(ids) == [0, 2]
    texts = row_texts(store, ids)
    assert sorted(texts) == [0, 2] and texts[0].startswith("The capital of France")


def test_snippets_read_only_those_rows_from_the_tokenized_corpus(tiny_store, tmp_path,
                                                                 monkeypatch):
    store = open_store(tiny_store)
    cfg = store.meta["config"]
    _, tok, _ = load_model(cfg["model"], seed=cfg.get("seed", 0))
    corpus = TokenizedCorpus.open_or_build(CORPUS, tok, max_length=cfg["max_length"],
                                           cache_dir=tmp_path, num_proc=1, progress=False)
    store.meta["dataset"]["corpus_path"] = str(corpus.path)  # what the cache job records

    def no_corpus_file(*a, **k):
        raise AssertionError("the corpus file was read")

    monkeypatch.setattr("grass_llm.influence.texts.read_records", no_corpus_file)
    ids = row_ids(store, [0, 5])
    texts = row_texts(store, ids, tokenizer=tok)
    assert texts == {0: corpus.text(0, tok), 5: corpus.text(5, tok)} and "Paris" in texts[0]
    with pytest.raises(AssertionError, match="corpus file"):  # rows of another corpus: the
        row_texts(store, {0: "not-this-id"}, tokenizer=tok)  # cache is not trusted


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




def test_two_processes_equal_one(tiny_store, tmp_path):
    """fisher, query (queries and tokens in one pass, the score matrix), self-influence and
    value on 2 ranks (torchrun, strict collectives) against the same commands on 1 process."""
    qfile = tmp_path / "q.jsonl"
    qfile.write_text("".join(json.dumps({"id": f"q{i}", "text": t}) + "\n" for i, t in
                             enumerate(["Paris is in France.", "Ice melts.", "Rome, Italy."])))
    runs = {}
    for tag in ("one", "two"):
        store = str(tmp_path / f"{tag}.zarr")
        shutil.copytree(tiny_store, store)
        cmds = [["fisher", store], ["query", store, "--queries", str(qfile), "--per-token",
                                    "--top-k", "4", "--out", str(tmp_path / f"{tag}.jsonl"),
                                    "--matrix", str(tmp_path / f"{tag}-m.zarr")],
                ["self-influence", store, "--out", str(tmp_path / f"{tag}-si.jsonl")],
                ["value", store, "--target-store", store, "--out",
                 str(tmp_path / f"{tag}-v.jsonl")],
                # normalized: the training-row norms are summed per rank's own chunks
                ["query", store, "--queries", str(qfile), "--per-token", "--top-k", "4",
                 "--normalize", "cosine", "--out", str(tmp_path / f"{tag}-cos.jsonl")],
                ["self-influence", store, "--normalize", "train-unit", "--out",
                 str(tmp_path / f"{tag}-siu.jsonl")],
                ["value", store, "--target-store", store, "--normalize", "cosine", "--out",
                 str(tmp_path / f"{tag}-vc.jsonl")]]
        if tag == "one":
            for cmd in cmds:
                res = CliRunner().invoke(app, cmd, terminal_width=200)
                assert res.exit_code == 0, res.output
        else:
            args = [a for cmd in cmds for a in cmd + ["--next"]][:-1]
            launch = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                      "--master-port", str(_free_port()), "-m", "tests.influence_ranks", *args]
            res = subprocess.run(launch, cwd=ROOT, env=_env(), capture_output=True, text=True,
                                 timeout=600)
            assert res.returncode == 0, res.stderr[-4000:]
        runs[tag] = store
    one, two = load_factors(open_store(runs["one"])), load_factors(open_store(runs["two"]))
    for name in one:  # the same float64 sums, added in another order
        torch.testing.assert_close(two[name], one[name], rtol=1e-10, atol=1e-12)
    lines = {t: [json.loads(x) for name in ("", "-cos") for x in
                 (tmp_path / f"{t}{name}.jsonl").read_text().splitlines()]
             for t in ("one", "two")}
    assert len(lines["one"]) == 6 and {x["normalize"] for x in lines["two"]} == {"none", "cosine"}
    for a, b in zip(lines["one"], lines["two"]):
        assert [e["index"] for e in a["top"]] == [e["index"] for e in b["top"]]
        assert [[e["index"] for e in t["top"]] for t in a["tokens"]] == \
            [[e["index"] for e in t["top"]] for t in b["tokens"]]
        # float32 model and GEMMs on 1 thread per rank vs the test's threads: ~1e-7 relative
        np.testing.assert_allclose([e["score"] for e in a["top"]],
                                   [e["score"] for e in b["top"]], rtol=1e-4)
    np.testing.assert_allclose(zarr.open_array(str(tmp_path / "two-m.zarr"))[:],
                               zarr.open_array(str(tmp_path / "one-m.zarr"))[:], rtol=1e-4,
                               atol=1e-6)
    for name, key in (("si", "self_influence"), ("v", "value"), ("siu", "self_influence"),
                      ("vc", "value")):
        got = {t: [json.loads(x) for x in (tmp_path / f"{t}-{name}.jsonl").read_text()
                   .splitlines()] for t in ("one", "two")}
        assert [x["id"] for x in got["one"]] == [x["id"] for x in got["two"]]
        np.testing.assert_allclose([x[key] for x in got["two"]], [x[key] for x in got["one"]],
                                   rtol=1e-6)
