"""Scoring and Fisher throughput over a store, against the machine's own limits, in one run.

1. Builds a synthetic store (random float16 rows; --rows x --layers x --k).
2. Raw read rate: reading every chunk file of the store's gradient arrays, sequentially.
3. Zarr decode rate: the same rows through Zarr (zstd + CRC32C check), no arithmetic.
4. Scoring: `stream_top_k` (top-10) for 1 and 16 queries, with the torch and the fused Numba
   float16 scoring backends; reported as store bytes/s and as a fraction of the raw read rate.
5. Top-k merge: the Numba kernel against the torch path on the same score chunks.
6. Fisher: `accumulate_gram` over all rows (float64), against the float64 GEMM rate of the same
   shapes on data already in memory.

Every figure is the median of --repeats runs. Usage: python tools/bench_query.py [--rows 8192]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from grass_llm.influence.fisher import accumulate_gram
from grass_llm.influence.score import HAVE_NUMBA, TopK, stream_top_k
from grass_llm.store import LayerInfo, StoreLayout, create_store, open_store


def timed(fn, repeats):
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def build(url, rows, layers, k, chunk):
    lays = tuple(LayerInfo(f"layer.{i}", f"factgrass:c=1,k={k},k_in=64,k_out=64", i, k, 1024,
                           1024, False) for i in range(layers))
    store = create_store(url, StoreLayout(n_examples=rows, layers=lays, chunk_rows=chunk,
                                          dtype="float16"), {"config": {"bench": True}})
    rng = np.random.default_rng(0)
    for c in store.pending_chunks():
        a, b = store.layout.chunk_range(c)
        grads = {x.name: rng.standard_normal((b - a, k), dtype=np.float32) for x in lays}
        store.write_chunk(c, grads, [str(i) for i in range(a, b)], [1] * (b - a), [0] * (b - a))
    return open_store(url)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=8192)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--k", type=int, default=1024)
    ap.add_argument("--chunk-rows", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        url = str(Path(tmp) / "bench.zarr")
        t0 = time.perf_counter()
        store = build(url, args.rows, args.layers, args.k, args.chunk_rows)
        files = sorted(p for p in Path(url, "grads").rglob("*") if p.is_file())
        nbytes = sum(p.stat().st_size for p in files)
        print(f"store: {args.rows} rows x {args.layers} layers x k={args.k} float16, "
              f"{nbytes / 2**20:,.0f} MiB of chunk files (built in "
              f"{time.perf_counter() - t0:.0f} s); torch {torch.__version__}, "
              f"{torch.get_num_threads()} threads, numba {'yes' if HAVE_NUMBA else 'no'}")
        rate = {}
        rate["raw read"] = nbytes / timed(lambda: [p.read_bytes() for p in files], args.repeats)

        def decode():
            for c in range(store.layout.n_chunks):
                a, b = store.layout.chunk_range(c)
                for x in store.layout.layers:
                    store.read_raw(x.name, a, b)

        rate["zarr decode"] = nbytes / timed(decode, args.repeats)
        print("\n| what | MiB/s of store | vs raw read |")
        print("|---|---:|---:|")
        for name, r in rate.items():
            print(f"| {name} | {r / 2**20:,.0f} | {r / rate['raw read']:.2f} |")
        backends = ["torch"] + (["numba"] if HAVE_NUMBA else [])
        for n_q in (1, 16):
            pre = {x.name: torch.randn(n_q, args.k, dtype=torch.float64)
                   for x in store.layout.layers}
            for be in backends:
                stream_top_k(store, pre, 10, score_backend=be)  # warm-up (Numba compiles)
                t = timed(lambda: stream_top_k(store, pre, 10, score_backend=be), args.repeats)
                r = nbytes / t
                print(f"| score top-10, {n_q} quer{'y' if n_q == 1 else 'ies'}, {be} | "
                      f"{r / 2**20:,.0f} | {r / rate['raw read']:.2f} |")
        scores = [np.random.default_rng(i).standard_normal((16, args.chunk_rows))
                  for i in range(store.layout.n_chunks)]
        print("\n| top-k merge (16 queries, all chunks) | ms |")
        print("|---|---:|")
        for be in backends:
            def merge():
                top = TopK(16, 10, be)
                for c, s in enumerate(scores):
                    top.update(s, c * args.chunk_rows)
            merge()
            print(f"| {be} | {timed(merge, args.repeats) * 1e3:,.2f} |")
        chunks = list(range(store.layout.n_chunks))
        t_fisher = timed(lambda: [accumulate_gram(store, x.name, chunks)
                                  for x in store.layout.layers], 1)
        flops = 2.0 * args.rows * args.k * args.k * args.layers
        g = torch.randn(args.chunk_rows, args.k, dtype=torch.float64)
        acc = torch.zeros(args.k, args.k, dtype=torch.float64)
        n_mm = args.rows // args.chunk_rows * args.layers
        t_gemm = timed(lambda: [acc.addmm_(g.T, g) for _ in range(n_mm)], 1)
        print(f"\nFisher: {flops / t_fisher / 1e9:,.1f} GFLOP/s streaming from the store vs "
              f"{flops / t_gemm / 1e9:,.1f} GFLOP/s float64 GEMM in memory "
              f"({t_gemm / t_fisher:.2f} of the GEMM rate)")


if __name__ == "__main__":
    main()
