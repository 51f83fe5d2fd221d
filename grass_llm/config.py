"""The run configuration of ``grass-llm cache``: one kw-only dataclass, YAML files in configs/,
``--set key=value`` overrides on the command line; the resolved config goes into the store."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from grass_llm.capture.hooks import TOKEN_MODES
from grass_llm.capture.loss import REDUCTIONS
from grass_llm.compress import check_spec
from grass_llm.store.layout import CODECS, NONFINITE_POLICIES, STORAGE_DTYPES

MODEL_DTYPES = ("float32", "bfloat16", "float16")
PARALLEL = ("none", "fsdp", "deepspeed", "tp")
# Fields that say how a run executes, not what it computes: they may change when a run is
# resumed (a lower max_tokens after an OOM, another sharding, a moved data file: the data's
# content, the weights and the tokenizer are identified by hashes) and are recorded per session
# in the store. Every other field is part of the store's identity.
EXECUTION_FIELDS = ("model", "data", "out", "adapter", "tokenizer", "max_tokens", "nonfinite",
                    "parallel", "tp_size", "shard_size", "deepspeed_config",
                    "gradient_checkpointing", "overwrite")


@dataclass(kw_only=True)
class RunConfig:
    """Everything ``grass-llm cache`` needs; every field is recorded in the store (identity
    fields once, ``EXECUTION_FIELDS`` per session)."""

    model: str
    """A Hugging Face model directory, a .gguf file, a config.json (random weights, for
    throughput work), ``smollm2`` (the offline SmolLM2-135M-Instruct) or ``tiny:<family>``
    (a tiny random model: llama, qwen2, mistral, gpt_neox)."""
    data: str
    """Corpus: .jsonl/.json/.parquet/.txt file, a directory of .txt files, or a Hugging Face
    dataset saved with save_to_disk. Records have ``text``, or ``prompt`` + ``completion``
    (prompt tokens are not targets), or chat ``messages``; an ``id`` field is kept."""
    out: str
    """Store path or fsspec URL (created, or resumed when it holds this same run)."""
    adapter: str | None = None
    """A PEFT LoRA adapter directory applied on top of ``model``; attribution then covers the
    adapter's Linear layers (lora_A / lora_B) unless ``layers`` says otherwise."""
    tokenizer: str | None = None
    """Tokenizer directory; default: the model's own (``tiny:*`` models use a byte tokenizer)."""
    compressor: str = "factgrass:k=4096,k_in=128,k_out=128"
    """Compressor spec applied to every hooked layer (``grass-llm compressors`` lists them)."""
    layers: list[str] | None = None
    """Layer name patterns (glob, or ``re:`` regex); default every Linear in the decoder."""
    exclude: list[str] = field(default_factory=list)
    """Layer name patterns to leave out."""
    include_bias: bool = True
    """Give layers with a bias a bias column."""
    seed: int = 0
    """Global seed; layer ``name`` uses ``derive_seed(seed, name)``."""
    reduction: str = "sum"
    """Per-example loss: ``sum`` (default) or ``mean`` of target-token NLL."""
    token_mode: str | None = None
    """Also store per-token rows: ``loss`` (each target token's own loss) or ``position``."""
    dtype: str = "float32"
    """Model dtype: float32, bfloat16 or float16 (compression math is float32 regardless)."""
    max_length: int = 1024
    """Longest sequence in tokens."""
    overflow: str = "truncate"
    """Longer documents: ``truncate``, ``chunk`` (consecutive windows, ids ``<id>#<n>``) or
    ``error``."""
    add_bos: bool | None = None
    """Put the tokenizer's BOS token before documents and prompts: null (default) as the
    tokenizer itself does (``tokenizer(text)``: Llama's adds it, GPT-2's and SmolLM2's do
    not), true always, false never. Never a target (nothing predicts position 0). Chat
    ``messages`` get what their template renders."""
    add_eos: bool | None = None
    """Append the tokenizer's EOS token, as a target, to documents and completions: null
    (default) as the tokenizer itself does (most do not add it), true always (right only for a
    model trained with EOS after each document: the loss on an EOS the model never learned
    dominates every gradient), false never. Chat ``messages`` get what their template
    renders."""
    on_bad_record: str = "error"
    """Bad input (invalid JSON, empty document, missing field, no target): ``error`` or ``skip``
    (skipped ids and reasons are recorded in the store)."""
    max_tokens: int = 8192
    """Token budget of one batch (batch size x padded length)."""
    chunk_rows: int = 256
    """Examples per store chunk: the unit of writing and of resume."""
    store_dtype: str = "float16"
    """Storage dtype of gradient rows: float16, bfloat16 or float32."""
    codec: str = "none"
    """Chunk compression: none or zstd (a CRC32C checksum is always added; zstd saves ~7% on
    gradient rows and reads ~3x slower)."""
    nonfinite: str = "fail"
    """A NaN/Inf gradient row: ``fail`` (stop, naming the example) or ``record`` (store zeros,
    flag the row)."""
    parallel: str = "none"
    """Sharding: ``none`` (data parallel), ``fsdp`` (FSDP2), ``deepspeed`` (ZeRO-3) or ``tp``
    (tensor parallel)."""
    tp_size: int = 0
    """Ranks per tensor-parallel group with parallel=tp; 0 = the ranks of one node
    (``LOCAL_WORLD_SIZE``), so tensor parallelism never crosses the interconnect; the groups
    are replicated over the remaining (data-parallel) dimension."""
    shard_size: int = 0
    """Ranks that shard one copy of the model with parallel=fsdp; 0 = the ranks of one node.
    When the run spans more ranks than that, FSDP2 runs as HSDP: sharded within a group of
    ``shard_size`` ranks, replicated across groups (all-gathers stay inside a node)."""
    deepspeed_config: str | None = None
    """DeepSpeed JSON for parallel=deepspeed (default: stage 3 with grass_llm's settings)."""
    gradient_checkpointing: bool = False
    """Recompute decoder layers in backward to save activation memory."""
    overwrite: bool = False
    """Replace an existing store of a different run instead of stopping."""

    def __post_init__(self):
        for name in ("model", "data", "out"):
            if not getattr(self, name):
                raise ValueError(f"{name} is required")
        choices = {"reduction": REDUCTIONS, "token_mode": TOKEN_MODES, "dtype": MODEL_DTYPES,
                   "overflow": ("truncate", "chunk", "error"),
                   "on_bad_record": ("error", "skip"), "store_dtype": STORAGE_DTYPES,
                   "codec": CODECS, "nonfinite": NONFINITE_POLICIES, "parallel": PARALLEL}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {list(allowed)}, got "
                                 f"{getattr(self, name)!r}")
        for name in ("add_bos", "add_eos"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true, false or null (as the tokenizer does), "
                                 f"got {getattr(self, name)!r}")
        for name in ("max_length", "max_tokens", "chunk_rows"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("tp_size", "shard_size"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if self.max_tokens < self.max_length:
            raise ValueError(f"max_tokens={self.max_tokens} must be >= max_length="
                             f"{self.max_length} (a batch must fit one full-length example)")
        if self.adapter is not None and self.parallel == "tp":
            raise ValueError("parallel=tp does not support LoRA adapters (the tensor-parallel "
                             "plan shards plain Linear layers); use none, fsdp or deepspeed")
        if self.token_mode == "loss" and self.reduction != "sum":
            raise ValueError("token_mode=loss needs reduction=sum")
        check_spec(self.compressor)  # syntax, names, a mask file; sizes per layer at build

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def identity_dict(self) -> dict:
        """The fields that change what is computed (a resume must match them)."""
        return {k: v for k, v in self.to_dict().items() if k not in EXECUTION_FIELDS}

    def execution_dict(self) -> dict:
        """The fields free to change between the sessions of one run."""
        return {k: v for k, v in self.to_dict().items() if k in EXECUTION_FIELDS}


def field_help() -> dict[str, str]:
    """Field name -> its docstring (for --help and docs)."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(RunConfig))
    body = tree.body[0].body
    out = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) \
                and isinstance(nxt.value, ast.Constant):
            out[node.target.id] = " ".join(nxt.value.value.split())
    return out


def load_config(path: str | None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML config and apply ``key=value`` overrides (values parsed as YAML)."""
    data: dict = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise ValueError(f"config file {path} does not exist")
        loaded = yaml.safe_load(p.read_text())
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: expected a mapping of config fields at the top level")
        data.update(loaded)
    for item in overrides or []:
        key, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"override {item!r} must look like key=value")
        data[key.strip().replace("-", "_")] = yaml.safe_load(value) if value else None
    known = {f.name for f in dataclasses.fields(RunConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown config field(s) {unknown}; known: {sorted(known)}")
    missing = [n for n in ("model", "data", "out") if n not in data]
    if missing:
        raise ValueError(f"missing required config field(s) {missing} (in the YAML or as "
                         f"--set {missing[0]}=...)")
    return RunConfig(**data)
