"""Promethean's own CPU kernels for inference (`csrc/`), built on first use.

`available()` says whether they can run here: an x86-64 Linux CPU with AVX2 and FMA, a C++
compiler, and this PyTorch's headers. Where the CPU also has AVX-512 with its bf16 and VNNI dot
products, those kernels run (`instruction_set()` says which). The first call in a new
environment compiles `csrc/` once (about 20 s) into the cache
(`$PROMETHEAN_CACHE/kernels/<key>/`, the key naming the source, PyTorch and the compiler), under
a file lock so that processes starting together build it once; later processes just load it.
Where they cannot run, everything falls back to PyTorch's own kernels: slower, the same results
to rounding, and without the kernels' guarantee that a row's result does not depend on what it is
computed with.

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

SOURCES = Path(__file__).with_name("csrc")
LIBRARY_NAME = "promethean_kernels.so"
DISABLE_VARIABLE = "PROMETHEAN_CPU_KERNELS"
BUILD_TIMEOUT_S = 600
REQUIRED_CPU_FLAGS = {"avx2", "fma", "f16c"}
INSTRUCTION_SETS = ("avx512", "avx2")
# One translation unit per instruction set, each compiled with its own flags; ops.cpp (the torch
# operators) is plain x86-64 and calls the set the CPU has. -ffp-contract=off everywhere: the
# compiler may not fuse a multiply and an add on its own, which would round differently on each
# instruction set (and from one inlining to the next).
TRANSLATION_UNITS = {
    "ops.cpp": [],
    "isa_avx512.cpp": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512bf16",
                       "-mavx512vnni", "-mavx2", "-mfma", "-mf16c"],
    "isa_avx2.cpp": ["-mavx2", "-mfma", "-mf16c"],
}
COMMON_FLAGS = ["-O3", "-std=c++20", "-fPIC", "-fopenmp", "-w", "-ffp-contract=off",
                "-fno-math-errno"]
LACKS_AVX2 = "this CPU lacks AVX2 and FMA"


def available() -> bool:
    """Whether `linear` can run here (building the kernels on the first call of a process)."""
    return _load() is None


def loaded() -> bool:
    """Whether the kernels are built and loaded in this process already (never builds them)."""
    return _load.cache_info().currsize > 0 and _load() is None


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


# The activations a product can end with (csrc/api.h's Activation); the gated ones take a weight
# packed with `gated=True` (gate and up rows) and return act(gate) * up.
ACTIVATIONS = {"none": 0, "gelu_tanh": 1, "silu": 2, "softplus": 3, "silu_mul": 4,
               "gelu_tanh_mul": 5}


def pack_linear(weight: torch.Tensor, gated: bool = False) -> torch.Tensor:
    """A (rows, K) fp32, bf16 or int8 weight in the kernels' panel layout (csrc/api.h): one
    sequential read per thread for a product. `gated`: the rows are a gate projection's, then an
    up projection's, packed so that one product gives act(gate) * up."""
    return torch.ops.promethean_kernels.pack_linear(weight, gated)


def packed_rows(packed: torch.Tensor, ids: torch.Tensor, in_features: int,
                scales: torch.Tensor | None = None,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Rows `ids` of a packed weight, (*ids.shape, in_features): the lookup of an embedding that
    shares the head's matrix. In the weight's dtype; or, given int8 panels' `scales`, each row
    times its scale in `dtype` (fp32 or bf16), as `(rows.float() * scales[ids]).to(dtype)`."""
    return torch.ops.promethean_kernels.packed_rows(packed, ids, in_features, scales,
                                                    dtype == torch.bfloat16)


def linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    out_features: int,
    scales: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    activation: str = "none",
    lora: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """x (..., K) times a packed weight (* scales per weight row) (+ bias), then `activation`, in
    x's dtype (bf16 or fp32). int8 weights need their fp32 `scales`; bias is fp32. A row's result
    does not depend on the other rows. Only call this where `available()` is true.

    `lora` = (down, up, slots) adds LoRA adapters held side by side before the activation: row m
    of x (flattened to rows) gets (x_m down[s]) up[s] with s = slots[m] (int64, -1: nothing);
    down is (adapters, K, R), up (adapters, R, weight rows) with the scaling folded in, fp32."""
    if lora is None:
        return torch.ops.promethean_kernels.linear(x, packed, out_features, scales, bias,
                                                   ACTIVATIONS[activation])
    down, up, slots = lora
    return torch.ops.promethean_kernels.linear(x, packed, out_features, scales, bias,
                                               ACTIVATIONS[activation], down, up, slots)


def norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    eps: float,
    rms: bool,
    unit_offset: bool = False,
) -> torch.Tensor:
    """LayerNorm (rms=False) or RMSNorm of x's rows, in x's dtype; weight and bias are fp32."""
    return torch.ops.promethean_kernels.norm(x, weight, bias, eps, rms, unit_offset)


def attention(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    query_slot: int,
    key_slot: int,
    held: int,
    left_padding: torch.Tensor | None,
    window: int | None,
    scale: float,
) -> torch.Tensor:
    """Causal attention: q (B, H, Tq, D) at slots query_slot.., against the first `held` keys and
    values (B, Hkv, S, D), whose index 0 is slot `key_slot`. A query sees the keys from its row's
    first real slot (after `left_padding`) or, with a `window`, its last `window` slots; returns
    (B, Tq, H * D) in q's dtype."""
    return torch.ops.promethean_kernels.attention(q, keys, values, query_slot, key_slot, held,
                                                  left_padding, window or 0, scale)


def ssm_scan(x, z, delta, bc, A, skip, state, threshold: float) -> torch.Tensor:
    """The selective scan of one SSM layer (csrc/api.h's ScanArgs): x and z (B, T, D) in the
    model's dtype, delta (B, T, D) and bc (B, T, 2N: B then C) fp32, A (D, N), skip (D,), state
    (B, D, N) fp32 updated in place; returns silu(z) * (C.h + skip x) per token."""
    return torch.ops.promethean_kernels.ssm_scan(x, z, delta, bc, A, skip, state, threshold)


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, D) rotated by (B or 1, 1, T, D) tables of its dtype, "rotate half" as
    promethean.model.layers.apply_rotary, computed in fp32 and rounded once."""
    return torch.ops.promethean_kernels.rotary(x, cos, sin)


def silu(x: torch.Tensor) -> torch.Tensor:
    """x * sigmoid(x) elementwise, every element computed alike wherever it sits."""
    return torch.ops.promethean_kernels.activate(x, ACTIVATIONS["silu"])


def argmax_rows(x: torch.Tensor) -> torch.Tensor:
    """`x.float().argmax(dim=-1)` (int64) for fp32 or bf16 x, without the copy, ~10x faster."""
    return torch.ops.promethean_kernels.argmax_rows(x)


def stream_read(buffer: torch.Tensor) -> float:
    """The sum of a contiguous fp32 buffer, read as fast as this CPU can (a bandwidth probe)."""
    return torch.ops.promethean_kernels.stream_read(buffer)


def decode_blocks(
    x: torch.Tensor,
    params: list[torch.Tensor | None],
    keys: list[torch.Tensor],
    values: list[torch.Tensor],
    first_slots: list[int],
    filled: list[int],
    windows: list[int],
    rotary: list[torch.Tensor | None],
    left_padding: torch.Tensor | None,
    query_slot: int,
    shape: list[int],
    reals: list[float],
    lora: list[torch.Tensor | None] | None = None,
    lora_slots: torch.Tensor | None = None,
) -> torch.Tensor:
    """Every block of a decode step (see `fused_decode`): x (batch, 1, width) in, the last
    block's output out; the new keys and values are written at index `filled[layer]` of each
    layer's cache buffers. `lora`: (down, up) of each layer's qkv, output, up and down
    projections (then the head's), each row's slot in `lora_slots` (see `linear`). Only call
    this where `available()` is true."""
    return torch.ops.promethean_kernels.decode_blocks(
        x, params, keys, values, first_slots, filled, windows, rotary, left_padding, query_slot,
        shape, reals, lora or [], lora_slots)


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


def _compile_commands(compiler: str, folder: Path) -> tuple[list[list[str]], list[str]]:
    """(one compile command per translation unit, the link command), writing into `folder`."""
    from torch.utils import cpp_extension

    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    compiles, objects = [], []
    for unit, flags in TRANSLATION_UNITS.items():
        target = folder / (unit.removesuffix(".cpp") + ".o")
        includes = [f"-I{path}" for path in cpp_extension.include_paths()] if not flags else []
        compiles.append([compiler, *COMMON_FLAGS, *flags, f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
                         *includes, "-c", str(SOURCES / unit), "-o", str(target)])
        objects.append(str(target))
    link = [compiler, "-shared", "-fopenmp", *objects, "-o", str(folder / LIBRARY_NAME),
            *(f"-L{path}" for path in cpp_extension.library_paths()), "-lc10", "-ltorch_cpu"]
    # OpenMP comes from the libgomp PyTorch already loaded (same soname): one thread pool.
    return compiles, link


def _build_key(compiler: str) -> str:
    version = subprocess.run(
        [compiler, "--version"], capture_output=True, text=True, timeout=60, check=True
    ).stdout.splitlines()[0]
    digest = hashlib.sha256()
    compiles, link = _compile_commands(compiler, Path("out"))
    parts = [path.read_bytes() for path in sorted(SOURCES.iterdir()) if path.suffix in (".cpp", ".h")]
    parts += [torch.__version__.encode(), version.encode(),
              " ".join(" ".join(command) for command in [*compiles, link]).encode()]
    for part in parts:
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
        print("promethean: building the CPU inference kernels (once, about 20 s)...",
              file=sys.stderr, flush=True)
        with tempfile.TemporaryDirectory(dir=folder) as scratch:
            compiles, link = _compile_commands(compiler, Path(scratch))
            # The translation units compile side by side (ops.cpp, with torch's headers, is
            # the slow one), then link.
            running = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        text=True) for command in compiles]
            failures = []
            for process in running:
                try:
                    _, errors = process.communicate(timeout=BUILD_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    process.kill()
                    raise
                if process.returncode != 0:
                    failures.append((process.returncode, errors))
            if not failures:
                done = subprocess.run(link, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
                if done.returncode != 0:
                    failures.append((done.returncode, done.stderr or done.stdout))
            if failures:
                code, errors = failures[0]
                message = (errors.strip() or "no output").splitlines()
                raise subprocess.SubprocessError(f"{compiler} exited with {code}: {message[0]}")
            os.replace(Path(scratch) / LIBRARY_NAME, library)  # whole or absent, never half-written
    return library


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
