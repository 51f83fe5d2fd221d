"""`grass-llm plan`: figures against hand computations on a tiny Llama, against a real store
written by `grass-llm cache`, and its error messages."""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from grass_llm.cli import app
from grass_llm.plan import PAPER_SPEC, PlanConfig, make_plan, parse_count, resolve_spec
from grass_llm.store import open_store

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "tiny.yaml")
CORPUS = str(ROOT / "tests" / "data" / "tiny_corpus.jsonl")
LLAMA8B = str(ROOT / "configs" / "llama3-8b-config.json")
TINY_SPEC = "factgrass:k=16,k_in=6,k_out=5"  # configs/tiny.yaml's compressor

runner = CliRunner()

# tiny:llama = tiny_config("llama", vocab_size=259): hidden 40, 2 decoder layers, 4 heads of 10,
# 2 key/value heads (k/v width 20), intermediate 57, untied embeddings, no biases.
H, KV, INTER, VOCAB, BLOCKS = 40, 20, 57, 259, 2
BLOCK_LINEAR = H * H + KV * H + KV * H + H * H + 3 * INTER * H  # q, k, v, o, gate, up, down
EMBED = HEAD = VOCAB * H
PARAMS = EMBED + HEAD + BLOCKS * (BLOCK_LINEAR + 2 * H) + H  # + 2 RMSNorms per block, final norm


def _tiny(**kw) -> PlanConfig:
    base = {"model": "tiny:llama", "tokens": 10_000, "doc_tokens": 50, "max_length": 64,
            "max_tokens": 256, "compressor": TINY_SPEC, "store_dtype": "float32",
            "dtype": "float32", "gpus": 1, "parallel": "none", "chunk_rows": 4,
            "gradient_checkpointing": False}
    return PlanConfig(**{**base, **kw})


def test_tiny_llama_figures_match_a_hand_computation():
    plan = make_plan(_tiny())
    n_layers = 7 * BLOCKS
    assert plan.model["params"] == PARAMS
    assert plan.model["layers_hooked"] == n_layers
    s = plan.store
    assert s["rows"] == 200  # 10,000 tokens / 50 per example
    assert s["numbers_per_example"] == n_layers * 16
    assert s["grad_bytes"] == 200 * n_layers * 16 * 4
    assert s["chunks"] == 50
    assert plan.fisher["bytes"] == n_layers * 16 ** 2 * 8
    assert plan.fisher["gemm_flops"] == 2 * 200 * n_layers * 16 ** 2

    mem = plan.memory["items"]
    assert mem["weights"] == PARAMS * 4  # unsharded float32
    assert mem["hook_features"] == 256 * n_layers * 6 * 4  # k_in=6 float32 per token per layer
    assert mem["compressed_results"] == (256 // 50) * n_layers * 16 * 4
    assert mem["materialized_gradient"] == 0  # factorized: G is never formed
    # 256 x 259 logits go through torch's cross-entropy whole: a float32 copy, the saved
    # log-softmax and its gradient beside the float32 logits
    assert mem["logits_and_loss"] == 256 * VOCAB * 12
    # What autograd keeps per token in one Llama decoder layer with frozen weights, float32:
    # each RMSNorm its float32 input and 1/rms, the attention q, k, v, output and a log-sum-exp
    # per head, the MLP gate, up and silu(gate) (a frozen Linear keeps nothing of its input).
    per_layer = 2 * (H * 4 + 4) + (H + KV + KV + H) * 4 + 4 * 4 + 3 * INTER * 4
    assert plan.memory["layer_activation_bytes_per_token"] == per_layer
    assert mem["activations"] == BLOCKS * per_layer * 256

    # forward 2 N + A, input-gradient backward 2 N + 2 A (N: matmul weights incl. the head;
    # A: causal attention, 2 x layers x width x (T + 1)), plus FactGraSS's 2 k_in k_out.
    attn = 2 * BLOCKS * H * (50 + 1)
    n_mm = BLOCKS * BLOCK_LINEAR + HEAD
    expect = 4 * n_mm + 3 * attn + n_layers * 2 * 6 * 5
    assert plan.time["flops_per_token"] == pytest.approx(expect, rel=1e-12)
    ckpt = make_plan(_tiny(gradient_checkpointing=True))  # + one more decoder forward
    assert ckpt.time["flops_per_token"] == pytest.approx(
        expect + 2 * (n_mm - HEAD) + attn, rel=1e-12)
    assert ckpt.memory["items"]["activations"] == BLOCKS * 256 * H * 4 + per_layer * 256


def test_measured_throughput_gives_the_hours():
    plan = make_plan(_tiny(tokens_per_second=500.0, gpus=4))
    assert plan.time["measured_hours"] == pytest.approx(10_000 / (500 * 4) / 3600)
    assert plan.time["estimated_hours"] != plan.time["measured_hours"]


def test_sharding_divides_the_weights():
    full = make_plan(_tiny(gpus=2, parallel="none")).memory["items"]["weights"]
    tp = make_plan(_tiny(gpus=2, parallel="tp")).memory["items"]["weights"]
    assert tp == (BLOCKS * BLOCK_LINEAR / 2 + PARAMS - BLOCKS * BLOCK_LINEAR) * 4
    assert make_plan(_tiny(gpus=2, parallel="fsdp")).memory["items"]["weights"] < 2 * full
    # a tensor-parallel rank keeps half the heads' and the MLP's activations
    one, two = (make_plan(_tiny(gpus=2, parallel="tp", tp_size=t)).memory for t in (1, 2))
    assert two["layer_activation_bytes_per_token"] < one["layer_activation_bytes_per_token"]


def _cache(out, *extra):
    res = runner.invoke(app, ["cache", "--config", CONFIG, "--set", f"data={CORPUS}", "--set",
                              f"out={out}", "--quiet", *extra], terminal_width=200)
    assert res.exit_code == 0, res.output
    return open_store(out)


def _plan_json(*args):
    res = runner.invoke(app, ["plan", "--model", "tiny:llama", "--compressor", TINY_SPEC,
                              "--store-dtype", "float32", "--max-length", "64", "--max-tokens",
                              "256", "--chunk-rows", "4", "--gpus", "1", "--json", *args])
    assert res.exit_code == 0, res.output
    return json.loads(res.output)


@pytest.mark.parametrize("token_mode", [None, "position"])
def test_store_size_equals_a_real_cache_store(tmp_path, token_mode):
    extra = [] if token_mode is None else ["--set", f"token_mode={token_mode}"]
    store = _cache(str(tmp_path / "s.zarr"), *extra)
    # rows come from --examples; in position mode the store has one token row per input token
    tokens = int(store.layout.token_offsets()[-1]) if token_mode else 1000
    plan = _plan_json("--tokens", str(tokens), "--examples", str(store.n_examples),
                      *(["--token-mode", token_mode] if token_mode else []))
    s = plan["store"]
    assert [x["name"] for x in plan["layers"]] == store.layer_names
    assert [x["k"] for x in plan["layers"]] == [x.k for x in store.layout.layers]
    assert s["rows"] == store.n_examples
    assert s["chunks"] == store.layout.n_chunks
    grads = sum(store.group[f"grads/{n}"].nbytes for n in store.layer_names)
    assert s["grad_bytes"] == grads == s["rows"] * s["numbers_per_example"] * 4
    if token_mode:
        assert s["token_rows"] == tokens
        stored = sum(store.group[f"tokens/{n}"].nbytes for n in store.layer_names)
        assert stored <= s["token_bytes"]  # the plan counts the chunk padding's upper bound


def test_llama3_8b_paper_setting():
    plan = make_plan(PlanConfig(model=LLAMA8B, tokens=10 ** 9, gpus=8))
    assert plan.model["layers_hooked"] == 224
    assert plan.store["numbers_per_example"] == 917_504  # configs/llama3-8b.yaml's comment
    assert plan.store["rows"] == 976_563
    assert plan.fisher["bytes"] == 224 * 4096 ** 2 * 8
    # 16,384 x 128,256 bfloat16 logits go through the loss in blocks of 2^24: the logits and
    # their gradient, and two float32 blocks (tests/test_loss.py measures what they add)
    assert plan.memory["items"]["logits_and_loss"] == 2 * 2 * 16_384 * 128_256 + 8 * 2 ** 24
    assert plan.memory["fits"]
    res = runner.invoke(app, ["plan", "--model", LLAMA8B, "--tokens", "1B", "--gpus", "8"],
                        terminal_width=200)
    assert res.exit_code == 0, res.output
    for word in ("ESTIMATED", "917,504", "1.6 TiB", "28.0 GiB", "fits"):
        assert word in res.output, word


def test_k_and_compressor_resolution():
    assert resolve_spec(None, None) == PAPER_SPEC
    assert resolve_spec(None, 1024) == "factgrass:k=1024,k_in=128,k_out=128"
    assert resolve_spec("grass:k_prime=64", 16) == "grass:k_prime=64,k=16"
    assert resolve_spec("factgrass:k=16,k_in=6,k_out=5", 16) == "factgrass:k=16,k_in=6,k_out=5"
    with pytest.raises(ValueError, match="disagrees"):
        resolve_spec("factgrass:k=16,k_in=6,k_out=5", 8)
    with pytest.raises(ValueError, match="no k parameter"):
        resolve_spec("logra:k_in=4,k_out=4", 16)
    assert parse_count("1B") == parse_count("1e9") == parse_count("1_000_000_000") == 10 ** 9
    assert parse_count("500M") == 5 * 10 ** 8


@pytest.mark.parametrize("args, message", [
    (["--model", "no/such/config.json"], "no such file or directory"),
    (["--compressor", "nosuch:k=4"], "unknown compressor"),
    (["--compressor", "factgrass:k=16,k_in=100,k_out=5"], "does not fit layer"),
    (["--k", "64", "--compressor", "factgrass:k_in=6,k_out=5"], "k=64 must be <="),
    (["--k", "8", "--compressor", TINY_SPEC], "disagrees"),
    (["--tokens", "-5"], "is not a count"),
    (["--tokens", "lots"], "is not a count"),
    (["--tokens", "0"], "tokens must be >= 1"),
    (["--gpus", "0"], "gpus must be >= 1"),
    (["--mfu", "2"], "mfu must be in (0, 1]"),
    (["--doc-tokens", "5000"], "doc_tokens must be in"),
    (["--doc-tokens", "50", "--examples", "10"], "not both"),
    (["--parallel", "megatron"], "parallel must be one of"),
    (["--parallel", "tp", "--gpus", "3"], "divisible by 3"),
    (["--tokens-per-second", "-1"], "positive number"),
])
def test_errors_are_one_clear_line(args, message, tmp_path):
    base = {"--model": "tiny:llama", "--tokens": "10000", "--gpus": "1", "--max-length": "64",
            "--max-tokens": "256", "--compressor": TINY_SPEC}
    for i in range(0, len(args), 2):
        base[args[i]] = args[i + 1]
    res = runner.invoke(app, ["plan", *[x for kv in base.items() for x in kv]],
                        terminal_width=400)
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], res.output


def test_model_directories_without_a_usable_config(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    for model, message in ((empty, "has no config.json"), (broken, "not a valid JSON")):
        res = runner.invoke(app, ["plan", "--model", str(model), "--tokens", "1000"],
                            terminal_width=400)
        assert res.exit_code == 2 and "error:" in res.output and message in res.output, \
            res.output
