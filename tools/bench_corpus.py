"""Benchmark: the tokenized corpus cache (``TokenizedCorpus.open_or_build``) against the old
path (``read_records`` + ``tokenize_records`` + ``dataset_fingerprint`` on every rank).

For each corpus size (synthetic JSON Lines, ~30 tokens per document with the SmolLM2
tokenizer, 4 in 5 plain text and 1 in 5 prompt/completion) and each number of ranks, it starts
fresh rank processes (``torch.distributed.run``, gloo) and measures per rank the seconds of
``open_or_build`` cold (empty cache) and on resume (cache present), and the peak host RSS of
the rank process and of its tokenizing workers; the old path is measured at the sizes where it
fits in memory (``--old-max``). With ``--first-step`` it also runs the real ``grass-llm cache``
job (SmolLM2-135M; FSDP2 when there are 2 ranks) on the corpus and measures, per rank, the
seconds from the rank's start to the start of its first step and its peak RSS until then, cold (no
corpus cache, no store) and resumed. Seconds on a shared machine are noisy; peak RSS is not.
Prints a markdown table.

Peak RSS is each process's own ``VmHWM`` (/proc/<pid>/status), not ``ru_maxrss``: Linux
carries into ``ru_maxrss`` the high-water mark of the image a process had before ``exec``,
i.e. that of its parent at ``fork``, so every spawned worker (and every rank, started by
torchrun) would report at least its parent's peak. Workers are sampled by a thread of their
rank every 0.2 s while they live (VmHWM only grows, so the last sample is their peak to within
that interval).

    python tools/bench_corpus.py --sizes 100000,1000000,5000000 --ranks 1,2

Heavy imports live inside functions: the tokenizing workers are spawned processes that import
this file again.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORDS = ("the of and to in is was for on that with as by at from his her an which or be are "
         "were this had not but have it one all they been their there has would who when more "
         "city river water light planet moon language number system people world history "
         "music animal plant country school house century found known called used made "
         "between during after before under against around through").split()


def _hwm_mb(pid="self") -> float:
    """Peak RSS (MiB) of one process image: VmHWM (see the module docstring)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 if pid == "self" else 0.0


class _ChildPeaks(threading.Thread):
    """Samples the VmHWM of this process's children (the tokenizing workers)."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak, self._done = 0.0, threading.Event()

    def run(self) -> None:
        me = str(os.getpid())
        while not self._done.wait(0.2):
            for entry in os.listdir("/proc"):
                try:
                    with open(f"/proc/{entry}/stat") as f:
                        ppid = f.read().rsplit(")", 1)[1].split()[1]
                except (OSError, IndexError):
                    continue
                if ppid == me:
                    self.peak = max(self.peak, _hwm_mb(entry))

    def stop(self) -> float:
        self._done.set()
        self.join()
        return self.peak


def _load_tokenizer(name: str):
    if name == "byte":
        from grass_llm.models import byte_tokenizer

        return byte_tokenizer()
    from grass_llm.models import cache_root

    folder = cache_root() / "smollm2-135m-instruct"
    if (folder / "tokenizer.json").is_file():
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(folder)
    from grass_llm.models import load_smollm2

    return load_smollm2()[1]


def make_corpus(path: Path, n: int, seed: int = 0) -> None:
    """``n`` short documents as JSON Lines (22..26 words, ~30 SmolLM2 tokens)."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            words = rng.choices(WORDS, k=rng.randint(22, 26))
            if i % 5 == 4:
                row = {"id": f"doc-{i}", "prompt": " ".join(words[:10]) + "?",
                       "completion": " " + " ".join(words[10:]) + "."}
            else:
                row = {"id": f"doc-{i}", "text": " ".join(words).capitalize() + "."}
            f.write(json.dumps(row) + "\n")


class _FirstStep(Exception):
    """Raised at the cache job's first step: what the first-step job measures ends there."""


def first_step_job(args, t_start: float) -> dict:
    """One rank of ``grass-llm cache`` (SmolLM2-135M, FSDP2 over the ranks) on the corpus, up
    to the start of its first step (everything before the loop: model, corpus, identities,
    store, sharding, plan): seconds since the rank started and its peak RSS until then (the
    step's own activations are the model's, not the corpus')."""
    from grass_llm import cache_loop
    from grass_llm.config import RunConfig
    from grass_llm.parallel import comm
    from grass_llm.runner import run_cache

    mark = {}

    def first(self, cap, idx):
        mark["seconds"], mark["rss"] = time.perf_counter() - t_start, _hwm_mb()
        raise _FirstStep

    cache_loop.CacheLoop._compute = first
    ranks = int(os.environ.get("WORLD_SIZE", "1"))
    cfg = RunConfig(model="smollm2", data=args.data, out=str(Path(args.cache) / "store.zarr"),
                    compressor="factgrass:k=256,k_in=16,k_out=16", max_length=args.max_length,
                    max_tokens=max(2048, args.max_length), chunk_rows=1024,
                    parallel="fsdp" if ranks > 1 else "none")
    try:
        run_cache(cfg, progress=False)
    except _FirstStep:
        pass
    comm.barrier()
    return {"rank": comm.rank(), "seconds": mark["seconds"], "rss_mb": mark["rss"],
            "base_rss_mb": 0.0, "workers_rss_mb": 0.0, "n": 0, "tokens": 0}


def rank_job(args) -> None:
    """One rank: the measurement named by ``args.job``; writes ``rank<r>.json``."""
    t_start = time.perf_counter()
    if args.job == "first-step":
        out = first_step_job(args, t_start)
        Path(args.out, f"rank{out['rank']}.json").write_text(json.dumps(out))
        return
    from grass_llm.parallel import comm
    from grass_llm.parallel.dist import init_distributed

    info = init_distributed(timeout_s=6 * 3600)  # rank 1 waits out rank 0's cold build
    tok = _load_tokenizer(args.tokenizer)
    base = _hwm_mb()
    children = _ChildPeaks()
    children.start()
    t0 = time.perf_counter()
    if args.job == "old":
        from grass_llm.data import read_records, tokenize_records
        from grass_llm.store.identity import dataset_fingerprint

        read = read_records(args.data)
        toks = tokenize_records(read.records, tok, max_length=args.max_length)
        n = len(toks.examples)
        tokens = sum(len(e.input_ids) for e in toks.examples)
        if info.is_main:
            dataset_fingerprint((e.id, e.input_ids, e.labels) for e in toks.examples)
    else:
        from grass_llm.data.corpus import TokenizedCorpus

        corpus = TokenizedCorpus.open_or_build(args.data, tok, max_length=args.max_length,
                                               cache_dir=args.cache, num_proc=args.num_proc,
                                               progress=False)
        n, tokens = corpus.n_examples, corpus.n_tokens
        corpus.example(n // 2)  # a read through the maps
    seconds = time.perf_counter() - t0
    workers = children.stop()
    comm.barrier()
    out = {"rank": info.rank, "seconds": seconds, "rss_mb": _hwm_mb(), "base_rss_mb": base,
           "workers_rss_mb": workers, "n": n, "tokens": tokens}
    Path(args.out, f"rank{info.rank}.json").write_text(json.dumps(out))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(job: str, ranks: int, data: Path, cache: Path, args) -> list[dict]:
    out = Path(tempfile.mkdtemp(prefix="bench_corpus_out"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks),
           "--master-port", str(_free_port()), __file__, "--rank-job", job, "--data", str(data),
           "--cache", str(cache), "--out", str(out), "--tokenizer", args.tokenizer,
           "--max-length", str(args.max_length)]
    if args.num_proc:
        cmd += ["--num-proc", str(args.num_proc)]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    if job == "first-step":  # the job's caches (corpus, store) in ``cache``; the model's shared
        env["GRASS_LLM_CACHE"] = str(cache)
        _link_model_cache(cache)
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{job} with {ranks} ranks failed:\n{done.stdout}\n{done.stderr}")
    results = [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(ranks)]
    shutil.rmtree(out)
    return results


def _link_model_cache(cache: Path) -> None:
    """The converted SmolLM2 (from the usual cache root) visible under ``cache`` too, so that a
    cold first-step run rebuilds the corpus cache, not the model conversion."""
    from grass_llm.models import cache_root, load_smollm2

    src = cache_root() / "smollm2-135m-instruct"
    if not (src / "config.json").is_file():
        load_smollm2()
    cache.mkdir(parents=True, exist_ok=True)
    link = cache / "smollm2-135m-instruct"
    if not link.exists():
        link.symlink_to(src, target_is_directory=True)


def _row(size: int, ranks: int, what: str, results: list[dict]) -> str:
    def per_rank(key, fmt="{:.0f}"):
        return " / ".join(fmt.format(r[key]) for r in results)

    tokens = f"{results[0]['tokens']:,}" if results[0]["tokens"] else "—"
    return (f"| {size:,} | {tokens} | {ranks} | {what} | "
            f"{per_rank('seconds', '{:.1f}')} | {per_rank('rss_mb')} | "
            f"{per_rank('base_rss_mb')} | {results[0]['workers_rss_mb']:.0f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="100000,1000000,5000000",
                   help="documents per corpus, comma-separated")
    p.add_argument("--ranks", default="1,2", help="numbers of ranks, comma-separated")
    p.add_argument("--old-max", type=int, default=1_000_000,
                   help="largest size at which to run the old path too")
    p.add_argument("--tokenizer", default="smollm2", choices=("smollm2", "byte"))
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--num-proc", type=int, default=None,
                   help="tokenizing processes (default: every core)")
    p.add_argument("--first-step", action="store_true",
                   help="also time the whole `grass-llm cache` job (SmolLM2-135M, FSDP2 over "
                        "the ranks, the real runner) from rank start to the end of its first "
                        "step, cold (no corpus cache, no store) and resumed")
    p.add_argument("--workdir", default=None, help="where corpora and caches go (default: a "
                   "temporary folder, removed at the end)")
    p.add_argument("--rank-job", default=None, help=argparse.SUPPRESS)
    p.add_argument("--data", default=None, help=argparse.SUPPRESS)
    p.add_argument("--cache", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.rank_job:
        args.job = args.rank_job
        rank_job(args)
        return
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_corpus"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"cores: {len(os.sched_getaffinity(0))}; tokenizer: {args.tokenizer}; seconds are "
          "wall-clock of the call (noisy on a shared machine), RSS is the peak per process",
          flush=True)
    rows = ["| docs | tokens | ranks | path | seconds (per rank) | peak RSS MiB (per rank) | "
            "RSS before the call MiB | workers' peak RSS MiB |", "|---" * 8 + "|"]
    try:
        for size in (int(float(s)) for s in args.sizes.split(",")):
            data = work / f"corpus_{size}.jsonl"
            if not data.exists():
                make_corpus(data, size)
            for ranks in (int(r) for r in args.ranks.split(",")):
                cache = work / f"cache_{size}_{ranks}"
                shutil.rmtree(cache, ignore_errors=True)
                jobs = (("cache, cold", "corpus"), ("cache, resume", "corpus")) + (
                    (("old path", "old"),) if size <= args.old_max else ())
                if args.first_step:
                    jobs += (("cache job until its 1st step, cold", "first-step"),
                             ("cache job until its 1st step, resume", "first-step"))
                for what, job in jobs:
                    if what.endswith("1st step, cold"):
                        shutil.rmtree(cache, ignore_errors=True)
                    rows.append(_row(size, ranks, what, launch(job, ranks, data, cache, args)))
                    print(rows[-1], flush=True)
                shutil.rmtree(cache, ignore_errors=True)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
