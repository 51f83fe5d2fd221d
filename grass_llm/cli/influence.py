"""Commands on a finished store: fisher, query, self-influence, value."""

from __future__ import annotations

import os

import typer
from rich.table import Table

from grass_llm.cli._app import app, console, _fail


DEVICE_HELP = ("auto (this process's GPU when there is one, else the CPU), cpu, cuda or "
               "cuda:N.")
PARALLEL_HELP = ("How the model that computes the query gradients is placed: none (a full "
                 "copy on every rank, the ranks split the batches), fsdp (FSDP2 shards over "
                 "one node's ranks, HSDP across nodes) or tp (tensor parallel within a node): "
                 "the cache job's loading and sharding, for models that do not fit one "
                 "device. Under torchrun / accelerate launch only; the store's own cache "
                 "sharding is not assumed (a query run may use other machines).")
NORMALIZE_HELP = ("Score normalization, norms over all layers: none (the influence score "
                  "q~ . g), cosine (the preconditioned query and the training row each "
                  "unit-normalized, as LESS), train-unit (the training row only: per query "
                  "the ranking of cosine, as TrackStar). See docs/influence.md.")


def _check_parallel(parallel: str, precomputed: bool) -> None:
    """Refuse an unknown --parallel; say so when it is ignored (gradients read from a store)."""
    from grass_llm.influence.query import QUERY_PARALLEL

    if parallel not in QUERY_PARALLEL:
        _fail(ValueError(f"--parallel must be one of {list(QUERY_PARALLEL)}, got {parallel!r}"))
    if precomputed and parallel != "none" and os.environ.get("RANK", "0") == "0":
        console.print(f"note: --parallel {parallel} is ignored: the query gradients are read "
                      "from a store, no model runs", highlight=False)


def _progress_bar(info, label: str):
    """A rich progress bar on rank 0 (a no-op context elsewhere) and its update callback."""
    from contextlib import nullcontext

    from rich.progress import Progress

    if not info.is_main:
        return nullcontext(), None
    bar = Progress(console=console, transient=True)
    task = bar.add_task(label, total=None)
    return bar, lambda done, total: bar.update(task, total=total, completed=done)


@app.command()
def fisher(
    store: str = typer.Argument(..., help="Path or URL of a complete gradient store."),
    damping: float = typer.Option(0.1, help="Damping: a multiple of tr(F)/k per block "
                                            "(relative) or the value itself (absolute)."),
    damping_mode: str = typer.Option("relative", help="relative or absolute."),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    precision: str = typer.Option("auto", help="Gram GEMM dtype: auto (float64 on CPU and on "
                                               "GPUs with fast float64, else float32 tiles "
                                               "summed in float64), float64 or float32."),
) -> None:
    """Fit the per-layer Fisher F = (1/n) sum g g^T (summed in float64), damp it, store its
    Cholesky factors as a new fit (the previous fit stays current until the new one is
    complete), and report each block's damping and condition number. Under torchrun /
    accelerate launch the ranks split the rows, and each block is factored by one rank."""
    from grass_llm.influence import compute_fisher
    from grass_llm.influence.fisher import ILL_CONDITIONED
    from grass_llm.parallel import init_distributed
    from grass_llm.parallel.comm import RankFailure
    from grass_llm.store import StoreError, open_store

    info = init_distributed()
    bar, update = _progress_bar(info, "fisher")
    try:
        st = open_store(store, mode="r+")
        with bar:
            report = compute_fisher(st, damping=damping, mode=damping_mode, device=device,
                                    precision=precision, progress=None if update is None else
                                    lambda name, i, t: update(i, t))
    except (StoreError, ValueError, RankFailure) as err:
        _fail(err)
    if not info.is_main:
        return
    table = Table(title=f"Fisher blocks of {store} (damping {damping}, {damping_mode})")
    for col in ("layer", "lambda", "trace", "condition"):
        table.add_column(col, justify="left" if col == "layer" else "right")
    for name, r in report.items():
        table.add_row(name, f"{r['lambda']:.3e}", f"{r['trace']:.3e}", f"{r['condition']:.2e}")
    console.print(table)
    bad = [n for n, r in report.items() if r["ill_conditioned"]]
    if bad:
        console.print(f"[yellow]warning:[/yellow] {len(bad)} block(s) have condition number > "
                      f"{ILL_CONDITIONED:.0e} (e.g. {bad[0]}); consider a larger --damping")
    loose = [n for n, r in report.items() if r["condition_rel_error"] > 0.01]
    if loose:
        console.print(f"note: the condition estimate of {len(loose)} block(s) is uncertain "
                      f"by more than 1% (e.g. {loose[0]}); see `condition_rel_error` in the "
                      "fit's report")


@app.command()
def query(
    store: str = typer.Argument(..., help="Gradient store with Fisher factors."),
    queries: str = typer.Option(None, help="Query file (same formats and fields as a corpus: "
                                           "text, prompt+completion or messages), tokenized "
                                           "with the store's special tokens."),
    query_store: str = typer.Option(None, help="A store cached from the queries with the same "
                                               "config (no model needed)."),
    top_k: int = typer.Option(10, help="Training examples to report per query (and token)."),
    per_token: bool = typer.Option(False, help="Also the top-k of each query token "
                                               "(token-level influence), in the same pass."),
    token_mode: str = typer.Option("loss", help="Per-token rows: loss (each target token's "
                                                "own loss gradient) or position (each "
                                                "position's term of the query gradient)."),
    out: str = typer.Option("influence.jsonl", help="Output JSONL, one line per query."),
    matrix: str = typer.Option(None, help="Also write the full [queries, n] score matrix to "
                                          "this Zarr array path."),
    model: str = typer.Option(None, help="Model path, if it moved since the store was made "
                                         "(it must be the same weights)."),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    max_tokens: int = typer.Option(None, help="Padded tokens per query forward/backward "
                                              "(default: the store's max_tokens)."),
    normalize: str = typer.Option("none", help=NORMALIZE_HELP),
    train_tokens: bool = typer.Option(False, help="Also the score of each token of each top-k "
                                                  "training example (they add up to its "
                                                  "score); needs a store cached with "
                                                  "token_mode."),
    parallel: str = typer.Option("none", help=PARALLEL_HELP),
) -> None:
    """Top-k most influential training examples for each query (and each query token), in one
    pass over the store. Under torchrun / accelerate launch the ranks split the query batches
    (with --parallel fsdp|tp over a sharded model), the layers' solves and the store's row
    chunks; rank 0 writes the results."""
    from grass_llm.influence.cli_query import run_query
    from grass_llm.parallel import init_distributed
    from grass_llm.parallel.comm import RankFailure
    from grass_llm.store import StoreError

    _check_parallel(parallel, query_store is not None)
    info = init_distributed()
    bar, update = _progress_bar(info, "scoring")
    try:
        with bar:
            run_query(console, store, queries=queries, query_store=query_store, top_k=top_k,
                      per_token=per_token, token_mode=token_mode, out=out, matrix=matrix,
                      model=model, device=device, max_tokens=max_tokens, normalize=normalize,
                      train_tokens=train_tokens, parallel=parallel, progress=update)
    except (StoreError, ValueError, FileNotFoundError, RankFailure) as err:
        _fail(err)


@app.command("self-influence")
def self_influence_cmd(
    store: str = typer.Argument(..., help="Gradient store with Fisher factors."),
    out: str = typer.Option("self_influence.jsonl", help="Output JSONL, one line per example."),
    show: int = typer.Option(10, help="Print the examples with the highest self-influence."),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    normalize: str = typer.Option("none", help="none: s(i, i) = g^T H^-1 g; train-unit: "
                                               "s(i, i) / ||g||^2, the self-influence of the "
                                               "unit-normalized row (its direction, not its "
                                               "magnitude). cosine is refused: an example's "
                                               "cosine with itself is 1."),
) -> None:
    """s(i, i) for every training example: high values flag outliers and mislabeled data.
    Under torchrun / accelerate launch the ranks split the row chunks."""
    from grass_llm.influence import self_influence
    from grass_llm.influence.cli_query import write_ranked
    from grass_llm.parallel import init_distributed
    from grass_llm.parallel.comm import RankFailure
    from grass_llm.store import StoreError, open_store

    info = init_distributed()
    bar, update = _progress_bar(info, "self-influence")
    try:
        st = open_store(store)
        with bar:
            scores = self_influence(st, normalize=normalize, device=device, progress=update)
    except (StoreError, ValueError, RankFailure) as err:
        _fail(err)
    if not info.is_main:
        return
    write_ranked(console, st, scores, out, key="self_influence", ranked=False, show=show,
                 title=f"highest self-influence ({normalize}) of {len(scores):,} examples (all "
                       f"in {out})")


@app.command()
def value(
    store: str = typer.Argument(..., help="Gradient store with Fisher factors."),
    targets: str = typer.Option(None, help="Target set file (corpus format), tokenized with "
                                           "the store's special tokens."),
    target_store: str = typer.Option(None, help="A store cached from the targets."),
    select: float = typer.Option(None, help="Write this top fraction (0-1] of the training "
                                            "set as a corpus (see --select-format)."),
    out: str = typer.Option("values.jsonl", help="Output JSONL, ranked, one line per example."),
    select_out: str = typer.Option(None, help="Where --select writes (default: selected.<the "
                                              "format's suffix>, a folder for hf)."),
    select_format: str = typer.Option("auto", help="auto (the corpus's own format: JSONL, "
                                                   "JSON, Parquet, text, a text folder or a "
                                                   "saved dataset, records as they are), "
                                                   "jsonl, parquet, hf (a datasets dataset, "
                                                   "save_to_disk) or ids (one id a line)."),
    model: str = typer.Option(None, help="Model path, if it moved since the store was made."),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    normalize: str = typer.Option("none", help=NORMALIZE_HELP + " cosine gives every target "
                                               "the same weight."),
    parallel: str = typer.Option("none", help=PARALLEL_HELP),
) -> None:
    """Data valuation: each training example's total influence on a target set, ranked; with
    --select, the best fraction written as a training corpus. Under torchrun / accelerate
    launch the ranks split the target batches (with --parallel fsdp|tp over a sharded model)
    and the row chunks."""
    from grass_llm.influence import from_file, from_store, valuation
    from grass_llm.influence.cli_query import write_ranked
    from grass_llm.influence.select import SELECT_FORMATS, default_out, write_selection
    from grass_llm.parallel import init_distributed
    from grass_llm.parallel.comm import RankFailure
    from grass_llm.store import StoreError, open_store

    if (targets is None) == (target_store is None):
        _fail(ValueError("give exactly one of --targets or --target-store"))
    if select is not None and not 0 < select <= 1:
        _fail(ValueError(f"--select must be in (0, 1], got {select}"))
    if select_format not in SELECT_FORMATS:
        _fail(ValueError(f"--select-format must be one of {list(SELECT_FORMATS)}, got "
                         f"{select_format!r}"))
    _check_parallel(parallel, target_store is not None)
    info = init_distributed()
    bar, update = _progress_bar(info, "valuation")
    try:
        st = open_store(store)
        q = (from_store(st, open_store(target_store)) if target_store
             else from_file(st, targets, model_path=model, device=device, parallel=parallel))
        with bar:
            values = valuation(st, q.grads, normalize=normalize, device=device,
                               progress=update)
    except (StoreError, ValueError, FileNotFoundError, RankFailure) as err:
        _fail(err)
    if not info.is_main:
        return
    order = write_ranked(console, st, values, out, key="value", ranked=True, show=0)
    msg = f"valued {len(values):,} examples against {len(q.ids)} target(s) ({normalize}): {out}"
    if select is not None:
        n_sel = max(1, int(round(select * len(values))))
        try:
            sel = write_selection(st, order[:n_sel], select_out or default_out(st, select_format),
                                  select_format)
        except (StoreError, ValueError) as err:
            _fail(err)
        msg += (f"; top {sel.rows} examples ({sel.records} records) written as "
                f"{sel.format} to {sel.path}")
    console.print(msg, highlight=False, soft_wrap=True)
