"""Fused kernels against the pure-torch reference, side by side in one run (CPU or CUDA).

For Linear-layer shapes of SmolLM2-135M (d 576, intermediate 1536; masks 64x64 -> k 1024, the
demo's setting) and Llama-3.1-8B (d 4096, intermediate 14336; masks 128x128 -> k 4096, the paper's
setting), one batch each, it times:

  per example     FactGraSS from raw (x, delta) -> [B, k]: gathers, outer-product sum, SJLT
  capture bwd     what the capture hook runs when delta arrives: stored features + raw delta
  per token       one row per token -> [B, T, k] (token-level attribution)
  SJLT            GraSS's second stage on [B, k'] vectors, k' = 4k
  LoGra           for scale: LoGra with k_in * k_out = k on the same (x, delta)

"fused" is the extension (grass_llm.kernels), "reference" the pure-torch path that
GRASS_LLM_KERNELS=reference runs. Calls are interleaved within each repeat so that drift on a
shared machine hits both alike; figures are medians in ms, ratio = reference / fused.

--vs-matmul instead times each call against the layer's own forward GEMM ``x @ W^T``, at the
shapes of Llama-3.1-8B's q, k/v and down projections with B = 8, T = 1024 (per token at
T = 256), masks 128x128 -> k 4096: the time of --calls back-to-back calls divided by their
number, measured with CUDA events on a GPU (the wall clock on the CPU); --small divides the
shapes by 16 for a quick run on a CPU.

Usage: python tools/bench_kernels.py [--device cpu|cuda] [--dtype float32|bfloat16]
       [--repeats 7] [--quick] [--vs-matmul [--calls 100] [--small]]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from grass_llm import kernels
from grass_llm.compress import FactGraSS, LoGra
from grass_llm.kernels import reference

# name: (d_in, d_out, k_in, k_out, k, batch, tokens)
SHAPES = {
    "SmolLM2 q_proj 576->576": (576, 576, 64, 64, 1024, 8, 256),
    "SmolLM2 down_proj 1536->576": (1536, 576, 64, 64, 1024, 8, 256),
    "Llama-8B q_proj 4096->4096": (4096, 4096, 128, 128, 4096, 4, 512),
    "Llama-8B down_proj 14336->4096": (14336, 4096, 128, 128, 4096, 4, 512),
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_medians(fns: dict, repeats: int, device: torch.device) -> dict[str, float]:
    """Median seconds per call of each function, the functions alternating within a repeat."""
    for fn in fns.values():  # warm-up: allocations, device tables, the extension build
        fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def shape_rows(name, shape, dtype, device, repeats):
    d_in, d_out, k_in, k_out, k, B, T = shape
    fg = FactGraSS(d_in, d_out, k=k, k_in=k_in, k_out=k_out, seed=0)
    lg = LoGra(d_in, d_out, k_in=k_in // 2 if k_in * k_out > k else k_in,
               k_out=k // (k_in // 2 if k_in * k_out > k else k_in), seed=0)
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(B, T, d_in, generator=gen, device=device).to(dtype)
    d = torch.randn(B, T, d_out, generator=gen, device=device).to(dtype)
    xf = fg.input_features(x)
    Tt = min(T, 64)
    idx_in, idx_out = (torch.from_numpy(a).to(device) for a in (fg.idx_in, fg.idx_out))
    all_in = torch.arange(k_in, device=device)
    csr = fg.sjlt.csr.on(device)
    g = torch.randn(B, fg.k_prime, generator=gen, device=device)

    def ref(x_, d_, i_in, per_token):
        return reference.factgrass(x_, d_, i_in, idx_out, *csr, fg.sjlt.scale, per_token)

    cases = {
        "per example": (lambda: fg(x, d), lambda: ref(x, d, idx_in, False)),
        "capture bwd": (lambda: fg.reduce(xf, d), lambda: ref(xf, d, all_in, False)),
        f"per token (T={Tt})": (lambda: fg.per_token(x[:, :Tt], d[:, :Tt]),
                                lambda: ref(x[:, :Tt], d[:, :Tt], idx_in, True)),
        f"SJLT {fg.k_prime}->{k}": (lambda: kernels.sjlt(g, *csr, 1.0),
                                    lambda: reference.sjlt(g, *csr, 1.0)),
    }
    rows = []
    for case, (fused, slow) in cases.items():
        t = interleaved_medians({"fused": fused, "reference": slow}, repeats, device)
        rows.append((name, case, t["fused"], t["reference"]))
    t_lg = interleaved_medians({"logra": lambda: lg(x, d)}, repeats, device)["logra"]
    rows.append((name, f"LoGra {lg.k_in}x{lg.k_out} (k={lg.k})", None, t_lg))
    return rows


# name: (d_in, d_out) of Llama-3.1-8B's projections; masks 128x128 -> k 4096
MATMUL_SHAPES = {"q_proj 4096->4096": (4096, 4096), "k/v_proj 4096->1024": (4096, 1024),
                 "down_proj 14336->4096": (14336, 4096)}


def per_call(fn, calls: int, device: torch.device) -> float:
    """Seconds per call of ``calls`` back-to-back calls (after one warm-up call)."""
    fn()
    _sync(device)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / calls
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls


def matmul_rows(name, d_in, d_out, dtype, device, calls, small):
    """(layer, what, seconds per call) for one projection, the GEMM first."""
    div = 16 if small else 1
    d_in, d_out = d_in // div, d_out // div
    k_in, k = (32, 256) if small else (128, 4096)  # k_in * k_out / k = 4, the paper's
    B, T, Tt = (2, 1024 // div, 256 // div) if small else (8, 1024, 256)
    fg = FactGraSS(d_in, d_out, k=k, k_in=k_in, k_out=k_in, seed=0)
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(B, T, d_in, generator=gen, device=device).to(dtype)
    d = torch.randn(B, T, d_out, generator=gen, device=device).to(dtype)
    w = (torch.randn(d_out, d_in, generator=gen, device=device) / d_in ** 0.5).to(dtype)
    xf = fg.input_features(x)
    idx_in, idx_out = (torch.from_numpy(a).to(device) for a in (fg.idx_in, fg.idx_out))
    csr = fg.sjlt.csr.on(device)
    g = torch.randn(B, fg.k_prime, generator=gen, device=device)
    xt, dt, xft = x[:, :Tt].contiguous(), d[:, :Tt].contiguous(), xf[:, :Tt].contiguous()
    cases = {
        f"x @ W^T (the layer's forward GEMM, [{B * T}, {d_in}] x [{d_in}, {d_out}])":
            lambda: torch.nn.functional.linear(x, w),
        "forward hook: input_features(x)": lambda: fg.input_features(x),
        "per example, fused: fg(x, delta)": lambda: fg(x, d),
        "capture backward, fused: reduce(features, delta)": lambda: fg.reduce(xf, d),
        "per example, reference": lambda: reference.factgrass(
            x, d, idx_in, idx_out, *csr, fg.sjlt.scale, False),
        f"per token (T={Tt}), fused: reduce(features, delta)":
            lambda: fg.reduce(xft, dt, per_token=True),
        f"per token (T={Tt}), fused from raw x": lambda: fg.per_token(xt, dt),
        f"per token (T={Tt}), reference": lambda: reference.factgrass(
            xt, dt, idx_in, idx_out, *csr, fg.sjlt.scale, True),
        f"SJLT {fg.k_prime}->{k}, [{B}, {fg.k_prime}]": lambda: kernels.sjlt(g, *csr, 1.0),
    }
    return [(name, what, per_call(fn, calls, device)) for what, fn in cases.items()]


def vs_matmul(args, dtype, device) -> None:
    calls = args.calls
    print(f"\n{calls} back-to-back calls each, "
          f"{'CUDA events' if device.type == 'cuda' else 'wall clock'}; "
          f"x and delta in {args.dtype}{', shapes / 16' if args.small else ''}")
    print("\n| layer | what | ms per call | x of x @ W^T |")
    print("|---|---|---:|---:|")
    for name, (d_in, d_out) in MATMUL_SHAPES.items():
        rows = matmul_rows(name, d_in, d_out, dtype, device, calls, args.small)
        gemm = rows[0][2]
        for layer, what, t in rows:
            print(f"| {layer} | {what} | {t * 1e3:.4f} | {t / gemm:.2f} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--quick", action="store_true", help="SmolLM2 shapes only, 3 repeats")
    ap.add_argument("--vs-matmul", action="store_true",
                    help="time each call against the layer's x @ W^T (Llama-8B shapes)")
    ap.add_argument("--calls", type=int, default=100, help="--vs-matmul: calls per timing")
    ap.add_argument("--small", action="store_true", help="--vs-matmul: shapes / 16 (CPU)")
    args = ap.parse_args()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    x0 = torch.zeros(1, device=device)
    backend = kernels.backend_name(x0)
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}"
          f", {torch.get_num_threads()} threads), inputs {args.dtype}, backend '{backend}', "
          f"torch {torch.__version__}")
    if backend == "reference":
        print("WARNING: the extension is not in use, both columns run the reference")
    if args.vs_matmul:
        vs_matmul(args, dtype, device)
        return
    shapes = {k: v for k, v in SHAPES.items() if not args.quick or k.startswith("SmolLM2")}
    repeats = 3 if args.quick else args.repeats
    print("\n| layer | what | fused ms | reference ms | reference / fused |")
    print("|---|---|---:|---:|---:|")
    for name, shape in shapes.items():
        for layer, case, fused, ref in shape_rows(name, shape, dtype, device, repeats):
            f = "" if fused is None else f"{fused * 1e3:.3f}"
            ratio = "" if fused is None else f"{ref / fused:.2f}"
            print(f"| {layer} | {case} | {f} | {ref * 1e3:.3f} | {ratio} |", flush=True)


if __name__ == "__main__":
    main()
