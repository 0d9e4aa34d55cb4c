"""Serving throughput: continuous batching against one-request-at-a-time, over real HTTP.

    python benchmarks/serve.py [--rounds 2] [--write docs/BENCHMARKS.md] [--json ROWS.json]
        [--quick]

For each model (`tiny-gpt2` and `gpt2-small`, random weights written by `promethean model init`)
two `promethean serve` processes run side by side: one with `--max-batch-size 32` (continuous
batching; the batch is at least every concurrency measured) and one with `--max-batch-size 1`
(each request decoded alone: the peer). At concurrency 1, 8 and 32, `--requests`-many 16-token
completions (greedy, one short prompt) are sent by that many concurrent `httpx` clients; a round
measures both servers, in an order that alternates from round to round, so the ratio (taken within
a round, median over rounds) sees the same noise on both sides. gpt2-small is measured once per
`--small-dtypes` value (`serve --dtype`: fp32 and bf16 weights by default), both servers of a
pair with the same weights. Requests/s = requests / wall
seconds of the whole burst; latency = send to full response, p50/p95 over every round's requests.

Then a load test: 1000 requests at concurrency 32 against the tiny model's server with the
defaults of `promethean serve` (batch 16, queue 64), counting the status codes (every one must be
200 or 503; a 503 is the queue saying "retry later", any other 5xx is a bug).

With --write FILE the results replace the part of FILE between `<!-- serve:start -->` and
`<!-- serve:end -->` (appended if absent); the rest of the file is left as it is. With --json
FILE the summary rows of `python -m benchmarks` are written there. --quick: tiny-gpt2 only, one
round of 8/16/32 requests, a 100-request load at concurrency 16, for a smoke run.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import datetime
import os
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.common import (  # noqa: E402
    add_report_options,
    cpu_description,
    measured_line,
    parse_report_arguments,
    ratios,
    summary_row,
    write_section,
    write_summary_rows,
)

START, END = "<!-- serve:start -->", "<!-- serve:end -->"
MODELS = ("tiny-gpt2", "gpt2-small")
CONCURRENCIES = (1, 8, 32)
NEW_TOKENS = 16
PROMPT = "Once upon a time, in a small village by the sea, there lived"
BATCHED, ALONE = "batched", "one-at-a-time"
# --quick: the tiny model only, one round of small bursts, a 100-request load.
QUICK = {"models": ["tiny-gpt2"], "rounds": 1, "tiny_requests": [8, 16, 32],
         "load_requests": 100, "load_concurrency": 16}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """`promethean serve CHECKPOINT` in a subprocess, ready once /health answers."""

    def __init__(self, checkpoint: Path, max_batch_size: int, max_queue: int, log: Path,
                 dtype: str = "fp32", extra: tuple[str, ...] = ()) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "promethean", "serve", str(checkpoint), "--port", str(self.port),
             "--max-batch-size", str(max_batch_size), "--max-queue", str(max_queue),
             "--chat-log", str(log), "--dtype", dtype, *extra],
            stdout=subprocess.DEVNULL, stderr=open(log.with_suffix(".stderr"), "w"))
        self.log = log.with_suffix(".stderr")
        deadline = time.monotonic() + 120
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited: {self.log.read_text()[-2000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the server did not start in 120 s")
            time.sleep(0.2)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()


async def burst(url: str, requests: int, concurrency: int,
                models: tuple[str, ...] = ()) -> dict:
    """`requests` completions by `concurrency` clients (request i for models[i % len(models)],
    or the server's base model); wall seconds, latencies, status codes."""
    body = {"prompt": PROMPT, "max_tokens": NEW_TOKENS, "temperature": 0}
    latencies: list[float] = []
    statuses: collections.Counter = collections.Counter()
    tokens = 0
    remaining = iter(range(requests))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        async def worker() -> None:
            nonlocal tokens
            for index in remaining:
                started = time.perf_counter()
                try:
                    response = await client.post(
                        "/v1/completions",
                        json={**body, "model": models[index % len(models)]} if models else body)
                except httpx.HTTPError as error:
                    statuses[type(error).__name__] += 1
                    continue
                latencies.append(time.perf_counter() - started)
                statuses[response.status_code] += 1
                if response.status_code == 200:
                    tokens += response.json()["usage"]["completion_tokens"]

        clock = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        seconds = time.perf_counter() - clock
    return {"seconds": seconds, "latencies": latencies, "statuses": statuses, "tokens": tokens,
            "requests": requests}


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def init_checkpoint(preset: str, directory: Path) -> Path:
    out = directory / preset
    subprocess.run([sys.executable, "-m", "promethean", "model", "init", preset, "--out", str(out)],
                   check=True, capture_output=True)
    return out


def measure_model(preset: str, directory: Path, counts: dict[int, int], rounds: int,
                  dtype: str = "fp32") -> dict:
    checkpoint = directory / preset
    if not checkpoint.exists():
        init_checkpoint(preset, directory)
    label = f"{preset}-{dtype}"
    servers = {BATCHED: ServerProcess(checkpoint, max(CONCURRENCIES), 1024,
                                      directory / f"{label}-batched.jsonl", dtype),
               ALONE: ServerProcess(checkpoint, 1, 1024, directory / f"{label}-alone.jsonl", dtype)}
    results: dict = {}
    try:
        for server in servers.values():  # warm-up: first-call allocations, thread start-up
            asyncio.run(burst(server.url, 4, 2))
        for concurrency in CONCURRENCIES:
            for round_index in range(rounds):
                order = [BATCHED, ALONE] if round_index % 2 == 0 else [ALONE, BATCHED]
                for mode in order:
                    result = asyncio.run(burst(servers[mode].url, counts[concurrency],
                                               concurrency))
                    results.setdefault((concurrency, mode), []).append(result)
                    print(f"{label} c={concurrency} {mode}: "
                          f"{result['requests'] / result['seconds']:.1f} req/s "
                          f"{dict(result['statuses'])}", flush=True)
    finally:
        for server in servers.values():
            server.stop()
    return results


def load_test(directory: Path, requests: int, concurrency: int) -> dict:
    checkpoint = directory / "tiny-gpt2"
    server = ServerProcess(checkpoint, 16, 64, directory / "load.jsonl")  # the serve defaults
    try:
        return asyncio.run(burst(server.url, requests, concurrency))
    finally:
        server.stop()


def summarise(results: dict, preset: str, counts: dict[int, int], dtype: str = "fp32") -> list[dict]:
    rows = []
    for concurrency in CONCURRENCIES:
        rates = {mode: [r["requests"] / r["seconds"] for r in results[concurrency, mode]]
                 for mode in (BATCHED, ALONE)}
        row = {"model": preset, "dtype": dtype, "concurrency": concurrency, "requests": counts[concurrency],
               "ratio": ratios(rates[BATCHED], rates[ALONE])}
        for mode in (BATCHED, ALONE):
            latencies = [x for r in results[concurrency, mode] for x in r["latencies"]]
            statuses = collections.Counter()
            for r in results[concurrency, mode]:
                statuses.update(r["statuses"])
            row[mode] = {"rate": statistics.median(rates[mode]),
                         "p50": percentile(latencies, 0.5), "p95": percentile(latencies, 0.95),
                         "statuses": statuses}
        rows.append(row)
    return rows


def render(rows: list[dict], load: dict, args, command: str, started, elapsed: float) -> str:
    import torch

    info = cpu_description()
    lines = [
        f"{measured_line(info, started, elapsed / 60)}; torch {torch.__version__}, "
        f"httpx {httpx.__version__}, Python {info['python']}. Load average at the start: "
        f"{args.load_start}.",
        "",
        f"Setup: `promethean serve` subprocesses (uvicorn, one engine thread, torch's default "
        f"threads), driven by concurrent `httpx.AsyncClient` workers in this process on the same "
        f"cores. Each request: `POST /v1/completions`, a {len(PROMPT)}-character prompt, "
        f"`max_tokens={NEW_TOKENS}`, greedy. {BATCHED}: `--max-batch-size {max(CONCURRENCIES)}`; "
        f"{ALONE}: `--max-batch-size 1` (each request decoded alone, the others wait in the "
        f"queue). {args.rounds} rounds per cell, the two servers alternating; req/s is the median "
        f"over rounds, the ratio is taken within a round (median), latencies are p50/p95 over "
        f"every request of every round.",
        "",
        "| model | weights | concurrency | requests per round | batched req/s | one-at-a-time req/s | "
        "**ratio** | batched p50 / p95 | one-at-a-time p50 / p95 | command |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        b, a = row[BATCHED], row[ALONE]
        lines.append(
            f"| {row['model']} | {row['dtype']} | {row['concurrency']} | {row['requests']} | {b['rate']:.1f} | "
            f"{a['rate']:.1f} | **{row['ratio']:.2f}x** | {b['p50']:.2f} s / {b['p95']:.2f} s | "
            f"{a['p50']:.2f} s / {a['p95']:.2f} s | `{command}` |")
    bad = {code: n for row in rows for mode in (BATCHED, ALONE)
           for code, n in row[mode]["statuses"].items() if code != 200}
    lines.append("")
    lines.append(f"Every timed request above answered 200{'' if not bad else f' except {bad}'}.")
    statuses = ", ".join(f"{code}: {n}" for code, n in sorted(load["statuses"].items(), key=str))
    other_5xx = sum(n for code, n in load["statuses"].items()
                    if not isinstance(code, int) or (code >= 500 and code != 503))
    lines += [
        "",
        f"Load: {load['requests']} requests at concurrency {args.load_concurrency} against "
        f"tiny-gpt2 with the serve defaults (batch 16, queue 64): {statuses} "
        f"({load['requests'] / load['seconds']:.1f} req/s, p50 "
        f"{percentile(load['latencies'], 0.5):.2f} s, p95 {percentile(load['latencies'], 0.95):.2f} "
        f"s); {other_5xx} responses were a 5xx other than 503 or a transport error.",
    ]
    at8 = {f"{r['model']} {r['dtype']}": r for r in rows if r["concurrency"] == 8}
    target = ", ".join(f"{model} {row['ratio']:.2f}x" for model, row in at8.items())
    lines += ["", f"Targets: batched ≥ 4x one-at-a-time at concurrency 8: {target}"]
    small = ", ".join(f"{model} {row[BATCHED]['rate']:.1f} req/s" for model, row in at8.items()
                      if row["model"] == "gpt2-small")
    if small:
        lines[-1] += f"; gpt2-small ≥ 10 req/s at concurrency 8: {small}"
    lines[-1] += "."
    return "\n".join(lines)


def summary(rows: list[dict], load: dict, command: str) -> list[dict[str, str]]:
    """The rows `python -m benchmarks` puts in the report's summary table: batched against
    one-at-a-time at concurrency 8 for each model, and the load test's status codes."""
    code = f"`{command}`"
    lines = []
    for row in rows:
        if row["concurrency"] != 8:
            continue
        batched, alone = row[BATCHED], row[ALONE]
        target = f"≥ 4x: {'met' if row['ratio'] >= 4 else 'not met'}"
        if row["model"] == "gpt2-small":
            target += f"; ≥ 10 req/s: {'met' if batched['rate'] >= 10 else 'not met'}"
        lines.append(summary_row(
            f"serving {row['model']} ({row['dtype']} weights), {NEW_TOKENS}-token completions "
            f"over HTTP, concurrency 8",
            f"{batched['rate']:.1f} req/s (p95 {batched['p95']:.2f} s)",
            f"{alone['rate']:.1f} req/s (one at a time, p95 {alone['p95']:.2f} s)",
            f"{row['ratio']:.2f}x", "", target, code))
    other = sum(n for status, n in load["statuses"].items()
                if not isinstance(status, int) or (status >= 500 and status != 503))
    statuses = ", ".join(f"{status}: {n}"
                         for status, n in sorted(load["statuses"].items(), key=str))
    lines.append(summary_row(
        f"serving load, {load['requests']} requests, tiny-gpt2, serve defaults",
        f"{load['requests'] / load['seconds']:.1f} req/s ({statuses})", "", "", "",
        f"no 5xx but 503: {'met' if other == 0 else 'not met'}", code))
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--tiny-requests", type=int, nargs=3, default=[32, 96, 192],
                        metavar=("C1", "C8", "C32"), help="tiny-gpt2 requests per round")
    parser.add_argument("--small-requests", type=int, nargs=3, default=[8, 32, 64],
                        metavar=("C1", "C8", "C32"), help="gpt2-small requests per round")
    parser.add_argument("--load-requests", type=int, default=1000)
    parser.add_argument("--load-concurrency", type=int, default=32)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--small-dtypes", nargs="+", default=["fp32", "bf16"],
                        choices=["fp32", "bf16", "int8"],
                        help="`serve --dtype` values measured for gpt2-small (tiny-gpt2: fp32)")
    add_report_options(parser, QUICK)
    args = parse_report_arguments(parser, argv, QUICK)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    command = (f"nice python benchmarks/serve.py --rounds {args.rounds} --tiny-requests "
               f"{' '.join(map(str, args.tiny_requests))} --small-requests "
               f"{' '.join(map(str, args.small_requests))} --load-requests {args.load_requests} --load-concurrency {args.load_concurrency}")
    if args.models != list(MODELS):
        command += f" --models {' '.join(args.models)}"
    if "gpt2-small" in args.models:
        command += f" --small-dtypes {' '.join(args.small_dtypes)}"
    if args.write:
        command += f" --write {shlex.quote(str(args.write))}"
    started = datetime.datetime.now(datetime.timezone.utc)
    args.load_start = " ".join(f"{x:.2f}" for x in os.getloadavg())
    clock = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        directory = Path(scratch)
        for preset in args.models:
            wanted = args.tiny_requests if preset == "tiny-gpt2" else args.small_requests
            counts = dict(zip(CONCURRENCIES, wanted))
            for dtype in args.small_dtypes if preset == "gpt2-small" else ["fp32"]:
                results = measure_model(preset, directory, counts, args.rounds, dtype)
                rows += summarise(results, preset, counts, dtype)
        if not (directory / "tiny-gpt2").exists():
            init_checkpoint("tiny-gpt2", directory)
        print(f"load: {args.load_requests} requests at concurrency {args.load_concurrency}",
              flush=True)
        load = load_test(directory, args.load_requests, args.load_concurrency)
    body = render(rows, load, args, command, started, time.perf_counter() - clock)
    print()
    print(body)
    if args.write:
        write_section(args.write, START, END, body,
                      heading="## Serving: continuous batching over HTTP\n\n"
                              "`benchmarks/serve.py`: requests/s and latency of 16-token "
                              "completions through `promethean serve`, batched against "
                              "one-at-a-time, and a 1000-request load.\n\n")
        print(f"\nwrote the serve section of {args.write}")
    write_summary_rows(args.json, summary(rows, load, command))


if __name__ == "__main__":
    main()
