"""The machine's own physical limits, measured rather than looked up: the matmul peak (FLOP/s) in
fp32 and bf16, and the memory read bandwidth (bytes/s). Benchmarks divide by these to say how close
a figure is to what the hardware allows (MFU for training, the bandwidth bound for decoding).

A limit is the fastest this machine's libraries reach, so each is measured several ways and the
fastest wins (the description names each way's figure and the winner): the matmul as
`torch.matmul` (MKL for fp32, which takes a slow path on AMD CPUs) and as oneDNN's linear
(`torch.ops.mkldnn._linear_pointwise`, where this PyTorch has it); the read as `torch.sum`,
`torch.mv` (the access pattern of a batch-1 decode step) and Promethean's streaming read
(`torch.ops.promethean_kernels.stream_read`, where our kernels run and have it).

Each is a median over several timed passes after a warm-up, with the thread count every
benchmark uses (all the cores this process may run on), so that one stray interruption on a
shared machine moves them little. Each takes a few seconds.

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


def _onednn_linear():
    """oneDNN's linear (x @ weight.T) as this PyTorch exposes it, or None where it does not."""
    import torch

    try:
        if not torch.backends.mkldnn.is_available():
            return None
        return torch.ops.mkldnn._linear_pointwise
    except (AttributeError, RuntimeError):
        return None


def matmul_paths(a, b) -> dict[str, Callable[[], object]]:
    """The ways this PyTorch multiplies two matrices, by name: `torch.matmul`, and oneDNN's
    linear where it is there (it multiplies by b.T: the same FLOPs)."""
    import torch

    paths: dict[str, Callable[[], object]] = {"torch.matmul": lambda: torch.matmul(a, b)}
    linear = _onednn_linear()
    if linear is not None:
        paths["oneDNN linear"] = lambda: linear(a, b, None, "none", [], "")
    return paths


def measure_matmul_peaks(dtype_name: str, size: int = 2048, passes: int = 7,
                         budget_s: float = 3.0, threads: int | None = None) -> dict[str, float]:
    """FLOP/s of a `size`^3 matmul in `dtype_name` ("fp32" or "bf16") by each of
    `matmul_paths`: 2 size^3 / the median time of up to `passes` passes (at least 3; fewer once
    the path's share of `budget_s` is spent). A path that fails (an op this build cannot run)
    is left out; torch.matmul always runs."""
    import torch

    if dtype_name not in DTYPE_NAMES:
        raise ValueError(f"unknown dtype {dtype_name!r}; expected one of {', '.join(DTYPE_NAMES)}")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    previous = _with_threads(threads)
    peaks: dict[str, float] = {}
    try:
        generator = torch.Generator().manual_seed(0)
        a = torch.randn(size, size, generator=generator).to(dtype)
        b = torch.randn(size, size, generator=generator).to(dtype)
        paths = matmul_paths(a, b)
        for name, action in paths.items():
            try:
                seconds = _median_seconds(action, passes, budget_s / len(paths))
            except Exception:  # noqa: BLE001 - only torch.matmul must run
                if name == "torch.matmul":
                    raise
                continue
            peaks[name] = 2 * size**3 / seconds
    finally:
        torch.set_num_threads(previous)
    return peaks


def measure_matmul_peak(dtype_name: str, size: int = 2048, passes: int = 7,
                        budget_s: float = 3.0, threads: int | None = None) -> float:
    """The matmul peak in `dtype_name`: the fastest of `measure_matmul_peaks`, in FLOP/s."""
    return max(measure_matmul_peaks(dtype_name, size, passes, budget_s, threads).values())


def fastest(figures: dict[str, float]) -> str:
    """The name of the largest figure."""
    return max(figures, key=figures.__getitem__)


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


def _stream_read():
    """Promethean's streaming-read op (the sum of a contiguous buffer), or None where our
    kernels cannot run here or do not have it."""
    try:
        from promethean.inference import kernels

        if not kernels.available():
            return None
        import torch

        namespace = torch.ops.promethean_kernels
        return namespace.stream_read if hasattr(namespace, "stream_read") else None
    except Exception:  # noqa: BLE001 - an optional reader: any failure leaves it out
        return None


def memory_readers(matrix, vector) -> dict[str, Callable[[], object]]:
    """The ways to read all of `matrix` (contiguous fp32) once, by name: torch.sum, torch.mv (a
    matrix-vector product, the access pattern of a batch-1 decode step) and, where it runs,
    Promethean's `stream_read`."""
    readers: dict[str, Callable[[], object]] = {"torch.sum": lambda: matrix.sum(),
                                                "torch.mv": lambda: matrix.mv(vector)}
    stream_read = _stream_read()
    if stream_read is not None:
        readers["promethean stream_read"] = lambda: stream_read(matrix)
    return readers


def ones_on_huge_pages(rows: int, width: int):
    """An fp32 (rows, width) tensor of ones on 2 MB pages where the OS grants them, as a prepared
    model's weights are (promethean.inference.kernel_layers.huge_page_bytes): reads of it measure
    what the memory delivers, not what 4 KB pages' TLB misses leave of it. Ordinary memory where
    it cannot be asked for."""
    import torch

    try:
        from promethean.inference.kernel_layers import huge_page_bytes

        arena = huge_page_bytes(rows * width * 4)
    except ImportError:
        arena = None
    if arena is None:
        return torch.ones(rows, width)
    matrix = arena.view(torch.float32).view(rows, width)
    matrix.fill_(1.0)
    return matrix


def measure_memory_readers(buffer_bytes: int | None = None, width: int = 3072, passes: int = 7,
                           budget_s: float = 3.0, threads: int | None = None) -> dict[str, float]:
    """Bytes/s of reading an fp32 buffer of ones of `buffer_bytes` (default: well past L3; on
    2 MB pages where granted, `ones_on_huge_pages`) once, by each of `memory_readers`: the median of up to `passes` passes each. An optional reader
    that fails, or whose sum is not the buffer's (so it did not read it all), is left out."""
    import torch

    total = buffer_bytes or _buffer_bytes()
    rows = max(1, total // (4 * width))
    previous = _with_threads(threads)
    figures: dict[str, float] = {}
    try:
        matrix = ones_on_huge_pages(rows, width)
        vector = torch.ones(width)
        read_bytes = matrix.numel() * matrix.element_size()
        readers = memory_readers(matrix, vector)
        for name, read in readers.items():
            if name.startswith("torch."):
                seconds = _median_seconds(read, passes, budget_s / len(readers))
            else:
                try:
                    if abs(float(read()) - matrix.numel()) > 1e-2 * matrix.numel():
                        continue
                    seconds = _median_seconds(read, passes, budget_s / len(readers))
                except Exception:  # noqa: BLE001 - an optional reader
                    continue
            figures[name] = read_bytes / seconds
    finally:
        torch.set_num_threads(previous)
    if not all(math.isfinite(value) and value > 0 for value in figures.values()):
        raise RuntimeError("memory bandwidth measurement gave no positive figure")
    return figures


def measure_memory_bandwidth(buffer_bytes: int | None = None, width: int = 3072, passes: int = 7,
                             budget_s: float = 3.0, threads: int | None = None) -> float:
    """The memory read bandwidth: the fastest of `measure_memory_readers`, in bytes/s."""
    return max(measure_memory_readers(buffer_bytes, width, passes, budget_s, threads).values())


def describe_machine() -> dict:
    """The CPU description of benchmarks.common plus the measured limits: "matmul_peak" {dtype:
    FLOP/s} and "bandwidth" (B/s), the fastest ways, and every way's figure ("matmul_paths"
    {dtype: {path: FLOP/s}}, "bandwidth_readers" {reader: B/s})."""
    from benchmarks.common import cpu_description

    machine = cpu_description()
    machine["matmul_paths"] = {name: measure_matmul_peaks(name) for name in DTYPE_NAMES}
    machine["matmul_peak"] = {name: max(paths.values())
                              for name, paths in machine["matmul_paths"].items()}
    machine["bandwidth_readers"] = measure_memory_readers()
    machine["bandwidth"] = max(machine["bandwidth_readers"].values())
    return machine


if __name__ == "__main__":
    if sys.argv[1:] == ["--json"]:  # how `python -m benchmarks` asks, from a process of its own
        import json

        print(json.dumps(describe_machine()))
    else:
        from benchmarks.common import cpu_description, cpu_phrase

        def listing(figures: dict[str, float], unit: float) -> str:
            return ", ".join(f"{name} {value / unit:.1f}" for name, value in figures.items())

        cpu = cpu_description()
        print(f"CPU: {cpu_phrase(cpu)}; Promethean's CPU kernels: {cpu['kernels']}")
        for name in DTYPE_NAMES:
            paths = measure_matmul_peaks(name)
            print(f"matmul peak {name}: {max(paths.values()) / 1e9:.1f} GFLOP/s "
                  f"({listing(paths, 1e9)}; fastest: {fastest(paths)})")
        readers = measure_memory_readers()
        print(f"memory read bandwidth: {max(readers.values()) / 1e9:.1f} GB/s "
              f"({listing(readers, 1e9)}; fastest: {fastest(readers)})")
