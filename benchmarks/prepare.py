"""Throughput of `data prepare` (GPT-2 tokens/s) against a single-process tiktoken loop.

    python benchmarks/prepare.py [--corpus python-stdlib] [--copies 3 9] [--repeats 5] [--write docs/BENCHMARKS.md]
        [--json ROWS.json] [--quick]

What it measures, all in one run so that every figure has a peer measured under the same noise:

* in memory, at each size in --copies (the corpus's documents repeated that many times, read into
  a list first): `prepare(documents, gpt2, tmp, workers=N)`, N = every core this process may use,
  against the peer, `encoding.encode_ordinary(text)` over the same documents in one process with
  the same tiktoken `Encoding`. tok/s = the documents' tokens (prepare's added end-of-text ids
  left out, so both count the same work) / seconds of the whole call: ours includes starting the
  worker pool, shipping text to it, writing and fsyncing the files and meta.json; the peer only
  counts. Two sizes show what is fixed cost (pool start, the last chunk, fsync) and what is rate.
* the ceiling, at each size: the peer loop split over N forked processes that share nothing
  (each encodes every N-th document, timed from a common start, start-up excluded): the most N
  cores deliver on this machine, memory bandwidth and shared caches included.
* at the largest size only: `prepare` with 1 worker (in-process) against the peer; and end to
  end, as a user runs it, the same documents written out as a folder of .txt files, then
  `python -m promethean data prepare FOLDER --tokenizer gpt2 --out tmp` in a fresh subprocess
  (interpreter start, imports, the fork server, reading and hashing the corpus) against a fresh
  subprocess that opens the same folder with `open_corpus` and runs the peer loop.

One warm-up of each, then --repeats rounds; each round runs every contender once, in an order that
rotates from round to round. Ratios are taken within a round and the median over rounds is
reported.

With --write FILE the results replace the part of FILE between `<!-- prepare:start -->` and
`<!-- prepare:end -->` (appended if absent); the rest of the file is left as it is. With
--json FILE the summary rows of `python -m benchmarks` are written there. --quick: the corpus's
first 150 documents once (`--documents 150 --copies 1`) and one round, for a smoke run.
"""

from __future__ import annotations

import argparse
import datetime
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.common import (  # noqa: E402
    add_report_options,
    cores,
    cpu_description,
    measured_line,
    parse_report_arguments,
    ratios,
    summary_row,
    write_section,
    write_summary_rows,
)

START, END = "<!-- prepare:start -->", "<!-- prepare:end -->"
TARGET = 1.8  # prepare's tokens/s over the single-process loop, on 2 cores
# --quick: the corpus's first 150 documents once, one round (each round also starts the CLI in a
# fresh interpreter).
QUICK = {"copies": [1], "repeats": 1, "documents": 150}
PEER_SCRIPT = """
import sys, time
from promethean.data.corpora import open_corpus
from promethean.tokenizer import resolve_tokenizer
encoding = resolve_tokenizer("gpt2").encoding
tokens = sum(len(encoding.encode_ordinary(text)) for text in open_corpus(sys.argv[1]).documents())
print(tokens)
"""


def machine() -> dict:
    import numpy
    import tiktoken

    return {**cpu_description(), "tiktoken": tiktoken.__version__, "numpy": numpy.__version__}


# ----------------------------------------------------------------------------- contenders
def run_ours(documents: list[str], tokenizer, workers: int, scratch: Path) -> tuple[int, float]:
    from promethean.data.prepare import prepare

    out = scratch / f"ours-{workers}"
    started = time.perf_counter()
    result = prepare(documents, tokenizer, out, source_name="bench", source_sha256="0" * 64,
                     workers=workers, progress=False, overwrite=True)
    elapsed = time.perf_counter() - started
    shutil.rmtree(out)
    return result.tokens - result.documents, elapsed  # end-of-text ids are not the peer's work


def run_peer(documents: list[str], encoding) -> tuple[int, float]:
    started = time.perf_counter()
    tokens = 0
    for text in documents:
        tokens += len(encoding.encode_ordinary(text))
    return tokens, time.perf_counter() - started


def _ceiling_worker(documents, share, parts, barrier, results) -> None:
    from promethean.tokenizer import resolve_tokenizer

    encoding = resolve_tokenizer("gpt2").encoding
    mine = documents[share::parts]
    barrier.wait()
    started = time.perf_counter()
    tokens = sum(len(encoding.encode_ordinary(text)) for text in mine)
    results.put((tokens, time.perf_counter() - started))


def run_ceiling(documents: list[str], parts: int) -> tuple[int, float]:
    """The peer loop split over `parts` forked processes with nothing to coordinate: each encodes
    every parts-th document, timed from a common start. What the cores can do at best."""
    import multiprocessing

    context = multiprocessing.get_context("fork")  # the documents are inherited, not shipped
    barrier, results = context.Barrier(parts), context.Queue()
    processes = [context.Process(target=_ceiling_worker, args=(documents, share, parts, barrier,
                                                               results)) for share in range(parts)]
    for process in processes:
        process.start()
    outcomes = [results.get() for _ in processes]
    for process in processes:
        process.join()
    return sum(tokens for tokens, _ in outcomes), max(seconds for _, seconds in outcomes)


def write_folder(documents: list[str], folder: Path) -> None:
    """One .txt file per document, named so that sorted order is the list's order."""
    folder.mkdir()
    width = len(str(len(documents)))
    for index, text in enumerate(documents):
        (folder / f"{index:0{width}}.txt").write_text(text, encoding="utf-8", errors="replace")


def run_cli(corpus: str, scratch: Path) -> tuple[int, float]:
    out = scratch / "cli"
    command = [sys.executable, "-m", "promethean", "data", "prepare", corpus, "--tokenizer", "gpt2",
               "--out", str(out), "--overwrite"]
    started = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True, cwd=ROOT)
    elapsed = time.perf_counter() - started
    from promethean.data.prepare import read_meta

    meta = read_meta(out)
    shutil.rmtree(out)
    splits = meta["splits"].values()
    return sum(s["tokens"] for s in splits) - sum(s["documents"] for s in splits), elapsed


def run_cli_peer(corpus: str) -> tuple[int, float]:
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", PEER_SCRIPT, corpus], check=True,
                            capture_output=True, text=True, cwd=ROOT)
    return int(result.stdout.split()[-1]), time.perf_counter() - started


def measure(args) -> dict:
    from promethean.data.corpora import open_corpus
    from promethean.tokenizer import resolve_tokenizer

    tokenizer = resolve_tokenizer("gpt2")
    corpus = list(open_corpus(args.corpus).documents())[: args.documents]
    workers = cores()
    sizes = sorted(set(args.copies))
    largest = corpus * sizes[-1]
    scratch_root = tempfile.TemporaryDirectory(prefix="promethean-bench-")
    folder = Path(scratch_root.name) / "corpus"
    write_folder(largest, folder)
    contenders, peers = {}, {}
    for copies in sizes:
        documents = corpus * copies
        contenders[f"ours@{copies}"] = (
            lambda scratch, d=documents: run_ours(d, tokenizer, workers, scratch))
        contenders[f"peer@{copies}"] = lambda scratch, d=documents: run_peer(d, tokenizer.encoding)
        contenders[f"ceiling@{copies}"] = lambda scratch, d=documents: run_ceiling(d, workers)
        peers[f"ours@{copies}"] = peers[f"ceiling@{copies}"] = f"peer@{copies}"
    if workers > 1:
        contenders["ours-1"] = lambda scratch: run_ours(largest, tokenizer, 1, scratch)
        peers["ours-1"] = f"peer@{sizes[-1]}"
    contenders["cli"] = lambda scratch: run_cli(str(folder), scratch)
    contenders["cli-peer"] = lambda scratch: run_cli_peer(str(folder))
    peers["cli"] = "cli-peer"
    names = list(contenders)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    tokens: dict[str, int] = {}
    with scratch_root:
        scratch = Path(scratch_root.name)
        for name in names:  # warm-up: page cache, the fork server, tiktoken's first use
            contenders[name](scratch)
        for round_index in range(args.repeats):
            order = names[round_index % len(names):] + names[: round_index % len(names)]
            for name in order:
                count, elapsed = contenders[name](scratch)
                tokens[name] = count
                seconds[name].append(elapsed)
            print(f"round {round_index + 1}: " + ", ".join(
                f"{name} {tokens[name] / seconds[name][-1] / 1e6:.2f}M" for name in names
            ) + " tok/s", flush=True)
    for name, peer in peers.items():
        if tokens[name] != tokens[peer]:
            raise SystemExit(f"{name} counted {tokens[name]} tokens but {peer} {tokens[peer]}")
    text_mb = {copies: sum(len(t.encode("utf-8", "replace")) for t in corpus) * copies / 1e6
               for copies in sizes}
    return {"workers": workers, "names": names, "seconds": seconds, "tokens": tokens,
            "sizes": sizes, "corpus_documents": len(corpus), "text_mb": text_mb}


# ------------------------------------------------------------------------------- reporting
def render(result: dict, info: dict, args, command: str, started, elapsed: float) -> str:
    workers, seconds, tokens, sizes = (
        result["workers"], result["seconds"], result["tokens"], result["sizes"])
    tps = {name: [tokens[name] / s for s in seconds[name]] for name in result["names"]}
    median = {name: statistics.median(values) for name, values in tps.items()}

    def row(what, mine, peer, limit):
        ratio = ratios(tps[mine], tps[peer])
        return [what, f"{median[mine] / 1e6:.2f}M tok/s", f"{median[peer] / 1e6:.2f}M tok/s",
                f"**{ratio:.2f}x**", limit, f"`{command}`"], ratio

    def size(copies):
        return f"{result['text_mb'][copies]:.0f} MB, {tokens[f'peer@{copies}'] / 1e6:.1f}M tokens"

    rows, achieved, ceilings = [], {}, {}
    for copies in sizes:
        ceilings[copies] = ratios(tps[f"ceiling@{copies}"], tps[f"peer@{copies}"])
        limit = (f"≤ {ceilings[copies]:.2f}x: {workers} forked processes running the loop on "
                 f"1/{workers} of the documents each reach "
                 f"{median[f'ceiling@{copies}'] / 1e6:.2f}M tok/s")
        cells, achieved[copies] = row(
            f"`prepare`, {workers} workers, vs one tiktoken `encode_ordinary` loop, documents in "
            f"memory ({size(copies)})", f"ours@{copies}", f"peer@{copies}", limit)
        rows.append(cells)
    if "ours-1" in tps:
        rows.append(row(
            f"`prepare`, 1 worker (in-process), vs the same loop ({size(sizes[-1])})", "ours-1",
            f"peer@{sizes[-1]}", "— (one core each; ours encodes with `encode_to_numpy`)")[0])
    rows.append(row(
        "`python -m promethean data prepare FOLDER --tokenizer gpt2` vs a subprocess that opens "
        "the same folder and runs the loop, both end to end on the same documents as one .txt "
        f"file each ({size(sizes[-1])})", "cli", "cli-peer",
        f"≤ {ceilings[sizes[-1]]:.2f}x (as above)")[0])
    header = ["what", "ours", "peer, same run", "ratio", "physical limit", "command"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    per_round = "; ".join(
        f"{name} " + ", ".join(f"{value / 1e6:.2f}" for value in values)
        for name, values in tps.items()
    )
    target = TARGET
    verdicts = ", ".join(
        f"{'met' if achieved[copies] >= target else '**not met**'} at {result['text_mb'][copies]:.0f}"
        f" MB ({achieved[copies]:.2f}x, {achieved[copies] / ceilings[copies]:.0%} of the ceiling)"
        for copies in sizes
    )
    return "\n".join([
        f"{measured_line(info, started, elapsed / 60)}; Python {info['python']}, tiktoken "
        f"{info['tiktoken']}, numpy {info['numpy']}.",
        "",
        f"Setup: the `{args.corpus}` corpus ({'its first ' if args.documents else ''}"
        f"{result['corpus_documents']:,} documents) repeated "
        f"{' and '.join(map(str, sizes))} times. tok/s counts the documents' tokens (the "
        "end-of-text ids prepare adds are left out, so both sides count the same work) over the "
        "seconds of the whole call; ours includes the worker pool's start, shipping the text, "
        "writing and fsyncing train.bin/val.bin/meta.json; the peer only counts. The end-to-end "
        "row runs each side in a fresh interpreter. "
        f"Medians of {args.repeats} rounds after one warm-up; each ratio is taken within a round, "
        "then the median is reported.",
        "",
        *lines,
        "",
        f"Target: `prepare` ≥ {target}x a single-process tiktoken loop on 2 cores: {verdicts}.",
        "",
        f"Per-round M tok/s: {per_round}.",
        f"Load average at start / end: {args.load_start} / "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}.",
        "",
        "How it works: the parent reads documents lazily and ships ~1 MB chunks to the workers, at "
        "most 2 per worker in flight; each worker encodes with tiktoken's `encode_to_numpy` "
        "(ordinary text, no Python list of ints), appends the end-of-text ids, and returns the "
        "chunk as raw uint16 bytes, which the parent appends to the files in corpus order. What "
        "separates `prepare` from the ceiling is mostly fixed: starting the workers (~60 ms: a "
        "fork of the fork server and unpickling the tokenizer), the last chunk, and fsync.",
    ])


def summary(result: dict, command: str) -> list[dict[str, str]]:
    """The rows `python -m benchmarks` puts in the report's summary table: prepare in memory at
    the largest size, and the command line end to end."""
    workers, seconds, tokens, sizes = (
        result["workers"], result["seconds"], result["tokens"], result["sizes"])
    tps = {name: [tokens[name] / s for s in seconds[name]] for name in result["names"]}
    largest = sizes[-1]
    ceiling = ratios(tps[f"ceiling@{largest}"], tps[f"peer@{largest}"])
    limit = f"≤ {ceiling:.2f}x ({workers} forked processes, nothing shared)"
    rows = []
    for what, mine, peer in (
        (f"tokenization, `prepare` ({workers} workers), documents in memory, "
         f"{result['text_mb'][largest]:.0f} MB", f"ours@{largest}", f"peer@{largest}"),
        ("tokenization, `promethean data prepare FOLDER` end to end", "cli", "cli-peer"),
    ):
        ratio = ratios(tps[mine], tps[peer])
        rows.append(summary_row(
            what, f"{statistics.median(tps[mine]) / 1e6:.2f}M tok/s",
            f"{statistics.median(tps[peer]) / 1e6:.2f}M tok/s (single-process tiktoken)",
            f"{ratio:.2f}x", limit,
            f"≥ {TARGET}x: {'met' if ratio >= TARGET else 'not met'}" if mine != "cli" else "",
            f"`{command}`"))
    return rows


HEADING = (
    "## Preparation: GPT-2 tokens/s of `data prepare`\n\n"
    "`benchmarks/prepare.py`: `prepare` with one worker process per core against the "
    "simplest fast alternative, one process running tiktoken's `encode_ordinary` over the "
    "same documents, in memory and end to end from the command line.\n\n"
)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", default="python-stdlib")
    parser.add_argument("--copies", type=int, nargs="+", default=[3, 9])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--documents", type=int, default=None,
                        help="only the corpus's first N documents")
    add_report_options(parser, QUICK)
    args = parse_report_arguments(parser, argv, QUICK)
    too_few_documents = args.documents is not None and args.documents < 1
    if min(args.copies) < 1 or args.repeats < 1 or too_few_documents:
        parser.error("--copies, --repeats and --documents must be at least 1")
    command = (f"python benchmarks/prepare.py --corpus {shlex.quote(args.corpus)} "
               f"--copies {' '.join(map(str, args.copies))} --repeats {args.repeats}")
    if args.documents:
        command += f" --documents {args.documents}"
    if args.write:
        command += f" --write {shlex.quote(str(args.write))}"
    started = datetime.datetime.now(datetime.timezone.utc)
    args.load_start = " ".join(f"{x:.2f}" for x in os.getloadavg())
    clock = time.perf_counter()
    result = measure(args)
    body = render(result, machine(), args, command, started, time.perf_counter() - clock)
    print()
    print(body)
    if args.write:
        write_section(args.write, START, END, body, heading=HEADING)
        print(f"\nwrote the prepare section of {args.write}")
    write_summary_rows(args.json, summary(result, command))


if __name__ == "__main__":
    main()
