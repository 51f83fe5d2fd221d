"""Capacity planning for ``grass-llm cache`` (``grass-llm plan``): store size, Fisher size,
memory per rank and time, from a model config alone.

The model is built on the ``meta`` device (``grass_llm.metamodel``), and the numbers per example
come from the product's own layer selection (``capture.layers.select_layers``) and compressor
registry (``compress.build_compressor``), so they are what a real run would store. A decoder
layer's activation memory is measured on meta tensors; everything else is arithmetic on sizes,
and every figure is labelled exact, measured, estimated or assumed where it is shown. Units:
bytes, FLOPs and seconds unless a name says otherwise.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import re
from dataclasses import dataclass, field

import torch
from torch import nn

from grass_llm.capture.layers import select_layers
from grass_llm.capture.loss import loss_peak_bytes
from grass_llm.compress import FactorizedCompressor, build_compressor, parse_spec
from grass_llm.compress.dense import Gaussian, Rademacher
from grass_llm.compress.registry import compressor_class
from grass_llm.parallel.plan import ROWWISE
from grass_llm.store.layout import STORAGE_DTYPES

PAPER_SPEC = "factgrass:k=4096,k_in=128,k_out=128"
PARALLEL = ("none", "fsdp", "zero3", "tp")
MODEL_DTYPES = {"bfloat16": 2, "float16": 2, "float32": 4}
STORE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4}
#: H100 / H200 SXM dense bf16/fp16 tensor-core peak (the two share the compute die), and fp32
#: without TF32 (PyTorch's default float32 matmul precision), in TFLOP/s
PEAK_TFLOPS = {"bfloat16": 989.0, "float16": 989.0, "float32": 67.0}
#: launch/deepspeed_zero3.json: stage3_prefetch_bucket_size (parameters gathered ahead)
ZERO3_PREFETCH = 50_000_000
#: the store's per-example metadata: n_targets int32 + loss float32 + row_flags uint8, plus an
#: example id estimated at 16 bytes
ROW_META_BYTES = 4 + 4 + 1 + 16
TOKEN_CHUNK_ROWS = 1024  # StoreLayout.token_chunk_rows default


@dataclass(kw_only=True)
class PlanConfig:
    """What ``grass-llm plan`` plans for; field names follow the run config where they overlap."""

    model: str
    """A config.json, a model directory, a .gguf file, ``smollm2`` or ``tiny:<family>``."""
    tokens: int
    """Training tokens to cache."""
    gpus: int = 8
    """GPUs (ranks) of the cache run."""
    gpus_per_node: int = 8
    """GPUs per node (host RAM per node; default tensor-parallel group size)."""
    compressor: str = PAPER_SPEC
    """Compressor spec of every hooked layer."""
    layers: list[str] | None = None
    """Layer include patterns (default every Linear in the decoder blocks)."""
    exclude: list[str] = field(default_factory=list)
    """Layer exclude patterns."""
    include_bias: bool = True
    """Bias column for layers with a bias."""
    examples: int | None = None
    """Store rows; default ``ceil(tokens / doc_tokens)``."""
    doc_tokens: int | None = None
    """Average tokens per example; default ``tokens / examples``, or ``max_length``."""
    dtype: str = "bfloat16"
    """Model dtype."""
    store_dtype: str = "float16"
    """Storage dtype of gradient rows."""
    token_mode: str | None = None
    """None, ``loss`` or ``position``: also per-token rows (see GradientCapture)."""
    max_length: int = 1024
    """Longest sequence in tokens."""
    max_tokens: int = 16384
    """Token budget of one batch (batch size x padded length)."""
    chunk_rows: int = 1024
    """Examples per store chunk."""
    parallel: str = "fsdp"
    """none (data parallel), fsdp (FSDP2), zero3 (DeepSpeed ZeRO-3) or tp."""
    tp_size: int = 0
    """Ranks per tensor-parallel group with parallel=tp; 0 = min(gpus, gpus_per_node)."""
    gradient_checkpointing: bool = True
    """Recompute decoder layers in backward."""
    gpu_memory_gib: float = 80.0
    """Memory of one GPU (H100: 80, H200: 141)."""
    tokens_per_second: float | None = None
    """Measured cache throughput per GPU; replaces the FLOP estimate for the time."""
    peak_tflops: float | None = None
    """Peak TFLOP/s of one GPU; default by dtype (PEAK_TFLOPS)."""
    mfu: float = 0.4
    """Fraction of peak reached on all executed FLOPs (recomputation included)."""
    read_gbps: float = 2.0
    """Store read bandwidth of one query/Fisher reader, GB/s (1e9 bytes)."""
    fisher_gflops: float = 500.0
    """float64 GEMM rate of one Fisher rank (a CPU node), GFLOP/s."""

    def __post_init__(self):
        if self.parallel == "deepspeed":
            self.parallel = "zero3"
        choices = {"dtype": tuple(MODEL_DTYPES), "store_dtype": STORAGE_DTYPES,
                   "parallel": PARALLEL, "token_mode": (None, "loss", "position")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {list(allowed)}, got "
                                 f"{getattr(self, name)!r}")
        for name in ("tokens", "gpus", "gpus_per_node", "max_length", "max_tokens",
                     "chunk_rows"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("gpu_memory_gib", "tokens_per_second", "peak_tflops", "read_gbps",
                     "fisher_gflops"):
            value = getattr(self, name)
            if value is not None and not (value > 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a positive number, got {value}")
        if not 0 < self.mfu <= 1:
            raise ValueError(f"mfu must be in (0, 1], got {self.mfu}")
        if self.max_tokens < self.max_length:
            raise ValueError(f"max_tokens={self.max_tokens} must be >= max_length="
                             f"{self.max_length}")
        if self.examples is not None and self.doc_tokens is not None:
            raise ValueError("give examples or doc_tokens, not both (one follows from the other)")
        if self.examples is not None and not 1 <= self.examples <= self.tokens:
            raise ValueError(f"examples must be in [1, tokens={self.tokens}], got "
                             f"{self.examples}")
        if self.doc_tokens is not None and not 1 <= self.doc_tokens <= self.max_length:
            raise ValueError(f"doc_tokens must be in [1, max_length={self.max_length}] (longer "
                             f"documents are truncated or chunked), got {self.doc_tokens}")
        if self.tp_size < 0 or (self.tp_size and self.gpus % self.tp_size):
            raise ValueError(f"tp_size must divide gpus={self.gpus}, got {self.tp_size}")

    @property
    def rows(self) -> int:
        """Store rows: ``examples``, or the tokens cut into ``doc_tokens`` (or
        ``max_length``) documents."""
        if self.examples is not None:
            return self.examples
        return math.ceil(self.tokens / (self.doc_tokens or self.max_length))

    @property
    def avg_doc_tokens(self) -> float:
        """Average tokens per store row."""
        return self.tokens / self.rows


def resolve_spec(compressor: str | None, k: int | None) -> str:
    """The compressor spec from ``--compressor`` and ``--k``: ``--k`` alone sets ``k`` of the
    paper's spec; with a spec, it must agree with the spec's ``k`` (or fill it in)."""
    spec = compressor or PAPER_SPEC
    if k is None:
        return spec
    name, params = parse_spec(spec)
    if "k" not in inspect.signature(compressor_class(name).__init__).parameters:
        raise ValueError(f"{name!r} has no k parameter (its size follows from its other "
                         f"parameters); leave out --k")
    if compressor is not None and "k" in params and params["k"] != k:
        raise ValueError(f"--k {k} disagrees with k={params['k']} in --compressor {spec!r}; "
                         "give k once")
    params["k"] = k
    return f"{name}:" + ",".join(f"{key}={v}" for key, v in params.items())


def parse_count(text: str | int) -> int:
    """``"1e9"``, ``"1B"``, ``"500M"``, ``"1_000_000"`` -> int; ValueError otherwise."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9][0-9_]*(?:\.[0-9]*)?(?:[eE][0-9]+)?)\s*([kKmMbBgGtT]?)\s*",
                     str(text))
    if not m:
        raise ValueError(f"{text!r} is not a count (examples: 1000000, 1e9, 500M, 1B)")
    scale = {"": 1, "k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12}[m.group(2).lower()]
    value = float(m.group(1).replace("_", "")) * scale
    if value != int(value):
        raise ValueError(f"{text!r} is not a whole number")
    return int(value)


# ---------------------------------------------------------------------------- the layers
@dataclass(frozen=True)
class LayerPlan:
    """One hooked layer as a real run would build it."""

    name: str
    d_in: int
    d_out: int
    bias: bool
    k: int
    feat_in: int
    """Numbers per token the forward hook keeps until backward (float32)."""
    flops_per_token: float
    """Compression work per token (outer products, projections, materialization)."""
    flops_per_example: float
    """Compression work per example (the vector map applied to a materialized gradient)."""
    materializes: bool
    """A vector compressor: the hook forms each example's full ``d_out x d_in`` gradient."""


def plan_layers(model: nn.Module, spec: str, layers=None, exclude=None,
                include_bias: bool = True) -> list[LayerPlan]:
    """Each hooked layer's compressed size and hook costs, from the product's own selection and
    registry (one compressor per distinct layer shape: k does not depend on the seed)."""
    built: dict[tuple, object] = {}
    out = []
    for name, mod in select_layers(model, layers, exclude or None).items():
        bias = include_bias and mod.bias is not None
        shape = (mod.in_features, mod.out_features, bias)
        if shape not in built:
            try:
                built[shape] = build_compressor(spec, seed=0, d_in=mod.in_features,
                                                d_out=mod.out_features, bias=bias, layer=name,
                                                p=mod.out_features * (mod.in_features + bias))
            except ValueError as err:
                raise ValueError(f"compressor {spec!r} does not fit layer {name} "
                                 f"({mod.out_features} x {mod.in_features}): {err}") from err
        comp = built[shape]
        d_in_eff = mod.in_features + bias
        if isinstance(comp, FactorizedCompressor):
            per_tok = 2.0 * comp.k_in * comp.k_out  # the outer-product sum
            if hasattr(comp, "proj_in"):  # LoGra: dense projections of x and delta
                per_tok += 2.0 * (d_in_eff * comp.k_in + mod.out_features * comp.k_out)
            per_ex, feat = 0.0, comp.k_in
        else:  # materialized G = sum_t delta_t x_t^T, then the vector map
            p = mod.out_features * d_in_eff
            per_tok, feat = 2.0 * p, d_in_eff
            per_ex = 2.0 * p * comp.k if isinstance(comp, (Gaussian, Rademacher)) else 0.0
        out.append(LayerPlan(name, mod.in_features, mod.out_features, bias, comp.k, feat,
                             per_tok, per_ex, not isinstance(comp, FactorizedCompressor)))
    return out


# ------------------------------------------------------------------------------ the plan
@dataclass
class Plan:
    """Every figure of a plan; ``to_dict()`` is the ``--json`` output."""

    config: dict
    model: dict
    layers: list[dict]
    store: dict
    fisher: dict
    memory: dict
    time: dict
    notes: list[str]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def make_plan(cfg: PlanConfig) -> Plan:
    """Plan a cache run (raises ValueError with a message a user can act on)."""
    from grass_llm.metamodel import load_model_config, meta_model, param_counts

    dtype = getattr(torch, cfg.dtype)
    config, name = load_model_config(cfg.model)
    model = meta_model(config, dtype)
    lays = plan_layers(model, cfg.compressor, cfg.layers, cfg.exclude, cfg.include_bias)
    counts = param_counts(model)
    tp = (cfg.tp_size or min(cfg.gpus, cfg.gpus_per_node)) if cfg.parallel == "tp" else 1
    for attr in ("num_attention_heads", "num_key_value_heads"):
        n = getattr(config, attr, None)
        if tp > 1 and n is not None and n % tp:
            raise ValueError(f"tensor parallel over {tp} ranks needs {attr}={n} to be "
                             f"divisible by {tp}; set --tp-size")
    store = _store(cfg, lays)
    notes: list[str] = []
    model_info = {"name": name, "type": config.model_type, "params": counts["total"],
                  "layers_hooked": len(lays), "decoder_layers": config.num_hidden_layers,
                  "hidden": config.hidden_size, "vocab": config.vocab_size}
    memory = _memory(cfg, config, counts, lays, tp, notes)
    return Plan(config=dataclasses.asdict(cfg), model=model_info,
                layers=[dataclasses.asdict(x) for x in lays], store=store,
                fisher=_fisher(cfg, lays, store), memory=memory,
                time=_time(cfg, config, counts, lays, tp, store, notes), notes=notes)


def _store(cfg: PlanConfig, lays: list[LayerPlan]) -> dict:
    numbers = sum(x.k for x in lays)
    b = STORE_BYTES[cfg.store_dtype]
    rows = cfg.rows
    n_chunks = math.ceil(rows / cfg.chunk_rows)
    out = {"rows": rows, "numbers_per_example": numbers, "dtype_bytes": b,
           "grad_bytes": rows * numbers * b,  # exact: the grads/<layer> arrays' nbytes
           "meta_bytes": rows * ROW_META_BYTES + n_chunks,
           "chunks": n_chunks, "chunk_files": n_chunks * len(lays),
           "chunk_file_bytes": cfg.chunk_rows * max(x.k for x in lays) * b,
           "bytes_per_token": numbers * b / cfg.avg_doc_tokens, "token_rows": 0,
           "token_bytes": 0}
    if cfg.token_mode is not None:
        per_ex = cfg.avg_doc_tokens - (1 if cfg.token_mode == "loss" else 0)
        tok_rows = math.ceil(rows * per_ex)
        padded = tok_rows + n_chunks * TOKEN_CHUNK_ROWS  # upper bound of chunk-aligned padding
        out["token_rows"] = tok_rows
        out["token_bytes"] = padded * (numbers * b + 4) + 8 * (rows + 1 + n_chunks)
    out["total_bytes"] = out["grad_bytes"] + out["meta_bytes"] + out["token_bytes"]
    return out


def _fisher(cfg: PlanConfig, lays: list[LayerPlan], store: dict) -> dict:
    """compute_fisher: float64 Grams of a group of min(ranks, 8) layers at a time on every
    rank, each block reduced to its owner rank, which factors, writes and frees it."""
    blocks = sum(x.k ** 2 for x in lays) * 8
    kmax = max(x.k for x in lays)
    flops = 2.0 * store["rows"] * sum(x.k ** 2 for x in lays)
    group = min(max(1, cfg.gpus), 8, len(lays))
    # the group's partial Grams, plus the owned block's damped copy and factor
    peak = (group + 2) * kmax ** 2 * 8
    return {"bytes": blocks, "peak_ram_bytes": peak, "group": group, "gemm_flops": flops,
            "hours_one_rank": flops / (cfg.fisher_gflops * 1e9) / 3600,
            "read_hours_one_reader": store["total_bytes"] / (cfg.read_gbps * 1e9) / 3600,
            "query_pass_hours": store["grad_bytes"] / (cfg.read_gbps * 1e9) / 3600}


def _memory(cfg: PlanConfig, config, counts: dict, lays: list[LayerPlan], tp: int,
            notes: list[str]) -> dict:
    b = MODEL_DTYPES[cfg.dtype]
    P, G = counts["total"], cfg.gpus
    tokens = cfg.max_tokens
    rows_step = max(1, cfg.max_tokens // max(1, round(cfg.avg_doc_tokens)))
    if cfg.parallel == "fsdp":  # shards + the root's params (gathered for the whole step)
        root = P - counts["decoder"]  # + the current and the prefetched decoder layer
        weights = P / G * b + (root + 2 * counts["layer"]) * b
    elif cfg.parallel == "zero3":
        weights = P / G * b + (counts["largest_module"] + ZERO3_PREFETCH) * b
    elif cfg.parallel == "tp":  # decoder q/k/v/o/gate/up/down split; the rest replicated
        weights = (counts["decoder_linear"] / tp + P - counts["decoder_linear"]) * b
    else:
        weights = P * b
    from grass_llm.metamodel import layer_activation_bytes_per_token

    per_layer = layer_activation_bytes_per_token(config, getattr(torch, cfg.dtype),
                                                 cfg.max_length, tp)
    L = config.num_hidden_layers
    if per_layer is None:
        notes.append(f"{config.model_type} does not run on meta tensors: decoder-layer "
                     "activations are not measured and not included")
    layer = (per_layer or 0.0) * tokens
    if cfg.gradient_checkpointing:  # layer inputs kept, one layer recomputed at a time
        acts = L * tokens * config.hidden_size * b + layer
    else:
        acts = L * layer
    logits = loss_peak_bytes(tokens, config.vocab_size, b)
    numbers = sum(x.k for x in lays)
    # a row-parallel layer's rank sees 1/tp of x, so keeps ~1/tp of the k_in masked columns
    feats = tokens * 4 * sum(x.feat_in / tp if x.name.endswith(ROWWISE) else x.feat_in
                             for x in lays)
    if cfg.token_mode == "position":  # streamed per layer (capture/tokens.py): the batch's
        # rows in the store dtype, one layer's float32 block, the examples' float32 sums
        results = (tokens * numbers * STORE_BYTES[cfg.store_dtype]
                   + tokens * max(x.k for x in lays) * 4 + rows_step * numbers * 4)
    else:
        results = rows_step * numbers * 4
    materialized = rows_step * max((x.d_out * (x.d_in + x.bias) for x in lays
                                    if x.materializes), default=0) * 4
    items = {"weights": weights, "activations": acts, "logits_and_loss": logits,
             "hook_features": feats, "compressed_results": results,
             "materialized_gradient": materialized}
    total = sum(items.values())
    if not total <= 0.9 * cfg.gpu_memory_gib * 2 ** 30:
        big = max(items, key=items.get)
        notes.append(f"does not fit: the largest item is {big.replace('_', ' ')}; lower "
                     "--max-tokens" + ("" if cfg.gradient_checkpointing else
                                       ", turn on checkpointing") + " or shard more")
    if cfg.parallel == "tp" and tp > 1:
        notes.append("parallel=tp replicates the embedding and the output head: every rank of "
                     "a group computes the full logits")
    # cache_loop keeps a chunk's rows (and token rows) in the store dtype on the host until it
    # is full, then the writer thread holds it (one queued, one being written): 3 chunks
    rows_kept = cfg.chunk_rows * (1 + (cfg.avg_doc_tokens if cfg.token_mode else 0))
    store_b = STORE_BYTES[cfg.store_dtype]
    ranks = min(cfg.gpus, cfg.gpus_per_node)
    # rank 0 reads the full model; in the sharded modes the others receive one tensor at a time
    load = P * b * (ranks if cfg.parallel == "none" else 1) + (
        0 if cfg.parallel == "none" else (ranks - 1) * counts["largest_module"] * b)
    return {"items": items, "total": total, "gpu_bytes": cfg.gpu_memory_gib * 2 ** 30,
            "fits": total <= 0.9 * cfg.gpu_memory_gib * 2 ** 30,
            "batch_tokens": tokens, "batch_rows": rows_step, "tp_size": tp,
            "layer_activation_bytes_per_token": per_layer,
            "host_chunk_buffer": 3 * rows_kept * numbers * store_b,
            "host_load_per_node": load}


def _time(cfg, config, counts, lays, tp, store, notes) -> dict:
    T = cfg.avg_doc_tokens
    L = config.num_hidden_layers
    heads = config.num_attention_heads
    d_q = heads * (getattr(config, "head_dim", None) or config.hidden_size // heads)
    attn = 2.0 * L * d_q * (T + 1)  # causal QK^T and AV, forward, per token
    head = 2.0 * counts["head"]
    dec = 2.0 * (counts["matmul"] - counts["head"]) + attn
    # forward + input-gradient-only backward (no weight-gradient GEMMs): 2x the forward's
    # matmuls, 3x its attention; checkpointing re-runs the decoder forward once more
    dec_flops = 2 * dec + attn + (dec if cfg.gradient_checkpointing else 0.0)
    comp = sum(x.flops_per_token + x.flops_per_example / T for x in lays)
    head_flops = 2 * head
    per_token = dec_flops + head_flops + comp
    rows_per_example = (T - 1) if cfg.token_mode == "loss" else 1
    # tensor parallel: the head is replicated, so each of the tp ranks computes all of it
    gpu_flops_per_token = (dec_flops + comp + tp * head_flops) * rows_per_example
    peak = (cfg.peak_tflops or PEAK_TFLOPS[cfg.dtype]) * 1e12
    est_tps = peak * cfg.mfu / gpu_flops_per_token
    out = {"flops_per_token": per_token * rows_per_example,
           "gpu_flops_per_token": gpu_flops_per_token, "peak_tflops": peak / 1e12,
           "mfu": cfg.mfu, "estimated_tokens_per_s_per_gpu": est_tps,
           "estimated_hours": cfg.tokens / (est_tps * cfg.gpus) / 3600,
           "measured_tokens_per_s_per_gpu": cfg.tokens_per_second, "measured_hours": None,
           "implied_mfu": None}
    if cfg.tokens_per_second is not None:
        out["measured_hours"] = cfg.tokens / (cfg.tokens_per_second * cfg.gpus) / 3600
        out["implied_mfu"] = cfg.tokens_per_second * gpu_flops_per_token / peak
    hours = out["measured_hours"] or out["estimated_hours"]
    out["store_write_mb_per_s"] = store["total_bytes"] / (hours * 3600) / 1e6
    if cfg.token_mode == "loss":
        notes.append("token_mode=loss runs one forward+backward per target token: compute "
                     f"x{rows_per_example:,.0f}")
    return out

