"""Memory commands: `memory add/search/stats/prune`."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from promethean.context.defaults import MEMORY_PROMPT_TOKENS
from promethean.errors import PrometheanError
from promethean.cli.common import (
    memory_app,
    console,
    err_console,
)


# ------------------------------------------------------------------------------ memory
MemoryDirArgument = Annotated[Path, typer.Argument(help="Memory directory (a memory tree).")]
MemoryModelOption = Annotated[Optional[str], typer.Option(
    "--checkpoint", "-c", help="Embed with this checkpoint's mean-pooled hidden states (and score "
    "surprise with it). Without it: hashed character n-grams, no model needed.")]
HashedDimOption = Annotated[int, typer.Option(help="Dimensions of the hashed n-gram embedder.")]


def _memory_embedder(checkpoint: str | None, dim: int):
    from promethean.context.embed import embedder_for

    if checkpoint is None:
        err_console.print("[yellow]note:[/] no --checkpoint: using the hashed character n-gram "
                          "embedder (spelling, not meaning).")
    return embedder_for(checkpoint, dim)


@memory_app.command("add")
def memory_add(
    directory: MemoryDirArgument,
    text: Annotated[Optional[list[str]], typer.Option("--text", "-t", help="A text to remember (repeatable).")] = None,
    file: Annotated[Optional[Path], typer.Option(help="JSON lines of intake records, or plain text "
                                                 "(one document per blank-line-separated paragraph).")] = None,
    checkpoint: MemoryModelOption = None,
    dim: HashedDimOption = 256,
    min_salience: Annotated[float, typer.Option(help="Drop texts scoring below this (0..1).")] = 0.0,
    near_duplicate: Annotated[float, typer.Option(help="Cosine above which a text is a near duplicate.")] = 0.95,
    max_items: Annotated[Optional[int], typer.Option(help="Keep at most this many memories.")] = None,
    max_bytes: Annotated[Optional[str], typer.Option(help="Keep the memory within this size (e.g. 50MB).")] = None,
    replay: Annotated[Optional[Path], typer.Option(help="Also feed accepted texts to this replay buffer (needs --checkpoint).")] = None,
    block_size: Annotated[int, typer.Option(help="Replay window length in tokens.")] = 256,
) -> None:
    """Remember texts: the intake scores salience, drops duplicates, and stores the rest."""
    import json

    from promethean.context.intake import DocumentRecord, Intake
    from promethean.context.retrieval import open_memory
    from promethean.train.memory import parse_memory_size

    records = [DocumentRecord(text=t) for t in text or [] if t.strip()]
    if file is not None:
        if not file.is_file():
            raise PrometheanError(f"{file} does not exist.")
        content = file.read_text(errors="replace")
        if file.suffix in (".jsonl", ".json"):
            try:
                raw = [json.loads(line) for line in content.splitlines() if line.strip()]
            except json.JSONDecodeError as error:
                raise PrometheanError(f"{file} is not JSON lines ({error.msg}, line {error.lineno}).") from None
            records += _intake_records(raw, file)
        else:
            records += [DocumentRecord(text=p.strip(), source=str(file))
                        for p in content.split("\n\n") if p.strip()]
    if not records:
        raise PrometheanError("nothing to remember: give --text or --file.")
    if replay is not None and checkpoint is None:
        raise PrometheanError("--replay needs --checkpoint (replay windows are the model's tokens).")
    embedder, tokenizer, model = _memory_embedder(checkpoint, dim)
    tree = open_memory(directory, embedder)
    tree.set_budget(max_items, parse_memory_size(max_bytes) if max_bytes is not None else None)
    buffer = None
    if replay is not None:
        from promethean.continual.replay import ReplayBuffer

        buffer = ReplayBuffer(replay, block_size)
    batcher = None
    if model is not None:  # model passes bounded by the activations of a padded batch
        from promethean.context.intake import ActivationBoundedBatcher

        batcher = ActivationBoundedBatcher.for_model(tokenizer, model.config)
    intake = Intake(tree, embedder, tokenizer=tokenizer, replay=buffer, batcher=batcher,
                    surprise=embedder.loss_per_token if model is not None else None,
                    vocab_size=model.config.vocab_size if model is not None else None,
                    near_duplicate=near_duplicate, min_salience=min_salience)
    report = intake.process(records)
    tree.prune()
    tree.save(directory)
    summary = report.summary()
    typer.echo(f"remembered {summary['accepted']} of {len(records)} texts in {directory} "
               f"({summary['exact_duplicates']} exact and {summary['near_duplicates']} near "
               f"duplicates, {summary['low_salience']} below salience {min_salience}); "
               f"{len(tree)} memories now.")
    if buffer is not None:
        typer.echo(f"replay windows offered: {summary['replay_windows']}")


@memory_app.command("search")
def memory_search(
    directory: MemoryDirArgument,
    query: Annotated[str, typer.Argument(help="What to look for.")],
    k: Annotated[int, typer.Option("-k", help="How many memories.")] = 5,
    beam: Annotated[int, typer.Option(help="Search beam width (wider: slower, more exact).")] = 32,
    checkpoint: MemoryModelOption = None,
    dim: HashedDimOption = 256,
    prompt: Annotated[bool, typer.Option(help="Print the chat prompt the memories would make.")] = False,
    token_budget: Annotated[int, typer.Option(help="Token budget of the memory block (--prompt).")] = MEMORY_PROMPT_TOKENS,
) -> None:
    """Find the memories closest to a query."""
    from promethean.context.retrieval import chat_prompt_with_memory, open_memory, retrieve
    from promethean.data.chat import Turn

    embedder, tokenizer, _model = _memory_embedder(checkpoint, dim)
    tree = open_memory(directory, embedder, create=False)
    if prompt:
        if tokenizer is None:  # no model: count bytes, an upper bound on any tokenizer's count
            from promethean.tokenizer import ByteTokenizer

            tokenizer = ByteTokenizer()
        sys.stdout.write(chat_prompt_with_memory([Turn("human", query)], tree, embedder, tokenizer,
                                                 token_budget, k, beam) + "\n")
        return
    table = Table("id", "score", "salience", "text")
    for memory in retrieve(tree, embedder, query, k, beam):
        snippet = " ".join(memory.text.split())
        table.add_row(str(memory.id), f"{memory.score:.3f}", f"{memory.salience:.3f}",
                      snippet[:100] + ("…" if len(snippet) > 100 else ""))
    console.print(table)


@memory_app.command("stats")
def memory_stats(directory: MemoryDirArgument) -> None:
    """Size, shape and budget of a memory."""
    from promethean.context.tree import MemoryTree

    tree = MemoryTree.load(directory)
    table = Table("what", "value")
    for key, value in {**tree.stats(), **tree.info}.items():
        table.add_row(key, f"{value:.3f}" if isinstance(value, float) else str(value))
    console.print(table)


@memory_app.command("prune")
def memory_prune(
    directory: MemoryDirArgument,
    max_items: Annotated[Optional[int], typer.Option(help="Keep at most this many memories.")] = None,
    max_bytes: Annotated[Optional[str], typer.Option(help="Keep the memory within this size (e.g. 50MB).")] = None,
) -> None:
    """Evict the least salient (then oldest) memories down to a budget, and keep that budget."""
    from promethean.context.tree import MemoryTree
    from promethean.train.memory import parse_memory_size

    if max_items is None and max_bytes is None:
        raise PrometheanError("give --max-items and/or --max-bytes.")
    tree = MemoryTree.load(directory)
    tree.set_budget(max_items, parse_memory_size(max_bytes) if max_bytes is not None else None)
    evicted = tree.prune()
    tree.save(directory)
    typer.echo(f"evicted {len(evicted)} memories; {len(tree)} remain ({tree.total_bytes:,} bytes).")



def _intake_records(raw: list, file: Path) -> list:
    """Intake records from JSON lines: the intake's own records, or chat log lines (ours, the
    GPT-2 chat card's user/assistant pairs, OpenAI messages), each conversation one chat record."""
    from promethean.context.intake import ChatRecord, ChatTurn, parse_records
    from promethean.continual.chat_examples import PROMETHEAN_LOG_FORMAT
    from promethean.data.chat import foreign_chat_exchanges

    chats, formats, others = [], set(), []
    for record in raw:
        foreign = foreign_chat_exchanges(record)
        if foreign is None and isinstance(record, dict) and "kind" not in record and all(
                isinstance(record.get(k), str) for k in ("chat_id", "human", "assistant")):
            foreign = (PROMETHEAN_LOG_FORMAT, [(record["human"], record["assistant"])])
        if foreign is None:
            others.append(record)
            continue
        formats.add(foreign[0])
        turns = [ChatTurn(role=role, text=said) for human, assistant in foreign[1]
                 for role, said in (("human", human), ("assistant", assistant)) if said.strip()]
        if turns:
            chats.append(ChatRecord(turns=turns, source=str(file)))
    if formats:
        typer.echo(f"{file}: {len(chats)} conversations (log format: {', '.join(sorted(formats))})")
    return parse_records(others) + chats
