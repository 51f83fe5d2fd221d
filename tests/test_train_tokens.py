"""``query --train-tokens`` on a tiny Llama cached with per-token rows: each reported training
example's token scores against a reference computed directly (numpy solve, the raw token
arrays by the documented layout), their sum against the example's score, and their texts
against the tokenized corpus."""

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from grass_llm.cli import app
from grass_llm.data.corpus import TokenizedCorpus
from grass_llm.influence import from_file, load_factors
from grass_llm.models import load_model
from grass_llm.store import open_store
from tests.test_cache import CONFIG, CORPUS


@pytest.fixture(scope="module", params=["loss", "position"])
def token_store(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    out = str(folder / f"{request.param}.zarr")
    data = folder / "corpus.jsonl"  # 7 of the tiny corpus's records: text, prompt, chat
    data.write_text("".join(open(CORPUS).readlines()[:7]))
    res = CliRunner().invoke(app, ["cache", "--config", CONFIG, "--set", f"data={data}",
                                   "--set", f"out={out}", "--set",
                                   f"token_mode={request.param}",
                                   # short documents: the cache's per-token loss rows cost one
                                   # full-length row per target token
                                   "--set", "max_length=32", "--set", "on_bad_record=skip", "--quiet"],
                             terminal_width=200)
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(app, ["fisher", out], terminal_width=200)
    assert res.exit_code == 0, res.output
    return out


def _queries(tmp_path):
    qfile = tmp_path / "q.jsonl"
    qfile.write_text(json.dumps({"id": "q1", "prompt": "What is the capital of France?",
                                 "completion": " Paris."}) + "\n"
                     + json.dumps({"id": "q2", "text": "Ice melts in the sun."}) + "\n")
    return qfile


def _reference_pre(store, grads, normalize):
    """The preconditioned queries by numpy: ``solve(L L^T, q)`` per layer, concatenated; for
    cosine divided by their norm."""
    fac = load_factors(store)
    pre = np.concatenate([np.linalg.solve(fac[n].numpy() @ fac[n].numpy().T,
                                          grads[n].double().numpy().T).T
                          for n in store.layer_names], 1)
    if normalize == "cosine":
        pre /= np.linalg.norm(pre, axis=1, keepdims=True)
    return pre


@pytest.mark.parametrize("normalize", ["none", "cosine"])
def test_train_token_scores_match_the_stored_rows_and_add_up(token_store, tmp_path, normalize):
    qfile = _queries(tmp_path)
    out = tmp_path / "infl.jsonl"
    res = CliRunner().invoke(app, ["query", token_store, "--queries", str(qfile), "--top-k",
                                   "3", "--train-tokens", "--normalize", normalize, "--out",
                                   str(out), "--device", "cpu"], terminal_width=200)
    assert res.exit_code == 0, res.output
    store = open_store(token_store)
    pre = _reference_pre(store, from_file(store, str(qfile), device="cpu").grads, normalize)
    g = np.concatenate([np.asarray(store.group[f"grads/{n}"][:], np.float64)
                        for n in store.layer_names], 1)
    tok_rows = np.concatenate([np.asarray(store.group[f"tokens/{n}"][:], np.float64)
                               for n in store.layer_names], 1)
    off, base = store.group["token_offsets"][:], store.group["token_chunk_base"][:]
    cfg = store.meta["config"]
    _, tok, _ = load_model(cfg["model"], seed=cfg.get("seed", 0))
    corpus = TokenizedCorpus.open(store.meta["dataset"]["corpus_path"])
    R = store.layout.chunk_rows
    for j, line in enumerate(json.loads(x) for x in out.read_text().splitlines()):
        assert line["normalize"] == normalize and line["train_token_mode"] == \
            store.layout.token_mode
        for entry in line["top"]:
            i = entry["index"]
            c = i // R
            s = base[c] + off[i] - off[c * R]
            rows = tok_rows[s: s + off[i + 1] - off[i]]  # the documented layout, by hand
            scale = 1.0 if normalize == "none" else 1 / np.linalg.norm(g[i])
            tt = entry["train_tokens"]
            # float64 throughout; the two solves differ by round-off times the blocks'
            # condition numbers (damping 0.1 tr/k keeps them below ~1e3): 1e-9 relative
            np.testing.assert_allclose(tt["scores"], rows @ pre[j] * scale, rtol=1e-9,
                                       atol=1e-12 * np.abs(rows @ pre[j]).max() * scale)
            # the token scores add up to the example's score, up to the float32 rounding of
            # the stored example row (the sum of its token rows) and the pass's float32 GEMMs
            np.testing.assert_allclose(sum(tt["scores"]), entry["score"], rtol=1e-5,
                                       atol=1e-6 * np.abs(tt["scores"]).sum())
            want_pos = store.group["token_position"][s: s + off[i + 1] - off[i]].tolist()
            assert tt["positions"] == want_pos
            ids = corpus.example(i).input_ids
            assert tt["token_ids"] == [ids[p] for p in want_pos]
            assert tt["tokens"] == [tok.decode([ids[p]]) for p in want_pos]
            if store.layout.token_mode == "position":  # every position of the example
                assert want_pos == list(range(len(ids)))


def test_train_tokens_refuse_a_store_without_token_rows(tmp_path):
    out = str(tmp_path / "plain.zarr")
    for cmd in (["cache", "--config", CONFIG, "--set", f"data={CORPUS}", "--set", f"out={out}",
                 "--quiet"], ["fisher", out]):
        assert CliRunner().invoke(app, cmd, terminal_width=200).exit_code == 0
    res = CliRunner().invoke(app, ["query", out, "--queries", str(_queries(tmp_path)),
                                   "--train-tokens"], terminal_width=200)
    assert res.exit_code == 2
    assert "no per-token rows" in res.output and "token_mode=loss" in res.output
