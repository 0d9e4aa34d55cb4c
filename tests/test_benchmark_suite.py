"""`python -m benchmarks`: the machine's measured limits, the summary report it renders from the
benchmarks' rows, a failed benchmark reported (and the exit status), a --quick run end to end."""

import datetime
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from benchmarks import __main__ as suite
from benchmarks.common import summary_row
from benchmarks.machine import measure_matmul_peak, measure_memory_bandwidth

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parent.parent

FAKE_MACHINE = {
    "cpu": "Fake CPU", "features": ["AVX-512"], "cores": 2, "l3": "32 MiB", "ram_gib": 16.0,
    "python": "3.12.0", "matmul_peak": {"fp32": 250e9, "bf16": 1.5e12}, "bandwidth": 20e9,
}
STARTED = datetime.datetime(2026, 1, 2, 3, 4, tzinfo=datetime.timezone.utc)

# A stand-in benchmark script: --mode ok writes one row, fail exits 1 with a message, silent
# exits 0 without rows.
FAKE_SCRIPT = textwrap.dedent("""
    import argparse, json, pathlib, sys
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode")
    parser.add_argument("--write", type=pathlib.Path)
    parser.add_argument("--json", type=pathlib.Path)
    args = parser.parse_args()
    if args.mode == "fail":
        print("some progress", flush=True)
        sys.exit("boom: the fake benchmark failed")
    if args.mode == "ok":
        section = "## Fake\\n\\n<!-- fake:start -->\\nfake body\\n<!-- fake:end -->\\n"
        args.write.write_text(args.write.read_text() + "\\n" + section)
        row = dict(what="fake speed", ours="2 it/s", peer="1 it/s", ratio="2.00x", limit="",
                   target="", command="`python fake.py`")
        args.json.write_text(json.dumps([row]))
""")


def test_machine_measurements_are_positive_and_finite():
    for dtype in ("fp32", "bf16"):
        peak = measure_matmul_peak(dtype, size=256, passes=3, budget_s=0.5, threads=1)
        assert math.isfinite(peak) and peak > 0
    bandwidth = measure_memory_bandwidth(buffer_bytes=16 * 2**20, passes=3, budget_s=0.5,
                                         threads=1)
    assert math.isfinite(bandwidth) and bandwidth > 0
    with pytest.raises(ValueError, match="unknown dtype 'fp8'"):
        measure_matmul_peak("fp8")


def test_summary_renders_the_machine_and_every_row():
    decode = suite.Benchmark("decode", "benchmarks/decode.py")
    serve = suite.Benchmark("serve", "benchmarks/serve.py")
    outcomes = [
        suite.Outcome(decode, [summary_row("decode tok/s, bf16", "50 tok/s", "40 tok/s",
                                           "1.25x", "80 tok/s at 20 GB/s", "≥ 60%: not met",
                                           "`python benchmarks/decode.py`")], 60.0),
        suite.Outcome(serve, [summary_row("serving | c=8", "9.0 req/s", "2.0 req/s", "4.50x",
                                          command="`python benchmarks/serve.py`")], 120.0),
    ]
    body = suite.render_summary(FAKE_MACHINE, outcomes, quick=False,
                                command="python -m benchmarks", started=STARTED, elapsed=180.0)
    assert body.splitlines()[0] == (
        "Measured 2026-01-02 03:04 UTC by `python -m benchmarks` (3 min: decode (1.0 min), "
        "serve (2.0 min)); Python 3.12.0.")
    assert "\n".join([
        "| measure | value | how |",
        "|---|---|---|",
        "| matmul peak, fp32 | 250 GFLOP/s | 2048³ `torch.matmul`, median of timed passes |",
        "| matmul peak, bf16 | 1,500 GFLOP/s | 2048³ `torch.matmul`, median of timed passes |",
        "| memory read bandwidth | 20.0 GB/s | an fp32 buffer past the L3 read by `torch.sum` / "
        "`torch.mv`, the faster median |",
        "| cores | 2 | this process's CPU affinity; every benchmark uses all |",
        "| CPU | Fake CPU (AVX-512, L3 32 MiB, 16 GiB RAM) | `/proc/cpuinfo` |",
    ]) in body
    assert body.endswith("\n".join([
        "| what | ours | peer (same run) | ratio | physical limit | target | command |",
        "|---|---|---|---|---|---|---|",
        "| decode tok/s, bf16 | 50 tok/s | 40 tok/s | 1.25x | 80 tok/s at 20 GB/s | ≥ 60%: not met "
        "| `python benchmarks/decode.py` |",
        "| serving \\| c=8 | 9.0 req/s | 2.0 req/s | 4.50x | — | — "
        "| `python benchmarks/serve.py` |",
    ]))
    assert "smoke run" not in body and "Failed" not in body


def fake_benchmarks(tmp_path):
    script = tmp_path / "fake.py"
    script.write_text(FAKE_SCRIPT)
    return [suite.Benchmark("good", str(script), full=("--mode", "ok")),
            suite.Benchmark("broken", str(script), full=("--mode", "fail")),
            suite.Benchmark("silent", str(script), full=("--mode", "silent"))]


def test_a_failed_benchmark_is_reported_and_the_others_still_run(tmp_path, capsys):
    report = tmp_path / "BENCHMARKS.md"
    report.write_text("# Benchmarks\n\nIntro.\n\n## Old\n\n<!-- old:start -->\nkeep me\n"
                      "<!-- old:end -->\n")
    status = suite.main(["--write", str(report)], benchmarks=fake_benchmarks(tmp_path),
                        measure=lambda: FAKE_MACHINE)
    assert status == 1
    text = report.read_text()
    # The summary goes before the first section; the benchmarks' own sections stay as written.
    assert text.index("Intro.") < text.index("## Summary") < text.index(suite.START) < text.index(
        "## Old") < text.index("## Fake")
    assert "keep me" in text and "fake body" in text
    summary = text[text.index(suite.START):text.index(suite.END)]
    assert "| fake speed | 2 it/s | 1 it/s | 2.00x | — | — | `python fake.py` |" in summary
    assert ("- `broken`: exit status 1: boom: the fake benchmark failed" in summary)
    assert "- `silent`: it wrote no summary rows (no --json output)" in summary
    assert "- `good`" not in summary
    assert "failed: broken, silent" in capsys.readouterr().out
    # A second run rewrites the summary in place rather than adding another.
    assert suite.main(["--write", str(report), "--only", "good"],
                      benchmarks=fake_benchmarks(tmp_path), measure=lambda: FAKE_MACHINE) == 0
    text = report.read_text()
    assert text.count(suite.START) == 1 and "Failed" not in text
    assert "`python -m benchmarks --only good --write " in text


def test_a_new_report_starts_with_the_summary(tmp_path):
    report = tmp_path / "runs" / "new.md"
    assert suite.main(["--write", str(report), "--only", "good"],
                      benchmarks=fake_benchmarks(tmp_path), measure=lambda: FAKE_MACHINE) == 0
    text = report.read_text()
    assert text.startswith("# Benchmarks\n\n## Summary\n\n" + suite.START)
    assert text.index(suite.END) < text.index("## Fake") and "fake body" in text


def test_unknown_benchmark_name_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        suite.main(["--only", "nope", "--write", str(tmp_path / "r.md")],
                   benchmarks=fake_benchmarks(tmp_path), measure=lambda: FAKE_MACHINE)
    assert "invalid choice: 'nope'" in capsys.readouterr().err


def test_quick_run_of_one_benchmark_end_to_end(tmp_path):
    """The cheapest real benchmark, through `python -m benchmarks --quick`, into a temp report."""
    report = tmp_path / "quick.md"
    done = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--only", "prepare",
                           "--write", str(report)], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    text = report.read_text()
    assert text.startswith("# Benchmarks (a --quick smoke run)\n\n## Summary\n\n" + suite.START)
    summary = text[text.index(suite.START):text.index(suite.END)]
    assert "**A --quick smoke run**" in summary and "| matmul peak, bf16 |" in summary
    assert "| tokenization, `prepare` (" in summary and "(single-process tiktoken)" in summary
    assert ("`python benchmarks/prepare.py --corpus python-stdlib --copies 1 --repeats 1 "
            "--documents 150") in summary
    assert "<!-- prepare:start -->" in text and text.index(suite.END) < text.index(
        "<!-- prepare:start -->")


def test_rows_of_benchmarks_not_rerun_are_kept_with_their_date(tmp_path):
    """`--only NAME` re-runs one benchmark; the others' rows stay in the summary, dated."""
    report = tmp_path / "BENCHMARKS.md"
    good, _broken, _silent = fake_benchmarks(tmp_path)
    again = suite.Benchmark("again", good.script, full=good.full)
    assert suite.main(["--write", str(report), "--only", "good"], benchmarks=[good, again],
                      measure=lambda: FAKE_MACHINE) == 0
    assert suite.main(["--write", str(report), "--only", "again"], benchmarks=[good, again],
                      measure=lambda: FAKE_MACHINE) == 0
    text = report.read_text()
    summary = text[text.index(suite.START):text.index(suite.END)]
    assert summary.count("| fake speed | 2 it/s |") == 2  # good's kept row and again's new one
    assert "Rows of benchmarks not re-run this time, from their last run: good (20" in summary
    kept = suite.load_kept_rows(report)
    assert sorted(kept) == ["again", "good"] and kept["good"]["rows"][0]["what"] == "fake speed"
    # A damaged rows file is ignored (the summary then shows only this run), never a traceback.
    suite.rows_file(report).write_text("{not json")
    assert suite.main(["--write", str(report), "--only", "again"], benchmarks=[good, again],
                      measure=lambda: FAKE_MACHINE) == 0
    summary = report.read_text()
    assert summary.count("| fake speed | 2 it/s |") == 1
