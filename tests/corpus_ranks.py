"""``python -m torch.distributed.run --nproc-per-node 2 -m tests.corpus_ranks OUT GOOD BAD
CACHE``: every rank calls ``TokenizedCorpus.open_or_build`` on GOOD, then on BAD (a corpus with
a bad record), under the strict collectives of ``tests/strict_dist.py``; each writes what it
saw to ``OUT/rank<r>.json`` (for tests/test_corpus.py)."""

from tests import strict_dist

strict_dist.install()

import json  # noqa: E402  (after the patch, on purpose)
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

from grass_llm.data import corpus  # noqa: E402
from grass_llm.parallel.dist import init_distributed, shutdown  # noqa: E402
from tests.test_data import make_tokenizer  # noqa: E402


def main(out: str, good: str, bad: str, cache: str) -> None:
    info = init_distributed()
    builds = []
    original = corpus.build

    def counted(*args, **kwargs):
        builds.append(1)
        return original(*args, **kwargs)

    corpus.build = counted
    tok = make_tokenizer()
    c = corpus.TokenizedCorpus.open_or_build(good, tok, max_length=6, overflow="chunk",
                                             cache_dir=cache, progress=False)
    seen = {"rank": info.rank, "builds": len(builds), "path": str(c.path),
            "fingerprint": c.fingerprint,
            "examples": [[e.id, e.input_ids, e.labels, e.location]
                         for e in c.examples(range(len(c)))]}
    try:
        corpus.TokenizedCorpus.open_or_build(bad, tok, max_length=6, cache_dir=cache,
                                             progress=False)
    except Exception as err:  # noqa: BLE001 - the test checks which one each rank gets
        seen["error"] = [type(err).__name__, str(err)]
    Path(out, f"rank{info.rank}.json").write_text(json.dumps(seen))
    shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:5])
