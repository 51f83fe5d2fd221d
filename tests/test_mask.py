"""The paper's selective mask in the factorized path: fitting (fit_factorized_mask, fit-mask),
the mask file, FactGraSS with ``mask=PATH`` against its dense reference, tensor-parallel shards,
and the store / query bookkeeping of the file's hash."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from grass_llm.capture import GradientCapture
from grass_llm.cli import app
from grass_llm.compress import FactGraSS, build_compressor, check_spec, fit_factorized_mask
from grass_llm.compress._hash import sample_indices
from grass_llm.compress.mask_file import LayerMask, read_mask_file, write_mask_file
from grass_llm.compress.selective import factorized_mask_correlation
from grass_llm.compress.sharded import shard_compressor
from grass_llm.config import load_config
from grass_llm.influence import from_file
from grass_llm.models import tiny_model
from grass_llm.store import StoreError, open_store

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "tiny.yaml")
CORPUS = str(ROOT / "tests" / "data" / "tiny_corpus.jsonl")
# float64: the map and its reference differ only in summation order, so 1e-12 relative is far
# above round-off and far below any wrong index (which changes values by O(1)).
TOL = dict(rtol=1e-12, atol=1e-12)


def _explicit_vec_grad(x, d, bias):
    """Row-major vec(G), G = sum_t delta_t x_t^T (with the constant-1 bias column)."""
    if bias:
        x = torch.cat([x, torch.ones(*x.shape[:-1], 1, dtype=x.dtype)], dim=-1)
    return torch.einsum("bto,bti->boi", d, x).reshape(x.shape[0], -1)


def _mask_file(path, layers):
    """A mask file from ``{name: (idx_in, idx_out, d_in, d_out, bias)}``."""
    return write_mask_file(path, {n: LayerMask(np.array(a), np.array(b), di, do, bias)
                                  for n, (a, b, di, do, bias) in layers.items()})


# ----------------------------------------------------------------------------------- the fit
def _concentrated_grads(gen, n, T, sx, sd):
    """Per-example gradients whose energy sits on the coordinates where sx / sd are large."""
    x = torch.randn(n, T, sx.numel(), generator=gen, dtype=torch.float64) * sx
    d = torch.randn(n, T, sd.numel(), generator=gen, dtype=torch.float64) * sd
    return torch.einsum("nto,nti->noi", d, x)


def test_fit_finds_the_known_input_and_output_subsets_and_beats_random_masks():
    gen = torch.Generator().manual_seed(0)
    I, O, k_in, k_out = 40, 30, 8, 6
    s_in = torch.randperm(I, generator=gen)[:k_in].sort().values
    s_out = torch.randperm(O, generator=gen)[:k_out].sort().values
    sx, sd = torch.full((I,), 0.1), torch.full((O,), 0.1)
    sx[s_in], sd[s_out] = 1.0, 1.0
    tr = _concentrated_grads(gen, 64, 5, sx, sd)
    te = _concentrated_grads(gen, 16, 5, sx, sd)
    fit = fit_factorized_mask(tr, te, k_in, k_out, steps=60, seed=1)
    np.testing.assert_array_equal(fit.idx_in, s_in.numpy())
    np.testing.assert_array_equal(fit.idx_out, s_out.numpy())
    rand = [factorized_mask_correlation(tr, te, sample_indices(I, k_in, s),
                                        sample_indices(O, k_out, 100 + s)) for s in range(10)]
    # the true subsets carry all but ~1% of each inner product (0.1^2 off-subset scale per
    # factor), so their correlation is ~0.999; random subsets mostly miss them (~0.2)
    assert fit.objective > 0.99 and fit.objective > max(rand) + 0.3
    assert fit.objective == pytest.approx(factorized_mask_correlation(tr, te, s_in.numpy(),
                                                                      s_out.numpy()), abs=0)


def test_fit_is_deterministic_and_checks_its_input():
    gen = torch.Generator().manual_seed(3)
    tr, te = torch.randn(6, 5, 7, generator=gen), torch.randn(2, 5, 7, generator=gen)
    a = fit_factorized_mask(tr, te, 3, 2, steps=20, seed=4)
    b = fit_factorized_mask(tr, te, 3, 2, steps=20, seed=4)
    np.testing.assert_array_equal(a.idx_in, b.idx_in)
    np.testing.assert_array_equal(a.idx_out, b.idx_out)
    full = fit_factorized_mask(tr, te, 7, 5, steps=20)  # keeps everything: exact
    assert full.objective == pytest.approx(1.0, abs=1e-12) and full.step == 0
    for args, msg in [((tr, te[:, :4], 3, 2), "g_target is"), ((tr[:2], te, 3, 2), "3 rows"),
                      ((tr, te, 8, 2), "k_in=8"), ((tr, te, 3, 6), "k_out=6"),
                      ((tr[0], te, 3, 2), "3-D")]:
        with pytest.raises(ValueError, match=msg):
            fit_factorized_mask(*args)


# ----------------------------------------------------------- FactGraSS with a mask file: exact
@pytest.mark.parametrize("bias", [False, True])
def test_factgrass_with_mask_file_equals_mask_then_sjlt_on_vec_g(tmp_path, bias):
    d_in, d_out = 19, 13
    idx_in = [0, 3, 4, 11, 18] + ([19] if bias else [])  # the bias column is index d_in
    idx_out = [1, 2, 7, 12]
    path = tmp_path / "m.safetensors"
    _mask_file(path, {"blk.0.q": (idx_in, idx_out, d_in, d_out, bias),
                      "blk.0.k": ([1, 2, 3, 4, 5, 6][:len(idx_in)], [0, 1, 2, 3], d_in, d_out,
                                  bias)})
    spec = f"factgrass:k=9,k_in={len(idx_in)},k_out=4,c=2,mask={path}"
    fg = build_compressor(spec, seed=5, d_in=d_in, d_out=d_out, bias=bias, layer="blk.0.q")
    np.testing.assert_array_equal(fg.idx_in, idx_in)
    np.testing.assert_array_equal(fg.idx_out, idx_out)
    x = torch.randn(3, 8, d_in, dtype=torch.float64)
    d = torch.randn(3, 8, d_out, dtype=torch.float64)
    vec_g = _explicit_vec_grad(x, d, bias)
    # the reference, built from the file's indices only: GraSS's mask S_out x S_in on vec(G),
    # then the same seeded SJLT as the random-mask FactGraSS of this seed
    flat = [i * (d_in + bias) + j for i in idx_out for j in idx_in]
    ref = FactGraSS(d_in, d_out, k=9, k_in=len(idx_in), k_out=4, c=2, seed=5, bias=bias)
    expected = ref.sjlt(vec_g[:, flat])
    torch.testing.assert_close(fg(x, d), expected, **TOL)
    torch.testing.assert_close(fg.per_token(x, d).sum(1), expected, **TOL)
    torch.testing.assert_close(fg.reduce(fg.input_features(x), d), expected, **TOL)  # hooks
    torch.testing.assert_close(vec_g @ fg.dense_matrix().T, expected, **TOL)


def test_mask_spec_records_the_file_hash_and_rebuilds_only_with_that_file(tmp_path):
    path = tmp_path / "m.safetensors"
    sha = _mask_file(path, {"L": ([1, 4], [0, 2], 6, 5, False)})
    assert sha == hashlib.sha256(path.read_bytes()).hexdigest()
    fg = build_compressor(f"factgrass:k=3,k_in=2,k_out=2,mask={path}", seed=1, d_in=6,
                          d_out=5, layer="L")
    assert fg.spec == f"factgrass:c=1,k=3,k_in=2,k_out=2,mask_sha256={sha}"  # no path
    again = build_compressor(f"{fg.spec},mask={path}", seed=1, d_in=6, d_out=5, layer="L")
    torch.testing.assert_close(again.dense_matrix(), fg.dense_matrix(), rtol=0, atol=0)
    _mask_file(path, {"L": ([1, 5], [0, 2], 6, 5, False)})  # the file changes
    with pytest.raises(ValueError, match="not the file the maps were built with"):
        build_compressor(f"{fg.spec},mask={path}", seed=1, d_in=6, d_out=5, layer="L")
    with pytest.raises(ValueError, match="names no mask file"):
        build_compressor(fg.spec, seed=1, d_in=6, d_out=5, layer="L")
    # a spec without a mask is what it always was: no hash, the seeded random masks
    plain = build_compressor("factgrass:k=3,k_in=2,k_out=2", seed=1, d_in=6, d_out=5,
                             layer="L")
    assert plain.spec == "factgrass:c=1,k=3,k_in=2,k_out=2"


def test_missing_corrupt_or_mismatched_mask_files_give_clear_errors(tmp_path):
    good = tmp_path / "m.safetensors"
    _mask_file(good, {"L": ([1, 4], [0, 2], 6, 5, False)})
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"not a mask file at all")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-5])
    other = tmp_path / "other.safetensors"
    from safetensors.numpy import save_file
    save_file({"w": np.zeros(3)}, str(other))

    def build(path, layer="L", k_in=2, d_in=6, bias=False):
        return build_compressor(f"factgrass:k=3,k_in={k_in},k_out=2,mask={path}", seed=0,
                                d_in=d_in, d_out=5, bias=bias, layer=layer)

    for call, msg in [(lambda: build(tmp_path / "nope.safetensors"), "cannot read mask file"),
                      (lambda: build(corrupt), "not a valid grass_llm mask file"),
                      (lambda: build(truncated), "not a valid grass_llm mask file"),
                      (lambda: build(other), "format"),
                      (lambda: build(good, layer="M"), "no masks for layer 'M'"),
                      (lambda: build(good, layer=None), "layer's name"),
                      (lambda: build(good, k_in=3), "k_in=2, k_out=2 but the spec asks k_in=3"),
                      (lambda: build(good, d_in=7), "fitted as 5 x 6"),
                      (lambda: build(good, bias=True), "fitted as 5 x 6"),
                      (lambda: check_spec(f"factgrass:k=3,k_in=3,k_out=2,mask={good}"),
                       "spec asks k_in=3"),
                      (lambda: check_spec(f"factgrass:k=3,k_in=2,k_out=2,mask={corrupt}"),
                       "not a valid"),
                      (lambda: check_spec(f"logra:k_in=2,k_out=2,mask={good}"),
                       "no parameter 'mask'"),
                      (lambda: LayerMask(np.array([4, 1]), np.array([0]), 6, 5, False),
                       "sorted"),
                      (lambda: LayerMask(np.array([1, 6]), np.array([0]), 6, 5, False),
                       r"\[0, 6\)")]:
        with pytest.raises(ValueError, match=msg):
            call()
    check_spec(f"factgrass:k=3,k_in=2,k_out=2,mask={good}")  # and a good one passes
    with pytest.raises(ValueError, match="cannot read mask file"):
        load_config(CONFIG, ["compressor=factgrass:k=16,k_in=6,k_out=5,mask=missing.st"])


# ------------------------------------------------------------------------ tensor parallelism
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("side", ["out", "in"])
def test_tensor_parallel_shards_of_a_masked_map_sum_to_the_unsharded_map(tmp_path, side, bias):
    d_in, d_out = 17, 13
    idx_in = [0, 1, 2, 9, 10, 16] + ([17] if bias else [])  # clustered: uneven shard shares
    idx_out = [3, 4, 5, 6, 12]
    path = tmp_path / "m.safetensors"
    _mask_file(path, {"L": (idx_in, idx_out, d_in, d_out, bias)})
    full = build_compressor(f"factgrass:k=11,k_in={len(idx_in)},k_out=5,c=2,mask={path}",
                            seed=2, d_in=d_in, d_out=d_out, bias=bias, layer="L")
    x = torch.randn(3, 6, d_in, dtype=torch.float64)
    d = torch.randn(3, 6, d_out, dtype=torch.float64)
    n = d_out if side == "out" else d_in
    total = torch.zeros(3, 11, dtype=torch.float64)
    for rank, (a, b) in enumerate([(0, 6), (6, 11), (11, n)]):  # three uneven shards
        out_r, in_r = ((a, b), (0, d_in)) if side == "out" else ((0, d_out), (a, b))
        sh = shard_compressor(full, out_r, in_r, own_bias=side == "out" or rank == 0)
        xf = sh.input_features(x[..., in_r[0]:in_r[1]])
        total += sh.reduce(xf, d[..., out_r[0]:out_r[1]])
    torch.testing.assert_close(total, full(x, d), **TOL)


# ------------------------------------------------------------- the hooks, the store, queries
def test_capture_hooks_use_each_layers_masks_from_the_file(tmp_path):
    model = tiny_model("qwen2", dtype=torch.float64)  # q/k/v have biases
    names = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
    shapes = {n: (model.get_submodule(n).in_features, model.get_submodule(n).out_features,
                  model.get_submodule(n).bias is not None) for n in names}
    rng = np.random.default_rng(0)
    layers = {n: (np.sort(rng.choice(di + b, 6, replace=False)),
                  np.sort(rng.choice(do, 5, replace=False)), di, do, b)
              for n, (di, do, b) in shapes.items()}
    assert layers[names[0]][4]  # the bias case is covered
    path = tmp_path / "m.safetensors"
    _mask_file(path, layers)
    ids = torch.randint(0, 101, (3, 9), generator=torch.Generator().manual_seed(0))
    with GradientCapture(model, "identity", layers=names) as cap:
        exact = cap(ids).grads
    with GradientCapture(model, f"factgrass:k=17,k_in=6,k_out=5,mask={path}",
                         layers=names) as cap:
        got = cap(ids).grads
    for n in names:
        comp = cap.compressors[n]
        np.testing.assert_array_equal(comp.idx_in, layers[n][0])
        np.testing.assert_array_equal(comp.idx_out, layers[n][1])
        flat = [i * (shapes[n][0] + shapes[n][2]) + j for i in layers[n][1] for j in layers[n][0]]
        torch.testing.assert_close(got[n], comp.sjlt(exact[n][:, flat]), **TOL)


def test_fit_mask_then_cache_records_the_hash_and_a_changed_mask_file_is_refused(tmp_path):
    runner = CliRunner()
    mask = tmp_path / "mask.safetensors"
    res = runner.invoke(app, ["fit-mask", "--model", "tiny:llama", "--data", CORPUS,
                              "--targets", CORPUS, "--out", str(mask), "--compressor",
                              "factgrass:k=16,k_in=6,k_out=5", "--n-train", "8", "--n-targets",
                              "3", "--set", "steps=15", "--set", "max_length=64", "--quiet"],
                        terminal_width=200)
    assert res.exit_code == 0, res.output
    assert "learned" in res.output and f"mask={mask}" in res.output
    mf = read_mask_file(mask)
    assert len(mf.layers) == 14 and all(lm.k_in == 6 and lm.k_out == 5
                                        for lm in mf.layers.values())
    cal = mf.meta["calibration"]
    assert cal["train"]["n_examples"] == 8 and cal["targets"]["n_examples"] == 3
    assert all(lm.objective is not None and lm.random_objective is not None
               for lm in mf.layers.values())
    store_url = str(tmp_path / "s.zarr")
    spec = f"factgrass:k=16,k_in=6,k_out=5,mask={mask}"
    for cmd in (["cache", "--config", CONFIG, "--set", f"data={CORPUS}", "--set",
                 f"out={store_url}", "--set", f"compressor={spec}", "--quiet"],
                ["fisher", store_url]):
        res = runner.invoke(app, cmd, terminal_width=200)
        assert res.exit_code == 0, res.output
    store = open_store(store_url)
    assert {lay.spec for lay in store.layout.layers} == {
        f"factgrass:c=1,k=16,k_in=6,k_out=5,mask_sha256={mf.sha256}"}
    qfile = tmp_path / "q.jsonl"
    qfile.write_text(json.dumps({"id": "q", "text": "The capital of France is Paris."}) + "\n")
    q = from_file(store, str(qfile))  # the same file: the same maps
    row = store.read_rows(store.layout.layers[0].name, 0, 1)
    assert q.grads[store.layout.layers[0].name].shape == (1, 16) and row.shape == (1, 16)
    first = np.arange(5)  # other output masks than the learned ones, same sizes
    changed = {n: LayerMask(lm.idx_in, first if not np.array_equal(lm.idx_out, first)
                            else first + 1, lm.d_in, lm.d_out, lm.bias)
               for n, lm in mf.layers.items()}
    write_mask_file(mask, changed)
    with pytest.raises(StoreError, match="uses the mask file with SHA-256 .* but .* was built "
                                         f"with the mask file with SHA-256 {mf.sha256[:12]}"):
        from_file(store, str(qfile))
    res = runner.invoke(app, ["query", store_url, "--queries", str(qfile)], terminal_width=200)
    assert res.exit_code == 2 and "store's mask file" in res.output


def test_lds_mask_calibration_uses_disjoint_training_rows_only():
    from grass_llm.evaluation.corpus import CorpusConfig, make_corpus
    from grass_llm.evaluation.selective import calibration_batches, calibration_rows

    corpus = make_corpus(CorpusConfig(n_people=12))
    tr_rows, te_rows = calibration_rows(len(corpus.train), 20, 10, 0)
    assert len(set(tr_rows.tolist()) | set(te_rows.tolist())) == 30  # disjoint
    (tr_ids, _, tr_lab), (te_ids, te_mask, te_lab) = calibration_batches(corpus, 20, 10, 0)
    train_ids, _, train_lab = corpus.train_batch()  # training rows only, never the queries
    torch.testing.assert_close(tr_ids, train_ids[tr_rows])
    torch.testing.assert_close(te_ids, train_ids[te_rows])
    torch.testing.assert_close(tr_lab, train_lab[tr_rows])  # train side: every word a target
    assert ((te_lab != -100).sum(1) == 1).all()  # target side: query form, the answer only
    answer = te_mask.sum(1) - 2
    assert (te_lab[torch.arange(10), answer] == te_ids[torch.arange(10), answer]).all()
    with pytest.raises(ValueError, match="mask_train"):
        calibration_rows(len(corpus.train), 2, 10, 0)
