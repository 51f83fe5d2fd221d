"""The Zarr gradient store: round trips, plain-zarr reads, concurrent writers, crash/resume."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from typer.testing import CliRunner

from grass_llm.cli import app
from grass_llm.store import (
    LayerInfo,
    NonFiniteGradientError,
    StoreError,
    StoreLayout,
    StoreMismatchError,
    create_store,
    open_store,
    verify_store,
)
from tests.store_writer import LAYOUT, META, chunk_data

ROOT = Path(__file__).resolve().parents[1]
LAYERS = (LayerInfo("a.q_proj", "factgrass:c=1,k=5,k_in=3,k_out=2", 1, 5, 4, 3, False),
          LayerInfo("a.up_proj", "logra:k_in=1,k_out=3", 2, 3, 4, 6, True))


def small_layout(**kw):
    base = dict(n_examples=11, layers=LAYERS, chunk_rows=3)
    base.update(kw)
    return StoreLayout(**base)


def fill(store, seed=0):
    rng = np.random.default_rng(seed)
    written = {x.name: np.zeros((store.n_examples, x.k), np.float32) for x in LAYERS}
    for c in store.pending_chunks():
        a, b = store.layout.chunk_range(c)
        grads = {x.name: rng.standard_normal((b - a, x.k)).astype(np.float32) for x in LAYERS}
        store.write_chunk(c, grads, [f"e{i}" for i in range(a, b)], np.full(b - a, 3),
                          rng.random(b - a))
        for k, v in grads.items():
            written[k][a:b] = v
    return written


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("codec", ["zstd", "none"])
def test_round_trip_every_dtype_and_plain_zarr_read(tmp_path, dtype, codec):
    url = str(tmp_path / "s.zarr")
    store = create_store(url, small_layout(dtype=dtype, codec=codec), META)
    written = fill(store)
    back = open_store(url)
    for name, rows in written.items():
        # The exact storage rounding of each dtype, computed independently through torch.
        expected = torch.from_numpy(rows).to(getattr(torch, dtype)).float().numpy()
        np.testing.assert_array_equal(back.read_rows(name, 0, 11), expected)
        # Any Zarr v3 reader sees the arrays (bfloat16 as its raw uint16 bit patterns).
        plain = zarr.open_group(url, mode="r")[f"grads/{name}"][:]
        if dtype == "bfloat16":
            plain = torch.from_numpy(plain.view(np.int16)).view(torch.bfloat16).float().numpy()
        np.testing.assert_array_equal(plain, expected)
    assert list(back.example_ids()) == [f"e{i}" for i in range(11)]
    assert verify_store(url) == []


def test_fsspec_memory_url_works():
    url = "memory://grass-test/store.zarr"
    store = create_store(url, small_layout(), META, overwrite=True)
    written = fill(store)
    np.testing.assert_allclose(open_store(url).read_rows("a.up_proj", 2, 9),
                               written["a.up_proj"][2:9], rtol=1e-3, atol=1e-3)
    assert verify_store(url) == []


def test_reopening_same_run_resumes_and_other_run_is_refused(tmp_path):
    url = str(tmp_path / "s.zarr")
    create_store(url, small_layout(), META)
    again = create_store(url, small_layout(), META)  # same run: reopened, not recreated
    assert again.pending_chunks() == [0, 1, 2, 3]
    with pytest.raises(StoreMismatchError, match=r"meta\.config.*--overwrite"):
        create_store(url, small_layout(), {**META, "config": {"model": "other"}})
    with pytest.raises(StoreMismatchError, match=r"layout\.dtype"):
        create_store(url, small_layout(dtype="float32"), META)
    replaced = create_store(url, small_layout(dtype="float32"), META, overwrite=True)
    assert replaced.layout.dtype == "float32"
    with pytest.raises(StoreError, match="no gradient store"):
        open_store(str(tmp_path / "nothing.zarr"))
    zarr.open_group(str(tmp_path / "other.zarr"), mode="w")
    with pytest.raises(StoreError, match="not a grass_llm gradient store"):
        open_store(str(tmp_path / "other.zarr"))


def test_nonfinite_rows_fail_or_are_recorded(tmp_path):
    url = str(tmp_path / "s.zarr")
    store = create_store(url, small_layout(), META)
    grads = {x.name: np.ones((3, x.k), np.float32) for x in LAYERS}
    grads["a.q_proj"][1, 2] = np.nan
    with pytest.raises(NonFiniteGradientError, match=r"'e1'"):
        store.write_chunk(0, grads, ["e0", "e1", "e2"], [1, 1, 1], [0, 0, 0])
    assert store.pending_chunks()[0] == 0  # nothing marked done
    big = {x.name: np.ones((3, x.k), np.float32) for x in LAYERS}
    big["a.up_proj"][2, 0] = 1e6  # overflows float16 storage
    with pytest.raises(NonFiniteGradientError, match=r"'e2'"):
        store.write_chunk(0, big, ["e0", "e1", "e2"], [1, 1, 1], [0, 0, 0])
    store.write_chunk(0, grads, ["e0", "e1", "e2"], [1, 1, 1], [0, 0, 0], nonfinite="record")
    back = open_store(url)
    assert back.group["row_flags"][:3].tolist() == [0, 1, 0]
    assert (back.read_rows("a.q_proj", 1, 2) == 0).all()
    assert any("non-finite" in p for p in verify_store(url))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_rows_staged_in_the_store_dtype_are_checked_and_left_unchanged(tmp_path, dtype):
    # The cache job hands write_chunk views of one [R, sum k] buffer already in the store's
    # dtype; they skip the float32 round trip but not the finiteness check.
    store = create_store(str(tmp_path / "s.zarr"), small_layout(dtype=dtype), META)
    tdt = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[dtype]
    widths = [x.k for x in LAYERS]
    buf = torch.linspace(-2, 2, 3 * sum(widths)).reshape(3, -1).to(tdt)
    buf[0, 0] = torch.finfo(tdt).max  # the largest finite value is fine
    buf[1, -1] = float("nan")  # example 1's last layer
    buf[2, widths[0]] = float("-inf")  # example 2's second layer
    views = dict(zip([x.name for x in LAYERS], buf.split(widths, dim=1)))
    before = buf.clone()
    ids = ["e0", "e1", "e2"]
    with pytest.raises(NonFiniteGradientError, match=r"\['e1', 'e2'\]"):
        store.write_chunk(0, views, ids, [1] * 3, [0] * 3)
    store.write_chunk(0, views, ids, [1] * 3, [0] * 3, nonfinite="record")
    assert torch.equal(buf.isnan(), before.isnan())  # the caller's buffer is not zeroed
    assert torch.equal(buf.nan_to_num(), before.nan_to_num())
    back = open_store(str(tmp_path / "s.zarr"))
    assert back.group["row_flags"][:3].tolist() == [0, 1, 1]
    for name, view in views.items():
        torch.testing.assert_close(torch.from_numpy(back.read_rows(name, 0, 1)),
                                   view[:1].float(), rtol=0, atol=0)
        assert (back.read_rows(name, 1, 3) == 0).all()


def _os_threads() -> int:
    return len(os.listdir("/proc/self/task"))


@pytest.mark.skipif(torch.get_num_threads() < 2 or not os.path.isdir("/proc/self/task"),
                    reason="needs torch intra-op threads and Linux's /proc")
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_writing_a_staged_chunk_in_a_thread_starts_no_openmp_team(tmp_path, dtype):
    """The cache job writes chunks in a background thread that lives for the whole job. A torch
    op there that runs in parallel gives the thread an OpenMP team of its own (one more OS
    thread, kept while the thread lives), and while it exists every parallel op of the step
    loop ran slower: the loop fell from ~0.95 to ~0.76 of the floor
    (``tools/bench_capture.py --job``). Writing a chunk big enough for torch to go parallel
    must add no OS thread but the writer itself."""
    import threading

    R = 256
    layers = tuple(LayerInfo(f"l{i}", "factgrass:k=256,k_in=16,k_out=16", i, 256, 64, 64, False)
                   for i in range(3))
    layout = StoreLayout(n_examples=2 * R, layers=layers, chunk_rows=R, dtype=dtype)
    store = create_store(str(tmp_path / "s.zarr"), layout, META)
    tdt = {"float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    buf = torch.randn(R, 3 * 256).to(tdt)  # 65536 values per layer: above torch's grain
    views = {f"l{i}": buf[:, 256 * i:256 * (i + 1)] for i in range(3)}
    ids = [str(i) for i in range(R)]
    store.write_chunk(0, views, ids, np.ones(R), np.zeros(R))  # zarr's own threads start here
    torch.ones(1024, 1024).sum()  # the main thread's team exists
    before, wrote, release = _os_threads(), threading.Event(), threading.Event()
    counts = []

    def work():
        store.write_chunk(1, views, ids, np.ones(R), np.zeros(R))
        wrote.set()
        release.wait()

    th = threading.Thread(target=work)
    th.start()
    try:
        assert wrote.wait(60)
        counts.append(_os_threads() - before)
    finally:
        release.set()
        th.join()
    assert counts == [1], f"writing added {counts[0] - 1} OS thread(s) besides the writer"
    torch.testing.assert_close(torch.from_numpy(open_store(str(tmp_path / "s.zarr"))
                                                .read_rows("l1", R, 2 * R)),
                               views["l1"].float(), rtol=0, atol=0)


def test_write_errors_are_clear(tmp_path):
    store = create_store(str(tmp_path / "s.zarr"), small_layout(), META)
    good = {x.name: np.ones((3, x.k), np.float32) for x in LAYERS}
    with pytest.raises(ValueError, match="expected shape"):
        store.write_chunk(0, {**good, "a.q_proj": np.ones((2, 5))}, ["a", "b", "c"], [1] * 3,
                          [0] * 3)
    with pytest.raises(ValueError, match="no gradients for layer a.up_proj"):
        store.write_chunk(0, {"a.q_proj": good["a.q_proj"]}, ["a", "b", "c"], [1] * 3, [0] * 3)
    with pytest.raises(ValueError, match="3 rows"):
        store.write_chunk(0, good, ["a", "b"], [1] * 3, [0] * 3)
    with pytest.raises(IndexError):
        store.write_chunk(9, good, ["a", "b", "c"], [1] * 3, [0] * 3)
    with pytest.raises(StoreError, match="read-only"):
        open_store(store.url).write_chunk(0, good, ["a", "b", "c"], [1] * 3, [0] * 3)
    with pytest.raises(ValueError, match="dtype"):
        small_layout(dtype="int8")
    with pytest.raises(ValueError, match="token_counts"):
        small_layout(token_mode="loss")


def test_token_rows_round_trip_with_chunk_aligned_padding(tmp_path):
    url = str(tmp_path / "t.zarr")
    store = create_store(url, LAYOUT, META)
    for c in store.pending_chunks():
        store.write_chunk(c, **chunk_data(c))
    back = open_store(url)
    off = back.layout.token_offsets()
    base = back.layout.token_chunk_base()
    assert (base % LAYOUT.token_chunk_rows == 0).all()  # each row chunk owns whole token chunks
    for c in range(LAYOUT.n_chunks):
        a, b = LAYOUT.chunk_range(c)
        data = chunk_data(c)
        for name, rows in data["token_grads"].items():
            expected = rows.astype(np.float16).astype(np.float32)
            np.testing.assert_array_equal(back.read_chunk_tokens(name, c), expected)
            i = a + (b - a) // 2
            s = int(off[i] - off[a])
            np.testing.assert_array_equal(back.read_example_tokens(name, i),
                                          expected[s: s + LAYOUT.token_counts[i]])
    assert verify_store(url) == []


def _run_writer(url, rank, world, *extra):
    return subprocess.run([sys.executable, "-m", "tests.store_writer", url, str(rank),
                           str(world), *extra], cwd=ROOT, capture_output=True, text=True)


def _reference_store(tmp_path) -> str:
    url = str(tmp_path / "reference.zarr")
    create_store(url, LAYOUT, META)
    res = _run_writer(url, 0, 1)
    assert res.returncode == 0, res.stderr
    return url


def _assert_same_arrays(url_a, url_b):
    a, b = zarr.open_group(url_a, mode="r"), zarr.open_group(url_b, mode="r")
    names = sorted(name for name, _ in a.arrays()) + [
        f"{grp}/{name}" for grp in ("grads", "tokens") for name, _ in a[grp].arrays()]
    assert len(names) > 8
    for name in names:
        np.testing.assert_array_equal(a[name][:], b[name][:], err_msg=name)


def test_two_writer_processes_fill_disjoint_chunks(tmp_path):
    url = str(tmp_path / "two.zarr")
    create_store(url, LAYOUT, META)
    procs = [subprocess.Popen([sys.executable, "-m", "tests.store_writer", url, str(r), "2"],
                              cwd=ROOT, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    for p in procs:
        assert p.wait(timeout=120) == 0, p.stderr.read()
    assert verify_store(url) == []
    _assert_same_arrays(url, _reference_store(tmp_path))


@pytest.mark.parametrize("kill_at", [1, 5, 9, 14, 30])
def test_sigkill_at_any_point_then_resume_equals_uninterrupted(tmp_path, kill_at):
    """Killed at the N-th array write (inside a chunk, between chunks, right before a
    completion marker), a rerun of the same command completes an identical store."""
    url = str(tmp_path / "crash.zarr")
    create_store(url, LAYOUT, META)
    res = _run_writer(url, 0, 1, "--kill-at-setitem", str(kill_at))
    assert res.returncode == -9, res.stderr  # really killed mid-run
    assert not open_store(url).done_chunks().all()
    assert any("not complete" in p for p in verify_store(url, quick=True))
    res = _run_writer(url, 0, 1)
    assert res.returncode == 0, res.stderr
    assert verify_store(url) == []
    _assert_same_arrays(url, _reference_store(tmp_path))


def test_corrupted_and_truncated_chunks_are_found_and_repaired(tmp_path):
    url = str(tmp_path / "bad.zarr")
    create_store(url, LAYOUT, META)
    assert _run_writer(url, 0, 1).returncode == 0
    chunk = Path(url) / "grads" / "model.layers.0.q_proj" / "c" / "2" / "0"
    raw = chunk.read_bytes()
    chunk.write_bytes(raw[:-7])  # truncated
    flip = Path(url) / "tokens" / "model.layers.0.mlp.up_proj" / "c" / "0" / "0"
    data = bytearray(flip.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one corrupted byte
    flip.write_bytes(bytes(data))
    problems = verify_store(url)
    assert any("grads/model.layers.0.q_proj: chunk at row 8 is unreadable" in p
               for p in problems), problems
    assert any("tokens/model.layers.0.mlp.up_proj: chunk at row 0 is unreadable" in p
               for p in problems), problems
    runner = CliRunner()
    res = runner.invoke(app, ["verify", url], terminal_width=200)
    assert res.exit_code == 1 and "--repair" in res.output
    res = runner.invoke(app, ["verify", url, "--repair"], terminal_width=200)
    assert res.exit_code == 1 and "repaired: row chunks [0, 2]" in res.output
    assert open_store(url).pending_chunks() == [0, 2]
    assert _run_writer(url, 0, 1).returncode == 0  # the same command redoes exactly those
    res = runner.invoke(app, ["verify", url], terminal_width=200)
    assert res.exit_code == 0 and "OK" in res.output
    _assert_same_arrays(url, _reference_store(tmp_path))


def test_a_chunk_is_marked_done_only_after_its_files_and_their_folders_are_synced(
        tmp_path, monkeypatch):
    # a file's fsync does not make its new directory entry durable (POSIX): without the
    # folders' fsyncs a crash could keep the marker and lose a synced file, read back as zeros
    url = str(tmp_path / "sync.zarr")
    store = create_store(url, small_layout(), META)
    synced = []
    real_fsync = os.fsync

    def recording_fsync(fd):
        synced.append(os.path.relpath(os.readlink(f"/proc/self/fd/{fd}"), url))
        real_fsync(fd)

    import grass_llm.store.store as store_module

    monkeypatch.setattr(store_module.os, "fsync", recording_fsync)
    store.write_chunk(1, {x.name: np.ones((3, x.k), np.float32) for x in LAYERS},
                      ["e3", "e4", "e5"], np.full(3, 3), np.ones(3))
    marker = synced.index("chunk_done/c/1")
    before = set(synced[:marker])
    files = [p for p in synced[:marker] if (Path(url) / p).is_file()]
    assert "grads/a.q_proj/c/1/0" in files and "example_id/c/1" in files, synced
    for f in files:  # the file, its folder and the folder's parent (c/ for a new c/1/)
        assert {os.path.dirname(f), os.path.dirname(os.path.dirname(f))} <= before, (f, synced)
    assert {"chunk_done/c", "chunk_done"} <= set(synced[marker:]), synced


def test_a_lost_chunk_file_of_a_done_chunk_is_found_not_read_as_zeros(tmp_path):
    # zarr reads a missing chunk file as the fill value: before verify listed the files, a
    # store that had lost one (an interrupted copy, a write lost in a crash) verified clean
    # and served those rows as zeros
    url = str(tmp_path / "lost.zarr")
    create_store(url, LAYOUT, META)
    assert _run_writer(url, 0, 1).returncode == 0
    (Path(url) / "grads" / "model.layers.0.mlp.up_proj" / "c" / "1" / "0").unlink()
    c = 4  # row chunk 4's token rows: storage rows [s, e), token chunks of 6 rows
    s, e = LAYOUT.token_storage_range(c)
    assert e > s
    (Path(url) / "tokens" / "model.layers.0.q_proj" / "c" / str(s // 6) / "0").unlink()
    (Path(url) / "loss" / "c" / "5").unlink()
    assert not open_store(url).read_rows("model.layers.0.mlp.up_proj", 4, 8).any()
    problems = verify_store(url)
    assert any(p.startswith("grads/model.layers.0.mlp.up_proj: 1 chunk file(s)") and
               "row chunks [1]" in p for p in problems), problems
    assert any(p.startswith("tokens/model.layers.0.q_proj: 1 chunk file(s)") and
               f"row chunks [{c}]" in p for p in problems), problems
    assert any(p.startswith("loss: 1 chunk file(s)") for p in problems), problems
    assert verify_store(url, quick=True) == []  # quick reads markers only: it cannot tell
    res = CliRunner().invoke(app, ["verify", url, "--repair"], terminal_width=200)
    assert res.exit_code == 1 and "repaired: row chunks [1, 4, 5]" in res.output, res.output
    assert open_store(url).pending_chunks() == [1, 4, 5]
    assert _run_writer(url, 0, 1).returncode == 0
    assert verify_store(url) == []
    _assert_same_arrays(url, _reference_store(tmp_path))


def test_info_prints_the_run_and_layers(tmp_path):
    url = str(tmp_path / "s.zarr")
    fill(create_store(url, small_layout(), META))
    res = CliRunner().invoke(app, ["info", url], terminal_width=200)
    assert res.exit_code == 0, res.output
    for text in ("format v1", "11 in 4 chunks", "4/4", "float16", "a.q_proj",
                 "factgrass:c=1,k=5,k_in=3,k_out=2", '"fingerprint": "abc"'):
        assert text in res.output
    res = CliRunner().invoke(app, ["info", str(tmp_path / "missing.zarr")])
    assert res.exit_code == 2 and "no gradient store" in res.output
    assert os.path.isdir(url)


def test_identities_change_exactly_when_their_subject_changes():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    from grass_llm.models import tiny_model
    from grass_llm.store.identity import (
        dataset_fingerprint,
        model_identity,
        tokenizer_identity,
    )

    a, b = tiny_model("llama", seed=0), tiny_model("llama", seed=0)
    assert model_identity(a) == model_identity(b)
    with torch.no_grad():
        b.model.layers[1].mlp.up_proj.weight[3, 4] += 1e-6
    ia, ib = model_identity(a), model_identity(b)
    assert ia["weights_hash"] != ib["weights_hash"] and ia["config_hash"] == ib["config_hash"]
    assert model_identity(tiny_model("qwen2"))["config_hash"] != ia["config_hash"]
    assert model_identity(a.to(torch.bfloat16))["weights_hash"] != ia["weights_hash"]

    def tok(vocab):
        return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(
            vocab, unk_token="[UNK]")), unk_token="[UNK]")

    t1 = tok({"[UNK]": 0, "a": 1, "b": 2})
    assert tokenizer_identity(t1) == tokenizer_identity(tok({"[UNK]": 0, "a": 1, "b": 2}))
    assert tokenizer_identity(t1) != tokenizer_identity(tok({"[UNK]": 0, "a": 2, "b": 1}))

    ds = [("x", [1, 2, 3], [-100, 2, 3]), ("y", [4], [4])]
    assert dataset_fingerprint(ds) == dataset_fingerprint(list(ds))
    assert dataset_fingerprint(ds)["n_examples"] == 2
    assert dataset_fingerprint(ds[::-1]) != dataset_fingerprint(ds)
    assert dataset_fingerprint([("x", [1, 2, 3], [1, 2, 3]), ds[1]]) != dataset_fingerprint(ds)


def test_background_writer_stops_at_its_first_error_and_keeps_what_was_done(tmp_path):
    from grass_llm.store.writer import ChunkWriter

    url = str(tmp_path / "s.zarr")
    store = create_store(url, small_layout(), META)
    rng = np.random.default_rng(0)

    def kwargs(c, bad=False):
        a, b = store.layout.chunk_range(c)
        grads = {x.name: rng.standard_normal((b - a, x.k)).astype(np.float32) for x in LAYERS}
        if bad:
            grads["a.q_proj"][0, 0] = np.nan  # nonfinite="fail" makes write_chunk raise
        return dict(grads=grads, example_ids=[f"e{i}" for i in range(a, b)],
                    n_targets=np.full(b - a, 3), loss=rng.random(b - a))

    writer = ChunkWriter(store, max_pending=1)
    writer.submit(0, **kwargs(0))
    writer.submit(1, **kwargs(1, bad=True))
    with pytest.raises(NonFiniteGradientError):
        for c in (2, 3):  # the loop learns of the failure at a later submit or at close
            writer.submit(c, **kwargs(c))
        writer.close()
    done = open_store(url).done_chunks()
    assert done[0] and not done[1] and not done[2:].any()  # nothing after the failure
    # chunk 0 intact (no checksum problem); the rest simply pending, to be resumed
    problems = verify_store(url)
    assert len(problems) == 1 and "3 of 4 row chunks are not complete" in problems[0]
