"""A store-writing process for the multi-writer and crash/resume tests.

Usage: python -m tests.store_writer URL RANK WORLD [--kill-at-setitem N] [--create]

Writes the deterministic rows of ``chunk_data`` for the chunks assigned to RANK. With
``--kill-at-setitem N`` the process SIGKILLs itself on its N-th Zarr array write, i.e. in the
middle of a chunk (while some of its concurrent layer writes are done and others not, or
before or after the completion marker).
"""

from __future__ import annotations

import argparse
import os
import signal

import numpy as np
import zarr

from grass_llm.store import LayerInfo, StoreLayout, create_store, open_store

LAYOUT = StoreLayout(
    n_examples=23, chunk_rows=4, dtype="float16", token_mode="position",
    token_counts=tuple(int(v) for v in (np.arange(23) * 7) % 5 + 1), token_chunk_rows=6,
    layers=(LayerInfo("model.layers.0.q_proj", "factgrass:c=1,k=8,k_in=4,k_out=4", 11, 8, 9, 7,
                      False),
            LayerInfo("model.layers.0.mlp.up_proj", "logra:k_in=2,k_out=3", 12, 6, 9, 13,
                      True)))
META = {"config": {"model": "tiny", "seed": 0}, "dataset": {"fingerprint": "abc"}}


def chunk_data(c: int) -> dict:
    """The rows of chunk c: a pure function of c, so every run writes the same bytes."""
    a, b = LAYOUT.chunk_range(c)
    rng = np.random.default_rng(1000 + c)
    off = LAYOUT.token_offsets()
    n_tok = int(off[b] - off[a])
    return {
        "grads": {x.name: rng.standard_normal((b - a, x.k)).astype(np.float32)
                  for x in LAYOUT.layers},
        "example_ids": [f"doc-{i}" for i in range(a, b)],
        "n_targets": np.arange(a, b) % 7,
        "loss": rng.random(b - a),
        "token_grads": {x.name: rng.standard_normal((n_tok, x.k)).astype(np.float32)
                        for x in LAYOUT.layers},
        "token_positions": np.arange(n_tok) % 11,
    }


def write(url: str, rank: int, world: int) -> None:
    store = open_store(url, mode="r+")
    for c in store.pending_chunks(rank, world):
        store.write_chunk(c, **chunk_data(c))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("url")
    ap.add_argument("rank", type=int)
    ap.add_argument("world", type=int)
    ap.add_argument("--kill-at-setitem", type=int, default=0)
    ap.add_argument("--create", action="store_true")
    args = ap.parse_args()
    if args.create:
        create_store(args.url, LAYOUT, META)
    if args.kill_at_setitem:
        # Counted over both write paths: the store writes a chunk's arrays as concurrent
        # AsyncArray.setitem calls, and its completion marker with Array.__setitem__.
        sync_set, async_set = zarr.Array.__setitem__, zarr.AsyncArray.setitem
        count = [0]

        def tick():
            count[0] += 1
            if count[0] == args.kill_at_setitem:
                os.kill(os.getpid(), signal.SIGKILL)

        def setitem(self, key, value):
            tick()
            return sync_set(self, key, value)

        def async_setitem(self, *a, **k):
            tick()
            return async_set(self, *a, **k)

        zarr.Array.__setitem__ = setitem
        zarr.AsyncArray.setitem = async_setitem
    write(args.url, args.rank, args.world)


if __name__ == "__main__":
    main()
