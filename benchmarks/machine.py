"""The machine's own physical limits, measured rather than looked up: the matmul peak (FLOP/s) in
fp32 and bf16, and the memory read bandwidth (bytes/s). Benchmarks divide by these to say how close
a figure is to what the hardware allows (MFU for training, the bandwidth bound for decoding).

Both are medians over several timed passes after a warm-up, with the thread count every benchmark
uses (all the cores this process may run on), so that one stray interruption on a shared machine
moves them little. Each takes a few seconds.

    python benchmarks/machine.py [--json]
"""

from __future__ import annotations

import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.common import cores  # noqa: E402

DTYPE_NAMES = ("fp32", "bf16")


def _median_seconds(action: Callable[[], object], passes: int, budget_s: float) -> float:
    """Median wall time of `action` over at least 3 and at most `passes` timed passes (fewer when
    the passes would run past `budget_s`), after one untimed warm-up."""
    action()
    times: list[float] = []
    spent_start = time.perf_counter()
    while len(times) < passes:
        start = time.perf_counter()
        action()
        times.append(time.perf_counter() - start)
        if len(times) >= 3 and time.perf_counter() - spent_start > budget_s:
            break
    return statistics.median(times)


def _with_threads(threads: int | None):
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads or cores())
    return previous


def measure_matmul_peak(dtype_name: str, size: int = 2048, passes: int = 7,
                        budget_s: float = 3.0, threads: int | None = None) -> float:
    """FLOP/s of a `size`^3 torch.matmul in `dtype_name` ("fp32" or "bf16"): 2 size^3 / the
    median time of up to `passes` passes (at least 3; fewer once `budget_s` is spent)."""
    import torch

    if dtype_name not in DTYPE_NAMES:
        raise ValueError(f"unknown dtype {dtype_name!r}; expected one of {', '.join(DTYPE_NAMES)}")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    previous = _with_threads(threads)
    try:
        generator = torch.Generator().manual_seed(0)
        a = torch.randn(size, size, generator=generator).to(dtype)
        b = torch.randn(size, size, generator=generator).to(dtype)
        seconds = _median_seconds(lambda: torch.matmul(a, b), passes, budget_s)
    finally:
        torch.set_num_threads(previous)
    return 2 * size**3 / seconds


def _buffer_bytes() -> int:
    """A buffer well past the last-level cache (twice L3, at least 512 MiB) so that reads come from
    memory, yet at most an eighth of the RAM."""
    import os

    l3 = 0
    l3_path = Path("/sys/devices/system/cpu/cpu0/cache/index3/size")
    try:
        text = l3_path.read_text().strip()
        unit = {"K": 2**10, "M": 2**20}.get(text[-1:], 1)
        l3 = int(text.rstrip("KM")) * unit
    except (OSError, ValueError):
        pass
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return min(max(2 * l3, 512 * 2**20), ram // 8)


def measure_memory_bandwidth(buffer_bytes: int | None = None, width: int = 3072, passes: int = 7,
                             budget_s: float = 3.0, threads: int | None = None) -> float:
    """Bytes/s of reading an fp32 buffer of `buffer_bytes` (default: well past L3) once, the faster
    of two readers: torch.sum, and torch.mv (a matrix-vector product, the access pattern of a
    batch-1 decode step). Each is the median of up to `passes` passes."""
    import torch

    total = buffer_bytes or _buffer_bytes()
    rows = max(1, total // (4 * width))
    previous = _with_threads(threads)
    try:
        matrix = torch.ones(rows, width)
        vector = torch.ones(width)
        read_bytes = matrix.numel() * matrix.element_size()
        best = 0.0
        for read in (lambda: matrix.sum(), lambda: matrix.mv(vector)):
            best = max(best, read_bytes / _median_seconds(read, passes, budget_s / 2))
    finally:
        torch.set_num_threads(previous)
    if not math.isfinite(best) or best <= 0:
        raise RuntimeError("memory bandwidth measurement gave no positive figure")
    return best


def describe_machine() -> dict:
    """The CPU description of benchmarks.common plus the measured peaks and bandwidth."""
    from benchmarks.common import cpu_description

    machine = cpu_description()
    machine["matmul_peak"] = {name: measure_matmul_peak(name) for name in DTYPE_NAMES}
    machine["bandwidth"] = measure_memory_bandwidth()
    return machine


if __name__ == "__main__":
    if sys.argv[1:] == ["--json"]:  # how `python -m benchmarks` asks, from a process of its own
        import json

        print(json.dumps(describe_machine()))
    else:
        for name in DTYPE_NAMES:
            print(f"matmul peak {name}: {measure_matmul_peak(name) / 1e9:.1f} GFLOP/s")
        print(f"memory read bandwidth: {measure_memory_bandwidth() / 1e9:.1f} GB/s")
