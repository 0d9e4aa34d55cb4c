"""Every benchmark of the project in one run, and the summary at the top of the report.

    python -m benchmarks [--quick] [--only decode train ...] [--write docs/BENCHMARKS.md]

First the machine is described and its own limits are measured (benchmarks/machine.py): the
CPU, its kind, and which of Promethean's CPU kernels its instruction set runs ('avx512' or
'avx2', or why none); the matmul peak in fp32 and bf16 and the memory read bandwidth, each the
fastest of several ways, named. Then each benchmark script runs in its own subprocess, one after
another, with `--write REPORT` (it rewrites its own marked section of the report) and `--json
ROWS` (it writes its summary rows, benchmarks.common.summary_row). Last, the part of the report
between `<!-- summary:start -->` and `<!-- summary:end -->` (inserted before the first section if
absent) is rewritten: the machine table, then one table of every benchmark's rows: what was
measured, our figure, the peer's figure measured in the same run, their ratio, the physical limit
where one applies, the target, and the command that produced it.

The report keeps one set of rows per CPU kind (benchmarks/common.py): every section, the summary
included, holds one block per kind, and a run rewrites only its own machine's kind's blocks (put
first), so the rows measured on another CPU stay, dated.

--quick runs every benchmark at small sizes (a smoke run of a few minutes, not a measurement) and
writes to runs/benchmarks-quick.md unless --write says otherwise, so that it never overwrites the
real report. A benchmark that fails (or writes no rows) is reported with the last line of its
stderr; the others still run, and the exit status is 1.

Each benchmark's rows are also kept beside the report (REPORT's name + `.rows.json`, per CPU
kind, with when they were measured), so `--only NAME` re-runs one benchmark and the summary still
lists every other benchmark's rows (of this CPU kind) from its last run, each dated: on a shared
2-core machine the whole suite rarely gets one quiet hour, and a benchmark is best re-run alone
when its section is stale.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.common import (  # noqa: E402
    LEGACY_KIND,
    SUMMARY_FIELDS,
    cpu_identity,
    cpu_phrase,
    write_atomically,
    write_section,
)

START, END = "<!-- summary:start -->", "<!-- summary:end -->"
SUMMARY_HEADING = "## Summary\n\n"
FULL_REPORT = Path("docs/BENCHMARKS.md")
QUICK_REPORT = Path("runs/benchmarks-quick.md")
COLUMNS = ("what", "ours", "peer (same run)", "ratio", "physical limit", "target", "command")


@dataclass(frozen=True)
class Benchmark:
    """One benchmark script: its arguments for a full run and for --quick (the runner adds
    `--write REPORT --json ROWS`)."""

    name: str
    script: str  # relative to the repository root
    full: tuple[str, ...] = ()
    quick: tuple[str, ...] = ("--quick",)

    def command(self, quick: bool, report: Path, rows: Path) -> list[str]:
        arguments = self.quick if quick else self.full
        return [sys.executable, str(ROOT / self.script), *arguments, "--write", str(report),
                "--json", str(rows)]


CONTINUAL_BASE = Path("runs/continual/base/checkpoint")

# In the report's order. decode.py and context.py take explicit small sizes for --quick.
BENCHMARKS = (
    Benchmark("decode", "benchmarks/decode.py", quick=("--new-tokens", "16", "--repeats", "1")),
    Benchmark("batched", "benchmarks/batched.py"),
    Benchmark("prepare", "benchmarks/prepare.py"),
    Benchmark("train", "benchmarks/train.py"),
    Benchmark("ssm", "benchmarks/ssm.py"),
    Benchmark("context", "benchmarks/context.py",
              full=("--beams", "4", "8", "16", "24", "32", "64", "--corpus", "100000",
                    # KJV embedded by the continual-learning experiment's base model, when this
                    # machine has run it (docs/CONTINUAL.md)
                    *(("--model-corpus", str(CONTINUAL_BASE)) if (ROOT / CONTINUAL_BASE).is_dir() else ())),
              quick=("--sizes", "10000", "--queries", "20", "--beams", "8", "32")),
    Benchmark("serve", "benchmarks/serve.py"),
    Benchmark("chat-reuse", "benchmarks/chat_reuse.py"),
    Benchmark("serve-adapters", "benchmarks/serve_adapters.py"),
    Benchmark("kv-memory", "benchmarks/kv_memory.py"),
)


@dataclass
class Outcome:
    """What one benchmark left: its rows, or why it has none."""

    benchmark: Benchmark
    rows: list[dict[str, str]]
    seconds: float
    error: str = ""  # empty when the benchmark succeeded
    measured: str = ""  # "YYYY-MM-DD HH:MM" UTC when the rows come from an earlier run


def rows_file(report: Path) -> Path:
    """Where the rows behind `report`'s summary are kept between runs."""
    return report.with_name(report.name + ".rows.json")


def migrate_kept_rows(kept: dict) -> dict[str, dict]:
    """A rows file from before rows were kept per CPU kind ({benchmark name: entry}) as
    {LEGACY_KIND: it}: those rows were all measured on the Intel AMX machine. Others as they are."""
    if any(isinstance(entry, dict) and "rows" in entry for entry in kept.values()):
        return {LEGACY_KIND: kept}
    return kept


def load_kept_rows(report: Path) -> dict[str, dict[str, dict]]:
    """{CPU kind: {benchmark name: {"rows", "measured", "seconds"}}} from earlier runs ({} if
    none or unreadable: the summary then shows only this run)."""
    try:
        kept = json.loads(rows_file(report).read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(kept, dict):
        return {}
    return {
        kind: {name: entry for name, entry in entries.items()
               if isinstance(entry, dict) and isinstance(entry.get("rows"), list)
               and all(isinstance(row, dict) and set(SUMMARY_FIELDS) <= set(row)
                       for row in entry["rows"])}
        for kind, entries in migrate_kept_rows(kept).items() if isinstance(entries, dict)
    }


def keep_rows(report: Path, kept: dict[str, dict[str, dict]]) -> None:
    from promethean.files import atomic_file

    with atomic_file(rows_file(report)) as partial:
        partial.write_text(json.dumps(kept, indent=1, ensure_ascii=False) + "\n")


# ------------------------------------------------------------------------------------- machine
def measure_machine() -> dict:
    """The CPU's description (benchmarks.common.cpu_description: its kind, the kernels that run)
    and its measured matmul peaks (FLOP/s) and read bandwidth (B/s), each way's figure too.

    Measured in a subprocess so that this process stays small: Linux carries a parent's RSS
    high-water mark into the children it starts (vfork + exec), and several benchmarks measure
    their children's peak RSS."""
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "machine.py"), "--json"],
                          cwd=ROOT, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"error: measuring the machine failed: {last_line(done.stderr)}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------ running
def last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def run_benchmark(benchmark: Benchmark, quick: bool, report: Path, scratch: Path) -> Outcome:
    """Run one script in a subprocess (its stdout shown as it goes, its stderr kept), then read
    its rows."""
    rows_path = scratch / f"{benchmark.name}.json"
    stderr_path = scratch / f"{benchmark.name}.stderr"
    if report.is_relative_to(ROOT):  # the commands in the report then read `--write docs/...`
        report = report.relative_to(ROOT)
    command = benchmark.command(quick, report, rows_path)
    print(f"\n=== {benchmark.name}: {shlex.join([benchmark.script, *command[2:]])}", flush=True)
    started = time.perf_counter()
    with open(stderr_path, "w") as stderr:
        done = subprocess.run(command, cwd=ROOT, stdout=None, stderr=stderr, check=False)
    seconds = time.perf_counter() - started
    stderr_text = stderr_path.read_text(errors="replace")
    if done.returncode != 0:
        sys.stderr.write(stderr_text[-3000:])
        reason = last_line(stderr_text) or "no message on stderr"
        return Outcome(benchmark, [], seconds, f"exit status {done.returncode}: {reason}")
    if not rows_path.exists():
        return Outcome(benchmark, [], seconds, "it wrote no summary rows (no --json output)")
    try:
        rows = json.loads(rows_path.read_text())
        if not isinstance(rows, list) or not rows:
            raise ValueError("an empty or malformed list of rows")
        rows = [{field: str(row[field]) for field in SUMMARY_FIELDS} for row in rows]
    except (ValueError, KeyError, TypeError) as error:
        return Outcome(benchmark, [], seconds, f"its summary rows are unreadable: {error}")
    return Outcome(benchmark, rows, seconds)


# ----------------------------------------------------------------------------------- rendering
def cell(text: str) -> str:
    """Table-safe text: a `|` would end the cell."""
    return text.replace("|", "\\|").replace("\n", " ")


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(value) for value in row) + " |" for row in rows]
    return lines


def ways(figures: dict[str, float] | None, unit: str) -> str:
    """'`torch.matmul` 142, `oneDNN linear` 201 GFLOP/s; `oneDNN linear` won' ("" for none);
    `unit` is GFLOP/s or GB/s."""
    if not figures:
        return ""
    digits = 1 if unit == "GB/s" else 0
    listed = ", ".join(f"`{name}` {value / 1e9:,.{digits}f}" for name, value in figures.items())
    return f"{listed} {unit}; `{max(figures, key=figures.__getitem__)}` won"


def render_summary(machine: dict, outcomes: Sequence[Outcome], *, quick: bool, command: str,
                   started: datetime.datetime, elapsed: float) -> str:
    peaks = machine["matmul_peak"]
    paths = machine.get("matmul_paths") or {}
    readers = ways(machine.get("bandwidth_readers"), "GB/s") or "`torch.sum`, `torch.mv`"
    machine_rows = [
        *((f"matmul peak, {dtype}", f"{peaks[dtype] / 1e9:,.0f} GFLOP/s",
           "2048³, the median of timed passes of each way: "
           + (ways(paths.get(dtype), "GFLOP/s") or "`torch.matmul`"))
          for dtype in ("fp32", "bf16")),
        ("memory read bandwidth", f"{machine['bandwidth'] / 1e9:,.1f} GB/s",
         f"an fp32 buffer past the L3 read once, the median of timed passes of each way: "
         f"{readers}"),
        ("cores", str(machine["cores"]), "this process's CPU affinity; every benchmark uses all"),
        ("CPU", f"{cpu_phrase(machine)}, {machine['ram_gib']:.0f} GiB RAM", "`/proc/cpuinfo`"),
        ("Promethean's CPU kernels", machine.get("kernels") or "not reported",
         "`promethean.inference.kernels`: the instruction set they run here, or why none"),
    ]
    every_row = [  # "—": no peer, no limit or no target applies
        [row[field] or "—" for field in SUMMARY_FIELDS]
        for outcome in outcomes for row in outcome.rows
    ]
    failed = [outcome for outcome in outcomes if outcome.error]
    earlier = [outcome for outcome in outcomes if outcome.measured]
    names = ", ".join(f"{outcome.benchmark.name} ({outcome.seconds / 60:.1f} min)"
                      for outcome in outcomes if not outcome.measured)
    lines = [
        f"Measured {started:%Y-%m-%d %H:%M} UTC by `{command}` ({elapsed / 60:.0f} min: {names}); "
        f"Python {machine['python']}.",
    ]
    if earlier:
        lines += ["", "Rows of benchmarks not re-run this time, from their last run: " + ", ".join(
            f"{outcome.benchmark.name} ({outcome.measured} UTC)" for outcome in earlier) + "."]
    if quick:
        lines += ["", "**A --quick smoke run**: every benchmark at toy sizes, one round; the "
                      "figures show that the benchmarks run, not how fast anything is."]
    lines += [
        "",
        "**The machine**, measured first (benchmarks/machine.py, all cores):",
        "",
        *table(("measure", "value", "how"), machine_rows),
        "",
        "**Every benchmark**: each figure against a peer measured in the same run (the ratio is "
        "the median over rounds of the ratio within a round); the physical limit is what the "
        "machine allows where one applies (matmul peak for training, memory bandwidth for "
        "decoding); each section below has the details.",
        "",
        *table(COLUMNS, every_row),
    ]
    if failed:
        lines += ["", "**Failed** (no rows above):", ""]
        lines += [f"- `{outcome.benchmark.name}`: {cell(outcome.error)}" for outcome in failed]
    return "\n".join(lines)


def write_summary(report: Path, body: str, machine: dict | None = None) -> None:
    """Rewrite `machine`'s CPU kind's block of the summary (the other kinds' stay); the first
    time, put the summary before the report's first section."""
    text = report.read_text() if report.exists() else ""
    if START not in text:
        first_section = text.find("\n## ")
        empty = f"{SUMMARY_HEADING}{START}\n{END}\n\n"
        if first_section < 0:
            text = (text.rstrip("\n") + "\n\n" if text.strip() else "") + empty
        else:
            text = text[: first_section + 1] + empty + text[first_section + 1 :]
        write_atomically(report, text)
    write_section(report, START, END, body, machine=machine)


# ---------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None, benchmarks: Sequence[Benchmark] = BENCHMARKS,
         measure: Callable[[], dict] = measure_machine) -> int:
    names = [benchmark.name for benchmark in benchmarks]
    parser = argparse.ArgumentParser(prog="python -m benchmarks",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help=f"toy sizes; writes {QUICK_REPORT} unless --write is given")
    parser.add_argument("--only", nargs="+", metavar="NAME", choices=names, default=None,
                        help=f"run only these, of: {', '.join(names)}")
    parser.add_argument("--write", type=Path, default=None, metavar="REPORT",
                        help=f"the report to update (default {FULL_REPORT}, or {QUICK_REPORT} "
                             "with --quick)")
    args = parser.parse_args(argv)
    report = args.write.resolve() if args.write else ROOT / (QUICK_REPORT if args.quick
                                                            else FULL_REPORT)
    chosen = [b for b in benchmarks if args.only is None or b.name in args.only]
    command = "python -m benchmarks" + (" --quick" if args.quick else "")
    if args.only:
        command += " --only " + " ".join(b.name for b in chosen)
    if args.write:
        command += f" --write {shlex.quote(str(args.write))}"
    if not report.exists():  # the summary's place first: the benchmarks append their sections
        report.parent.mkdir(parents=True, exist_ok=True)
        title = "# Benchmarks" + (" (a --quick smoke run)" if args.quick else "")
        write_atomically(report, f"{title}\n\n{SUMMARY_HEADING}{START}\n{END}\n")
    started = datetime.datetime.now(datetime.timezone.utc)
    clock = time.perf_counter()
    print("measuring the machine: matmul peak (fp32, bf16), memory read bandwidth", flush=True)
    machine = {**cpu_identity(), **measure()}  # the kind from here if `measure` has none
    print(f"  CPU: {cpu_phrase(machine)}; Promethean's CPU kernels: "
          f"{machine.get('kernels', 'not reported')}", flush=True)
    print(f"  fp32 {machine['matmul_peak']['fp32'] / 1e9:.0f} GFLOP/s, bf16 "
          f"{machine['matmul_peak']['bf16'] / 1e9:.0f} GFLOP/s, read "
          f"{machine['bandwidth'] / 1e9:.1f} GB/s", flush=True)
    every_kind = load_kept_rows(report)
    kept = every_kind.setdefault(machine["kind"], {})  # only this CPU kind's rows are summed up
    outcomes = []
    with tempfile.TemporaryDirectory(prefix="promethean-benchmarks-") as scratch:
        for benchmark in benchmarks:
            if benchmark not in chosen:
                entry = kept.get(benchmark.name)
                if entry is not None:  # not re-run: its rows from the last run, dated
                    outcomes.append(Outcome(benchmark, entry["rows"], entry.get("seconds", 0.0),
                                            measured=str(entry.get("measured", "an earlier run"))))
                continue
            outcome = run_benchmark(benchmark, args.quick, report, Path(scratch))
            outcomes.append(outcome)
            status = f"failed: {outcome.error}" if outcome.error else f"{len(outcome.rows)} rows"
            print(f"=== {benchmark.name}: {status} ({outcome.seconds:.0f} s)", flush=True)
            if not outcome.error:
                now = datetime.datetime.now(datetime.timezone.utc)
                kept[benchmark.name] = {"rows": outcome.rows, "seconds": outcome.seconds,
                                        "measured": f"{now:%Y-%m-%d %H:%M}"}
                keep_rows(report, every_kind)
    body = render_summary(machine, outcomes, quick=args.quick, command=command, started=started,
                          elapsed=time.perf_counter() - clock)
    write_summary(report, body, machine)
    failed = [outcome.benchmark.name for outcome in outcomes if outcome.error]
    print(f"\nwrote the summary of {report}" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
