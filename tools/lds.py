"""Attribution quality: the linear datamodeling score (LDS) of every compressor, as the GraSS
paper measures it, on a tiny Llama trained here on a generated fact corpus.

Trains the full model and M models on random 50% subsets (same recipe and initialization),
then scores each method's attributions from the full model against the subset models' query
losses (Spearman per query over the M subsets, mean over queries; higher is better). The logic
lives in ``grass_llm.evaluation``; see docs/lds.md for the results and their discussion.

Usage::

    OMP_NUM_THREADS=1 python tools/lds.py --out lds.json           # the full run (docs/lds.md)
    python tools/lds.py --subsets 8 --methods exact,factgrass --k 256   # a quick look
    OMP_NUM_THREADS=1 python tools/lds.py --methods factgrass,factgrass_sm   # selective mask
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import re
import sys
import time

import torch
from rich.console import Console
from rich.table import Table
from tqdm import tqdm

import grass_llm
from grass_llm.evaluation.corpus import RELATIONS, CorpusConfig
from grass_llm.evaluation.lds import (
    METHODS,
    LDSConfig,
    Score,
    check_methods,
    paired_difference,
    run,
)
from grass_llm.evaluation.train import TrainConfig

LABELS = {"exact": "exact (identity)", "factgrass": "FactGraSS",
          "factgrass_sm": "FactGraSS, selective mask", "logra": "LoGra",
          "grass": "GraSS", "sjlt": "SJLT", "mask": "random mask", "gaussian": "Gaussian"}


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated methods")
    ap.add_argument("--k", default="256,1024,4096", help="comma-separated numbers per layer")
    ap.add_argument("--subsets", type=int, default=50, help="M, retrained subset models")
    ap.add_argument("--fraction", type=float, default=0.5, help="share of data per subset")
    ap.add_argument("--people", type=int, default=200, help="people in the generated corpus")
    ap.add_argument("--relations", default=",".join(RELATIONS), help="topics to use")
    ap.add_argument("--queries", type=int, default=None, help="queries (default: every fact)")
    ap.add_argument("--corpus-seed", type=int, default=0, help="seed of the generated corpus")
    ap.add_argument("--hidden", type=int, default=64, help="model width")
    ap.add_argument("--intermediate", type=int, default=128, help="MLP width")
    ap.add_argument("--layers", type=int, default=2, help="decoder blocks")
    ap.add_argument("--epochs", type=int, default=20, help="training epochs (full and subsets)")
    ap.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate")
    ap.add_argument("--damping", type=float, default=0.1, help="relative Fisher damping")
    ap.add_argument("--seed", type=int, default=1, help="seed of the subsets and batch orders")
    ap.add_argument("--mask-train", type=int, default=128,
                    help="factgrass_sm: training examples on the train side of the mask fit")
    ap.add_argument("--mask-targets", type=int, default=64,
                    help="factgrass_sm: other training examples (query form) as its targets")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--out", help="write the raw report (per-query values too) as JSON here")
    ap.add_argument("--markdown", action="store_true", help="also print a Markdown table")
    return ap.parse_args(argv)


def _int_list(text: str, what: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--{what} must be comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise ValueError(f"--{what} needs at least one positive integer, got {text!r}")
    return values


def build_config(args: argparse.Namespace) -> tuple[LDSConfig, list[str], list[int]]:
    """The evaluation config, methods and k values; ValueError with a message on bad input."""
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    ks = _int_list(args.k, "k")
    check_methods(methods, ks)
    corpus = CorpusConfig(n_people=args.people, n_queries=args.queries, seed=args.corpus_seed,
                          relations=tuple(r.strip() for r in args.relations.split(",")))
    train = TrainConfig(hidden_size=args.hidden, intermediate_size=args.intermediate,
                        num_layers=args.layers, epochs=args.epochs, lr=args.lr)
    cfg = LDSConfig(corpus=corpus, train=train, n_subsets=args.subsets, fraction=args.fraction,
                    subset_seed=args.seed, damping=args.damping, mask_train=args.mask_train,
                    mask_targets=args.mask_targets)
    return cfg, methods, ks


def _cell(row: dict) -> str:
    if "skipped" in row:
        return "skipped"
    return f"{row['lds']:.3f} ± {row['se']:.3f}"


def _grid(report: dict, ks: list[int]) -> list[tuple[str, list[str]]]:
    """``(method label, one cell per k)``; exact has one value, shown under every k."""
    out = []
    for method in dict.fromkeys(r["method"] for r in report["rows"]):
        rows = {r["k"]: r for r in report["rows"] if r["method"] == method}
        cells = [_cell(rows[None]) if None in rows else _cell(rows[k]) for k in ks]
        out.append((LABELS[method], cells))
    for name, ref in report["references"].items():
        label = {"random": "random scores (baseline)",
                 "fact_match": "fact match (no gradients; reference)"}[name]
        out.append((label, [f"{ref['lds']:.3f} ± {ref['se']:.3f}"] * len(ks)))
    return out


def _notes(report: dict) -> list[str]:
    """Every clipping or skip, once per (method, k, layer shape)."""
    notes = []
    for r in report["rows"]:
        k = "" if r["k"] is None else f" k={r['k']}"
        if "skipped" in r:
            notes.append(f"{r['method']}{k}: skipped: {r['skipped']}")
        if "mask" in r:
            notes.append(f"{r['method']}{k}: mask objective on the calibration set, mean over "
                         f"{len(r['mask']['per_layer'])} layers: learned "
                         f"{r['mask']['learned']:.3f}, random {r['mask']['random']:.3f}")
        for lay in r["layers"]:
            if lay["note"]:
                shape = "x".join(map(str, lay["shape"]))
                notes.append(f"{r['method']}{k}, {lay['n_layers']} layer(s) {shape}: "
                             f"{lay['note']} -> {lay['spec']}")
    return notes


def _score(row: dict) -> Score:
    return Score(row["lds"], row["se"], row["n_valid"], row["per_query"])


def _pairs(report: dict, ks: list[int]) -> list[str]:
    """Paired per-query differences behind the paper's claims (FactGraSS vs LoGra, ...)."""
    rows = {(r["method"], r["k"]): r for r in report["rows"] if "lds" in r}
    out = []
    for a, b in (("factgrass", "logra"), ("factgrass_sm", "factgrass"), ("sjlt", "gaussian"), ("mask", "gaussian"),
                 ("grass", "sjlt"), ("factgrass", "exact"), ("logra", "exact")):
        for k in ks:
            kb = None if b == "exact" else k
            if (a, k) in rows and (b, kb) in rows:
                d, se = paired_difference(_score(rows[a, k]), _score(rows[b, kb]))
                out.append(f"{a} - {b} at k={k}: {d:+.3f} ± {se:.3f} (paired over queries)")
    return out


def show(report: dict, ks: list[int], markdown: bool) -> None:
    console = Console()
    table = Table(title="LDS (mean Spearman over queries ± standard error)")
    table.add_column("method")
    for k in ks:
        table.add_column(f"k={k}", justify="right")
    grid = _grid(report, ks)
    for label, cells in grid:
        table.add_row(label, *cells)
    console.print(table)
    for line in _notes(report) + _pairs(report, ks):
        console.print(f"  {line}", highlight=False)
    if markdown:
        print("\n| method | " + " | ".join(f"k={k}" for k in ks) + " |")
        print("|---|" + "---:|" * len(ks))
        for label, cells in grid:
            print(f"| {label} | " + " | ".join(cells) + " |")


def _track(items, desc: str):
    """tqdm progress; (method, k) items are named in the bar while they run."""
    bar = tqdm(items, desc=desc, leave=False, dynamic_ncols=True)
    for item in bar:
        if isinstance(item, tuple):
            bar.set_postfix_str(item[0] + ("" if item[1] is None else f" k={item[1]}"))
        yield item


def _dump(report: dict, path: str) -> None:
    """JSON with one line per number list (per-query values), not one line per number."""
    text = json.dumps(report, indent=1)
    text = re.sub(r"\[\s+([-0-9.eE,\snul]+?)\s+\]",
                  lambda m: "[" + " ".join(m.group(1).split()) + "]", text)
    with open(path, "w") as f:
        f.write(text + "\n")


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        return platform.machine()


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg, methods, ks = build_config(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    report = run(cfg, methods, ks, track=_track)
    report["wall_seconds"] = time.perf_counter() - t0
    report["environment"] = {
        "command": " ".join(["python", "tools/lds.py", *(argv if argv is not None
                                                         else sys.argv[1:])]),
        "grass_llm": grass_llm.__version__, "torch": torch.__version__,
        "python": platform.python_version(), "cpu": _cpu_name(), "cores": os.cpu_count(),
        "threads": torch.get_num_threads()}
    report["config"] = dataclasses.asdict(cfg)
    show(report, ks, args.markdown)
    gt = report["ground_truth"]
    print(f"\n{gt['n_train']} training examples, {gt['n_queries']} queries, vocabulary "
          f"{gt['vocab']}, {gt['n_params']:,} parameters; mean query loss "
          f"{gt['full_model_query_loss']:.3f} (full model), {gt['subset_query_loss']:.3f} "
          f"(subset models); training {gt['train_seconds']:.0f} s, total "
          f"{report['wall_seconds']:.0f} s")
    if args.out:
        _dump(report, args.out)
        print(f"report written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
