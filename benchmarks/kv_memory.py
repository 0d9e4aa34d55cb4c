"""KV cache memory per request: what the engine's padded batch cache holds against what the
requests' tokens need.

    python benchmarks/kv_memory.py [--model gpt2-small] [--dtypes fp32,bf16]
        [--concurrency 8,32] [--write docs/BENCHMARKS.md] [--json ROWS.json] [--quick]

The engine (`promethean.inference.engine.Engine`, in this process, `--model` with random
weights prepared as each dtype) keeps every running request as a row of one contiguous cache:
a row has as many slots as the longest row (left padding), and the buffers grow by doubling. For
each concurrency, that many requests of a chat-like mix (prompts of 16-`--longest-prompt`
random tokens, replies of 8-64 greedy tokens, all submitted at once) run to the end, and the
engine's own gauges (`Engine.counters`: `peak_kv_bytes`, `peak_kv_tokens`, reported by the
server's /metrics) give the most bytes the batch cache held and the most tokens its rows held.
A token's keys and values take `2 x layers x kv heads x head size x element size` bytes; the
ratio of the two is what padding and spare room cost, the memory a paged cache (blocks of held
tokens only) would give back.

With --write FILE the results replace the part of FILE between `<!-- kv-memory:start -->` and
`<!-- kv-memory:end -->` (appended if absent). With --json FILE the summary rows of
`python -m benchmarks` are written there. --quick: tiny-gpt2, fp32, concurrency 8.
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.common import (  # noqa: E402
    add_report_options,
    cpu_description,
    measured_line,
    parse_report_arguments,
    summary_row,
    write_section,
    write_summary_rows,
)

START, END = "<!-- kv-memory:start -->", "<!-- kv-memory:end -->"
HEADING = "## KV cache memory per request\n\n"
QUICK = {"model": "tiny-gpt2", "dtypes": "fp32", "concurrency": "8", "longest_prompt": 48}


def token_bytes(config, dtype: str) -> int:
    """Bytes of one token's keys and values over every attention layer."""
    element = 4 if dtype == "fp32" else 2  # int8 models keep bf16 activations and caches
    attention_layers = sum(1 for layer in range(config.n_layer)
                           if config.layer_mixer(layer) == "attention")
    return 2 * attention_layers * config.kv_heads * config.head_size * element


def measure(args, dtype: str, concurrency: int) -> dict:
    import torch

    from promethean.config import load_preset
    from promethean.inference.engine import Engine
    from promethean.inference.generate import SamplingParams
    from promethean.inference.quantize import prepare_for_inference
    from promethean.model import Transformer

    torch.manual_seed(0)
    model = prepare_for_inference(Transformer(load_preset(args.model).model), dtype)
    generator = torch.Generator().manual_seed(concurrency)
    vocab = model.config.vocab_size
    requests = []
    for _ in range(concurrency):
        length = int(torch.randint(16, args.longest_prompt + 1, (1,), generator=generator))
        reply = int(torch.randint(8, 65, (1,), generator=generator))
        requests.append((torch.randint(0, vocab, (length,), generator=generator).tolist(),
                         SamplingParams(max_new_tokens=reply, temperature=0)))
    engine = Engine(model, max_batch_size=concurrency)
    try:
        handles = [engine.submit(prompt, params) for prompt, params in requests]
        for handle in handles:
            handle.result(timeout=600)
        counters = engine.counters()
    finally:
        engine.shutdown()
    per_token = token_bytes(model.config, dtype)
    return {"peak_bytes": counters["peak_kv_bytes"], "peak_tokens": counters["peak_kv_tokens"],
            "token_bytes": per_token, "needed_bytes": counters["peak_kv_tokens"] * per_token,
            "requests": concurrency}


def render(results, args, command: str, started, elapsed: float) -> str:
    import torch

    info = cpu_description()
    lines = [
        f"{measured_line(info, started, elapsed / 60)}; torch {torch.__version__}, Python "
        f"{info['python']}.",
        "",
        f"Setup: {args.model} (random weights, prepared for inference), one engine; at each "
        f"concurrency that many requests submitted at once, prompts of 16-{args.longest_prompt} "
        "random tokens, greedy replies of 8-64 tokens, run to the end. Peaks are the engine's "
        "own gauges (`promethean_kv_cache_peak_bytes` / `_tokens` in /metrics).",
        "",
        "| dtype | concurrency | peak cache | peak tokens held | their keys and values | "
        "cache / tokens' need | cache per request |",
        "|---|---|---|---|---|---|---|",
    ]
    mib = 2**20
    for (dtype, concurrency), result in results.items():
        ratio = result["peak_bytes"] / max(1, result["needed_bytes"])
        lines.append(
            f"| {dtype} | {concurrency} | {result['peak_bytes'] / mib:.1f} MiB | "
            f"{result['peak_tokens']} | {result['needed_bytes'] / mib:.1f} MiB | {ratio:.2f}x | "
            f"{result['peak_bytes'] / concurrency / mib:.2f} MiB |")
    lines += ["", "The ratio is today's padded, doubling cache against the tokens it holds (each "
              "at its own peak, which need not fall on the same step): what a paged cache would "
              f"give back. Command: `{command}`"]
    return "\n".join(lines)


def summary(results, args, command: str) -> list[dict[str, str]]:
    rows = []
    for (dtype, concurrency), result in results.items():
        ratio = result["peak_bytes"] / max(1, result["needed_bytes"])
        rows.append(summary_row(
            f"KV cache per request, {args.model} {dtype}, concurrency {concurrency} (padded "
            "batch cache)",
            f"{result['peak_bytes'] / concurrency / 2**20:.2f} MiB",
            f"{result['needed_bytes'] / concurrency / 2**20:.2f} MiB the tokens need",
            f"{ratio:.2f}x", "", "", f"`{command}`"))
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="gpt2-small")
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--concurrency", default="8,32")
    parser.add_argument("--longest-prompt", type=int, default=400)
    add_report_options(parser, QUICK)
    args = parse_report_arguments(parser, argv, QUICK)
    command = (f"python benchmarks/kv_memory.py --model {args.model} --dtypes {args.dtypes} "
               f"--concurrency {args.concurrency} --longest-prompt {args.longest_prompt}"
               + (" --write docs/BENCHMARKS.md" if args.write else ""))
    started = datetime.datetime.now(datetime.timezone.utc)
    began = time.perf_counter()
    results = {}
    for dtype in args.dtypes.split(","):
        for concurrency in (int(c) for c in args.concurrency.split(",")):
            results[dtype, concurrency] = measure(args, dtype, concurrency)
            print(f"{dtype} c={concurrency}: {results[dtype, concurrency]}", flush=True)
    body = render(results, args, command, started, time.perf_counter() - began)
    print(body)
    if args.write is not None:
        write_section(args.write, START, END, body, HEADING)
    write_summary_rows(args.json, summary(results, args, command))


if __name__ == "__main__":
    main()
