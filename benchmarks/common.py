"""What every benchmark shares: the machine's description, ratios taken within rounds, and
rewriting one marked section of docs/BENCHMARKS.md."""

from __future__ import annotations

import os
import platform
import re
import statistics
from pathlib import Path


def cores() -> int:
    return len(os.sched_getaffinity(0))


def cpu_description() -> dict:
    """The CPU model, the vector features that matter to our kernels, the L3 size, and RAM."""
    model_name = platform.processor() or "unknown CPU"
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name") and model_name in ("unknown CPU", "x86_64"):
                    model_name = line.split(":", 1)[1].strip()
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    features = [
        name for flag, name in (("avx512f", "AVX-512"), ("amx_bf16", "AMX-BF16")) if flag in flags
    ]
    l3 = None
    l3_path = Path("/sys/devices/system/cpu/cpu0/cache/index3/size")
    if l3_path.exists():
        l3 = l3_path.read_text().strip()
        if l3.endswith("K") and l3[:-1].isdigit():
            l3 = f"{int(l3[:-1]) / 1024:.0f} MiB"
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {
        "cpu": model_name,
        "features": features,
        "cores": cores(),
        "l3": l3,
        "ram_gib": total / 2**30,
        "python": platform.python_version(),
    }


def ratios(numerator: list[float], denominator: list[float]) -> float:
    """Median over rounds of a ratio taken within each round (noise hits both sides alike)."""
    return statistics.median(n / d for n, d in zip(numerator, denominator, strict=True))


def write_section(path: Path, start: str, end: str, body: str, heading: str = "") -> None:
    """Replace the text between the `start` and `end` markers, or append `heading` + section."""
    section = f"{start}\n{body}\n{end}"
    text = path.read_text() if path.exists() else ""
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _: section, text, count=1)
    else:
        text = (text.rstrip("\n") + "\n\n" if text.strip() else "") + heading + section + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


# The summary protocol: each benchmark script takes `--json PATH` and writes there the rows of the
# report's summary table (`python -m benchmarks` gathers them). Every value is already formatted
# text, so the report needs to know nothing about what a row measures.
SUMMARY_FIELDS = ("what", "ours", "peer", "ratio", "limit", "target", "command")


def summary_row(what: str, ours: str, peer: str = "", ratio: str = "", limit: str = "",
                target: str = "", command: str = "") -> dict[str, str]:
    """One summary line: what was measured, our figure, the peer's figure measured in the same run,
    their ratio, the physical limit where one applies, the target and whether it was met, and the
    command that produced it."""
    return {"what": what, "ours": ours, "peer": peer, "ratio": ratio, "limit": limit,
            "target": target, "command": command}


def write_summary_rows(path: Path | None, rows: list[dict[str, str]]) -> None:
    """Write `rows` as JSON to `path` (nothing when `path` is None)."""
    import json

    if path is None:
        return
    for row in rows:
        missing = set(SUMMARY_FIELDS) - set(row)
        if missing:
            raise ValueError(f"summary row {row!r} lacks {sorted(missing)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows, indent=1, ensure_ascii=False) + "\n")


def add_report_options(parser, quick: dict | None = None) -> None:
    """The options every benchmark script shares: `--write REPORT` (rewrite its section),
    `--json ROWS` (its summary rows for `python -m benchmarks`) and, when the script has small
    settings for a smoke run, `--quick` (those settings, unless an option is given explicitly)."""
    parser.add_argument("--write", type=Path, default=None, help="markdown file to update")
    parser.add_argument("--json", type=Path, default=None,
                        help="write the summary rows of `python -m benchmarks` here")
    if quick is not None:
        parser.add_argument("--quick", action="store_true",
                            help=f"small settings for a smoke run: {quick} unless given")


def parse_report_arguments(parser, argv, quick: dict | None = None):
    """parse_args, with --quick's settings as the defaults when it is given (so an explicit
    option still wins)."""
    if quick is not None and parser.parse_known_args(argv)[0].quick:
        parser.set_defaults(**quick)
    return parser.parse_args(argv)

