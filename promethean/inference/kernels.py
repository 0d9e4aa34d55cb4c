"""Promethean's own CPU kernels for inference (`kernels.cpp`), built on first use.

`available()` says whether they can run here: an x86-64 Linux CPU with AVX2 and FMA, a C++
compiler, and this PyTorch's headers. Where the CPU also has AVX-512 with its bf16 and VNNI dot
products, those kernels run (`instruction_set()` says which). The first call in a new
environment compiles `kernels.cpp` once (about 15 s) into the cache
(`$PROMETHEAN_CACHE/kernels/<key>/`, the key naming the source, PyTorch and the compiler), under
a file lock so that processes starting together build it once; later processes just load it.
Where they cannot run, everything falls back to PyTorch's own kernels: slower, same results to
rounding.

`PROMETHEAN_CPU_KERNELS=0` turns them off (to compare, or to rule them out);
`PROMETHEAN_CPU_KERNELS=avx2` runs the AVX2 kernels even where AVX-512 is there.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from promethean.archives import cache_dir
from promethean.errors import PrometheanError

SOURCE = Path(__file__).with_name("kernels.cpp")
LIBRARY_NAME = "promethean_kernels.so"
DISABLE_VARIABLE = "PROMETHEAN_CPU_KERNELS"
BUILD_TIMEOUT_S = 600
REQUIRED_CPU_FLAGS = {"avx2", "fma", "f16c"}
INSTRUCTION_SETS = ("avx512", "avx2")
LACKS_AVX2 = "this CPU lacks AVX2 and FMA"


def available() -> bool:
    """Whether `linear` can run here (building the kernels on the first call of a process)."""
    return _load() is None


def unavailable_reason() -> str | None:
    """Why the kernels cannot run here, in one sentence; None where they can."""
    return _load()


def instruction_set() -> str:
    """'avx512' or 'avx2': which kernels run (loading them first)."""
    _require()
    return torch.ops.promethean_kernels.instruction_set()


def use_instruction_set(name: str) -> None:
    """Run the 'avx512' or the 'avx2' kernels from now on (to compare them; this CPU must have
    that set)."""
    _require()
    if name not in INSTRUCTION_SETS:
        raise PrometheanError(f"the instruction set must be avx512 or avx2, not '{name}'.")
    try:
        torch.ops.promethean_kernels.select_instruction_set(name)
    except RuntimeError as error:
        raise PrometheanError(f"{_first_line(error)}.") from None


def _require() -> None:
    reason = unavailable_reason()
    if reason is not None:
        raise PrometheanError(f"Promethean's CPU kernels cannot run here: {reason}.")


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    scales: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """x @ weight.T (* scales per output row) (+ bias), in x's dtype (bf16 or fp32).

    `weight` is a contiguous bf16 or int8 (out, in) matrix; int8 needs `scales`; scales and bias
    are fp32. Only call this where `available()` is true."""
    return torch.ops.promethean_kernels.linear(x, weight, scales, bias)


def decode_blocks(
    x: torch.Tensor,
    params: list[torch.Tensor | None],
    keys: list[torch.Tensor],
    values: list[torch.Tensor],
    rotary: list[torch.Tensor],
    mask: torch.Tensor | None,
    filled: int,
    shape: list[int],
    reals: list[float],
) -> torch.Tensor:
    """Every block of a decode step (see `fused_decode`): x (batch, 1, width) in, the last
    block's output out; the new keys and values are written at slot `filled` of each layer's
    cache buffers. Only call this where `available()` is true."""
    return torch.ops.promethean_kernels.decode_blocks(
        x, params, keys, values, rotary, mask, filled, shape, reals
    )


@functools.cache
def _load() -> str | None:
    """Load the kernels into this process; return why not, or None when they are loaded."""
    choice = os.environ.get(DISABLE_VARIABLE, "").strip().lower()
    if choice in ("0", "false", "no", "off"):
        return f"{DISABLE_VARIABLE}=0 turns them off"
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        return f"they are written for x86-64 Linux, not {sys.platform} on {platform.machine()}"
    if choice and choice not in INSTRUCTION_SETS and choice not in ("1", "true", "yes", "on"):
        return f"{DISABLE_VARIABLE}={choice} is not 0, 1, avx2 or avx512"
    if not _cpu_flags() >= REQUIRED_CPU_FLAGS:
        return LACKS_AVX2
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        return "no C++ compiler was found (install g++ to build them)"
    try:
        library = _build(compiler)
    except (OSError, subprocess.SubprocessError) as error:
        return f"building them failed ({_first_line(error)})"
    try:
        torch.ops.load_library(str(library))
        if not torch.ops.promethean_kernels.supported():
            return LACKS_AVX2
        if choice in INSTRUCTION_SETS:
            torch.ops.promethean_kernels.select_instruction_set(choice)
    except (OSError, RuntimeError) as error:
        return f"loading them failed ({_first_line(error)})"
    return None


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _compile_command(compiler: str, output: Path) -> list[str]:
    from torch.utils import cpp_extension

    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    return [
        compiler, "-O3", "-std=c++20", "-fPIC", "-shared", "-fopenmp", "-w",
        f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
        *(f"-I{path}" for path in cpp_extension.include_paths()),
        str(SOURCE), "-o", str(output),
        *(f"-L{path}" for path in cpp_extension.library_paths()),
        "-lc10", "-ltorch_cpu",
        # OpenMP comes from the libgomp PyTorch already loaded (same soname): one thread pool.
    ]


def _build_key(compiler: str) -> str:
    version = subprocess.run(
        [compiler, "--version"], capture_output=True, text=True, timeout=60, check=True
    ).stdout.splitlines()[0]
    digest = hashlib.sha256()
    for part in (SOURCE.read_bytes(), torch.__version__.encode(), version.encode(),
                 " ".join(_compile_command(compiler, Path("out"))).encode()):
        digest.update(part)
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def _build(compiler: str) -> Path:
    """The compiled library in the cache, compiling it first if it is not there yet."""
    folder = Path(os.environ.get("PROMETHEAN_KERNEL_CACHE") or cache_dir() / "kernels")
    folder = folder / _build_key(compiler)
    library = folder / LIBRARY_NAME
    if library.is_file():
        return library
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be building it right now
        if library.is_file():
            return library
        print("promethean: building the CPU inference kernels (once, about 15 s)...",
              file=sys.stderr, flush=True)
        with tempfile.TemporaryDirectory(dir=folder) as scratch:
            partial = Path(scratch) / LIBRARY_NAME
            done = subprocess.run(
                _compile_command(compiler, partial), capture_output=True, text=True,
                timeout=BUILD_TIMEOUT_S,
            )
            if done.returncode != 0:
                message = (done.stderr.strip() or done.stdout.strip() or "no output").splitlines()
                raise subprocess.SubprocessError(f"{compiler} exited with {done.returncode}: "
                                                 f"{message[0]}")
            os.replace(partial, library)  # whole or absent: never a half-written library
    return library


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
