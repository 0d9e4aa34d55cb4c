"""What every benchmark shares: the machine's description, ratios taken within rounds, and
rewriting one marked section of docs/BENCHMARKS.md, one set of rows per CPU kind.

**CPU kinds.** Figures measured on one CPU say little about another (AMX bf16 matmuls, MKL's slow
path on AMD), and this project's machines change CPU between sessions, so the report keeps one
set of rows per *CPU kind*, a short stable key (`cpu_kind`):

- x86-64: `<vendor>-<tier>`, vendor `intel`, `amd`, or `x86` (any other), tier the best of
  `avx512-amx` (AMX-BF16 or AMX-INT8), `avx512-bf16`, `avx512-vnni`, `avx512` (AVX-512F),
  `avx2` (AVX2 + FMA), or nothing (`intel`): e.g. `intel-avx512-amx` (Sapphire Rapids),
  `amd-avx512-bf16` (Zen 4), `intel-avx2` (a laptop).
- 64-bit ARM: `arm64` (none of our kernels run there yet); any other machine: its
  `platform.machine()`, e.g. `ppc64le`.

**Sections.** A script's section stays between its markers `<!-- NAME:start -->` and
`<!-- NAME:end -->`; inside, one block per CPU kind, `<!-- NAME:cpu KIND -->` ...
`<!-- NAME:cpu-end KIND -->`, each under a heading `### CPU (KIND), measured DATE`. Writing
a section replaces only this machine's kind's block and puts it first (the newest first); the
others stay as they are. Sections written before blocks had kinds (no `NAME:cpu` marker inside)
were all measured on the Intel AMX machine of 2026-11-21: `migrate_unkeyed_sections` turns each
into that kind's block (LEGACY_KIND) the first time anything is written to the report.
"""

from __future__ import annotations

import datetime
import os
import platform
import re
import statistics
from pathlib import Path

# ----------------------------------------------------------------------------------- the CPU
VENDORS = {"GenuineIntel": "Intel", "AuthenticAMD": "AMD"}
ARM_IMPLEMENTERS = {"0x41": "Arm", "0x48": "HiSilicon", "0x4e": "NVIDIA", "0x61": "Apple",
                    "0xc0": "Ampere"}
# (/proc/cpuinfo flag, name): the extensions our kernels and PyTorch's matmuls choose by.
X86_EXTENSIONS = (("avx2", "AVX2"), ("fma", "FMA"), ("avx512f", "AVX-512"),
                  ("avx512_bf16", "AVX-512 BF16"), ("avx512_vnni", "AVX-512 VNNI"),
                  ("amx_bf16", "AMX-BF16"), ("amx_int8", "AMX-INT8"))
ARM_EXTENSIONS = (("asimd", "NEON"), ("sve", "SVE"), ("bf16", "BF16"), ("i8mm", "I8MM"))
X86_MACHINES = ("x86_64", "amd64", "i386", "i686")
ARM_MACHINES = ("aarch64", "arm64")


def cores() -> int:
    return len(os.sched_getaffinity(0))


def parse_cpuinfo(text: str) -> dict:
    """The vendor, model name and flags of the first processor in `/proc/cpuinfo` text
    ("flags" on x86, "Features" on ARM)."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break  # the end of the first processor's block
            continue
        key, _, value = line.partition(":")
        fields.setdefault(key.strip().lower(), value.strip())
    vendor_id = fields.get("vendor_id", "")
    implementer = fields.get("cpu implementer", "")
    vendor = VENDORS.get(vendor_id) or ARM_IMPLEMENTERS.get(implementer) or vendor_id or ""
    model = fields.get("model name") or fields.get("hardware") or ""
    if not model and implementer:
        model = f"{vendor or 'ARM'} CPU (part {fields.get('cpu part', '?')})"
    flags = set((fields.get("flags") or fields.get("features") or "").split())
    return {"vendor": vendor, "cpu": model, "flags": flags}


def cpu_kind(vendor: str, flags: set[str], machine: str) -> str:
    """The CPU kind key the report groups rows by (this module's docstring has the scheme)."""
    machine = machine.lower()
    if machine in ARM_MACHINES:
        return "arm64"
    if machine not in X86_MACHINES:
        return machine or "unknown"
    prefix = {"Intel": "intel", "AMD": "amd"}.get(vendor, "x86")
    if flags & {"amx_bf16", "amx_int8"}:
        tier = "avx512-amx"
    elif "avx512_bf16" in flags:
        tier = "avx512-bf16"
    elif "avx512_vnni" in flags:
        tier = "avx512-vnni"
    elif "avx512f" in flags:
        tier = "avx512"
    elif {"avx2", "fma"} <= flags:
        tier = "avx2"
    else:
        return prefix
    return f"{prefix}-{tier}"


def cpu_identity(cpuinfo: str | None = None, machine: str | None = None) -> dict:
    """{"vendor", "cpu" (the model name), "features" (the extensions that matter), "kind"}, from
    `cpuinfo` (default: /proc/cpuinfo) and `machine` (default: platform.machine())."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:
            cpuinfo = ""
    machine = machine if machine is not None else platform.machine()
    parsed = parse_cpuinfo(cpuinfo)
    flags = parsed["flags"]
    arm = machine.lower() in ARM_MACHINES
    features = [name for flag, name in (ARM_EXTENSIONS if arm else X86_EXTENSIONS)
                if flag in flags]
    return {
        "vendor": parsed["vendor"] or "unknown vendor",
        "cpu": parsed["cpu"] or platform.processor() or "unknown CPU",
        "features": features,
        "kind": cpu_kind(parsed["vendor"], flags, machine),
    }


def kernel_description() -> str:
    """Which of Promethean's CPU kernels run here: 'avx512' or 'avx2', else 'unavailable
    (why)'. Never raises: the kernels may fail to build or load, and a benchmark still reports."""
    try:
        from promethean.inference import kernels

        if kernels.available():
            return str(kernels.instruction_set())
        return f"unavailable ({kernels.unavailable_reason()})"
    except Exception as error:  # noqa: BLE001 - whatever broke, the benchmark goes on
        message = (str(error).strip().splitlines() or [""])[0]
        return f"unavailable ({type(error).__name__}: {message})"


def cpu_description() -> dict:
    """The CPU (vendor, model, the extensions that matter, its kind), which of Promethean's
    kernels run on it, the L3 size, cores and RAM."""
    l3 = None
    l3_path = Path("/sys/devices/system/cpu/cpu0/cache/index3/size")
    if l3_path.exists():
        l3 = l3_path.read_text().strip()
        if l3.endswith("K") and l3[:-1].isdigit():
            l3 = f"{int(l3[:-1]) / 1024:.0f} MiB"
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {
        **cpu_identity(),
        "kernels": kernel_description(),
        "cores": cores(),
        "l3": l3,
        "ram_gib": total / 2**30,
        "python": platform.python_version(),
    }


def cpu_phrase(info: dict) -> str:
    """The CPU in one phrase: 'AMD EPYC (AMD; AVX2, FMA, AVX-512, AVX-512 BF16, AVX-512 VNNI;
    L3 32 MiB; CPU kind `amd-avx512-bf16`)'."""
    details = [info.get("vendor") or "unknown vendor",
               ", ".join(info.get("features") or []) or "no AVX2/AVX-512/AMX"]
    if info.get("l3"):
        details.append(f"L3 {info['l3']}")
    if info.get("kind"):
        details.append(f"CPU kind `{info['kind']}`")
    return f"{info['cpu']} ({'; '.join(details)})"


def measured_line(info: dict, started: datetime.datetime, minutes: float) -> str:
    """How every section starts: when, how long, on which CPU (`cpu_description`), and which of
    Promethean's CPU kernels ran; the script adds its versions after a '; '."""
    cpu = cpu_phrase(info)
    article = "an" if cpu[:1].lower() in "aeiou" else "a"
    return (f"Measured {started:%Y-%m-%d %H:%M} UTC ({minutes:.0f} min) on {info['cores']} cores "
            f"of {article} {cpu}, {info['ram_gib']:.0f} GiB RAM; Promethean's CPU kernels: "
            f"{info.get('kernels') or kernel_description()}")


def ratios(numerator: list[float], denominator: list[float]) -> float:
    """Median over rounds of a ratio taken within each round (noise hits both sides alike)."""
    return statistics.median(n / d for n, d in zip(numerator, denominator, strict=True))


# ------------------------------------------------------------------------------ the sections
# The kind of every section written before sections had kinds: the Intel Xeon with AMX that
# measured docs/BENCHMARKS.md on 2026-11-21.
LEGACY_KIND = "intel-avx512-amx"
LEGACY_CPU = "Intel(R) Xeon(R) Processor"
START_MARKER = re.compile(r"<!-- ([\w-]+):start -->")
SECTION = re.compile(r"<!-- ([\w-]+):start -->\n?(.*?)\n?<!-- \1:end -->", re.DOTALL)
MEASURED_DATE = re.compile(r"Measured (\d{4}-\d{2}-\d{2})")


def section_name(start: str) -> str:
    """'decode' for the marker '<!-- decode:start -->'."""
    match = START_MARKER.fullmatch(start)
    if match is None:
        raise ValueError(f"a section's start marker reads '<!-- NAME:start -->', not {start!r}")
    return match.group(1)


def kind_markers(name: str, kind: str) -> tuple[str, str]:
    return f"<!-- {name}:cpu {kind} -->", f"<!-- {name}:cpu-end {kind} -->"


def kind_block(name: str, kind: str, cpu: str, date: str, body: str) -> str:
    """One CPU kind's block of section `name`: its markers, a dated heading, the body."""
    begin, finish = kind_markers(name, kind)
    return f"{begin}\n### {cpu} (`{kind}`), measured {date}\n\n{body}\n{finish}"


def migrate_unkeyed_sections(text: str, kind: str = LEGACY_KIND, cpu: str = LEGACY_CPU) -> str:
    """Turn every section without CPU-kind blocks into one block of `kind`, dated by its own
    'Measured YYYY-MM-DD' (a one-off: sections written since carry their kind)."""
    def wrap(match: re.Match) -> str:
        name, inner = match.group(1), match.group(2)
        if not inner.strip() or f"<!-- {name}:cpu " in inner:
            return match.group(0)
        date = MEASURED_DATE.search(inner)
        block = kind_block(name, kind, cpu, date.group(1) if date else "date unknown",
                           inner.strip("\n"))
        return f"<!-- {name}:start -->\n{block}\n<!-- {name}:end -->"

    return SECTION.sub(wrap, text)


def write_section(path: Path, start: str, end: str, body: str, heading: str = "",
                  machine: dict | None = None) -> None:
    """Write `body` as this CPU kind's block between the `start` and `end` markers (first among
    the kinds; the other kinds' blocks stay), or append `heading` + a new section. `machine`
    (default: this one, `cpu_identity`) gives the kind and the CPU's name."""
    name = section_name(start)
    identity = machine if machine is not None else cpu_identity()
    kind = identity["kind"]
    today = datetime.datetime.now(datetime.timezone.utc).date().isoformat()
    block = kind_block(name, kind, identity["cpu"], today, body)
    text = migrate_unkeyed_sections(path.read_text() if path.exists() else "")
    pattern = re.compile(re.escape(start) + r"\n?(.*?)\n?" + re.escape(end), re.DOTALL)
    found = pattern.search(text)
    if found:
        begin, finish = kind_markers(name, kind)
        own = re.compile(r"\n*" + re.escape(begin) + r".*?" + re.escape(finish) + r"\n*",
                         re.DOTALL)
        others = own.sub("\n\n", found.group(1), count=1).strip("\n")
        inner = block + (f"\n\n{others}" if others.strip() else "")
        text = text[: found.start()] + f"{start}\n{inner}\n{end}" + text[found.end():]
    else:
        section = f"{start}\n{block}\n{end}"
        text = (text.rstrip("\n") + "\n\n" if text.strip() else "") + heading + section + "\n"
    write_atomically(path, text)


def write_atomically(path: Path, text: str) -> None:
    """Replace `path` with `text` whole or not at all (a report is never left half-written)."""
    from promethean.files import atomic_file

    with atomic_file(path) as partial:
        partial.write_text(text)


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
    write_atomically(path, json.dumps(rows, indent=1, ensure_ascii=False) + "\n")


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

