"""Prompts and batched decode steps of GPT-2 small: this tree against a reference tree.

    python benchmarks/batched.py --reference-commit REF [--repeats 3] [--write docs/BENCHMARKS.md]
        [--json ROWS.json]

Batch invariance (every row of a product, a norm, an attention computed alike whatever it is
batched with) took the several-row products off oneDNN's packed bf16 and MKL's fp32 and onto
Promethean's own kernels, so prompts and batched steps must be checked against the code before:
no more than 10% slower. --reference-commit REF checks REF out into a temporary git worktree (the
commit before that change: 65dc625) and every figure is measured in both trees, in alternation,
each in a fresh subprocess that imports the tree's own `promethean` (its own kernels, built into
the cache on first use), so that noise hits both alike. The ratios are taken within a round and
the median over rounds is reported.

Workloads, on `gpt2-small` with random weights prepared by `prepare_for_inference` in fp32, bf16
and int8 (all the cores, `torch.inference_mode`):

* a 512-token prompt (batch 1): the prefill's milliseconds, the last position's logits;
* four prompts of 256, 200, 128 and 64 tokens, left-padded into one batch;
* a decode step of 8 rows at once (each with 64 tokens in its cache): the median of 16 steps.

With --write FILE the results replace this CPU kind's block between `<!-- batched:start -->` and
`<!-- batched:end -->`; with --json FILE the summary rows of `python -m benchmarks` are written.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
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
    cpu_description,
    measured_line,
    ratios,
    summary_row,
    write_section,
    write_summary_rows,
)

START, END = "<!-- batched:start -->", "<!-- batched:end -->"
HEADING = (
    "## Prompts and batched steps: this code against the code before batch invariance\n\n"
    "`benchmarks/batched.py`: prefill and batched decode-step time of `gpt2-small`, this tree "
    "against a reference commit in a worktree beside it, alternating subprocesses.\n\n"
)
DTYPES = ("fp32", "bf16", "int8")
WORKLOADS = {
    "prefill": "prompt of 512 tokens, batch 1",
    "padded": "4 prompts (256, 200, 128, 64 tokens), left-padded batch",
    "step": "decode step of 8 rows (64 tokens cached each)",
}
# The most a workload may slow down against the reference (the 10%).
LEAST_SPEED = 0.9
QUICK = {"repeats": 1}


# ------------------------------------------------------------------------------- the child
# Runs in a fresh subprocess with only one tree's `promethean` importable (this script's
# `benchmarks` package is not: the reference tree has its own): seconds of each workload, as JSON.
CHILD = """
import json, os, statistics, sys, time
sys.path.insert(0, sys.argv[1])
import torch
from promethean.config import load_preset
from promethean.inference.quantize import prepare_for_inference
from promethean.model import Transformer

torch.set_num_threads(len(os.sched_getaffinity(0)))
torch.manual_seed(0)
model = prepare_for_inference(Transformer(load_preset("gpt2-small").model), sys.argv[2])
generator = torch.Generator().manual_seed(1)
vocab = model.config.vocab_size

def timed(action, repeats):
    action()  # warm-up (and, on the first call, any lazy packing)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        action()
        times.append(time.perf_counter() - start)
    return statistics.median(times)

results = {}
with torch.inference_mode():
    prompt = torch.randint(0, vocab, (1, 512), generator=generator)
    results["prefill"] = timed(lambda: model(prompt, cache=model.new_cache(1, capacity=520),
                                             last_logits_only=True), 3)
    padding = torch.tensor([0, 56, 128, 192])
    padded = torch.randint(0, vocab, (4, 256), generator=generator)
    results["padded"] = timed(lambda: model(
        padded, cache=model.new_cache(4, capacity=264, left_padding=padding),
        last_logits_only=True), 3)
    cache = model.new_cache(8, capacity=128)
    model(torch.randint(0, vocab, (8, 64), generator=generator), cache=cache)
    tokens = torch.randint(0, vocab, (8, 1), generator=generator)
    steps = []
    for _ in range(17):
        start = time.perf_counter()
        model(tokens, cache=cache)
        steps.append(time.perf_counter() - start)
    results["step"] = statistics.median(steps[1:])
print(json.dumps(results))
"""


def run_child(tree: Path, dtype: str) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": ""}
    done = subprocess.run([sys.executable, "-c", CHILD, str(tree), dtype], capture_output=True,
                          text=True, timeout=1800, cwd=tree, env=env)
    if done.returncode != 0:
        raise SystemExit(f"the {dtype} run in {tree} failed: "
                         f"{(done.stderr.strip().splitlines() or ['no output'])[-1]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------ the parent
def worktree(commit: str) -> tuple[Path, tempfile.TemporaryDirectory]:
    scratch = tempfile.TemporaryDirectory(prefix="promethean-reference-")
    path = Path(scratch.name) / "tree"
    done = subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(path),
                           commit], capture_output=True, text=True)
    if done.returncode != 0:
        scratch.cleanup()
        raise SystemExit(f"cannot check out {commit}: {done.stderr.strip()}")
    return path, scratch


def remove_worktree(path: Path, scratch: tempfile.TemporaryDirectory) -> None:
    subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(path)],
                   capture_output=True)
    scratch.cleanup()


def measure(reference: Path, repeats: int) -> dict:
    trees = {"ours": ROOT, "reference": reference}
    seconds = {(tree, dtype, work): [] for tree in trees for dtype in DTYPES for work in WORKLOADS}
    for repeat in range(repeats):
        order = list(trees) if repeat % 2 == 0 else list(reversed(trees))
        for dtype in DTYPES:
            for tree in order:
                for work, value in run_child(trees[tree], dtype).items():
                    seconds[tree, dtype, work].append(value)
            line = "  ".join(f"{work} {1e3 * seconds['ours', dtype, work][-1]:.1f} / "
                             f"{1e3 * seconds['reference', dtype, work][-1]:.1f} ms"
                             for work in WORKLOADS)
            print(f"  round {repeat + 1}/{repeats} {dtype}: ours / reference: {line}", flush=True)
    return seconds


def speed(seconds: dict, dtype: str, work: str) -> float:
    """The reference's time over ours, the median over rounds (above 1: ours is faster)."""
    return ratios(seconds["reference", dtype, work], seconds["ours", dtype, work])


def render(seconds, info, args, commit, started, elapsed, command) -> str:
    rows = ["| what | ours | reference, same run | speed (reference time / ours) | target |",
            "|---|---|---|---|---|"]
    for dtype in DTYPES:
        for work, what in WORKLOADS.items():
            ours = statistics.median(seconds["ours", dtype, work]) * 1e3
            theirs = statistics.median(seconds["reference", dtype, work]) * 1e3
            ratio = speed(seconds, dtype, work)
            verdict = "met" if ratio >= LEAST_SPEED else "**not met**"
            rows.append(f"| {what}, {dtype} | {ours:.1f} ms | {theirs:.1f} ms | **{ratio:.2f}x** | "
                        f"≥ {LEAST_SPEED:.1f}x: {verdict} |")
    per_round = "; ".join(
        f"{tree} {dtype} {work} " + ", ".join(f"{1e3 * s:.1f}" for s in values)
        for (tree, dtype, work), values in seconds.items())
    return "\n".join([
        f"{measured_line(info, started, elapsed / 60)}; torch {info['torch']}, "
        f"Python {info['python']}.",
        "",
        f"Setup: `gpt2-small` (random weights) prepared by `prepare_for_inference` in each dtype, "
        f"in this tree and in the reference commit `{commit}` checked out beside it; each figure "
        f"in a fresh subprocess per tree and dtype, trees alternating, {args.repeats} rounds; "
        "medians; each ratio is taken within a round, then the median is reported. The reference "
        "multiplied several rows with oneDNN's packed bf16 (its own kernel for int8), fp32 with "
        "`F.linear` (MKL), and attended with SDPA; ours runs every row on Promethean's kernels.",
        "",
        *rows,
        "",
        f"Per-round ms: {per_round}.",
        f"Command: `{command}`.",
    ])


def summary(seconds, command) -> list[dict[str, str]]:
    found = []
    for dtype in DTYPES:
        for work, what in WORKLOADS.items():
            ours = statistics.median(seconds["ours", dtype, work]) * 1e3
            theirs = statistics.median(seconds["reference", dtype, work]) * 1e3
            ratio = speed(seconds, dtype, work)
            found.append(summary_row(
                f"{what}, gpt2-small {dtype}, ours vs the code before batch invariance",
                f"{ours:.1f} ms", f"{theirs:.1f} ms (reference commit)", f"{ratio:.2f}x faster",
                "—", f"≥ {LEAST_SPEED:.1f}x: {'met' if ratio >= LEAST_SPEED else 'not met'}",
                f"`{command}`"))
    return found


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reference-commit", default="65dc625",
                        help="the commit to compare with (default: the one before batch "
                        "invariance)")
    parser.add_argument("--repeats", type=int, default=3)
    add_report_options(parser, QUICK)
    from benchmarks.common import parse_report_arguments

    args = parse_report_arguments(parser, argv, QUICK)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    command = (f"python benchmarks/batched.py --reference-commit {args.reference_commit} "
               f"--repeats {args.repeats}")
    if args.write:
        command += f" --write {shlex.quote(str(args.write))}"
    started = datetime.datetime.now(datetime.timezone.utc)
    clock = time.perf_counter()
    import torch

    path, scratch = worktree(args.reference_commit)
    try:
        seconds = measure(path, args.repeats)
    finally:
        remove_worktree(path, scratch)
    info = {**cpu_description(), "torch": torch.__version__}
    body = render(seconds, info, args, args.reference_commit, started,
                  time.perf_counter() - clock, command)
    print(body)
    if args.write:
        write_section(args.write, START, END, body, HEADING)
    write_summary_rows(args.json, summary(seconds, command))


if __name__ == "__main__":
    main()
