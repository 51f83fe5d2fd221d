"""``--normalize`` through the commands on a tiny Llama store: query (queries and tokens),
value and self-influence against a dense numpy reference (the Fisher rebuilt from the raw rows,
numpy solves, explicit norms over all layers). Library-level tests: test_scoring.py; the same
commands on 2 ranks: test_influence.py."""

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from grass_llm.cli import app
from grass_llm.influence import from_file, load_factors
from grass_llm.store import open_store
from tests.test_influence import tiny_store  # noqa: F401  (the module's shared fixture)


def _dense(store):
    """``(pre(q) -> [Q, sum K] preconditioned, rows [n, sum K], H^-1 block-diagonal)``."""
    lam = load_factors(store).report
    rows = [np.asarray(store.group[f"grads/{n}"][:], np.float64) for n in store.layer_names]
    inv = [np.linalg.inv(g.T @ g / store.n_examples + lam[n]["lambda"] * np.eye(g.shape[1]))
           for n, g in zip(store.layer_names, rows)]

    def pre(q):
        return np.concatenate([q[n].double().numpy() @ h for n, h in
                               zip(store.layer_names, inv)], 1)
    return pre, np.concatenate(rows, 1), inv


def _lines(path):
    return [json.loads(x) for x in open(path)]


# float32 model and GEMMs against float64 numpy: 1e-5 relative (test_scoring's tolerance)
def _close(got, want):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * np.abs(want).max())


@pytest.mark.parametrize("normalize", ["cosine", "train-unit"])
def test_normalized_commands_equal_a_dense_reference(tiny_store, tmp_path,  # noqa: F811
                                                     normalize):
    qfile = tmp_path / "q.jsonl"
    qfile.write_text(json.dumps({"id": "q1", "prompt": "The capital of France is",
                                 "completion": " Paris."}) + "\n"
                     + json.dumps({"id": "q2", "text": "Ice melts."}) + "\n")
    store = open_store(tiny_store)
    n = store.n_examples
    run = CliRunner()
    res = run.invoke(app, ["query", tiny_store, "--queries", str(qfile), "--per-token",
                           "--top-k", str(n), "--normalize", normalize, "--out",
                           str(tmp_path / "q.out"), "--device", "cpu"], terminal_width=200)
    assert res.exit_code == 0, res.output
    pre, rows, inv = _dense(store)
    q = from_file(store, str(qfile), per_token=True, device="cpu")
    pq, pt = pre(q.grads), pre(q.tokens)
    row_norm = np.linalg.norm(rows, axis=1)
    scale_q = np.linalg.norm(pq, axis=1) if normalize == "cosine" else np.ones(len(pq))
    for j, line in enumerate(_lines(tmp_path / "q.out")):
        want = pq[j] @ rows.T / row_norm / scale_q[j]
        got = np.zeros(n)
        got[[e["index"] for e in line["top"]]] = [e["score"] for e in line["top"]]
        _close(got, want)
        for t, tok in zip(range(q.offsets[j], q.offsets[j + 1]), line["tokens"]):
            # a token row is divided by its query's norm: the tokens add up to the query
            best = tok["top"][0]
            _close(best["score"], (pt[t] @ rows[best["index"]]) / row_norm[best["index"]]
                   / scale_q[j])
    targets = tmp_path / "targets.jsonl"
    targets.write_text(qfile.read_text())
    res = run.invoke(app, ["value", tiny_store, "--targets", str(targets), "--normalize",
                           normalize, "--out", str(tmp_path / "v.out"), "--device", "cpu"],
                     terminal_width=200)
    assert res.exit_code == 0, res.output
    want = (pq / scale_q[:, None]).sum(0) @ rows.T / row_norm  # cosine: every target alike
    got = {x["index"]: x["value"] for x in _lines(tmp_path / "v.out")}
    _close([got[i] for i in range(n)], want)


def test_normalized_self_influence_and_the_refused_cosine(tiny_store, tmp_path):  # noqa: F811
    store = open_store(tiny_store)
    _, rows, inv = _dense(store)
    res = CliRunner().invoke(app, ["self-influence", tiny_store, "--normalize", "train-unit",
                                   "--out", str(tmp_path / "si.out")], terminal_width=200)
    assert res.exit_code == 0, res.output
    parts, start = [], 0
    for h in inv:
        g = rows[:, start: start + h.shape[0]]
        parts.append(np.einsum("ik,kl,il->i", g, h, g))
        start += h.shape[0]
    want = sum(parts) / np.square(rows).sum(1)
    got = [x["self_influence"] for x in _lines(tmp_path / "si.out")]
    np.testing.assert_allclose(got, want, rtol=1e-9)  # float64 throughout: round-off only
    res = CliRunner().invoke(app, ["self-influence", tiny_store, "--normalize", "cosine"],
                             terminal_width=200)
    assert res.exit_code == 2 and "cosine of an example with itself is 1" in res.output
