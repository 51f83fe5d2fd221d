"""Commands that run jobs: cache, demo, fit-mask, plan, example, and the listings of compressors and config fields."""

from __future__ import annotations

import inspect

import typer
from rich.table import Table

from grass_llm.cli._app import app, console, _fail, _human_bytes


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
                                        "add_bos, add_eos, "
                                        "batch_size, steps, lr, l1, memory_gb, device."),
    quiet: bool = typer.Option(False, help="No progress bar."),
) -> None:
    """Learn FactGraSS's per-layer input/output masks (the GraSS paper's selective mask) from
    a calibration set, and write the file a spec names: factgrass:...,mask=OUT.

    Use the model, layers, bias, seed, loss, add_bos and add_eos of the cache run that uses it.
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
