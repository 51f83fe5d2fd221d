"""``torchrun ... -m tests.query_ranks STORE QUERIES PARALLEL MAX_TOKENS OUT_PT -- CLI ARGS``:
on every rank (strict collectives, ``tests/strict_dist.py``), the query gradients of QUERIES
with ``from_file(..., parallel=PARALLEL)``, example-level plus per-token rows of both token
modes; rank 0 saves them to OUT_PT (for tests/test_query_sharded.py). Then the grass-llm
command CLI ARGS (e.g. ``query ... --parallel PARALLEL``) in the same processes."""

import sys

from tests import strict_dist

strict_dist.install()

import torch  # noqa: E402

from grass_llm.cli import app  # noqa: E402
from grass_llm.influence import from_file  # noqa: E402
from grass_llm.parallel import comm  # noqa: E402
from grass_llm.store import open_store  # noqa: E402


def main(store_url: str, queries: str, parallel: str, max_tokens: str, out: str,
         cli: list[str]) -> int:
    store = open_store(store_url)
    got = {}
    for mode in ("position", "loss"):
        q = from_file(store, queries, per_token=True, token_mode=mode, parallel=parallel,
                      max_tokens=int(max_tokens))
        got[mode] = {"ids": q.ids, "grads": q.grads, "tokens": q.tokens,
                     "offsets": torch.from_numpy(q.offsets),
                     "positions": torch.from_numpy(q.positions), "texts": q.token_texts}
    if comm.rank() == 0:
        torch.save(got, out)
    return int(app(cli, prog_name="grass-llm", standalone_mode=False) or 0)


if __name__ == "__main__":
    sep = sys.argv.index("--")
    sys.exit(main(*sys.argv[1:sep], sys.argv[sep + 1:]))
