"""Many LoRA adapters in one batch: requests/s for mixed adapters against the base alone, and
what the adapters cost in memory, over real HTTP.

    python benchmarks/serve_adapters.py [--rounds 3] [--write docs/BENCHMARKS.md]
        [--json ROWS.json] [--quick]

One `promethean serve` process per dtype (`--dtypes`, default fp32 and bf16) serves `--model`
(random weights written by `promethean model init`) with `--adapters` rank-`--rank` LoRA adapters
on every block layer (q/k/v/o, MLP), random non-zero B so each changes the outputs, and
`--max-adapters` as many, so all are held at once. At concurrency `--concurrency`, `--requests`
16-token greedy completions of one short prompt are sent (benchmarks/serve.py's burst) either
all to the base model (the peer: the engine's speed without adapters) or round-robin over the
adapters (every batch mixes them); a round runs both, in an order that alternates from round to
round; the ratio is taken within a round, median over rounds.

Memory: the server's resident set (VmRSS) after the base alone has answered and again after every
adapter has (their slots written), beside the bytes of the adapters' matrices the engine reports
(`promethean_adapter_bytes` in /metrics) and what one merged copy of the model per adapter (the
engine before slots) would add.

With --write FILE the results replace the part of FILE between `<!-- serve-adapters:start -->`
and `<!-- serve-adapters:end -->` (appended if absent). With --json FILE the summary rows of
`python -m benchmarks` are written there. --quick: tiny-gpt2, fp32, one round of 16 requests.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import re
import statistics
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
from benchmarks.serve import ServerProcess, burst, init_checkpoint  # noqa: E402

START, END = "<!-- serve-adapters:start -->", "<!-- serve-adapters:end -->"
HEADING = "## Many adapters in one batch\n\n"
QUICK = {"model": "tiny-gpt2", "dtypes": "fp32", "rounds": 1, "requests": 16}
BASE, MIXED = "base alone", "adapters mixed"
TARGET = 0.8


def add_adapters(checkpoint: Path, count: int, rank: int) -> list[str]:
    """`count` adapters saved into the checkpoint (random B: each changes the outputs)."""
    import torch

    from promethean.checkpoint import load_checkpoint
    from promethean.continual.adapters import Adapters, adapter_directory, checkpoint_sha256

    model = load_checkpoint(checkpoint).model
    adapters = Adapters(model, base_sha256=checkpoint_sha256(checkpoint))
    generator = torch.Generator().manual_seed(0)
    names = [f"domain{index}" for index in range(count)]
    for name in names:
        adapters.add(name, rank=rank)
        with torch.no_grad():
            for key, tensor in adapters.trainable_parameters(name).items():
                if key.endswith("lora_B"):
                    tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.01)
        adapters.save(name, adapter_directory(checkpoint, name))
    return names


def resident_bytes(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) * 1024


def metric(url: str, name: str) -> float:
    text = httpx.get(url + "/metrics", timeout=10).text
    return float(re.search(rf"^promethean_{name} (\S+)$", text, re.MULTILINE).group(1))


def measure_dtype(args, checkpoint: Path, names: list[str], dtype: str, directory: Path) -> dict:
    base_name = checkpoint.name
    adapters = tuple(f"{base_name}:{name}" for name in names)
    server = ServerProcess(checkpoint, 32, 1024, directory / f"{dtype}.jsonl", dtype,
                           extra=("--max-adapters", str(len(names)), "--prefix-cache-memory", "0"))
    try:
        asyncio.run(burst(server.url, 8, 4))  # warm-up: first-call allocations, threads
        base_rss = resident_bytes(server.process.pid)
        asyncio.run(burst(server.url, 2 * len(adapters), 4, adapters))  # reads every adapter
        adapters_rss = resident_bytes(server.process.pid)
        adapter_bytes = metric(server.url, "adapter_bytes")
        rates: dict[str, list[float]] = {BASE: [], MIXED: []}
        for round_index in range(args.rounds):
            order = (BASE, MIXED) if round_index % 2 == 0 else (MIXED, BASE)
            for mode in order:
                result = asyncio.run(burst(server.url, args.requests, args.concurrency,
                                           adapters if mode == MIXED else ()))
                if set(result["statuses"]) != {200}:
                    raise SystemExit(f"{mode}: not every request succeeded: "
                                     f"{dict(result['statuses'])}")
                rates[mode].append(result["requests"] / result["seconds"])
                print(f"{args.model} {dtype} {mode}: {rates[mode][-1]:.1f} req/s", flush=True)
    finally:
        server.stop()
    return {"rates": rates, "base_rss": base_rss, "adapters_rss": adapters_rss,
            "adapter_bytes": adapter_bytes}


def model_bytes(checkpoint: Path, dtype: str) -> int:
    """Bytes of one copy of the model's weights as served in `dtype` (int8: one byte each)."""
    from safetensors import safe_open

    elements = 0
    with safe_open(str(checkpoint / "model.safetensors"), framework="pt") as reader:
        for key in reader.keys():  # noqa: SIM118 - a safetensors reader, not a dict
            count = 1
            for size in reader.get_slice(key).get_shape():
                count *= size
            elements += count
    return elements * {"fp32": 4, "bf16": 2}.get(dtype, 1)


def render(results: dict, args, names, checkpoint: Path, command: str, started,
           elapsed: float) -> str:
    import torch

    info = cpu_description()
    lines = [
        f"{measured_line(info, started, elapsed / 60)}; torch {torch.__version__}, Python "
        f"{info['python']}.",
        "",
        f"Setup: {args.model} (random weights), one `promethean serve` per dtype with "
        f"{len(names)} rank-{args.rank} adapters on every block layer held at once "
        f"(`--max-adapters {len(names)}`, prefix cache off). {args.requests} greedy 16-token "
        f"completions at concurrency {args.concurrency}, either all for the base model or "
        f"round-robin over the {len(names)} adapters (each batch mixes them); {args.rounds} "
        f"rounds, the two alternating; ratio within a round, median over rounds.",
        "",
        f"| dtype | {BASE}, req/s | {MIXED}, req/s | mixed / base | adapters' matrices | "
        "server RSS, base served | RSS after every adapter served | a merged model copy per "
        "adapter would add |",
        "|---|---|---|---|---|---|---|---|",
    ]
    mib = 2**20
    for dtype, result in results.items():
        rates = result["rates"]
        ratio = ratios(rates[MIXED], rates[BASE])
        copies = len(names) * model_bytes(checkpoint, dtype)
        lines.append(
            f"| {dtype} | {statistics.median(rates[BASE]):.1f} | "
            f"{statistics.median(rates[MIXED]):.1f} | {ratio:.2f}x | "
            f"{result['adapter_bytes'] / mib:.1f} MiB | {result['base_rss'] / mib:.0f} MiB | "
            f"{result['adapters_rss'] / mib:.0f} MiB "
            f"(+{(result['adapters_rss'] - result['base_rss']) / mib:.0f}) | "
            f"{copies / mib:.0f} MiB |")
    worst = min(ratios(r["rates"][MIXED], r["rates"][BASE]) for r in results.values())
    lines += ["", f"Target: mixed adapters at ≥ {TARGET}x the base's requests/s: {worst:.2f}x at "
              f"worst ({'met' if worst >= TARGET else 'not met'}); memory is the base plus the "
              f"adapters' matrices, twice (the slots, and the copy the server keeps read for "
              f"when a slot must be written again), with no copy of the model. Command: "
              f"`{command}`"]
    return "\n".join(lines)


def summary(results: dict, args, names, command: str) -> list[dict[str, str]]:
    rows = []
    for dtype, result in results.items():
        rates = result["rates"]
        ratio = ratios(rates[MIXED], rates[BASE])
        rows.append(summary_row(
            f"serve {args.model} {dtype}, concurrency {args.concurrency} over {len(names)} "
            "adapters mixed in one batch",
            f"{statistics.median(rates[MIXED]):.1f} req/s",
            f"{statistics.median(rates[BASE]):.1f} req/s to the base alone", f"{ratio:.2f}x",
            "", f"≥ {TARGET}x: {'met' if ratio >= TARGET else 'not met'}", f"`{command}`"))
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="gpt2-small")
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=3)
    add_report_options(parser, QUICK)
    args = parse_report_arguments(parser, argv, QUICK)
    command = (f"python benchmarks/serve_adapters.py --model {args.model} --dtypes {args.dtypes} "
               f"--adapters {args.adapters} --rank {args.rank} --concurrency {args.concurrency} "
               f"--requests {args.requests} --rounds {args.rounds}"
               + (" --write docs/BENCHMARKS.md" if args.write else ""))
    started = datetime.datetime.now(datetime.timezone.utc)
    began = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        directory = Path(scratch)
        checkpoint = init_checkpoint(args.model, directory)
        names = add_adapters(checkpoint, args.adapters, args.rank)
        results = {dtype: measure_dtype(args, checkpoint, names, dtype, directory)
                   for dtype in args.dtypes.split(",")}
        body = render(results, args, names, checkpoint, command, started,
                      time.perf_counter() - began)
    print(body)
    if args.write is not None:
        write_section(args.write, START, END, body, HEADING)
    write_summary_rows(args.json, summary(results, args, names, command))


if __name__ == "__main__":
    main()
