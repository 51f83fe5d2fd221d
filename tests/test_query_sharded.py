"""Query gradients on a sharded model (``--parallel fsdp|tp``: the cache job's loading and
sharding) equal the single-process ones: example-level rows, per-token rows of both token
modes, and the query command's top-k scores and score matrix. Ranks run under torchrun with
strict collectives (tests/query_ranks.py); an odd number of queries and a small token budget
give the ranks unequal numbers of batches (FSDP must pad with lockstep filler steps)."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import zarr
from typer.testing import CliRunner

from grass_llm.cli import app
from grass_llm.influence import from_file
from grass_llm.store import open_store
from tests.test_cache import ROOT, ROW_REL, _env, _free_port
from tests.test_influence import tiny_store  # noqa: F401  (a fixture)

QUERIES = ["Paris is in France.", "Ice melts.", "Rome, Italy.", "Cats purr at night, softly.",
           "Go."]
MAX_TOKENS = 40  # a few queries per batch, and many batches of loss-mode rows


def _assert_rows_close(got, ref, what):
    """Row-wise ``||got - ref|| <= ROW_REL ||ref_row|| + 1e-6 max_row ||ref||``: ROW_REL as the
    sharded cache stores (float32 sums in another order, tests/test_cache.py); some token rows
    are zero in exact arithmetic (a position attending only to itself passes no gradient to
    q/k) but float32 noise of ~1e-8 of the layer's largest row in both runs, so they are held
    to that scale."""
    norms = np.linalg.norm(ref, axis=-1)
    err = np.linalg.norm(got - ref, axis=-1)
    bound = ROW_REL * norms + 1e-6 * norms.max()
    assert (err <= bound).all(), (what, float((err / bound).max()))


def _query_args(store, qfile, out, matrix):
    return ["query", store, "--queries", str(qfile), "--per-token", "--top-k", "4", "--out",
            str(out), "--matrix", str(matrix)]


@pytest.fixture(scope="module")
def single(tiny_store, tmp_path_factory):  # noqa: F811
    """The single-process reference: from_file's rows of both token modes, and the query
    command's output lines and matrix."""
    tmp = tmp_path_factory.mktemp("qsingle")
    qfile = tmp / "q.jsonl"
    qfile.write_text("".join(json.dumps({"id": f"q{i}", "text": t}) + "\n"
                             for i, t in enumerate(QUERIES)))
    store = open_store(tiny_store)
    rows = {mode: from_file(store, str(qfile), per_token=True, token_mode=mode, device="cpu",
                            max_tokens=MAX_TOKENS) for mode in ("position", "loss")}
    res = CliRunner().invoke(app, _query_args(tiny_store, qfile, tmp / "one.jsonl",
                                              tmp / "one-m.zarr"), terminal_width=200)
    assert res.exit_code == 0, res.output
    lines = [json.loads(x) for x in (tmp / "one.jsonl").read_text().splitlines()]
    return {"qfile": qfile, "rows": rows, "lines": lines,
            "matrix": zarr.open_array(str(tmp / "one-m.zarr"))[:]}


@pytest.mark.parametrize(("parallel", "ranks"), [("fsdp", 2), ("tp", 2), ("fsdp", 3)])
def test_sharded_query_gradients_and_scores_equal_one_process(
        tiny_store, single, tmp_path, parallel, ranks):  # noqa: F811
    out, matrix = tmp_path / "two.jsonl", tmp_path / "two-m.zarr"
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks),
              "--master-port", str(_free_port()), "-m", "tests.query_ranks", tiny_store,
              str(single["qfile"]), parallel, str(MAX_TOKENS), str(tmp_path / "rows.pt"), "--",
              *_query_args(tiny_store, single["qfile"], out, matrix), "--parallel", parallel]
    res = subprocess.run(launch, cwd=ROOT, env=_env(), capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-6000:]
    got = torch.load(tmp_path / "rows.pt", weights_only=False)
    for mode, ref in single["rows"].items():
        g = got[mode]
        assert g["ids"] == ref.ids == [f"q{i}" for i in range(len(QUERIES))]
        np.testing.assert_array_equal(g["offsets"].numpy(), ref.offsets)
        np.testing.assert_array_equal(g["positions"].numpy(), ref.positions)
        assert g["texts"] == ref.token_texts
        for name in ref.grads:
            _assert_rows_close(g["grads"][name].numpy(), ref.grads[name].numpy(), (mode, name))
            _assert_rows_close(g["tokens"][name].numpy(), ref.tokens[name].numpy(),
                               (mode, name, "tokens"))
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x["query"] for x in lines] == [x["query"] for x in single["lines"]]
    for a, b in zip(single["lines"], lines):
        assert [e["index"] for e in a["top"]] == [e["index"] for e in b["top"]]
        assert [[e["index"] for e in t["top"]] for t in a["tokens"]] == \
            [[e["index"] for e in t["top"]] for t in b["tokens"]]
        # rows equal to ~1e-7 relative (float32, sums in another order), then the same GEMMs:
        # 1e-4 as the 2-process test of tests/test_influence.py
        np.testing.assert_allclose([e["score"] for e in b["top"]],
                                   [e["score"] for e in a["top"]], rtol=1e-4)
    # a score that nearly cancels moves by the rows' ~1e-7 relative error times |q| |g|, which
    # is of the size of the largest scores, not of its own: atol relative to those
    ref = single["matrix"]
    np.testing.assert_allclose(zarr.open_array(str(matrix))[:], ref, rtol=1e-4,
                               atol=1e-6 * np.abs(ref).max())


def test_parallel_option_refuses_unknown_modes_and_says_when_it_is_ignored(tiny_store,  # noqa: F811
                                                                            tmp_path):
    res = CliRunner().invoke(app, ["query", tiny_store, "--query-store", tiny_store,
                                   "--parallel", "deepspeed", "--out",
                                   str(tmp_path / "x.jsonl")], terminal_width=200)
    assert res.exit_code == 2 and "--parallel must be one of ['none', 'fsdp', 'tp']" in \
        res.output, res.output
    res = CliRunner().invoke(app, ["value", tiny_store, "--target-store", tiny_store,
                                   "--parallel", "fsdp", "--out", str(tmp_path / "v.jsonl")],
                             terminal_width=200)
    assert res.exit_code == 0 and "--parallel fsdp is ignored" in res.output, res.output
    with pytest.raises(ValueError, match="parallel must be one of"):
        from_file(open_store(tiny_store), str(tmp_path / "x.jsonl"), parallel="zero3")
