"""`grass-llm cache` end to end: single process against direct capture, and 2-process runs
(torchrun / accelerate launch, gloo) in every parallel mode against the single-process store."""

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from typer.testing import CliRunner

from grass_llm.capture import GradientCapture
from grass_llm.cli import app
from grass_llm.config import load_config
from grass_llm.data import collate, read_records, tokenize_records
from grass_llm.models import load_model
from grass_llm.store import open_store, verify_store

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "tiny.yaml")
CORPUS = str(ROOT / "tests" / "data" / "tiny_corpus.jsonl")

# fp32 everywhere. Sharded runs add partial results in a different order (all-reduce of
# partial vectors under TP, of partial layer outputs in row-parallel layers, of gathered shards
# under FSDP/ZeRO-3), which moves values by ~1e-7 relative; 1e-4 relative to each row's norm
# leaves margin while a wrong shard, index or order shows up as O(1) differences.
ROW_REL = 1e-4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cache_args(out, *extra):
    return ["cache", "--config", CONFIG, "--set", f"data={CORPUS}", "--set", f"out={out}",
            "--quiet", *extra]


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _torchrun(out, *extra, module="tests.strict_main", timeout=300):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-port", str(_free_port()), "-m", module, *_cache_args(out, *extra)]
    return subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=timeout)


def _assert_rows_close(a, b, what):
    err = np.linalg.norm(a - b, axis=-1)
    scale = np.maximum(np.linalg.norm(b, axis=-1), 1e-30)
    assert (err <= ROW_REL * scale).all(), (what, float((err / scale).max()))


def _assert_same_store(url_a, url_b):
    a, b = open_store(url_a), open_store(url_b)
    assert a.layer_names == b.layer_names
    assert list(a.example_ids()) == list(b.example_ids())
    np.testing.assert_array_equal(a.group["n_targets"][:], b.group["n_targets"][:])
    np.testing.assert_allclose(a.group["loss"][:], b.group["loss"][:], rtol=1e-5)
    for name in a.layer_names:
        _assert_rows_close(a.read_rows(name, 0, a.n_examples), b.read_rows(name, 0, b.n_examples),
                           name)


@pytest.fixture(scope="module")
def single_store(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("single") / "s.zarr")
    res = CliRunner().invoke(app, _cache_args(out), terminal_width=200)
    assert res.exit_code == 0, res.output
    return out


def test_single_process_store_equals_direct_capture(single_store):
    assert verify_store(single_store) == []
    store = open_store(single_store)
    cfg = load_config(CONFIG, [f"data={CORPUS}", "out=x"])
    assert store.meta["config"]["compressor"] == cfg.compressor
    assert store.meta["dataset"]["n_examples"] == 13 == store.n_examples
    model, tok, _ = load_model(cfg.model, seed=cfg.seed)
    examples = tokenize_records(read_records(CORPUS).records, tok, max_length=cfg.max_length,
                                overflow=cfg.overflow).examples
    assert list(store.example_ids()) == [e.id for e in examples]
    with GradientCapture(model, cfg.compressor, seed=cfg.seed) as cap:
        for i, ex in enumerate(examples):  # one example at a time: no batching involved
            batch = collate([ex], tok.pad_token_id)
            out = cap(batch["input_ids"], batch["attention_mask"], batch["labels"])
            for name in store.layer_names:
                _assert_rows_close(store.read_rows(name, i, i + 1), out.grads[name].numpy(),
                                   name)
            assert store.group["n_targets"][i] == int(out.n_targets[0])


@pytest.mark.parametrize("mode", ["none", "fsdp", "tp", "deepspeed"])
def test_two_process_store_equals_single_process(single_store, tmp_path, mode):
    if mode == "deepspeed":
        pytest.importorskip("deepspeed")
    out = str(tmp_path / f"{mode}.zarr")
    res = _torchrun(out, "--set", f"parallel={mode}")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-6000:]
    assert res.stdout.count("special tokens:") == 1  # rank 0 says it, once
    assert verify_store(out) == []
    _assert_same_store(out, single_store)


def test_accelerate_launch_runs_the_same_job(single_store, tmp_path):
    out = str(tmp_path / "acc.zarr")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "launch" / "cpu-2proc.yaml"), "--main_process_port", str(_free_port()),
           "-m", "tests.strict_main", *_cache_args(out, "--set", "parallel=fsdp")]
    res = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-6000:]
    _assert_same_store(out, single_store)


def test_killed_two_process_run_resumes_to_the_same_store(single_store, tmp_path):
    out = str(tmp_path / "killed.zarr")
    res = _torchrun(out, "--set", "parallel=fsdp", module="tests.kill_after_first_chunk")
    assert res.returncode != 0  # rank 0 died by SIGKILL after its first chunk
    assert not open_store(out).done_chunks().all()
    res = _torchrun(out, "--set", "parallel=fsdp")
    assert res.returncode == 0, res.stderr[-6000:]
    assert verify_store(out) == []
    _assert_same_store(out, single_store)


def test_rerun_with_another_config_is_refused_unless_overwrite(single_store, tmp_path):
    out = str(tmp_path / "copy.zarr")
    shutil.copytree(single_store, out)
    runner = CliRunner()
    res = runner.invoke(app, _cache_args(out), terminal_width=200)  # same run: nothing to do
    assert res.exit_code == 0 and "0 chunk(s) written" in res.output
    res = runner.invoke(app, _cache_args(out, "--set", "seed=1"), terminal_width=200)
    assert res.exit_code == 2 and "different run" in res.output and "--overwrite" in res.output
    res = runner.invoke(app, _cache_args(out, "--set", "seed=1", "--overwrite"),
                        terminal_width=200)
    assert res.exit_code == 0 and "4 chunk(s) written" in res.output
    assert zarr.open_group(out).attrs["meta"]["config"]["seed"] == 1


def test_config_errors_are_clear(tmp_path):
    runner = CliRunner()
    res = runner.invoke(app, _cache_args(tmp_path / "x.zarr", "--set", "parallel=ddp"),
                        terminal_width=200)
    assert res.exit_code == 2 and "parallel must be one of" in res.output
    res = runner.invoke(app, _cache_args(tmp_path / "x.zarr", "--set", "colour=red"),
                        terminal_width=200)
    assert res.exit_code == 2 and "unknown config field" in res.output
    res = runner.invoke(app, _cache_args(tmp_path / "x.zarr", "--set", "model=/no/such/dir"),
                        terminal_width=200)
    assert res.exit_code == 2 and "no such file or directory" in res.output


def test_token_mode_store_rows_sum_to_examples(tmp_path):
    out = str(tmp_path / "tok.zarr")
    res = CliRunner().invoke(app, _cache_args(out, "--set", "token_mode=loss"),
                             terminal_width=200)
    assert res.exit_code == 0, res.output
    store = open_store(out)
    assert verify_store(out) == []
    name = store.layer_names[3]
    for i in range(store.n_examples):
        toks = store.read_example_tokens(name, i)
        assert toks.shape[0] == store.group["n_targets"][i]
        _assert_rows_close(toks.sum(0, keepdims=True), store.read_rows(name, i, i + 1), name)


def test_position_mode_store_matches_a_per_example_store(tmp_path):
    # Position mode streams each layer's rows into the batch's buffer during backward; its
    # example rows (sums of the positions' float32 rows) must equal an independent per-example
    # run's, and its token rows must add up to them too.
    plain, pos = str(tmp_path / "plain.zarr"), str(tmp_path / "pos.zarr")
    for out, extra in ((plain, ()), (pos, ("--set", "token_mode=position"))):
        res = CliRunner().invoke(app, _cache_args(out, *extra), terminal_width=200)
        assert res.exit_code == 0, res.output
    a, b = open_store(plain), open_store(pos)
    assert verify_store(pos) == [] and a.layer_names == b.layer_names
    for name in a.layer_names:
        _assert_rows_close(b.read_rows(name, 0, b.n_examples), a.read_rows(name, 0, a.n_examples),
                           name)
    name = b.layer_names[-1]
    for i in range(b.n_examples):
        toks = b.read_example_tokens(name, i)
        assert toks.shape[0] >= b.group["n_targets"][i]  # every position, not only targets
        _assert_rows_close(toks.sum(0, keepdims=True), b.read_rows(name, i, i + 1), name)


def test_lora_adapter_attribution_equals_per_example_backward(tmp_path):
    peft = pytest.importorskip("peft")
    import torch.nn.functional as F

    from grass_llm.compress import build_compressor

    base, tok, _ = load_model("tiny:llama")
    lora = peft.get_peft_model(base, peft.LoraConfig(
        r=2, lora_alpha=4, lora_dropout=0.0, init_lora_weights=False,
        target_modules=["q_proj", "v_proj", "up_proj"]))
    adapter = tmp_path / "adapter"
    lora.save_pretrained(adapter)
    out = str(tmp_path / "lora.zarr")
    res = CliRunner().invoke(app, _cache_args(out, "--set", f"adapter={adapter}", "--set",
                                              "compressor=factgrass:k=4,k_in=2,k_out=2"),
                             terminal_width=200)
    assert res.exit_code == 0, res.output
    store = open_store(out)
    assert len(store.layer_names) == 2 * 3 * 2  # 2 layers x 3 targets x (lora_A, lora_B)
    assert all(".lora_A." in n or ".lora_B." in n for n in store.layer_names)
    model, tok, _ = load_model("tiny:llama", adapter=str(adapter))
    mods = dict(model.named_modules())
    for p in model.parameters():
        p.requires_grad_(False)
    examples = tokenize_records(read_records(CORPUS).records, tok, max_length=64).examples
    for i in (0, 2, 4):  # a text, a prompt/completion and a chat example
        ex = examples[i]
        for name in store.layer_names:
            mods[name].weight.requires_grad_(True)
        ids = torch.tensor([ex.input_ids])
        logits = model(input_ids=ids).logits[0, :-1]
        F.cross_entropy(logits, torch.tensor(ex.labels[1:]), ignore_index=-100,
                        reduction="sum").backward()
        for lay in store.layout.layers:
            comp = build_compressor(lay.spec, seed=lay.seed, d_in=lay.d_in, d_out=lay.d_out,
                                    bias=lay.bias)
            g = mods[lay.name].weight.grad.reshape(-1).double()
            expected = (comp.dense_matrix() @ g).float().numpy()[None]
            _assert_rows_close(store.read_rows(lay.name, i, i + 1), expected, lay.name)
            mods[lay.name].weight.grad = None
