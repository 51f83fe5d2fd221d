"""``grass-llm cache``: compressed gradients of a corpus into a store, on 1..N processes.

Composition, in this order (STYLE.md 1): process group (``parallel.dist``) -> rank 0 reads the
model and tokenizer (the other ranks receive the tokenizer and, for sharded modes, a meta
skeleton: ``sharding.load_on_ranks``) -> the tokenized corpus (built once by rank 0,
memory-mapped by all) -> identities and store (rank 0 creates or resumes, everyone opens) ->
sharding (one ``apply_*`` on the skeleton, weights streamed from rank 0:
``sharding.shard_model``, the path the query gradients share) -> the step loop
(``cache_loop``) -> summary. Every region where one rank may fail alone is guarded, so its
error reaches all.

Work split: the store's row chunks go round robin to the data-parallel ranks (row order stays
dataset order); a rank's chunks are cut into token-budget batches. Under FSDP2 and ZeRO-3 every
forward/backward is a collective, so all ranks take the same, agreed number of steps: a rank
that runs out of work steps on a one-example filler batch whose result is dropped. Under tensor
parallelism all ranks of a group compute the same batch and its first rank writes.
"""

from __future__ import annotations

import dataclasses
import socket
import time
from dataclasses import dataclass

import numpy as np
import torch

from grass_llm.cache_loop import STORE_TORCH_DTYPES, CacheLoop
from grass_llm.capture import GradientCapture
from grass_llm.config import RunConfig
from grass_llm.data.specials import describe_special_tokens
from grass_llm.models import ADAPTER_LAYERS, enable_activation_checkpointing
from grass_llm.parallel import comm, init_distributed
from grass_llm.parallel.dist import inner_size
from grass_llm.sharding import load_on_ranks, shard_model
from grass_llm.store import LayerInfo, StoreLayout, create_store, open_store
from grass_llm.store.identity import run_model_identity, tokenizer_identity

_MAX_SKIPPED_RECORDED = 1000


@dataclass
class Summary:
    examples: int
    tokens: int
    seconds: float
    chunks_written: int
    chunks_total: int
    skipped: int
    store: str
    store_bytes: int | None = None

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)


def _describe(cfg, corpus, model, tok, name, capture) -> tuple[StoreLayout, dict]:
    """The store's layout and identity meta (rank 0: hashes every weight of the full
    model)."""
    mid = run_model_identity(model, name, spec=cfg.model, dtype=cfg.dtype, seed=cfg.seed,
                             adapter=cfg.adapter)
    tid = tokenizer_identity(tok)
    meta = {
        "config": cfg.identity_dict(),
        "model": {k: v for k, v in mid.items() if k != "name"},
        "tokenizer": {k: v for k, v in tid.items() if k != "name"},
        "dataset": corpus.identity(),
        "special_tokens": corpus.special_tokens,  # the policy (in config) and what it added
        "loss_reduction": cfg.reduction,
        "model_dtype": cfg.dtype,
    }
    layers = tuple(LayerInfo(n, c.spec, c.seed, c.k, capture.layers[n].in_features,
                             capture.layers[n].out_features, capture._bias[n])
                   for n, c in capture.compressors.items())
    counts = None
    if cfg.token_mode == "position":
        counts = tuple(np.asarray(corpus.lengths).tolist())
    elif cfg.token_mode == "loss":
        counts = tuple(np.asarray(corpus.n_targets).tolist())
    layout = StoreLayout(n_examples=corpus.n_examples, layers=layers, chunk_rows=cfg.chunk_rows,
                         dtype=cfg.store_dtype, codec=cfg.codec, token_mode=cfg.token_mode,
                         token_counts=counts)
    return layout, meta


def _mesh_shape(cfg, info) -> list[int] | None:
    """The device mesh the sharding will use: (outer, inner) ranks."""
    if not info.initialized or cfg.parallel in ("none", "deepspeed"):
        return None
    inner = inner_size(info, cfg.shard_size if cfg.parallel == "fsdp" else cfg.tp_size,
                       "shard_size" if cfg.parallel == "fsdp" else "tp_size")
    return [info.world_size // inner, inner]


def _execution(cfg, info, name, tok, corpus) -> dict:
    return {"config": cfg.execution_dict(), "model": {"name": name},
            "tokenizer": {"name": getattr(tok, "name_or_path", "")},
            # the skipped records' locations name the data's path: a session record
            "dataset": {"path": cfg.data, "corpus_path": str(corpus.path),
                        "skipped": [dataclasses.asdict(s)
                                    for s in corpus.skipped[:_MAX_SKIPPED_RECORDED]]},
            "run": {"world_size": info.world_size, "local_world_size": info.local_world_size,
                    "mesh": _mesh_shape(cfg, info), "device": info.device.type,
                    "host": socket.gethostname()}}


def _open(cfg, info, corpus, model, tok, name):
    """Rank 0 creates (or reopens to resume) the store; then the others open it. Returns the
    store and the done-markers every rank plans from (read once, by rank 0)."""
    store, done = None, None
    with comm.guarded("creating the store"):
        if info.is_main:
            probe = GradientCapture(model, cfg.compressor, layers=cfg.layers, exclude=cfg.exclude,
                                    seed=cfg.seed, include_bias=cfg.include_bias)
            layout, meta = _describe(cfg, corpus, model, tok, name, probe)
            store = create_store(cfg.out, layout, meta, execution=_execution(cfg, info, name,
                                                                               tok, corpus),
                                 overwrite=cfg.overwrite)
            done = store.done_chunks()
    with comm.guarded("opening the store"):
        if not info.is_main:
            store = open_store(cfg.out, mode="r+")
    done = comm.broadcast_object(done)
    return store, done


def run_cache(cfg: RunConfig, *, progress: bool = True) -> Summary:
    """Run the cache job for this process (call it on every rank)."""
    info = init_distributed()
    if not info.is_main:
        _quiet()
    t_start = time.perf_counter()
    if cfg.adapter is not None and cfg.layers is None:
        cfg = dataclasses.replace(cfg, layers=list(ADAPTER_LAYERS))
    model, tok, name = load_on_ranks(info, cfg.parallel, model=cfg.model, dtype=cfg.dtype,
                                     tokenizer=cfg.tokenizer, seed=cfg.seed,
                                     adapter=cfg.adapter)
    corpus = _open_corpus(cfg, tok, progress=progress and info.is_main)
    if info.is_main:
        print(describe_special_tokens(corpus.special_tokens))
    if corpus.n_examples == 0:
        raise ValueError(f"{cfg.data}: no usable example ({corpus.n_skipped} skipped)")
    store, done = _open(cfg, info, corpus, model, tok, name)
    setup = shard_model(model, info, cfg.parallel, dtype=cfg.dtype, shard_size=cfg.shard_size,
                        tp_size=cfg.tp_size, deepspeed_config=cfg.deepspeed_config)
    del model
    if cfg.gradient_checkpointing:
        enable_activation_checkpointing(setup.module)
    capture = GradientCapture(setup.module, cfg.compressor, layers=cfg.layers,
                              exclude=cfg.exclude, seed=cfg.seed, reduction=cfg.reduction,
                              token_mode=cfg.token_mode, include_bias=cfg.include_bias,
                              tp_group=setup.tp_group, keep_trainable=setup.keep,
                              token_dtype=STORE_TORCH_DTYPES[store.layout.dtype])
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    loop = CacheLoop(cfg, setup, store, corpus, capture, pad_id, info.device,
                     progress and info.is_main, done)
    written, tokens = loop.run()
    totals = comm.all_reduce(torch.tensor([written, tokens], dtype=torch.long))
    comm.barrier()
    return Summary(examples=corpus.n_examples, tokens=int(totals[1]),
                   seconds=time.perf_counter() - t_start, chunks_written=int(totals[0]),
                   chunks_total=int(store.done_chunks().size), skipped=corpus.n_skipped,
                   store=cfg.out, store_bytes=_local_size(cfg.out))


def _open_corpus(cfg, tok, progress: bool):
    """The tokenized corpus: built once by rank 0 on every core, memory-mapped by all ranks
    (``grass_llm.data.corpus``); a resume opens the cache in seconds."""
    from grass_llm.data import TokenizedCorpus

    return TokenizedCorpus.open_or_build(cfg.data, tok, max_length=cfg.max_length,
                                         overflow=cfg.overflow, on_error=cfg.on_bad_record,
                                         add_eos=cfg.add_eos, add_bos=cfg.add_bos,
                                         progress=progress)


def _local_size(url: str) -> int | None:
    """Bytes on disk of a local store (None for remote URLs)."""
    from pathlib import Path

    root = Path(url)
    if "://" in url or not root.is_dir():
        return None
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def _quiet() -> None:
    """Ranks other than 0 only speak when they fail (their exceptions still propagate)."""
    import logging
    import warnings

    import transformers

    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore")
    for name in ("DeepSpeed", "deepspeed", "torch.distributed"):
        logging.getLogger(name).setLevel(logging.ERROR)
