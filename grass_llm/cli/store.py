"""Commands that inspect a store: info, verify."""

from __future__ import annotations

import typer
from rich.table import Table

from grass_llm.cli._app import app, console, _fail


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
    from grass_llm.data.specials import describe_special_tokens

    console.print(describe_special_tokens(st.meta.get("special_tokens")), highlight=False,
                  markup=False)
    for key, value in st.meta.items():
        if key == "special_tokens":
            continue  # described above
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
    repair: bool = typer.Option(False, help="Mark row chunks with missing or unreadable data as "
                                            "not done, so that rerunning the cache command "
                                            "redoes them."),
) -> None:
    """Check a gradient store: every chunk complete, its files present and readable (CRC32C),
    shapes and dtypes as recorded, no NaN/Inf, example ids unique. Exit code 1 if anything is
    wrong."""
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
