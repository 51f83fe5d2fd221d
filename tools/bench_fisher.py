"""Fisher fit time per layer block at k = 1024 and 4096: the former path (float64 GEMMs on rows
decoded by `read_rows`, Cholesky, then eigvalsh up to k = 1024 or the Cholesky-diagonal bound
above) against `compute_fisher` (read-ahead, the device's Gram dtype, Lanczos condition
estimate), and the factors' equality.

For each k: a synthetic float16 store of --rows rows and --layers layers of that k; both paths
fit every layer; reported per block: seconds of each path, their ratio, the largest relative
difference of the factors, and each path's condition number of the first block (the former
one is a loose lower bound above k = 1024), and how long the new condition estimate takes on
its own. Timings are single runs; prints one markdown table.
Usage: python tools/bench_fisher.py [--rows 4096] [--ks 1024 4096] [--device cuda] [--exact]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from grass_llm.influence import compute_fisher, load_factors  # noqa: E402
from grass_llm.influence.spectrum import condition_number  # noqa: E402
from grass_llm.store import LayerInfo, StoreLayout, create_store, open_store  # noqa: E402


def build(url: str, rows: int, layers: int, k: int, chunk: int):
    lays = tuple(LayerInfo(f"layer.{i}", f"factgrass:c=1,k={k},k_in=64,k_out=64", i, k, 1024,
                           1024, False) for i in range(layers))
    store = create_store(url, StoreLayout(n_examples=rows, layers=lays, chunk_rows=chunk,
                                          dtype="float16"), {"config": {"bench": True}})
    rng = np.random.default_rng(k)
    scale = np.exp(rng.uniform(-2, 2, k)).astype(np.float32)  # a spread-out spectrum
    for c in store.pending_chunks():
        a, b = store.layout.chunk_range(c)
        grads = {x.name: rng.standard_normal((b - a, k), dtype=np.float32) * scale for x in lays}
        store.write_chunk(c, grads, [str(i) for i in range(a, b)], [1] * (b - a), [0] * (b - a))
    return open_store(url, mode="r+")


def former_fit(store, damping: float = 0.1) -> tuple[dict, dict]:
    """The fit as the code did it before (one process): factors and condition numbers."""
    out, cond = {}, {}
    for lay in store.layout.layers:
        gram = torch.zeros(lay.k, lay.k, dtype=torch.float64)
        for c in range(store.layout.n_chunks):
            a, b = store.layout.chunk_range(c)
            g = torch.from_numpy(store.read_rows(lay.name, a, b)).double()
            gram.addmm_(g.T, g)
        fisher = gram / store.n_examples
        lam = damping * float(torch.trace(fisher)) / lay.k
        damped = fisher + lam * torch.eye(lay.k, dtype=torch.float64)
        L = torch.linalg.cholesky(damped)
        if lay.k <= 1024:
            eig = torch.linalg.eigvalsh(damped)
            cond[lay.name] = float(eig[-1] / eig[0])
        else:
            d = torch.diagonal(L)
            cond[lay.name] = float((d.max() / d.min()) ** 2)
        out[lay.name] = L
    return out, cond


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--ks", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument("--chunk-rows", type=int, default=1024)
    ap.add_argument("--device", default="cpu", help="device of the new path: cpu or cuda")
    ap.add_argument("--exact", action="store_true",
                    help="also the exact condition number of the first block (eigvalsh)")
    args = ap.parse_args()
    print(f"{args.rows} rows, {args.layers} layer(s) per k, float16 store; torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads; new path on {args.device}")
    print("\n| k | former s/block (CPU fp64) | new s/block | former / new | new: of which "
          "condition estimate, s | max rel. diff of factors | condition, former | condition, "
          "new (± rel. error) |" + (" condition, exact |" if args.exact else ""))
    print("|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if args.exact else ""))
    for k in args.ks:
        with tempfile.TemporaryDirectory() as tmp:
            store = build(str(Path(tmp) / f"k{k}.zarr"), args.rows, args.layers, k,
                          args.chunk_rows)
            t0 = time.perf_counter()
            old, old_cond = former_fit(store)
            t_old = (time.perf_counter() - t0) / args.layers
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            report = compute_fisher(store, device=args.device)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            t_new = (time.perf_counter() - t0) / args.layers
            new = load_factors(store)
            diff = max(float((new[n] - L).abs().max() / L.abs().max()) for n, L in old.items())
            first = store.layout.layers[0].name
            r = report[first]
            L = new[first].to(args.device)
            t0 = time.perf_counter()
            condition_number(L @ L.T, L, floor=r["lambda"])
            t_cond = time.perf_counter() - t0
            exact = ""
            if args.exact:
                eig = torch.linalg.eigvalsh(L @ L.T)
                exact = f" {float(eig[-1] / eig[0]):.6g} |"
            print(f"| {k} | {t_old:,.2f} | {t_new:,.2f} | {t_old / t_new:.2f} | {t_cond:,.2f} | "
                  f"{diff:.1e} | {old_cond[first]:.6g} | {r['condition']:.6g} "
                  f"(± {r['condition_rel_error']:.0e}) |{exact}")


if __name__ == "__main__":
    main()
