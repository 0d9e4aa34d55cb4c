"""Decode speed and peak memory of GPT-2 small (124M, random weights), ours against transformers,
in fp32, bf16 and weight-only int8.

    python benchmarks/decode.py [--new-tokens 128] [--repeats 3] [--write docs/BENCHMARKS.md]
        [--json ROWS.json]

What it measures, all in one run so that every figure has a peer measured under the same noise:

* tokens/s of a greedy, batch-1 generation of exactly --new-tokens tokens after a 16-token random
  prompt, for promethean's `generate` and `transformers`' `GPT2LMHeadModel.generate` (same config,
  random weights, KV cache), in fp32 and bf16, and ours in int8 (transformers has no int8 CPU
  path of its own: its int8 needs bitsandbytes or torchao). Where Promethean's AVX-512 kernels
  run, ours in bf16 and int8 is measured a second time on its AVX2 kernels (what a CPU without
  AVX-512 runs, on this machine's memory). Ours in bf16 and int8 is the
  fp32 model converted by `promethean.inference.quantize.prepare_for_inference`, exactly what
  `promethean generate --dtype` runs. The clock covers the whole `generate` call, the
  16-token prefill included. One warm-up per engine, then --repeats rounds; each round runs every
  engine once, in an order that rotates from round to round, so that noise hits all alike. Ratios
  are taken within a round and the median over rounds is reported.
* the memory-bandwidth bound: just before and just after each generation, reading an fp32
  buffer well past the last-level cache (the size `benchmarks/machine.py` uses: twice the L3, at
  least 512 MiB; on 2 MB pages where the OS grants them, as a prepared model's weights are) is
  timed with `torch.sum`, `torch.mv` and, where Promethean's kernels run, their `stream_read`
  (bytes read / seconds; the fastest counts, averaged over the two readings). Each generation is
  held against the bandwidth of its own moment: on a shared host it changes from one second to
  the next (measured on a Zen 4 VM: 28-30 or 45-55 GB/s, flipping every few seconds). At batch 1 every weight is read once per token, so weight bytes / memory bandwidth is
  the least possible time per token. Buffers as large as each dtype's weights are read too and
  reported beside it: on a CPU whose L3 could hold them (124 MB of int8 weights) such a read can
  run faster than memory, but the L3 is shared with whatever else runs, so the bound is taken
  against memory. Weight bytes are those a step really reads: 4, 2 or 1 per
  weight (with the kernels' panels padded to 64 outputs; int8 adds its per-channel scales), the
  biases and norms, a tied head once, the position table not at all (one row of it is read).
* peak RSS (getrusage ru_maxrss) of "import + build model + one generation", each engine and dtype
  in its own fresh subprocess, --repeats times, median. These run first, while this parent process
  is still small: Linux carries the parent's high-water mark into a child across vfork+exec, which
  would otherwise inflate them.

With --write FILE the results replace the part of FILE between `<!-- decode:start -->` and
`<!-- decode:end -->` (appended if absent); the rest of the file is left as it is. With --json FILE
the summary rows of `python -m benchmarks` are written there.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.common import (  # noqa: E402
    add_report_options,
    cores,
    cpu_description,
    measured_line,
    ratios,
    summary_row,
    write_section,
    write_summary_rows,
)

PRESET = "gpt2-small"
PROMPT_LENGTH = 16
SEED = 0
START, END = "<!-- decode:start -->", "<!-- decode:end -->"
DTYPE_NAMES = ("fp32", "bf16", "int8")
MEMORY = "memory"  # the key of the past-L3 buffer's bandwidth readings
# The dtypes each engine runs: transformers has no int8 CPU kernel without extra packages.
ENGINE_DTYPES = {"ours": DTYPE_NAMES, "transformers": ("fp32", "bf16")}
# The share of the memory-bandwidth bound a batch-1 decode must reach (issue 16), every dtype.
BOUND_TARGET = {"fp32": 0.70, "bf16": 0.70, "int8": 0.70}
# Peak-RSS runs: (label, engine, dtype, whether a model is built and run).
RSS_RUNS = (
    ("ours-fp32", "ours", "fp32", True),
    ("transformers-fp32", "transformers", "fp32", True),
    ("ours-bf16", "ours", "bf16", True),
    ("transformers-bf16", "transformers", "bf16", True),
    ("ours-int8", "ours", "int8", True),
    ("ours-import", "ours", "fp32", False),
    ("transformers-import", "transformers", "fp32", False),
)


def prompt_ids() -> list[int]:
    import torch

    generator = torch.Generator().manual_seed(SEED)
    return torch.randint(0, 50257, (PROMPT_LENGTH,), generator=generator).tolist()


# ---------------------------------------------------------------------------------- engines
def build_ours(dtype_name: str):
    """promethean's Transformer with random weights in fp32, converted for inference in bf16 or
    int8 by `prepare_for_inference` (what the CLI does after loading an fp32 checkpoint)."""
    import torch

    from promethean.config import load_preset
    from promethean.inference.quantize import prepare_for_inference
    from promethean.model import Transformer

    config = load_preset(PRESET).model
    torch.manual_seed(SEED)
    return prepare_for_inference(Transformer(config), dtype_name)


def generate_ours(model, prompt: list[int], new_tokens: int) -> int:
    from promethean.inference.generate import SamplingParams, generate

    params = SamplingParams(temperature=0.0, top_k=None, max_new_tokens=new_tokens)
    completion = generate(model, [prompt], params)[0]
    return len(completion.token_ids)


def build_theirs(dtype_name: str):
    import torch
    import transformers

    config = transformers.GPT2Config(
        n_embd=768, n_layer=12, n_head=12, n_positions=1024, vocab_size=50257
    )
    torch.manual_seed(SEED)
    if dtype_name == "bf16":  # built in bf16 directly: no fp32 copy on the way
        model = transformers.GPT2LMHeadModel._from_config(config, dtype=torch.bfloat16)
    else:
        model = transformers.GPT2LMHeadModel(config)
    return model.eval()


def generate_theirs(model, prompt: list[int], new_tokens: int) -> int:
    import torch

    ids = torch.tensor([prompt])
    eos = model.config.vocab_size - 1
    with torch.inference_mode():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            eos_token_id=eos,
            pad_token_id=eos,
            use_cache=True,
        )
    return out.shape[1] - len(prompt)


def generate_ours_avx2(model, prompt: list[int], new_tokens: int) -> int:
    """`generate_ours` on Promethean's AVX2 kernels: what a CPU without AVX-512 runs (most
    laptops), measured on this machine's memory."""
    from promethean.inference import kernels

    kernels.use_instruction_set("avx2")
    try:
        return generate_ours(model, prompt, new_tokens)
    finally:
        kernels.use_instruction_set("avx512")


BUILD = {"ours": build_ours, "ours-avx2": build_ours, "transformers": build_theirs}
GENERATE = {"ours": generate_ours, "ours-avx2": generate_ours_avx2,
            "transformers": generate_theirs}
AVX2 = "ours-avx2"


def engine_dtypes() -> dict[str, tuple[str, ...]]:
    """ENGINE_DTYPES, and the AVX2 kernels in bf16 and int8 where this CPU runs AVX-512 ones
    (elsewhere "ours" already is the AVX2 kernels, or PyTorch's)."""
    from promethean.inference import kernels

    if kernels.available() and kernels.instruction_set() == "avx512":
        return {**ENGINE_DTYPES, AVX2: ("bf16", "int8")}
    return dict(ENGINE_DTYPES)


def weight_bytes_per_token(model) -> int:
    """Bytes of weights a batch-1 decode step reads: every distinct parameter and buffer (int8
    weights, their scales and biases are buffers; a tied head counts once), plus the oneDNN-packed
    bf16 matrices, which are neither; not the position table, of which only one row is read, nor
    what only several rows at once read (a `Bf16Linear`'s `several_rows` copy)."""
    seen, total = set(), 0
    tensors = [*model.named_parameters(), *model.named_buffers()]
    for name, tensor in tensors:
        skipped = "position" in name or name.endswith("wpe.weight") or ".several_rows." in name
        if id(tensor) in seen or skipped:
            continue
        seen.add(id(tensor))
        total += tensor.numel() * tensor.element_size()
    for name, module in model.named_modules():
        if hasattr(module, "packed_weight") and not name.endswith(".several_rows"):
            total += module.weight_bytes()  # promethean.inference.quantize.PackedLinear
    return total


# ---------------------------------------------------------------------------------- peak RSS
def rss_child(label: str, new_tokens: int) -> None:
    """Runs in a fresh subprocess: import, build, generate, print the peak RSS as JSON."""
    _, engine, dtype_name, builds_model = next(run for run in RSS_RUNS if run[0] == label)
    import torch

    torch.set_num_threads(cores())
    if engine == "ours":
        import promethean.inference.generate  # noqa: F401
        import promethean.model  # noqa: F401
    else:
        import transformers  # noqa: F401
        from transformers import GPT2LMHeadModel  # noqa: F401
    produced = None
    if builds_model:
        if engine == "ours":
            model = build_ours(dtype_name)
        else:
            model = build_theirs(dtype_name)
        produced = GENERATE[engine](model, prompt_ids(), new_tokens)
        if produced != new_tokens:
            raise SystemExit(f"{label} produced {produced} tokens, expected {new_tokens}")
    hwm = None
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                hwm = int(line.split()[1])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    print(
        json.dumps({"label": label, "ru_maxrss_kib": peak, "vm_hwm_kib": hwm, "tokens": produced})
    )


def measure_rss(new_tokens: int, repeats: int) -> dict[str, dict]:
    results: dict[str, list[dict]] = {label: [] for label, *_ in RSS_RUNS}
    for repeat in range(repeats):
        for label, *_ in RSS_RUNS:
            command = [sys.executable, str(Path(__file__).resolve()), "--rss-child", label]
            command += ["--new-tokens", str(new_tokens)]
            done = subprocess.run(command, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise SystemExit(f"peak-RSS run {label} failed:\n{done.stderr[-3000:]}")
            record = json.loads(done.stdout.strip().splitlines()[-1])
            results[label].append(record)
            print(
                f"  rss round {repeat + 1}/{repeats} {label:22s} "
                f"{record['ru_maxrss_kib'] * 1024 / 1e6:7.1f} MB",
                flush=True,
            )
    summary = {}
    for label, records in results.items():
        summary[label] = {
            "mb": statistics.median(r["ru_maxrss_kib"] for r in records) * 1024 / 1e6,
            "hwm_mb": statistics.median(r["vm_hwm_kib"] for r in records) * 1024 / 1e6,
            "all_mb": [round(r["ru_maxrss_kib"] * 1024 / 1e6) for r in records],
        }
    return summary


# ---------------------------------------------------------------------------------- speed
BANDWIDTH_WIDTH = 3072


def memory_buffer_bytes() -> int:
    """The size `benchmarks/machine.py` reads to measure the memory bandwidth (past the L3)."""
    from benchmarks.machine import _buffer_bytes

    return _buffer_bytes()


def read_bandwidth(matrix, vector, passes: int = 3) -> dict[str, float]:
    """Bytes/s of reading `matrix` once, each way `benchmarks.machine.memory_readers` knows:
    torch.sum, torch.mv (a matrix-vector product, the very access pattern of a batch-1 decode
    step) and, where it runs, Promethean's AVX-512/AVX2 `stream_read`. Median of `passes` each."""
    from benchmarks.machine import memory_readers

    short = {"torch.sum": "sum", "torch.mv": "mv", "promethean stream_read": "stream"}
    results = {}
    for name, read in memory_readers(matrix, vector).items():
        name = short.get(name, name)
        read()
        times = []
        for _ in range(passes):
            start = time.perf_counter()
            read()
            times.append(time.perf_counter() - start)
        results[name] = matrix.numel() * matrix.element_size() / statistics.median(times)
    return results


def measure_speed(new_tokens: int, repeats: int) -> dict:
    import torch

    torch.set_num_threads(cores())
    prompt = prompt_ids()
    keys = [(engine, dtype) for engine, dtypes in engine_dtypes().items() for dtype in dtypes]
    models = {key: BUILD[key[0]](key[1]) for key in keys}
    weights = {key: weight_bytes_per_token(model) for key, model in models.items()}
    # fp32 buffers as large as each dtype's weights (fp32 reads run at full speed on every CPU;
    # what matters is how many bytes come from memory).
    from benchmarks.machine import ones_on_huge_pages

    buffers = {
        dtype: ones_on_huge_pages(weights[("ours", dtype)] // (4 * BANDWIDTH_WIDTH), BANDWIDTH_WIDTH)
        for dtype in DTYPE_NAMES
    }
    buffers[MEMORY] = ones_on_huge_pages(memory_buffer_bytes() // (4 * BANDWIDTH_WIDTH),
                                         BANDWIDTH_WIDTH)
    vector = torch.ones(BANDWIDTH_WIDTH)
    for key in keys:  # warm-up, and a check that nobody stops early
        produced = GENERATE[key[0]](models[key], prompt, new_tokens)
        if produced != new_tokens:
            raise SystemExit(f"{key} produced {produced} tokens, expected {new_tokens}")
        print(f"  warm-up {key[0]} {key[1]} done", flush=True)
    seconds: dict[tuple[str, str], list[float]] = {key: [] for key in keys}
    # adjacent[key] holds, per round, the memory readings ({reader: B/s}) just before and just
    # after that generation: this machine's memory bandwidth changes from second to second (a
    # shared host), so each generation is held against the bandwidth of its own moment.
    adjacent: dict[tuple[str, str], list[tuple[dict, dict]]] = {key: [] for key in keys}
    # bandwidth[name]: every reading of that buffer (the weight-sized ones once per round).
    bandwidth: dict[str, list[dict[str, float]]] = {name: [] for name in buffers}
    for repeat in range(repeats):
        order = keys[repeat % len(keys) :] + keys[: repeat % len(keys)]
        for key in order:
            before = read_bandwidth(buffers[MEMORY], vector)
            start = time.perf_counter()
            GENERATE[key[0]](models[key], prompt, new_tokens)
            seconds[key].append(time.perf_counter() - start)
            after = read_bandwidth(buffers[MEMORY], vector)
            adjacent[key].append((before, after))
            bandwidth[MEMORY] += [before, after]
        for dtype in DTYPE_NAMES:
            bandwidth[dtype].append(read_bandwidth(buffers[dtype], vector))
        line = "  ".join(f"{k[0]} {k[1]} {new_tokens / seconds[k][-1]:6.2f} tok/s" for k in keys)
        print(f"  round {repeat + 1}/{repeats}: {line}", flush=True)
    attention = getattr(models[("transformers", "fp32")].config, "_attn_implementation", "?")
    return {
        "seconds": seconds,
        "bandwidth": bandwidth,
        "adjacent": adjacent,
        "weights": weights,
        "attn_implementation": attention,
    }


# ---------------------------------------------------------------------------------- report
def machine() -> dict:
    import torch
    import transformers

    return {**cpu_description(), "torch": torch.__version__, "transformers": transformers.__version__}


def adjacent_bandwidth(readings: list[tuple[dict, dict]]) -> list[float]:
    """Per round: the fastest reader (torch.sum, torch.mv, the kernels' stream_read), averaged over
    the readings just before and just after the generation. The fastest reader is the better
    estimate of what the memory system can deliver, so the bound built on it is the stricter one."""
    return [(max(before.values()) + max(after.values())) / 2 for before, after in readings]


def summarise(speed: dict, new_tokens: int) -> dict:
    """tok/s per engine and dtype; per key the bound (tok/s at the memory bandwidth of its own
    moment, for ours' weight bytes of that dtype: see the module docstring); and per dtype the
    bound of ours' generations, which the rows show as "100%"."""
    seconds, weights = speed["seconds"], speed["weights"]
    tps = {key: [new_tokens / s for s in values] for key, values in seconds.items()}
    bound_of = {
        key: [bw / weights[("ours", key[1])] for bw in adjacent_bandwidth(readings)]
        for key, readings in speed["adjacent"].items()
    }
    bandwidth = {dtype: adjacent_bandwidth(speed["adjacent"][("ours", dtype)])
                 for dtype in DTYPE_NAMES}
    bound_tps = {dtype: bound_of[("ours", dtype)] for dtype in DTYPE_NAMES}
    return {"tps": tps, "bandwidth": bandwidth, "bound_tps": bound_tps, "bound_of": bound_of}


def build_rows(speed: dict, rss: dict, summary: dict, command: str) -> list[list[str]]:
    tps, bandwidth, bound_tps = summary["tps"], summary["bandwidth"], summary["bound_tps"]
    bound_of = summary["bound_of"]
    weights = speed["weights"]
    med = {key: statistics.median(values) for key, values in tps.items()}
    code = f"`{command}`"
    rows = []

    def speed_row(what, key, peer_key):
        dtype = key[1]
        rows.append(
            [
                what,
                f"{med[key]:.1f} tok/s",
                f"{med[peer_key]:.1f} tok/s ({peer_key[0]} {peer_key[1]})",
                f"**{ratios(tps[key], tps[peer_key]):.2f}x**",
                f"≤ {statistics.median(bound_tps[dtype]):.0f} tok/s, so ≤ "
                f"{ratios(bound_tps[dtype], tps[peer_key]):.2f}x "
                f"({weights[key] / 1e6:.0f} MB of {dtype} weights read per token)",
                code,
            ]
        )

    ours32, ours16, ours8 = ("ours", "fp32"), ("ours", "bf16"), ("ours", "int8")
    theirs32, theirs16 = ("transformers", "fp32"), ("transformers", "bf16")
    speed_row("decode tok/s, ours fp32 vs transformers fp32", ours32, theirs32)
    speed_row("decode tok/s, ours bf16 vs transformers fp32", ours16, theirs32)
    speed_row("decode tok/s, ours int8 vs transformers fp32", ours8, theirs32)
    speed_row("decode tok/s, transformers bf16 vs transformers fp32", theirs16, theirs32)
    speed_row("decode tok/s, ours bf16 vs transformers bf16", ours16, theirs16)
    speed_row("decode tok/s, ours bf16 vs ours fp32", ours16, ours32)
    speed_row("decode tok/s, ours int8 vs ours bf16", ours8, ours16)

    for dtype in DTYPE_NAMES:
        mine = ("ours", dtype)
        ours_fraction = ratios(tps[mine], bound_of[mine])
        gb_per_s = statistics.median(bandwidth[dtype]) / 1e9
        if ("transformers", dtype) in tps:
            theirs = ("transformers", dtype)
            peer = (f"{ratios(tps[theirs], bound_of[theirs]):.0%} (transformers {dtype}, "
                    f"{ms_per_token(tps[theirs]):.1f} ms/token)")
            ratio = f"{ratios(tps[mine], tps[theirs]):.2f}x"
        else:
            peer, ratio = "— (transformers has no int8 CPU path without bitsandbytes/torchao)", "—"
        rows.append(
            [
                f"fraction of the memory-bandwidth bound, {dtype}",
                f"{ours_fraction:.0%} ({ms_per_token(tps[mine]):.1f} ms/token)",
                peer,
                ratio,
                f"100% = {ms_per_token(bound_tps[dtype]):.1f} ms/token = "
                f"{weights[mine] / 1e6:.0f} MB / {gb_per_s:.1f} GB/s",
                code,
            ]
        )

    for dtype in ("bf16", "int8"):
        narrow = (AVX2, dtype)
        if narrow not in tps:
            continue
        rows.append(
            [
                f"fraction of the memory-bandwidth bound, {dtype}, AVX2 kernels (as on a CPU "
                "without AVX-512)",
                f"{ratios(tps[narrow], bound_of[narrow]):.0%} "
                f"({ms_per_token(tps[narrow]):.1f} ms/token)",
                f"{ratios(tps[('ours', dtype)], bound_of[('ours', dtype)]):.0%} (ours {dtype}, AVX-512 "
                f"kernels, {ms_per_token(tps[('ours', dtype)]):.1f} ms/token)",
                f"{ratios(tps[narrow], tps[('ours', dtype)]):.2f}x",
                f"100% = {ms_per_token(bound_tps[dtype]):.1f} ms/token",
                code,
            ]
        )

    def gbs(samples: list[dict[str, float]], kind: str) -> str:
        values = [sample[kind] / 1e9 for sample in samples]
        return f"{statistics.median(values):.1f} GB/s (range {min(values):.1f}–{max(values):.1f})"

    samples = speed["bandwidth"][MEMORY]
    readers = " · ".join(f"{name} {gbs(samples, name)}" for name in samples[0] if name != "mv")
    rows.append(
        [
            f"memory read bandwidth, {memory_buffer_bytes() / 2**20:.0f} MiB fp32 buffer (past L3)",
            f"torch.mv {gbs(samples, 'mv')}",
            readers,
            "—",
            "each generation's bound uses the fastest reader just before and after it; ours "
            f"fp32's: {statistics.median(bandwidth['fp32']) / 1e9:.1f} GB/s",
            code,
        ]
    )
    for dtype in DTYPE_NAMES:
        samples = speed["bandwidth"][dtype]
        size = weights[("ours", dtype)] / 1e6
        rows.append(
            [
                f"read speed of a {size:.0f} MB fp32 buffer (= {dtype} weight bytes; may sit in "
                "the L3)",
                f"torch.mv {gbs(samples, 'mv')}",
                f"torch.sum {gbs(samples, 'sum')}",
                "—",
                "for reference; not used by the bound",
                code,
            ]
        )

    floor = {"ours": rss["ours-import"]["mb"], "transformers": rss["transformers-import"]["mb"]}

    def rss_row(what, label, peer_label, engine, dtype, limit_dtype=None):
        mine, peer = rss[label]["mb"], rss[peer_label]["mb"]
        # bf16 and int8 are converted from an fp32 model, which is whole in memory first.
        weights_mb = weights[(engine, limit_dtype or dtype)] / 1e6
        rows.append(
            [
                what,
                f"{mine:.0f} MB",
                f"{peer:.0f} MB ({peer_label})",
                f"**{mine / peer:.2f}x**",
                f"≥ {floor[engine] + weights_mb:.0f} MB = imports {floor[engine]:.0f} MB "
                f"+ {limit_dtype or dtype} weights {weights_mb:.0f} MB",
                code,
            ]
        )

    rss_row(
        "peak RSS of import + build + generate, ours fp32",
        "ours-fp32",
        "transformers-fp32",
        "ours",
        "fp32",
    )
    rss_row("peak RSS, ours bf16 (converted from fp32)", "ours-bf16", "transformers-bf16", "ours",
            "bf16", limit_dtype="fp32")
    rss_row("peak RSS, ours int8 (converted from fp32)", "ours-int8", "transformers-bf16", "ours",
            "int8", limit_dtype="fp32")
    rows.append(
        [
            "peak RSS of the imports alone (torch + the engine)",
            f"{rss['ours-import']['mb']:.0f} MB",
            f"{rss['transformers-import']['mb']:.0f} MB (transformers)",
            f"{rss['ours-import']['mb'] / rss['transformers-import']['mb']:.2f}x",
            "—",
            code,
        ]
    )
    return rows


def kernel_description() -> str:
    """Which kernels run the prepared models here (promethean.inference.quantize)."""
    from promethean.inference import kernels

    reason = kernels.unavailable_reason()
    if reason is None:
        kind = ("AVX-512 kernels (bf16: `vdpbf16ps`; int8: per-channel int8 weights against x "
                "quantized to int16 per row, `vpdpwssd`, exact int64 sums; fp32 FMAs; the AVX2 "
                "rows: the same products with FMAs and `vpmaddwd`, bit-identical)")
        if kernels.instruction_set() == "avx2":
            kind = ("AVX2 kernels (bf16 as two fp32 FMAs per pair; int8 through `vpmaddwd`, exact "
                    "int64 sums; fp32 FMAs)")
        return (f"Promethean's {kind} for every layer, weights packed in panels of 64 outputs "
                "read front to back, q/k/v in one product, GELU or act(gate)*up in the "
                "product's epilogue, norms and attention on the kernels too, and every block of a "
                "decode step in one C++ call (`fused_decode`)")
    return (f"PyTorch's kernels, because Promethean's cannot run here ({reason}): bf16 "
            "oneDNN-prepacked matrices and the tied head through `torch.mv`, int8 through "
            "`torch._weight_int8pack_mm` with bf16 activations")


def ms_per_token(values: list[float]) -> float:
    return statistics.median(1e3 / value for value in values)


def met(ok: bool) -> str:
    return "met" if ok else "**not met**"


def summary_rows(speed: dict, summary: dict, command: str) -> list[dict[str, str]]:
    """The rows of `python -m benchmarks`' summary: speed against transformers fp32 in each dtype,
    and the share of the bandwidth bound reached in each, with the targets."""
    tps, bound_tps, weights = summary["tps"], summary["bound_tps"], speed["weights"]
    peer = ("transformers", "fp32")
    code = f"`{command}`"
    rows = []
    for dtype in DTYPE_NAMES:
        mine = ("ours", dtype)
        fraction = ratios(tps[mine], summary["bound_of"][mine])
        target = BOUND_TARGET.get(dtype)
        rows.append(summary_row(
            f"decode gpt2-small batch 1, ours {dtype}",
            f"{statistics.median(tps[mine]):.1f} tok/s ({fraction:.0%} of the bandwidth bound)",
            f"{statistics.median(tps[peer]):.1f} tok/s (transformers fp32)",
            f"{ratios(tps[mine], tps[peer]):.2f}x",
            f"{statistics.median(bound_tps[dtype]):.0f} tok/s = {weights[mine] / 1e6:.0f} MB read "
            "per token / memory bandwidth",
            f"≥ {target:.0%} of the bound: {'met' if fraction >= target else 'not met'}"
            if target else "",
            code,
        ))
    return rows


def render(rows, info, speed, rss, summary, args, started, elapsed) -> str:
    header = ["what", "ours", "peer, same run", "ratio", "physical limit", "command"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    tps = summary["tps"]
    per_round = "; ".join(
        f"{k[0]} {k[1]} " + ", ".join(f"{t:.1f}" for t in v) for k, v in tps.items()
    )
    rss_all = "; ".join(f"{label} {', '.join(map(str, r['all_mb']))}" for label, r in rss.items())
    mismatched = [label for label, r in rss.items() if abs(r["hwm_mb"] - r["mb"]) > 0.02 * r["mb"]]
    cross_check = (
        "ru_maxrss agrees with /proc/self/status VmHWM within 2% for every run."
        if not mismatched
        else f"ru_maxrss and VmHWM differ by more than 2% for {', '.join(mismatched)}."
    )
    speed_x = {
        dtype: ratios(tps[("ours", dtype)], tps[("transformers", "fp32")]) for dtype in DTYPE_NAMES
    }
    fraction = {
        dtype: ratios(tps[("ours", dtype)], summary["bound_of"][("ours", dtype)])
        for dtype in DTYPE_NAMES
    }
    ceiling = ratios(summary["bound_tps"]["fp32"], tps[("transformers", "fp32")])
    peak = rss["ours-fp32"]["mb"]
    floor = rss["ours-import"]["mb"] + speed["weights"][("ours", "fp32")] / 1e6
    bound_targets = ", ".join(
        f"{met(fraction[dtype] >= target)} in {dtype} ({fraction[dtype]:.0%})"
        for dtype, target in BOUND_TARGET.items()
    )
    return "\n".join(
        [
            f"{measured_line(info, started, elapsed / 60)}; "
            f"torch {info['torch']}, transformers {info['transformers']} "
            f"(attention: {speed['attn_implementation']}), Python {info['python']}.",
            "",
            f"Setup: `{PRESET}` (124M parameters, random weights) and "
            "`transformers.GPT2LMHeadModel` on the same config; batch 1, a "
            f"{PROMPT_LENGTH}-token random prompt, greedy, exactly {args.new_tokens} new tokens, "
            f"KV cache on; `torch.set_num_threads({info['cores']})` for both. tok/s = "
            f"{args.new_tokens} / seconds of the whole `generate` call (prefill included). "
            f"Medians of {args.repeats} rounds; each ratio is taken within a round, then the "
            "median is reported. MB = 10^6 bytes.",
            "",
            *lines,
            "",
            f"Targets: ours ≥ 3x transformers fp32 tok/s: {met(speed_x['fp32'] >= 3)} in fp32 "
            f"({speed_x['fp32']:.2f}x; the bandwidth bound allows at most {ceiling:.2f}x), "
            f"{met(speed_x['bf16'] >= 3)} in bf16 ({speed_x['bf16']:.2f}x), "
            f"{met(speed_x['int8'] >= 3)} in int8 ({speed_x['int8']:.2f}x). "
            f"≥ 70% of the memory-bandwidth bound: {bound_targets}. "
            f"Peak RSS of a 124M fp32 generation (ours) ≤ 600 MB: {met(peak <= 600)} "
            f"({peak:.0f} MB; imports + fp32 weights alone are {floor:.0f} MB).",
            "",
            f"Per-round tok/s: {per_round}.",
            f"Per-round peak RSS (MB): {rss_all}. {cross_check}",
            f"Load average at start / end: {args.load_start} / "
            f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}.",
            "",
            "How the models are built: ours `Transformer(config)` in fp32, and for bf16 and int8 "
            "then `prepare_for_inference(model, dtype)`, as `promethean generate --dtype` does: "
            f"{kernel_description()}; transformers `GPT2LMHeadModel(config)`, and "
            "`GPT2LMHeadModel._from_config(config, dtype=torch.bfloat16)` for bf16. The physical "
            "limit of a peak RSS is the imports-only run plus the weights it holds at its fullest "
            "(fp32 before a conversion); that of a decode speed is weight bytes / memory read "
            "bandwidth (a buffer past the L3).",
        ]
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    add_report_options(parser)
    parser.add_argument("--rss-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rss_child:
        rss_child(args.rss_child, args.new_tokens)
        return
    if args.new_tokens < 1 or args.repeats < 1:
        parser.error("--new-tokens and --repeats must be at least 1")

    command = f"python benchmarks/decode.py --new-tokens {args.new_tokens} --repeats {args.repeats}"
    if args.write:
        command += f" --write {shlex.quote(str(args.write))}"
    started = datetime.datetime.now(datetime.timezone.utc)
    args.load_start = " ".join(f"{x:.2f}" for x in os.getloadavg())
    clock = time.perf_counter()
    print(f"peak RSS, {len(RSS_RUNS)} subprocesses x {args.repeats} rounds", flush=True)
    rss = measure_rss(args.new_tokens, args.repeats)  # first: this process is still small
    engines = sum(len(dtypes) for dtypes in engine_dtypes().values())
    print(f"decode speed, {engines} engines x ({args.repeats} rounds + 1 warm-up)", flush=True)
    speed = measure_speed(args.new_tokens, args.repeats)
    info = machine()
    summary = summarise(speed, args.new_tokens)
    rows = build_rows(speed, rss, summary, command)
    body = render(rows, info, speed, rss, summary, args, started, time.perf_counter() - clock)
    print()
    print(body)
    if args.write:
        write_section(args.write, START, END, body)
        print(f"\nwrote the decode section of {args.write}")
    write_summary_rows(args.json, summary_rows(speed, summary, command))


if __name__ == "__main__":
    main()
