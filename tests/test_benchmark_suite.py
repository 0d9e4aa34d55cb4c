"""`python -m benchmarks`: the machine's measured limits (the fastest of several ways), the CPU
and its kind, the summary report it renders from the benchmarks' rows, one set of rows per CPU
kind (the old unkeyed Intel rows migrated), a failed benchmark reported (and the exit status), a
--quick run end to end."""

import datetime
import json
import math
import re
import shutil
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest

from benchmarks import __main__ as suite
from benchmarks import machine as machine_module
from benchmarks.common import (
    LEGACY_KIND,
    cpu_identity,
    kernel_description,
    measured_line,
    migrate_unkeyed_sections,
    summary_row,
    write_section,
)
from benchmarks.machine import (
    describe_machine,
    measure_matmul_peak,
    measure_matmul_peaks,
    measure_memory_bandwidth,
    measure_memory_readers,
)

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parent.parent

FAKE_MACHINE = {
    "cpu": "Toy CPU", "vendor": "AMD", "features": ["AVX2", "FMA", "AVX-512"],
    "kind": "amd-avx512", "kernels": "avx512", "cores": 2, "l3": "32 MiB", "ram_gib": 16.0,
    "python": "3.12.0", "matmul_peak": {"fp32": 250e9, "bf16": 1.5e12}, "bandwidth": 20e9,
    "matmul_paths": {"fp32": {"torch.matmul": 150e9, "oneDNN linear": 250e9},
                     "bf16": {"torch.matmul": 1.5e12, "oneDNN linear": 1.4e12}},
    "bandwidth_readers": {"torch.sum": 18e9, "torch.mv": 17e9, "promethean stream_read": 20e9},
}
INTEL_MACHINE = {**FAKE_MACHINE, "cpu": "Toy Xeon", "vendor": "Intel",
                 "features": ["AVX-512", "AMX-BF16"], "kind": "intel-avx512-amx"}
DOCS = ROOT / "docs" / "BENCHMARKS.md"
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


def test_machine_measurements_are_positive_and_finite(monkeypatch):
    monkeypatch.setattr(machine_module, "_stream_read", lambda: None)  # no kernel build here
    for dtype in ("fp32", "bf16"):
        peak = measure_matmul_peak(dtype, size=256, passes=3, budget_s=0.5, threads=1)
        assert math.isfinite(peak) and peak > 0
    bandwidth = measure_memory_bandwidth(buffer_bytes=16 * 2**20, passes=3, budget_s=0.5,
                                         threads=1)
    assert math.isfinite(bandwidth) and bandwidth > 0
    with pytest.raises(ValueError, match="unknown dtype 'fp8'"):
        measure_matmul_peak("fp8")


def test_the_peak_is_the_fastest_way_and_names_every_way(monkeypatch):
    """torch.matmul and oneDNN's linear both timed, the faster is the peak; a missing or failing
    oneDNN op is left out rather than failing the measurement."""
    import torch

    # Fake timings: a path's seconds are read off a table by the path's name.
    seconds = {"torch.matmul": 0.2, "oneDNN linear": 0.1}
    monkeypatch.setattr(machine_module, "matmul_paths", lambda a, b: {
        name: (lambda name=name: name) for name in seconds})
    monkeypatch.setattr(machine_module, "_median_seconds",
                        lambda action, passes, budget_s: seconds[action()])
    peaks = measure_matmul_peaks("fp32", size=8, threads=1)
    assert peaks == {"torch.matmul": 2 * 8**3 / 0.2, "oneDNN linear": 2 * 8**3 / 0.1}
    assert measure_matmul_peak("bf16", size=8, threads=1) == 2 * 8**3 / 0.1
    monkeypatch.undo()
    # The real paths: oneDNN's linear multiplies by b.T, the same FLOPs; without it, torch.matmul.
    a, b = torch.randn(4, 4), torch.randn(4, 4)
    paths = machine_module.matmul_paths(a, b)
    assert torch.allclose(paths["torch.matmul"](), a @ b)
    if "oneDNN linear" in paths:
        assert torch.allclose(paths["oneDNN linear"](), a @ b.T, atol=1e-5)
    monkeypatch.setattr(machine_module, "_onednn_linear", lambda: None)
    assert list(machine_module.matmul_paths(a, b)) == ["torch.matmul"]


def test_the_bandwidth_is_the_fastest_reader_promethean_stream_read_included(monkeypatch):
    """Where our kernels have `stream_read`, it is timed beside torch.sum and torch.mv; one that
    does not sum the whole buffer, or raises, is left out."""
    def broken(buffer):
        raise RuntimeError("stream_read is not built")

    fakes = {"whole": lambda buffer: float(buffer.sum()),
             "half": lambda buffer: 0.5 * buffer.numel(), "broken": broken}
    for name, fake in fakes.items():
        monkeypatch.setattr(machine_module, "_stream_read", lambda fake=fake: fake)
        readers = measure_memory_readers(buffer_bytes=2**20, passes=3, budget_s=0.1, threads=1)
        assert set(readers) == ({"torch.sum", "torch.mv", "promethean stream_read"}
                                if name == "whole" else {"torch.sum", "torch.mv"}), name
        assert all(math.isfinite(value) and value > 0 for value in readers.values())
    monkeypatch.setattr(machine_module, "measure_memory_readers", lambda: {
        "torch.sum": 29e9, "torch.mv": 31e9, "promethean stream_read": 39e9})
    monkeypatch.setattr(machine_module, "measure_matmul_peaks", lambda dtype: {
        "torch.matmul": 130e9, "oneDNN linear": 200e9})
    fake_kernels(monkeypatch, available=lambda: True, instruction_set=lambda: "avx512")
    described = describe_machine()
    assert described["bandwidth"] == 39e9 and described["matmul_peak"]["fp32"] == 200e9
    assert described["kind"] == cpu_identity()["kind"] and described["kernels"] == "avx512"
    body = suite.render_summary(described, [], quick=False, command="python -m benchmarks",
                                started=STARTED, elapsed=60.0)
    assert "`torch.matmul` 130, `oneDNN linear` 200 GFLOP/s; `oneDNN linear` won" in body
    assert ("`torch.sum` 29.0, `torch.mv` 31.0, `promethean stream_read` 39.0 GB/s; "
            "`promethean stream_read` won") in body


# /proc/cpuinfo as each kind of machine writes it (first processor; flags cut to those that matter).
INTEL_AMX = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse2 avx avx2 fma f16c avx512f avx512bw avx512_vnni avx512_bf16 amx_bf16 amx_int8

processor\t: 1
vendor_id\t: GenuineIntel
model name\t: a second processor, never read
"""
AMD_ZEN4 = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 9R14 96-Core Processor
flags\t\t: fpu sse2 avx avx2 fma f16c avx512f avx512dq avx512bw avx512_vnni avx512_bf16 avx512vbmi
"""
AVX2_LAPTOP = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Core(TM) i7-8650U CPU @ 1.90GHz
flags\t\t: fpu sse2 avx avx2 fma f16c
"""
OTHER_X86 = """processor\t: 0
vendor_id\t: HygonGenuine
model name\t: Hygon C86 7185
flags\t\t: fpu sse2 avx avx2 fma
"""
ARM = """processor\t: 0
BogoMIPS\t: 2100.00
Features\t: fp asimd evtstrm aes sha2 crc32 atomics sve asimddp i8mm bf16 svebf16
CPU implementer\t: 0x41
CPU architecture: 8
CPU part\t: 0xd40
"""


@pytest.mark.parametrize("cpuinfo,machine,kind,vendor,cpu,features", [
    (INTEL_AMX, "x86_64", "intel-avx512-amx", "Intel", "Intel(R) Xeon(R) Platinum 8480+",
     ["AVX2", "FMA", "AVX-512", "AVX-512 BF16", "AVX-512 VNNI", "AMX-BF16", "AMX-INT8"]),
    (AMD_ZEN4, "x86_64", "amd-avx512-bf16", "AMD", "AMD EPYC 9R14 96-Core Processor",
     ["AVX2", "FMA", "AVX-512", "AVX-512 BF16", "AVX-512 VNNI"]),
    (AVX2_LAPTOP, "x86_64", "intel-avx2", "Intel", "Intel(R) Core(TM) i7-8650U CPU @ 1.90GHz",
     ["AVX2", "FMA"]),
    (OTHER_X86, "x86_64", "x86-avx2", "HygonGenuine", "Hygon C86 7185", ["AVX2", "FMA"]),
    (ARM, "aarch64", "arm64", "Arm", "Arm CPU (part 0xd40)", ["NEON", "SVE", "BF16", "I8MM"]),
    ("", "ppc64le", "ppc64le", "unknown vendor", None, []),
])
def test_the_cpu_kind_from_proc_cpuinfo(cpuinfo, machine, kind, vendor, cpu, features):
    identity = cpu_identity(cpuinfo, machine)
    assert identity["kind"] == kind and identity["vendor"] == vendor
    assert identity["features"] == features
    if cpu is not None:
        assert identity["cpu"] == cpu


def fake_kernels(monkeypatch, **functions):
    """Stand in for promethean.inference.kernels (being rewritten; its real build is slow)."""
    import promethean.inference

    fake = types.SimpleNamespace(**functions)
    monkeypatch.setitem(sys.modules, "promethean.inference.kernels", fake)
    monkeypatch.setattr(promethean.inference, "kernels", fake, raising=False)


def test_the_kernels_that_run_are_named_and_a_failure_is_reported_not_raised(monkeypatch):
    fake_kernels(monkeypatch, available=lambda: True, instruction_set=lambda: "avx2")
    assert kernel_description() == "avx2"
    fake_kernels(monkeypatch, available=lambda: False,
                 unavailable_reason=lambda: "no C++ compiler was found")
    assert kernel_description() == "unavailable (no C++ compiler was found)"

    def broken():
        raise RuntimeError("undefined symbol: stream_read\nmore")

    fake_kernels(monkeypatch, available=broken)
    assert kernel_description() == "unavailable (RuntimeError: undefined symbol: stream_read)"
    info = {**cpu_identity(AMD_ZEN4, "x86_64"), "kernels": kernel_description(), "cores": 2,
            "l3": "32 MiB", "ram_gib": 16.0}
    assert measured_line(info, STARTED, 3.2) == (
        "Measured 2026-01-02 03:04 UTC (3 min) on 2 cores of an AMD EPYC 9R14 96-Core Processor "
        "(AMD; AVX2, FMA, AVX-512, AVX-512 BF16, AVX-512 VNNI; L3 32 MiB; CPU kind "
        "`amd-avx512-bf16`), 16 GiB RAM; Promethean's CPU kernels: unavailable (RuntimeError: "
        "undefined symbol: stream_read)")


def test_every_script_names_the_cpu_through_the_shared_line():
    """Each benchmark script's section starts with benchmarks.common.measured_line."""
    for name in ("decode", "prepare", "train", "ssm", "context", "serve", "chat_reuse",
                 "serve_adapters", "kv_memory"):
        source = (ROOT / "benchmarks" / f"{name}.py").read_text()
        assert "measured_line(info, started, " in source, name
        assert "cores of an {info['cpu']}" not in source, name


def section(text: str, name: str, kind: str) -> str:
    start, end = f"<!-- {name}:cpu {kind} -->", f"<!-- {name}:cpu-end {kind} -->"
    return text[text.index(start):text.index(end) + len(end)]


def test_a_section_written_on_one_cpu_kind_leaves_the_others(tmp_path):
    report = tmp_path / "BENCHMARKS.md"
    start, end = "<!-- decode:start -->", "<!-- decode:end -->"
    write_section(report, start, end, "Measured on the Xeon.", heading="## Decode\n\n",
                  machine=INTEL_MACHINE)
    intel = section(report.read_text(), "decode", "intel-avx512-amx")
    write_section(report, start, end, "Measured on the EPYC.", machine=FAKE_MACHINE)
    text = report.read_text()
    assert section(text, "decode", "intel-avx512-amx") == intel  # untouched
    assert text.count("## Decode") == 1 and text.count(start) == 1 and text.count(end) == 1
    assert text.index("<!-- decode:cpu amd-avx512 -->") < text.index(  # the newest first
        "<!-- decode:cpu intel-avx512-amx -->")
    today = datetime.datetime.now(datetime.timezone.utc).date().isoformat()
    assert f"### Toy CPU (`amd-avx512`), measured {today}\n\nMeasured on the EPYC.\n" in text
    # Re-measured on the Xeon: only its block changes, and it comes first again.
    write_section(report, start, end, "Measured on the Xeon, again.", machine=INTEL_MACHINE)
    text = report.read_text()
    assert "Measured on the Xeon.\n" not in text and "Measured on the Xeon, again." in text
    assert "Measured on the EPYC." in text and text.count("decode:cpu amd-avx512 ") == 1
    assert text.index("decode:cpu intel-avx512-amx") < text.index("decode:cpu amd-avx512")
    assert "\n\n\n" not in text
    with pytest.raises(ValueError, match="NAME:start"):
        write_section(report, "<!-- decode -->", end, "x", machine=FAKE_MACHINE)


def test_the_unkeyed_intel_sections_are_kept_as_their_kind(tmp_path):
    """The one-off migration, on a copy of docs/BENCHMARKS.md: every old section becomes the
    intel-avx512-amx block, dated as measured, word for word; a new kind's block goes first."""
    report = tmp_path / "BENCHMARKS.md"
    shutil.copy(DOCS, report)
    old = report.read_text()
    names = ["summary", "decode", "prepare", "train", "ssm", "context", "serve"]
    old_sections = {}
    for name in names:
        start, end = f"<!-- {name}:start -->\n", f"\n<!-- {name}:end -->"
        if f"<!-- {name}:cpu " in old:
            pytest.skip("docs/BENCHMARKS.md is already keyed by CPU kind")
        old_sections[name] = old[old.index(start) + len(start):old.index(end)]
    migrated = migrate_unkeyed_sections(old)
    assert migrate_unkeyed_sections(migrated) == migrated  # one-off: a keyed report stays
    write_section(report, "<!-- decode:start -->", "<!-- decode:end -->", "Measured anew.",
                  machine=FAKE_MACHINE)
    text = report.read_text()
    for name, body in old_sections.items():
        block = section(text, name, LEGACY_KIND)
        date = body[body.index("Measured ") + 9:][:10]
        assert block == (f"<!-- {name}:cpu {LEGACY_KIND} -->\n### Intel(R) Xeon(R) Processor "
                         f"(`{LEGACY_KIND}`), measured {date}\n\n{body}\n"
                         f"<!-- {name}:cpu-end {LEGACY_KIND} -->")
    assert section(text, "summary", LEGACY_KIND).count("2026-11-21") >= 1
    decode = text[text.index("<!-- decode:start -->"):text.index("<!-- decode:end -->")]
    assert decode.index("Measured anew.") < decode.index(f"decode:cpu {LEGACY_KIND}")
    # What lies outside the sections is as it was.
    def outside(report_text):
        return re.sub(r"<!-- ([\w-]+):start -->.*?<!-- \1:end -->", "", report_text,
                      flags=re.DOTALL)

    assert outside(text) == outside(old)


def test_the_summary_keeps_rows_per_cpu_kind(tmp_path):
    """On a copy of docs/BENCHMARKS.md and its rows: a run on another CPU kind adds its own
    summary block and rows, and keeps the Intel ones; `--only` on a kind sums up that kind's."""
    report = tmp_path / "BENCHMARKS.md"
    shutil.copy(DOCS, report)
    shutil.copy(suite.rows_file(DOCS), suite.rows_file(report))
    old_rows = json.loads(suite.rows_file(DOCS).read_text())
    if LEGACY_KIND in old_rows:
        pytest.skip("docs/BENCHMARKS.md.rows.json is already keyed by CPU kind")
    kept = suite.load_kept_rows(report)  # the old file, read as the Intel rows
    assert list(kept) == [LEGACY_KIND] and kept[LEGACY_KIND] == old_rows
    old_summary = report.read_text().split(suite.START)[1].split(suite.END)[0].strip("\n")

    good, _broken, _silent = fake_benchmarks(tmp_path)
    again = suite.Benchmark("again", good.script, full=good.full)
    assert suite.main(["--write", str(report), "--only", "good"], benchmarks=[good, again],
                      measure=lambda: FAKE_MACHINE) == 0
    kept = json.loads(suite.rows_file(report).read_text())
    assert kept[LEGACY_KIND] == old_rows and sorted(kept["amd-avx512"]) == ["good"]
    text = report.read_text()
    intel = section(text, "summary", LEGACY_KIND)
    assert old_summary in intel and "| decode gpt2-small batch 1, ours bf16 |" in intel
    amd = section(text, "summary", "amd-avx512")
    assert "| fake speed | 2 it/s |" in amd and "decode gpt2-small" not in amd
    assert "| CPU kind |" not in amd and "CPU kind `amd-avx512`" in amd
    assert "| Promethean's CPU kernels | avx512 |" in amd
    assert text.index("summary:cpu amd-avx512") < text.index(f"summary:cpu {LEGACY_KIND}")
    # Another kind's run: its --only keeps its own kind's earlier rows, not the others'.
    other = {**FAKE_MACHINE, "kind": "intel-avx2", "cpu": "Toy laptop"}
    assert suite.main(["--write", str(report), "--only", "again"], benchmarks=[good, again],
                      measure=lambda: other) == 0
    text = report.read_text()
    laptop = section(text, "summary", "intel-avx2")
    assert laptop.count("| fake speed |") == 1 and "Rows of benchmarks not re-run" not in laptop
    assert section(text, "summary", "amd-avx512") == amd
    assert section(text, "summary", LEGACY_KIND) == intel
    kept = suite.load_kept_rows(report)
    assert sorted(kept) == sorted([LEGACY_KIND, "amd-avx512", "intel-avx2"])
    assert sorted(kept["intel-avx2"]) == ["again"] and kept[LEGACY_KIND] == old_rows


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
        "| matmul peak, fp32 | 250 GFLOP/s | 2048³, the median of timed passes of each way: "
        "`torch.matmul` 150, `oneDNN linear` 250 GFLOP/s; `oneDNN linear` won |",
        "| matmul peak, bf16 | 1,500 GFLOP/s | 2048³, the median of timed passes of each way: "
        "`torch.matmul` 1,500, `oneDNN linear` 1,400 GFLOP/s; `torch.matmul` won |",
        "| memory read bandwidth | 20.0 GB/s | an fp32 buffer past the L3 read once, the median "
        "of timed passes of each way: `torch.sum` 18.0, `torch.mv` 17.0, `promethean "
        "stream_read` 20.0 GB/s; `promethean stream_read` won |",
        "| cores | 2 | this process's CPU affinity; every benchmark uses all |",
        "| CPU | Toy CPU (AMD; AVX2, FMA, AVX-512; L3 32 MiB; CPU kind `amd-avx512`), 16 GiB RAM "
        "| `/proc/cpuinfo` |",
        "| Promethean's CPU kernels | avx512 | `promethean.inference.kernels`: the instruction "
        "set they run here, or why none |",
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
    kept = suite.load_kept_rows(report)[FAKE_MACHINE["kind"]]
    assert sorted(kept) == ["again", "good"] and kept["good"]["rows"][0]["what"] == "fake speed"
    # A damaged rows file is ignored (the summary then shows only this run), never a traceback.
    suite.rows_file(report).write_text("{not json")
    assert suite.main(["--write", str(report), "--only", "again"], benchmarks=[good, again],
                      measure=lambda: FAKE_MACHINE) == 0
    summary = report.read_text()
    assert summary.count("| fake speed | 2 it/s |") == 1
