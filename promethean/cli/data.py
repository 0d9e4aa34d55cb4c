"""Data commands: `tokenizer train`, `data prepare`, `data list`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from promethean.errors import PrometheanError
from promethean.cli.common import (
    data_app,
    tokenizer_app,
    console,
    err_console,
)


# ------------------------------------------------------------------------- tokenizer commands


@tokenizer_app.command("train")
def tokenizer_train(
    corpus: Annotated[str, typer.Argument(
        help="A named corpus (e.g. shakespeare), or a local file, folder or glob.")],
    out: Annotated[Path, typer.Option("--out", help="Directory to write the tokenizer to.")],
    vocab_size: Annotated[Optional[int], typer.Option(
        help="Ids in all, <|endoftext|> included (default: 8000 for bpe, 512 for char).")] = None,
    kind: Annotated[str, typer.Option(
        help="bpe (byte-level BPE) or char (characters, bytes for the rest).")] = "bpe",
) -> None:
    """Train a tokenizer on a corpus; pass its directory wherever a tokenizer is asked for."""
    from promethean.data.corpora import open_corpus
    from promethean.tokenizer import DEFAULT_VOCAB_SIZES, train_tokenizer, write_tokenizer_directory

    source = open_corpus(corpus)
    with err_console.status(f"training a {kind} tokenizer on {source.name}"):
        # documents() is lazy, so a bad --kind or --vocab-size is refused before any is read.
        tokenizer = train_tokenizer(kind, source.documents(), vocab_size)
    write_tokenizer_directory(tokenizer, out)
    # Plain echo, not rich: corpus text may hold [brackets], and long lines should not be wrapped.
    typer.echo(
        f"wrote {out}: a {kind} tokenizer of {tokenizer.vocab_size:,} ids trained on {source.name} "
        f"(fingerprint {tokenizer.fingerprint[:12]})"
    )
    requested = DEFAULT_VOCAB_SIZES[kind] if vocab_size is None else vocab_size
    if tokenizer.vocab_size < requested:
        typer.echo(
            f"note: asked for {requested:,} ids; the corpus had nothing more to learn.", err=True
        )
    sample = next(source.documents())[:100]
    ids = tokenizer.encode(sample)
    typer.echo(f"sample: {sample!r}")
    typer.echo(f"  {len(ids)} tokens, {len(sample) / len(ids):.2f} characters each: {ids}")
    typer.echo(f"  pieces: {[tokenizer.decode([token]) for token in ids]}")


# ------------------------------------------------------------------------------ data commands


@data_app.command("prepare")
def data_prepare(
    corpus: Annotated[str, typer.Argument(
        help="A named corpus (see `data list`), or a local file, folder or glob.")],
    tokenizer: Annotated[str, typer.Option(
        "--tokenizer", help="bytes, gpt2, or a tokenizer directory (trained here, a Hugging Face "
        "tokenizer.json, or vocab.json + merges.txt/merges.json).")],
    out: Annotated[Path, typer.Option(
        "--out", help="Directory to write train.bin, val.bin and meta.json to.")],
    workers: Annotated[Optional[int], typer.Option(
        help="Tokenizing processes (default: every core this process may use).")] = None,
    val_fraction: Annotated[Optional[float], typer.Option(
        help="Share of documents for validation, chosen by a hash of their text "
        "(default 0.005).")] = None,
    text_field: Annotated[str, typer.Option(
        help="The text field of .jsonl and .parquet records.")] = "text",
    overwrite: Annotated[bool, typer.Option(
        help="Replace data prepared differently (other tokenizer, source or settings).")] = False,
    val: Annotated[Optional[str], typer.Option(
        "--val", help="A separate validation file (folder or glob) to tokenize as the val split "
        "instead of carving --val-fraction out of the corpus; corpus documents identical to one "
        "of its documents are left out of train.")] = None,
) -> None:
    """Tokenize a corpus into flat token files for training, in parallel."""
    from promethean.data.corpora import open_corpus
    from promethean.data.prepare import (
        DEFAULT_VAL_FRACTION,
        default_workers,
        prepare,
        start_worker_server,
    )
    from promethean.tokenizer import resolve_tokenizer

    if val is not None and val_fraction is not None:
        raise PrometheanError("--val names the validation data and --val-fraction carves it out "
                              "of the corpus; give one of them, not both.")
    if (default_workers() if workers is None else workers) > 1:
        start_worker_server()  # its start-up overlaps the corpus hashing below
    source = open_corpus(corpus, text_field=text_field)
    val_source = open_corpus(val, text_field=text_field) if val is not None else None
    chosen = resolve_tokenizer(tokenizer)
    separate = {} if val_source is None else {
        "val_documents": val_source.documents(), "val_source_name": val_source.name,
        "val_source_sha256": val_source.fingerprint(),
    }
    result = prepare(
        source.documents(), chosen, out, source_name=source.name,
        source_sha256=source.fingerprint(), workers=workers,
        val_fraction=DEFAULT_VAL_FRACTION if val_fraction is None else val_fraction,
        overwrite=overwrite, source_replaced_bytes=lambda: source.stats.replaced_bytes, **separate,
    )
    splits = result.meta["splits"]
    if result.already_prepared:
        typer.echo(f"already prepared: {out} holds {source.name} with tokenizer {chosen.kind} and "
                   "these settings; nothing to do.")
        return

    def count(number: int, noun: str) -> str:
        return f"{number:,} {noun}{'' if number == 1 else 's'}"

    train, val = (
        f"{name} {count(splits[name]['tokens'], 'token')} in "
        f"{count(splits[name]['documents'], 'document')}"
        for name in ("train", "val")
    )
    typer.echo(
        f"wrote {out}: {count(result.documents, 'document')}, {count(result.tokens, 'token')} "
        f"({chosen.kind}, {result.meta['dtype']}) in {result.seconds:.1f} s, "
        f"{result.tokens / max(result.seconds, 1e-9):,.0f} tokens/s; {train}, {val}"
    )
    if result.meta.get("val_duplicates_dropped"):
        typer.echo(f"note: {count(result.meta['val_duplicates_dropped'], 'corpus document')} "
                   f"identical to a document of {val} left out of train.", err=True)
    if splits["val"]["documents"] == 0:
        typer.echo("note: val.bin is empty; documents are split whole and this corpus has too few "
                   "(or --val-fraction is 0), so evaluate on another prepared corpus.", err=True)


@data_app.command("list")
def data_list() -> None:
    """List the named corpora (any local file, folder or glob works too)."""
    from promethean.data.corpora import is_cached, list_corpora

    table = Table(title="named corpora")
    for column in ("name", "description", "size", "license", "network"):
        table.add_column(column, overflow="fold")
    for info in list_corpora():
        if info.needs_network:
            network = "yes (hub)"
        else:
            network = "no" if is_cached(info.name) else "once (PyPI)"
        table.add_row(info.name, info.description, info.size, info.license, network)
    console.print(table)
