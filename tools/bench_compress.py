"""Per-vector cost of the compressors as the gradient size p grows (the GraSS paper's claim).

Table 1 (vector compressors on materialized gradients): Gaussian, FJLT, SJLT and GraSS at a fixed
k, p from 1e4 to 1e7. GraSS should stay flat in p (O(k')), SJLT grow linearly, FJLT as p log p and
Gaussian as p k. A dense Gaussian map of up to 2^27 entries (1 GiB in float64) is generated once
and kept ("cached": the per-vector figure is then the GEMM alone); larger maps cannot be kept and
are regenerated block by block on every call, as GPU projectors such as TRAK's do ("streamed").
A size whose estimated time exceeds --budget seconds is skipped.

Table 2 (Linear layers, d_in = d_out = d, T tokens per example): FactGraSS and LoGra from (x, delta)
against materializing G = sum_t delta_t x_t^T and then applying GraSS.

Every figure is the median of --repeats timed calls on one batch, after one warm-up call, all in
one run; ratios are relative to GraSS (table 1) and FactGraSS (table 2) of the same row.

Usage: python tools/bench_compress.py [--k 1024] [--batch 16] [--repeats 5] [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from grass_llm.compress import FJLT, SJLT, FactGraSS, Gaussian, GraSS, LoGra
from grass_llm.compress import dense as dense_mod

dense_mod.CACHE_ENTRIES = 2**27  # keep dense maps up to 1 GiB (float64) for a GEMM-only figure


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up: allocations and device caches
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def fmt_us(seconds: float | None) -> str:
    return "skipped" if seconds is None else f"{seconds * 1e6:,.1f}"


def vector_table(ps, k, batch, repeats, budget):
    print(f"\n## Vector compressors, k={k}, k'={4 * k} (GraSS), batch {batch}: us per vector\n")
    print("| p | Gaussian | FJLT | SJLT | GraSS | Gaussian/GraSS | FJLT/GraSS | SJLT/GraSS |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    gauss_rate = None  # seconds per (p * k) entry, from the last streamed size measured
    for p in ps:
        g = torch.randn(batch, p)
        row = {}
        for name, make in (("GraSS", lambda: GraSS(p, k, 4 * k, seed=0)),
                           ("SJLT", lambda: SJLT(p, k, seed=0)),
                           ("FJLT", lambda: FJLT(p, k, seed=0)),
                           ("Gaussian", lambda: Gaussian(p, k, seed=0))):
            streamed = name == "Gaussian" and p * k > dense_mod.CACHE_ENTRIES
            if streamed and gauss_rate is not None and gauss_rate * p * k > budget:
                row[name] = None
                continue
            comp = make()
            row[name] = median_time(lambda: comp(g), 1 if streamed else repeats) / batch
            if streamed:
                gauss_rate = row[name] * batch / (p * k)
        ratios = [("—" if row[n] is None else f"{row[n] / row['GraSS']:,.1f}x")
                  for n in ("Gaussian", "FJLT", "SJLT")]
        mode = "streamed" if p * k > dense_mod.CACHE_ENTRIES else "cached"
        print(f"| {p:.0e} | {fmt_us(row['Gaussian'])} ({mode}) | {fmt_us(row['FJLT'])} | "
              f"{fmt_us(row['SJLT'])} | {fmt_us(row['GraSS'])} | " + " | ".join(ratios) + " |",
              flush=True)


def linear_table(ds, tokens, batch, repeats, side):
    k = side * side
    print(f"\n## Linear layer d x d, {tokens} tokens/example, batch {batch}, k={k}: "
          "us per example\n")
    print(f"FactGraSS {2 * side}x{2 * side}->{k}, LoGra {side}x{side}, materialize G then "
          f"GraSS k'={4 * k}.\n")
    print("| d | FactGraSS | LoGra | G + GraSS | LoGra/FactGraSS | (G+GraSS)/FactGraSS |")
    print("|---:|---:|---:|---:|---:|---:|")
    for d in ds:
        x, delta = torch.randn(batch, tokens, d), torch.randn(batch, tokens, d)
        fg = FactGraSS(d, d, k=k, k_in=2 * side, k_out=2 * side, seed=0)
        lg = LoGra(d, d, k_in=side, k_out=side, seed=0)
        gr = GraSS(d * d, k, 4 * k, seed=0)
        t_fg = median_time(lambda: fg(x, delta), repeats) / batch
        t_lg = median_time(lambda: lg(x, delta), repeats) / batch
        t_gr = median_time(lambda: gr(torch.einsum("bto,bti->boi", delta, x)
                                      .reshape(batch, -1)), repeats) / batch
        print(f"| {d} | {fmt_us(t_fg)} | {fmt_us(t_lg)} | {fmt_us(t_gr)} | "
              f"{t_lg / t_fg:,.2f}x | {t_gr / t_fg:,.1f}x |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--k", type=int, default=1024, help="compressed size (table 1)")
    ap.add_argument("--batch", type=int, default=16, help="vectors / examples per call")
    ap.add_argument("--repeats", type=int, default=5, help="timed calls per figure (median)")
    ap.add_argument("--budget", type=float, default=60.0,
                    help="skip a Gaussian size whose estimated call time exceeds this (s)")
    ap.add_argument("--quick", action="store_true", help="small sizes only (a smoke run)")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    ps = [10**4, 10**5] if args.quick else [10**4, 10**5, 10**6, 10**7]
    vector_table(ps, args.k, args.batch, args.repeats, args.budget)
    ds = [256, 1024] if args.quick else [256, 1024, 2048, 4096]
    linear_table(ds, tokens=64, batch=args.batch, repeats=args.repeats, side=32)


if __name__ == "__main__":
    main()
