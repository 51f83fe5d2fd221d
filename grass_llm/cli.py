"""The ``grass-llm`` command line."""

from __future__ import annotations

import inspect

import typer
from rich.console import Console
from rich.table import Table

import grass_llm

app = typer.Typer(
    name="grass-llm",
    help="Scalable data attribution for LLMs with GraSS / FactGraSS gradient compression.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()


def _fail(err: Exception) -> None:
    """A user-facing error: one line, exit code 2."""
    console.print(f"[red]error:[/red] {err}", highlight=False, soft_wrap=True)
    raise typer.Exit(2) from err


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:,.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:,.1f} TiB"


def _version(value: bool) -> None:
    if value:
        console.print(f"grass-llm {grass_llm.__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    """Scalable data attribution for LLMs with GraSS / FactGraSS gradient compression."""


@app.command()
def compressors() -> None:
    """List the registered compressors, their kind and the parameters a spec string takes."""
    from grass_llm.compress.registry import (
        _CONTEXT_ARGS,
        available_compressors,
        compressor_class,
    )

    table = Table(title="compressors (spec: NAME:key=value,...)")
    for col in ("name", "kind", "spec parameters", "description"):
        table.add_column(col)
    for name, kind in available_compressors().items():
        cls = compressor_class(name)
        sig = inspect.signature(cls.__init__)
        params = [f"{n}={p.default}" if p.default is not inspect.Parameter.empty else n
                  for n, p in sig.parameters.items() if n not in _CONTEXT_ARGS | {"self"}]
        doc = (cls.__doc__ or "").strip().splitlines()[0].replace("``", "")
        table.add_row(name, kind, ", ".join(params), doc)
    console.print(table)


@app.command()
def example(
    d_in: int = typer.Option(512, help="Input features of the compressed Linear layer."),
    d_out: int = typer.Option(256, help="Output features of the compressed Linear layer."),
    tokens: int = typer.Option(16, help="Tokens per example."),
    n_train: int = typer.Option(256, help="Training examples."),
    n_test: int = typer.Option(16, help="Test (query) examples."),
    k: int = typer.Option(1024, help="Compressed size for every method (a perfect square)."),
    seed: int = typer.Option(0, help="Seed for the data and every compressor."),
) -> None:
    """Compress real per-example gradients of a small model with every method, and score them.

    Builds a two-layer token classifier, computes exact per-example gradients of its hidden
    Linear layer, compresses them with FactGraSS, LoGra, GraSS, SJLT, FJLT, Gaussian and a random
    mask, and reports how well compressed train-test inner products track the exact ones.
    """
    from grass_llm.example import ExampleConfig, run_example

    try:
        cfg = ExampleConfig(d_in=d_in, d_out=d_out, tokens=tokens, n_train=n_train,
                            n_test=n_test, k=k, seed=seed)
    except ValueError as err:
        raise typer.BadParameter(str(err)) from err
    with console.status("compressing") as status:
        results, t_mat = run_example(cfg, progress=lambda m: status.update(f"compressing: {m}"))
    table = Table(title=f"{n_train} train x {n_test} test examples, {tokens} tokens, "
                        f"layer {d_in}->{d_out} (p={d_in * d_out:,}), k={k}")
    for col in ("method", "spec", "needs G", "Pearson r (IP)", "top-10 recall", "us/example"):
        table.add_column(col, justify="right" if col not in ("method", "spec") else "left")
    for r in results:
        table.add_row(r.method, r.spec, "yes" if r.materializes else "no", f"{r.pearson:.3f}",
                      f"{r.top10_recall:.2f}", f"{r.us_per_example:,.1f}")
    console.print(table)
    console.print(f"Materializing exact per-example gradients alone costs {t_mat:,.1f} us/example "
                  "(included in the 'needs G' rows).\nPearson r compares compressed and exact "
                  "train-test gradient inner products; top-10 recall is the share of each test "
                  "example's exact top-10 training examples that the method also ranks top-10.")
    console.print("Next: `grass-llm compressors` lists every method and its spec parameters.")


@app.command()
def demo(
    out_dir: str = typer.Option("grass-llm-demo", help="Where the store and report go."),
    compressor: str = typer.Option("factgrass:k=256,k_in=32,k_out=32",
                                   help="Compressor spec for every layer."),
    top_k: int = typer.Option(5, help="Training documents shown per query."),
) -> None:
    """Attribution on a real model, offline: SmolLM2-135M-Instruct on a shipped corpus of 258
    documents, five prompt+response queries, token-level influence, an HTML report."""
    from grass_llm.models import smollm2_gguf_path
    from grass_llm.store import StoreError

    try:
        smollm2_gguf_path()
        from grass_llm.demo import run_demo

        path = run_demo(out_dir, compressor=compressor, top_k=top_k,
                        say=lambda m: console.print(m, highlight=False, soft_wrap=True))
    except (FileNotFoundError, ValueError, StoreError) as err:
        _fail(err)
    console.print(f"\n[bold]report:[/bold] {path.resolve()}  (open it in a browser)",
                  soft_wrap=True)
    console.print("next: grass-llm info " + f"{out_dir}/store.zarr" + "  |  grass-llm "
                  "self-influence " + f"{out_dir}/store.zarr" + "  |  your own data: "
                  "grass-llm cache --config configs/smollm2-demo.yaml --set data=my.jsonl",
                  highlight=False, soft_wrap=True)


@app.command(context_settings={"help_option_names": ["-h", "--help"]})
def cache(
    config: str = typer.Option(None, "--config", "-c",
                               help="YAML run config (see configs/ and `grass-llm config-help`)."),
    set_: list[str] = typer.Option([], "--set", "-s", metavar="KEY=VALUE",
                                   help="Override a config field (repeatable), e.g. "
                                        "--set out=cache.zarr --set parallel=fsdp."),
    overwrite: bool = typer.Option(False, help="Replace a store of a different run at `out`."),
    quiet: bool = typer.Option(False, help="No progress bar."),
) -> None:
    """Cache compressed gradients of a corpus into a store (resumes an interrupted run).

    Runs single-process, or under `accelerate launch --config_file launch/X.yaml -m grass_llm
    cache ...` / `torchrun --nproc-per-node N -m grass_llm cache ...` with the sharding of the
    config's `parallel` field (none, fsdp, deepspeed, tp).
    """
    from grass_llm.config import load_config
    from grass_llm.parallel.comm import RankFailure
    from grass_llm.runner import run_cache
    from grass_llm.store import StoreError

    try:
        cfg = load_config(config, list(set_) + (["overwrite=true"] if overwrite else []))
        summary = run_cache(cfg, progress=not quiet)
    except (ValueError, StoreError, OSError, RankFailure) as err:
        _fail(err)
    import os

    if int(os.environ.get("RANK", "0")) == 0:
        console.print(
            f"cached {summary.examples:,} examples ({summary.tokens:,} tokens this run) into "
            f"{summary.store}: {summary.chunks_written} chunk(s) written, "
            f"{summary.chunks_total} in the store, {summary.skipped} record(s) skipped, "
            f"{summary.seconds:,.1f} s, {summary.tokens_per_s:,.0f} tokens/s"
            + (f", store {_human_bytes(summary.store_bytes)}"
               if summary.store_bytes is not None else ""),
            highlight=False, soft_wrap=True)


@app.command("fit-mask")
def fit_mask(
    model: str = typer.Option(..., help="Model (as in a run config: directory, .gguf, smollm2, "
                                        "tiny:<family>)."),
    data: str = typer.Option(..., help="Training corpus: the train side of the calibration."),
    targets: str = typer.Option(..., help="Target examples (a held-out split, not the "
                                          "evaluation queries): the target side."),
    out: str = typer.Option(..., help="Mask file to write (.safetensors)."),
    compressor: str = typer.Option("factgrass:k=4096,k_in=128,k_out=128",
                                   help="The FactGraSS spec the mask is for (k_in, k_out)."),
    layers: list[str] = typer.Option(None, help="Layer name patterns (repeatable); default "
                                                "every Linear in the decoder."),
    exclude: list[str] = typer.Option([], help="Layer name patterns to leave out."),
    n_train: int = typer.Option(64, help="Calibration training examples (seeded sample)."),
    n_targets: int = typer.Option(32, help="Calibration target examples (seeded sample)."),
    seed: int = typer.Option(0, help="The run's global seed (sample, fit, random masks)."),
    set_: list[str] = typer.Option([], "--set", "-s", metavar="KEY=VALUE",
                                   help="Any other field (repeatable): tokenizer, adapter, "
                                        "include_bias, reduction, dtype, max_length, "
                                        "batch_size, steps, lr, l1, memory_gb, device."),
    quiet: bool = typer.Option(False, help="No progress bar."),
) -> None:
    """Learn FactGraSS's per-layer input/output masks (the GraSS paper's selective mask) from
    a calibration set, and write the file a spec names: factgrass:...,mask=OUT.

    Use the model, layers, bias, seed and loss reduction of the cache run that will use it.
    """
    from grass_llm.fit_mask import config_from_cli, print_summary, run_fit_mask

    try:
        cfg = config_from_cli(dict(model=model, data=data, targets=targets, out=out,
                                   compressor=compressor, layers=layers or None,
                                   exclude=list(exclude), n_train=n_train,
                                   n_targets=n_targets, seed=seed), list(set_))
        summary = run_fit_mask(cfg, progress=not quiet)
    except (ValueError, OSError) as err:
        _fail(err)
    print_summary(console, summary)


@app.command("config-help")
def config_help() -> None:
    """Describe every field of a run config (YAML key = --set key)."""
    import dataclasses

    from grass_llm.config import RunConfig, field_help

    docs = field_help()
    table = Table(title="run config fields")
    for col in ("field", "default", "meaning"):
        table.add_column(col)
    for f in dataclasses.fields(RunConfig):
        default = ("(required)" if f.default is dataclasses.MISSING
                   and f.default_factory is dataclasses.MISSING
                   else repr(f.default if f.default is not dataclasses.MISSING
                             else f.default_factory()))
        table.add_row(f.name, default, docs.get(f.name, ""))
    console.print(table)


DEVICE_HELP = ("auto (this process's GPU when there is one, else the CPU), cpu, cuda or "
               "cuda:N.")


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
                                           "text, prompt+completion or messages)."),
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
) -> None:
    """Top-k most influential training examples for each query (and each query token), in one
    pass over the store. Under torchrun / accelerate launch the ranks split the query batches,
    the layers' solves and the store's row chunks; rank 0 writes the results."""
    from grass_llm.influence.cli_query import run_query
    from grass_llm.parallel import init_distributed
    from grass_llm.parallel.comm import RankFailure
    from grass_llm.store import StoreError

    info = init_distributed()
    bar, update = _progress_bar(info, "scoring")
    try:
        with bar:
            run_query(console, store, queries=queries, query_store=query_store, top_k=top_k,
                      per_token=per_token, token_mode=token_mode, out=out, matrix=matrix,
                      model=model, device=device, max_tokens=max_tokens, progress=update)
    except (StoreError, ValueError, FileNotFoundError, RankFailure) as err:
        _fail(err)


@app.command("self-influence")
def self_influence_cmd(
    store: str = typer.Argument(..., help="Gradient store with Fisher factors."),
    out: str = typer.Option("self_influence.jsonl", help="Output JSONL, one line per example."),
    show: int = typer.Option(10, help="Print the examples with the highest self-influence."),
    device: str = typer.Option("auto", help=DEVICE_HELP),
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
            scores = self_influence(st, device=device, progress=update)
    except (StoreError, ValueError, RankFailure) as err:
        _fail(err)
    if not info.is_main:
        return
    write_ranked(console, st, scores, out, key="self_influence", ranked=False, show=show,
                 title=f"highest self-influence of {len(scores):,} examples (all in {out})")


@app.command()
def value(
    store: str = typer.Argument(..., help="Gradient store with Fisher factors."),
    targets: str = typer.Option(None, help="Target set file (corpus format)."),
    target_store: str = typer.Option(None, help="A store cached from the targets."),
    select: float = typer.Option(None, help="Write the ids of this top fraction (0-1]."),
    out: str = typer.Option("values.jsonl", help="Output JSONL, ranked, one line per example."),
    select_out: str = typer.Option("selected_ids.txt", help="Where --select writes the ids."),
    model: str = typer.Option(None, help="Model path, if it moved since the store was made."),
    device: str = typer.Option("auto", help=DEVICE_HELP),
) -> None:
    """Data valuation: each training example's total influence on a target set, ranked.
    Under torchrun / accelerate launch the ranks split the target batches and the row
    chunks."""
    from grass_llm.influence import from_file, from_store, valuation
    from grass_llm.influence.cli_query import row_ids, write_ranked
    from grass_llm.parallel import init_distributed
    from grass_llm.parallel.comm import RankFailure
    from grass_llm.store import StoreError, open_store

    if (targets is None) == (target_store is None):
        _fail(ValueError("give exactly one of --targets or --target-store"))
    if select is not None and not 0 < select <= 1:
        _fail(ValueError(f"--select must be in (0, 1], got {select}"))
    info = init_distributed()
    bar, update = _progress_bar(info, "valuation")
    try:
        st = open_store(store)
        q = (from_store(st, open_store(target_store)) if target_store
             else from_file(st, targets, model_path=model, device=device))
        with bar:
            values = valuation(st, q.grads, device=device, progress=update)
    except (StoreError, ValueError, FileNotFoundError, RankFailure) as err:
        _fail(err)
    if not info.is_main:
        return
    order = write_ranked(console, st, values, out, key="value", ranked=True, show=0)
    msg = f"valued {len(values):,} examples against {len(q.ids)} target(s): {out}"
    if select is not None:
        n_sel = max(1, int(round(select * len(values))))
        ids = row_ids(st, order[:n_sel])
        with open(select_out, "w") as f:
            f.writelines(ids[i] + "\n" for i in order[:n_sel])
        msg += f"; top {n_sel} ids in {select_out}"
    console.print(msg, highlight=False, soft_wrap=True)


@app.command()
def info(store: str = typer.Argument(..., help="Path or fsspec URL of a gradient store.")) -> None:
    """Print what a gradient store holds: format, run, model, layers, progress."""
    import json

    from grass_llm.store import StoreError, open_store

    try:
        st = open_store(store)
    except StoreError as err:
        _fail(err)
    lay = st.layout
    done = st.done_chunks()
    console.print(f"[bold]{store}[/bold]: grass_llm gradient store, format v"
                  f"{st.attrs['format_version']}, written by grass_llm "
                  f"{st.attrs['grass_llm_version']} at {st.attrs.get('created_at', '?')}")
    console.print(f"examples: {lay.n_examples:,} in {lay.n_chunks:,} chunks of {lay.chunk_rows} "
                  f"rows; complete: {int(done.sum()):,}/{done.size:,}")
    total_k = sum(x.k for x in lay.layers)
    console.print(f"storage: {lay.dtype}, codec {lay.codec} + crc32c; {total_k:,} numbers per "
                  f"example over {len(lay.layers)} layers; token mode: {lay.token_mode}")
    for key, value in st.meta.items():
        text = json.dumps(value, sort_keys=True, default=str)
        console.print(f"{key}: {text if len(text) < 400 else text[:400] + ' ...'}",
                      highlight=False, markup=False)
    table = Table(title="layers")
    for col in ("layer", "compressor", "seed", "k", "d_out x d_in"):
        table.add_column(col)
    for x in lay.layers:
        table.add_row(x.name, x.spec, str(x.seed), str(x.k),
                      f"{x.d_out} x {x.d_in}{'+1' if x.bias else ''}")
    console.print(table)


@app.command()
def verify(
    store: str = typer.Argument(..., help="Path or fsspec URL of a gradient store."),
    quick: bool = typer.Option(False, help="Check metadata and completion markers only; do not "
                                           "decode every chunk."),
    repair: bool = typer.Option(False, help="Mark row chunks with unreadable data as not done, "
                                            "so that rerunning the cache command redoes them."),
) -> None:
    """Check a gradient store: every chunk complete and readable (CRC32C), shapes and dtypes as
    recorded, no NaN/Inf, example ids unique. Exit code 1 if anything is wrong."""
    from rich.progress import Progress

    from grass_llm.store import verify_store

    with Progress(console=console, transient=True) as bar:
        task = bar.add_task("verifying", total=None)

        def progress(name, i, n):
            bar.update(task, total=n, completed=i, description=f"verifying {name}")

        problems = verify_store(store, quick=quick, repair=repair, progress=progress)
    if problems:
        for p in problems:
            console.print(f"[red]problem:[/red] {p}", highlight=False)
        raise typer.Exit(1)
    console.print(f"{store}: OK" + (" (quick check)" if quick else ""))


@app.command()
def plan(
    model: str = typer.Option(..., "--model", "-m",
                              help="A config.json, a model directory, a .gguf file, 'smollm2' or "
                                   "'tiny:<family>' (only the config is read)."),
    tokens: str = typer.Option(..., help="Training tokens to cache: 1000000, 1e9, 500M, 1B."),
    gpus: int = typer.Option(8, help="GPUs (ranks) of the cache run."),
    k: int = typer.Option(None, help="Compressed size per layer: sets k of --compressor (default "
                                     "spec: the paper's factgrass:k=4096,k_in=128,k_out=128); "
                                     "with a spec that sets k, both must agree."),
    compressor: str = typer.Option(None, help="Compressor spec of every layer (default the "
                                              "paper's FactGraSS setting)."),
    layers: list[str] = typer.Option(None, help="Layer include pattern (repeatable)."),
    exclude: list[str] = typer.Option([], help="Layer exclude pattern (repeatable)."),
    examples: str = typer.Option(None, help="Store rows (examples); default tokens / "
                                            "--doc-tokens."),
    doc_tokens: int = typer.Option(None, help="Average tokens per example (default "
                                              "--max-length)."),
    dtype: str = typer.Option("bfloat16", help="Model dtype: bfloat16, float16, float32."),
    store_dtype: str = typer.Option("float16", help="Storage dtype: float16, bfloat16, "
                                                    "float32."),
    token_mode: str = typer.Option(None, help="Also per-token rows: loss or position."),
    max_length: int = typer.Option(1024, help="Longest sequence in tokens."),
    max_tokens: int = typer.Option(16384, help="Token budget of one batch."),
    chunk_rows: int = typer.Option(1024, help="Examples per store chunk."),
    parallel: str = typer.Option("fsdp", help="none, fsdp, zero3 (DeepSpeed) or tp."),
    tp_size: int = typer.Option(0, help="Ranks per tensor-parallel group (0: min(gpus, "
                                        "gpus-per-node))."),
    gpus_per_node: int = typer.Option(8, help="GPUs per node."),
    checkpointing: bool = typer.Option(True, "--checkpointing/--no-checkpointing",
                                       help="Gradient checkpointing of the decoder layers."),
    gpu_memory: float = typer.Option(80.0, help="GiB of one GPU (H100 80, H200 141)."),
    tokens_per_second: float = typer.Option(None, help="Your measured cache tokens/s per GPU; "
                                                       "the time then comes from it."),
    peak_tflops: float = typer.Option(None, help="Peak TFLOP/s per GPU (default 989 for "
                                                 "bf16/fp16, H100/H200 SXM dense; 67 fp32)."),
    mfu: float = typer.Option(0.4, help="Assumed fraction of peak reached."),
    read_gbps: float = typer.Option(2.0, help="Assumed store read GB/s per reader."),
    fisher_gflops: float = typer.Option(500.0, help="Assumed float64 GFLOP/s per Fisher rank."),
    json_out: bool = typer.Option(False, "--json", help="Print the plan as JSON."),
) -> None:
    """Plan a cache run before renting GPUs: numbers per example, store and Fisher size, memory
    per rank and hours on N GPUs, from the model's config alone (built on the meta device)."""
    import json

    from grass_llm.plan import PlanConfig, make_plan, parse_count, resolve_spec
    from grass_llm.plan_report import render

    try:
        cfg = PlanConfig(
            model=model, tokens=parse_count(tokens), gpus=gpus, gpus_per_node=gpus_per_node,
            compressor=resolve_spec(compressor, k), layers=layers or None, exclude=exclude,
            examples=None if examples is None else parse_count(examples), doc_tokens=doc_tokens,
            dtype=dtype, store_dtype=store_dtype, token_mode=token_mode, max_length=max_length,
            max_tokens=max_tokens, chunk_rows=chunk_rows, parallel=parallel, tp_size=tp_size,
            gradient_checkpointing=checkpointing, gpu_memory_gib=gpu_memory,
            tokens_per_second=tokens_per_second, peak_tflops=peak_tflops, mfu=mfu,
            read_gbps=read_gbps, fisher_gflops=fisher_gflops)
        result = make_plan(cfg)
    except ValueError as err:
        _fail(err)
    if json_out:
        typer.echo(json.dumps(result.to_dict(), indent=2))
        return
    for part in render(result):
        console.print(part, highlight=False, soft_wrap=isinstance(part, str))


if __name__ == "__main__":
    app()
