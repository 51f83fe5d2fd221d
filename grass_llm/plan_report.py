"""``grass-llm plan``'s output: a plan (``grass_llm.plan``) as rich tables, each figure labelled
exact, measured, estimated or assumed."""

from __future__ import annotations

import re

from rich.table import Table

from grass_llm.plan import Plan


def fmt_bytes(n: float) -> str:
    """Binary units: ``1.6 TiB``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{int(n)} B" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    raise AssertionError


def _layer_groups(layers: list[dict]) -> list[tuple[str, int, dict]]:
    """Hooked layers grouped by name with the block index replaced by N, in first-seen order."""
    groups: dict[str, list[dict]] = {}
    for lay in layers:
        groups.setdefault(re.sub(r"\.\d+\.", ".N.", lay["name"]), []).append(lay)
    return [(name, len(v), v[0]) for name, v in groups.items()]


def render(plan: Plan) -> list:
    """The plan as rich renderables (tables and lines), for ``grass-llm plan``."""
    c, m, s, f, mem, t = (plan.config, plan.model, plan.store, plan.fisher, plan.memory,
                          plan.time)
    head = (f"[bold]{m['name']}[/bold] ({m['type']}, {m['params'] / 1e9:,.2f}B params, "
            f"{m['decoder_layers']} decoder layers), {c['compressor']} on "
            f"{m['layers_hooked']} Linear layers, {c['tokens']:,} tokens in "
            f"{s['rows']:,} examples of ~{c['tokens'] / s['rows']:,.0f} tokens")
    out: list = [head]
    lay = Table(title="hooked layers (exact: the product's selection and registry)")
    for col in ("layers", "count", "d_out x d_in", "k"):
        lay.add_column(col, justify="left" if col == "layers" else "right")
    for name, n, x in _layer_groups(plan.layers):
        lay.add_row(name, str(n), f"{x['d_out']} x {x['d_in']}{'+1' if x['bias'] else ''}",
                    f"{x['k']:,}")
    out.append(lay)

    st = _table("store (exact sizes; rows from --tokens / --doc-tokens or --examples)")
    st.add_row("numbers per example", f"{s['numbers_per_example']:,}",
               f"{fmt_bytes(s['numbers_per_example'] * s['dtype_bytes'])} in {c['store_dtype']}")
    st.add_row("gradient rows", fmt_bytes(s["grad_bytes"]),
               f"{s['rows']:,} rows x {s['numbers_per_example']:,} x {s['dtype_bytes']} B; "
               f"{s['bytes_per_token']:,.0f} B per training token")
    if c["token_mode"]:
        st.add_row("per-token rows", fmt_bytes(s["token_bytes"]),
                   f"{s['token_rows']:,} rows ({c['token_mode']} mode), chunk padding included")
    st.add_row("metadata", fmt_bytes(s["meta_bytes"]), "ids (est. 16 B), loss, n_targets, flags")
    st.add_row("total", fmt_bytes(s["total_bytes"]),
               f"{s['chunks']:,} chunks of {c['chunk_rows']} rows, {s['chunk_files']:,} "
               f"gradient files of {fmt_bytes(s['chunk_file_bytes'])}")
    out.append(st)

    fi = _table("Fisher (grass-llm fisher: per-layer k x k float64 Cholesky factors)")
    fi.add_row("factors in the store", fmt_bytes(f["bytes"]), "exact: sum of k^2 x 8 B")
    fi.add_row("memory per rank while fitting", fmt_bytes(f["peak_ram_bytes"]),
               f"exact: the partial Grams of {f['group']} layers at a time + the owned "
               "block's factorization; a query loads one factor at a time")
    fi.add_row("Gram GEMMs", f"{f['gemm_flops']:.2e} FLOP",
               f"est. {f['hours_one_rank']:,.2f} h on 1 rank at {c['fisher_gflops']:,.0f} "
               f"GFLOP/s (assumed), /{c['gpus']} = {f['hours_one_rank'] / c['gpus']:,.2f} h "
               f"split over {c['gpus']} ranks")
    fi.add_row("one pass over the store", f"{f['read_hours_one_reader']:,.2f} h",
               f"at {c['read_gbps']:g} GB/s per reader (assumed); each query batch streams "
               "the gradient rows once")
    out.append(fi)

    mt = _table(f"GPU memory per rank ({c['parallel']}"
                + (f", tp={mem['tp_size']}" if c["parallel"] == "tp" else "")
                + f", {mem['batch_tokens']:,} tokens per batch, {c['dtype']}"
                + (", gradient checkpointing)" if c["gradient_checkpointing"] else ")"))
    per_layer = mem["layer_activation_bytes_per_token"]
    how = {"weights": "exact sizes; sharding and gathered working set as modelled",
           "activations": (f"measured on meta: {per_layer:,.0f} B/token per decoder layer"
                           if per_layer is not None else "decoder layers NOT measured")
                          + (" + the layer inputs kept by checkpointing"
                             if c["gradient_checkpointing"] else ""),
           "logits_and_loss": "modelled: the logits and their gradient (the loss runs in "
                              "blocks of rows)",
           "hook_features": "exact: k_in (or d_in) float32 numbers per token per layer",
           "compressed_results": "exact: float32 rows of one step",
           "materialized_gradient": "exact: one layer's per-example G (vector compressors)"}
    for key, value in mem["items"].items():
        if value:
            mt.add_row(key.replace("_", " "), fmt_bytes(value), how[key])
    verdict = "fits" if mem["fits"] else "[red]does not fit[/red]"
    mt.add_row("[bold]total[/bold]", fmt_bytes(mem["total"]),
               f"{verdict} in {c['gpu_memory_gib']:g} GiB with 10% headroom (CUDA context and "
               "fragmentation not included)")
    mt.add_row("host RAM per rank", fmt_bytes(mem["host_chunk_buffer"]),
               "exact: 3 chunks of rows in the store dtype (filling, queued, being written)")
    mt.add_row("host RAM per node at start", fmt_bytes(mem["host_load_per_node"]),
               "exact: rank 0 reads the full model, the others receive their shards one "
               "tensor at a time" if c["parallel"] != "none" else
               "exact: data parallel, every rank holds the full model")
    out.append(mt)

    tt = _table(f"time on {c['gpus']} GPU(s), {c['tokens']:,} tokens")
    tt.add_row("FLOPs per token", f"{t['flops_per_token'] / 1e9:,.1f} GFLOP",
               "forward + input-gradient backward + attention"
               + (" + recomputation" if c["gradient_checkpointing"] else "") + " + compression")
    if t["gpu_flops_per_token"] != t["flops_per_token"]:
        tt.add_row("GPU FLOPs per token", f"{t['gpu_flops_per_token'] / 1e9:,.1f} GFLOP",
                   f"the output head runs on each of the {mem['tp_size']} ranks of a group")
    tt.add_row("ESTIMATED tokens/s per GPU", f"{t['estimated_tokens_per_s_per_gpu']:,.0f}",
               f"assumed {t['peak_tflops']:g} TFLOP/s peak x {t['mfu']:g} utilization")
    tt.add_row("ESTIMATED hours", f"{t['estimated_hours']:,.2f}", "from FLOPs")
    if t["measured_hours"] is not None:
        tt.add_row("MEASURED tokens/s per GPU", f"{t['measured_tokens_per_s_per_gpu']:,.0f}",
                   f"your --tokens-per-second (= {t['implied_mfu']:.2f} of peak)")
        tt.add_row("[bold]hours (from measured)[/bold]", f"{t['measured_hours']:,.2f}",
                   "tokens / (tokens/s per GPU x GPUs)")
    tt.add_row("store write rate", f"{t['store_write_mb_per_s']:,.0f} MB/s",
               "all ranks together, over the run")
    out.append(tt)
    out.extend(f"[yellow]note:[/yellow] {n}" for n in plan.notes)
    return out


def _table(title: str):
    table = Table(title=title, title_justify="left")
    table.add_column("")
    table.add_column("value", justify="right")
    table.add_column("how")
    return table
