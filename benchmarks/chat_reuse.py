"""A chat that resends its whole conversation every turn, with prefix reuse and without.

    python benchmarks/chat_reuse.py [--rounds 4] [--turns 10] [--write docs/BENCHMARKS.md]
        [--json ROWS.json] [--quick]

A chat client (the web page, `/v1/chat/completions`) sends the conversation so far with every
message, so without reuse the prefill of turn N covers every earlier turn and its time to first
token grows with the history. Two engines (`promethean.inference.engine.Engine`, in this
process) serve the same prepared model (`--model`, random weights, `--dtype`): one with the
server's default prefix cache (`--prefix-cache-memory 256MB`), one without (the peer, today's
engine before reuse). Each round plays the same `--turns`-turn conversation on both, in an order
that alternates from round to round: turn t sends the history plus a `--message-tokens` message
and takes a `--reply-tokens` greedy reply (random token ids: a reply is the model's own), then
waits `--think-seconds` (a person reading and typing; the engine files the finished turn for
reuse meanwhile, work no reply waits for in a real chat). Time to first token is submission to the first token's event; the replies of the two engines must be
equal (the run stops otherwise). Reported per turn: the median time to first token of each engine
and the prompt tokens each prefilled; the targets are the last turn's time to first token within
1.5x of the first's with reuse, and the ratio of the two engines at the last turn.

With --write FILE the results replace the part of FILE between `<!-- chat-reuse:start -->` and
`<!-- chat-reuse:end -->` (appended if absent). With --json FILE the summary rows of
`python -m benchmarks` are written there. --quick: tiny-gpt2, 4 turns, one round.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
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

START, END = "<!-- chat-reuse:start -->", "<!-- chat-reuse:end -->"
HEADING = "## Chat turns with prefix reuse\n\n"
QUICK = {"model": "tiny-gpt2", "turns": 4, "rounds": 1}
REUSE, PLAIN = "reuse", "no reuse"


def conversation(vocab: int, turns: int, message_tokens: int, seed: int = 0) -> list[list[int]]:
    import torch

    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (message_tokens,), generator=generator).tolist()
            for _ in range(turns)]


def play(engine, messages: list[list[int]], reply_tokens: int, think_seconds: float = 0.0
         ) -> list[dict]:
    """One conversation on `engine`: per turn, the time to first token, the prompt length, the
    prompt tokens prefilled and the reply. `think_seconds` pass between a reply and the next
    message, as a person reads and types (the engine files the finished turn meanwhile)."""
    from promethean.inference.generate import SamplingParams

    params = SamplingParams(max_new_tokens=reply_tokens, temperature=0)
    history, turns = [], []
    for message in messages:
        history = history + message
        prefilled = engine.prefilled_tokens
        sent = time.monotonic()
        handle = engine.submit(history, params)
        reply = handle.result(timeout=600).token_ids
        turns.append({"ttft": handle.first_token_at - sent, "prompt": len(history),
                      "prefilled": engine.prefilled_tokens - prefilled, "reply": reply})
        history = history + reply
        time.sleep(think_seconds)
    return turns


def measure(args) -> dict[str, list[list[dict]]]:
    import torch

    from promethean.config import load_preset
    from promethean.inference import DEFAULT_PREFIX_CACHE_BYTES
    from promethean.inference.engine import Engine
    from promethean.inference.quantize import prepare_for_inference
    from promethean.model import Transformer

    torch.manual_seed(0)
    model = prepare_for_inference(Transformer(load_preset(args.model).model), args.dtype)
    messages = conversation(model.config.vocab_size, args.turns, args.message_tokens)
    # Another conversation (no prefix in common with it) to warm each engine up, untimed.
    warm_up = conversation(model.config.vocab_size, 1, args.message_tokens, seed=1)
    runs: dict[str, list[list[dict]]] = {REUSE: [], PLAIN: []}
    for round_index in range(args.rounds):
        order = (REUSE, PLAIN) if round_index % 2 == 0 else (PLAIN, REUSE)
        for mode in order:
            # A fresh engine a round: each conversation starts with an empty prefix cache.
            engine = Engine(model, prefix_cache_bytes=DEFAULT_PREFIX_CACHE_BYTES
                            if mode == REUSE else 0)
            try:
                play(engine, warm_up, args.reply_tokens)
                runs[mode].append(play(engine, messages, args.reply_tokens,
                                       args.think_seconds))
            finally:
                engine.shutdown()
        replies = [[turn["reply"] for turn in runs[mode][-1]] for mode in (REUSE, PLAIN)]
        if replies[0] != replies[1]:
            raise SystemExit("the engine with prefix reuse answered differently from the one "
                             "without: reuse must change no output.")
    return runs


def per_turn(runs: list[list[dict]], key: str) -> list[float]:
    return [statistics.median(run[turn][key] for run in runs) for turn in range(len(runs[0]))]


def render(runs, args, command: str, started, elapsed: float) -> str:
    import torch

    info = cpu_description()
    ttft = {mode: per_turn(runs[mode], "ttft") for mode in runs}
    prefilled = {mode: per_turn(runs[mode], "prefilled") for mode in runs}
    prompts = per_turn(runs[REUSE], "prompt")
    lines = [
        f"{measured_line(info, started, elapsed / 60)}; torch {torch.__version__}, Python "
        f"{info['python']}.",
        "",
        f"Setup: {args.model} ({args.dtype} weights, random, prepared for inference), two "
        f"engines in one process: with the server's default prefix cache (256 MiB) and "
        f"without. One {args.turns}-turn conversation, each turn a {args.message_tokens}-token "
        f"message after the whole history and a {args.reply_tokens}-token greedy reply, "
        + (f"then {args.think_seconds:g} s before the next message (a person reading); "
           if args.think_seconds else "the next message sent as soon as the reply is complete; ")
        + f"{args.rounds} rounds, the engines alternating; medians over rounds. Both engines "
        f"gave the same replies in every round.",
        "",
        f"| turn | prompt tokens | prefilled, {REUSE} | prefilled, {PLAIN} | time to first "
        f"token, {REUSE} | time to first token, {PLAIN} | {PLAIN} / {REUSE} |",
        "|---|---|---|---|---|---|---|",
    ]
    for turn in range(args.turns):
        lines.append(
            f"| {turn + 1} | {prompts[turn]:.0f} | {prefilled[REUSE][turn]:.0f} | "
            f"{prefilled[PLAIN][turn]:.0f} | {ttft[REUSE][turn] * 1000:.1f} ms | "
            f"{ttft[PLAIN][turn] * 1000:.1f} ms | {ttft[PLAIN][turn] / ttft[REUSE][turn]:.2f}x |")
    growth = ttft[REUSE][-1] / ttft[REUSE][0]
    plain_growth = ttft[PLAIN][-1] / ttft[PLAIN][0]
    lines += ["", f"Target: turn {args.turns}'s time to first token within 1.5x of turn 1's "
              f"with reuse: {growth:.2f}x ({'met' if growth <= 1.5 else 'not met'}); without "
              f"reuse it is {plain_growth:.2f}x. Command: `{command}`"]
    return "\n".join(lines)


def summary(runs, args, command: str) -> list[dict[str, str]]:
    ttft = {mode: per_turn(runs[mode], "ttft") for mode in runs}
    growth = ttft[REUSE][-1] / ttft[REUSE][0]
    last = args.turns
    return [summary_row(
        f"chat turn {last} time to first token, {args.model} {args.dtype}, each turn resending "
        "the conversation",
        f"{ttft[REUSE][-1] * 1000:.0f} ms with prefix reuse ({growth:.2f}x turn 1)",
        f"{ttft[PLAIN][-1] * 1000:.0f} ms without",
        f"{ttft[PLAIN][-1] / ttft[REUSE][-1]:.2f}x", "",
        f"turn {last} ≤ 1.5x turn 1: {'met' if growth <= 1.5 else 'not met'}", f"`{command}`")]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="gpt2-small")
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "int8"))
    parser.add_argument("--turns", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--message-tokens", type=int, default=32)
    parser.add_argument("--reply-tokens", type=int, default=24)
    parser.add_argument("--think-seconds", type=float, default=0.0)
    add_report_options(parser, QUICK)
    args = parse_report_arguments(parser, argv, QUICK)
    # The settings that shaped the run (not where its files went), so the command reproduces it.
    command = (f"python benchmarks/chat_reuse.py --model {args.model} --dtype {args.dtype} "
               f"--turns {args.turns} --rounds {args.rounds} --message-tokens "
               f"{args.message_tokens} --reply-tokens {args.reply_tokens} --think-seconds "
               f"{args.think_seconds:g}" + (" --write docs/BENCHMARKS.md" if args.write else ""))
    started = datetime.datetime.now(datetime.timezone.utc)
    began = time.perf_counter()
    runs = measure(args)
    body = render(runs, args, command.strip(), started, time.perf_counter() - began)
    print(body)
    if args.write is not None:
        write_section(args.write, START, END, body, HEADING)
    write_summary_rows(args.json, summary(runs, args, command.strip()))


if __name__ == "__main__":
    main()
