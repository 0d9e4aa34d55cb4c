"""Memory: what a process uses now (`get_memory_stats`), and what training will need (the planner).

How `estimate_peak_memory` builds its figure (P parameters, N = micro_batch x block tokens,
C width, q/kv the query and key/value widths, F the MLP width, V the vocabulary, L layers):

- weights 4P (fp32 master copy); gradients 4P; AdamW state 8P (two fp32 moments), or 4P with
  `optimizer="adamw-bf16"` (BFloat16MomentsAdamW). Under bf16/fp16
  autocast every matmul weight (the tied head included) is also cast once per forward and the
  copy is kept for the backward: 2 bytes per matmul parameter.
- activations, what autograd saves per layer and token, counted from the model's own code and
  checked by tracing saved tensors (tests/test_memory.py): the residual stream entering each
  sublayer (2C); each pre-norm's output (C for LayerNorm, 2C for our fp32 RMSNorm, which keeps its
  normalised input too); attention's q, k, v (q + 2kv) and its output (q) plus a log-sum-exp per
  head; QK-norm adds 2q + 2kv; Gemma's sandwich norms add 4C; the MLP keeps 2F (GELU) or
  4F (gated). All fp32: 4 bytes an element. Under autocast the total is within 5% of fp32 (the
  saved bf16 casts sit beside the fp32 residual stream; measured), so the same count is used.
  The fused SDPA kernels never store the T x T attention weights, and this assumes them.
  An SSM mixer (D = ssm_expand x C channels, N state dimensions, R the step-size rank) replaces
  attention's count by DN (the scan keeps every state, fp32) + 13D (the
  projections, convolution, step size, gate and output) + R + 2N; its backward, one layer at a
  time, adds about 6DN per token of temporaries (the reverse scan), counted once.
- the loss: the trainer fuses cross-entropy with the head and computes it a chunk of rows at a
  time (promethean.model.loss), so the N x V logits never exist: one chunk's logits and
  probabilities (2 x chunk x V elements in the compute dtype), the gradient of the final hidden
  states (4NC), and the head's fp32 gradient twice (computed in the forward, scaled into a copy in
  the backward: 8VC); under autocast also the head weight's bf16 copy (2VC).
- gradient checkpointing keeps only each block's input (4C per token and layer) and recomputes
  one block at a time in the backward, so one layer's activations are added once.
- the peak is whichever is larger: the start of the backward (weights, optimizer state,
  autocast copies, all activations, the loss's peak and the head's gradient), or its end (weights,
  optimizer state, autocast copies, all gradients, and with checkpointing one block's
  activations) plus the optimizer step's temporaries (about twice the largest tensor).
- the activation phase (saved tensors, loss, head gradient) is multiplied by 1.25 for what the
  allocator keeps resident besides them (freed forward temporaries); measured on CPU.
- runtime overhead: what `import torch` and Promethean take before any model exists, measured as
  227 MB of RSS with torch 2.13 (CPU build) on Linux; CUDA and MPS contexts add their own,
  not counted here.

The estimate-versus-measured test (tests/test_memory.py) trains real steps in a fresh process and
compares `training_bytes` (the estimate without the overhead) with peak RSS minus the RSS right
after importing torch and building the batch.
"""

from __future__ import annotations

import math
import os
import re
import resource
import sys
from dataclasses import dataclass

import torch

from promethean.config import ModelConfig
from promethean.errors import PrometheanError
from promethean.model.loss import CHUNK_ELEMENTS

# Bytes per parameter of each optimizer's state (two moments for AdamW).
OPTIMIZERS = {"adamw": 4, "adamw-bf16": 2, "sgd": 0}

MB = 2**20
GB = 2**30
# RSS of a process that has imported torch and Promethean (torch 2.13 CPU, Linux); see above.
RUNTIME_OVERHEAD_BYTES = 227 * MB
FP32 = 4
AUTOCAST_DTYPES = ("bf16", "fp16")
DTYPE_NAMES = ("fp32", *AUTOCAST_DTYPES)
# The allocator keeps the forward's freed temporaries resident between the saved tensors: peak
# RSS measured 1.0-1.5x the saved bytes (tests/test_memory.py), so the activations get 25% more.
ALLOCATOR_SLACK = 1.25


def _read_status_kib(field: str) -> float | None:
    """A `VmRSS`/`VmHWM`-style field of /proc/self/status in KiB, or None off Linux."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return float(line.split()[1])
    except OSError:
        return None
    return None


def _rss_mb() -> float:
    kib = _read_status_kib("VmRSS")
    if kib is not None:
        return kib / 1024
    try:
        import psutil

        return psutil.Process(os.getpid()).memory_info().rss / MB
    except ImportError:  # pragma: no cover - psutil is a dependency
        return float("nan")


def _peak_rss_mb() -> float:
    kib = _read_status_kib("VmHWM")
    if kib is not None:
        return kib / 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # ru_maxrss is in bytes on macOS, KiB on Linux and the BSDs.
    return peak / MB if sys.platform == "darwin" else peak / 1024


_LIBC_TRIM = None


def release_free_memory() -> None:
    """Give the C allocator's free pages back to the system (glibc `malloc_trim`; elsewhere a
    no-op). glibc keeps freed mid-sized blocks resident, so each training phase's temporaries
    stay counted in RSS and the next phase's peak starts from there: trimming after every
    backward pass took GPT-2 small's training peak from 2.50 GB to 2.34 GB. About 30 ms a call
    at that size, so the trainer does it only in its memory-saving mode (checkpointing)."""
    global _LIBC_TRIM
    if _LIBC_TRIM is None:
        _LIBC_TRIM = False
        if sys.platform.startswith("linux"):
            try:
                import ctypes

                _LIBC_TRIM = ctypes.CDLL("libc.so.6").malloc_trim
            except (OSError, AttributeError):
                pass
    if _LIBC_TRIM:
        _LIBC_TRIM(0)


def get_memory_stats(device: torch.device | str | None = None) -> dict[str, float]:
    """Memory in MB (2**20 bytes): `rss_mb` and `peak_rss_mb` of this process, and for a CUDA
    device `cuda_allocated_mb`, `cuda_reserved_mb`, `cuda_peak_allocated_mb`, for MPS
    `mps_allocated_mb`. Cheap (one small /proc read plus counters): call it every log step.

    Without a device, the CUDA counters are reported when CUDA has been initialised (asking never
    initialises it); the MPS counter needs `device="mps"`.
    """
    stats = {"rss_mb": _rss_mb(), "peak_rss_mb": _peak_rss_mb()}
    device = torch.device(device) if device is not None else None
    want_cuda = (
        device.type == "cuda" if device is not None else torch.cuda.is_initialized()
    )
    if want_cuda and torch.cuda.is_available():
        stats["cuda_allocated_mb"] = torch.cuda.memory_allocated(device) / MB
        stats["cuda_reserved_mb"] = torch.cuda.memory_reserved(device) / MB
        stats["cuda_peak_allocated_mb"] = torch.cuda.max_memory_allocated(device) / MB
    want_mps = device.type == "mps" if device is not None else False
    if want_mps and torch.backends.mps.is_available():
        stats["mps_allocated_mb"] = torch.mps.current_allocated_memory() / MB
    return stats


# --------------------------------------------------------------------------------- the planner


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes at the peak of one training step, by what holds them."""

    weights: int
    gradients: int
    optimizer: int
    autocast_weights: int
    activations: int  # what autograd holds at the peak: saved tensors and the loss's buffers
    step_temporaries: int
    overhead: int = RUNTIME_OVERHEAD_BYTES

    @property
    def training_bytes(self) -> int:
        """Everything training adds to a process that has imported torch."""
        return (self.weights + self.gradients + self.optimizer + self.autocast_weights
                + self.activations + self.step_temporaries)

    @property
    def total(self) -> int:
        return self.training_bytes + self.overhead

    def describe(self) -> str:
        parts = [(name, getattr(self, name)) for name in (
            "weights", "gradients", "optimizer", "autocast_weights", "activations",
            "step_temporaries", "overhead")]
        listed = ", ".join(f"{name.replace('_', ' ')} {format_bytes(value)}" for name, value in parts if value)
        return f"about {format_bytes(self.total)} ({listed})"


def format_bytes(count: float) -> str:
    if count >= GB:
        return f"{count / GB:.1f} GB"
    return f"{count / MB:.0f} MB"


_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 2**10, "kib": 2**10, "m": MB, "mb": MB, "mib": MB,
          "g": GB, "gb": GB, "gib": GB, "t": 2**40, "tb": 2**40, "tib": 2**40}


def parse_memory_size(text: str) -> int:
    """Bytes in "8GB", "512MB", "1.5GiB" or "1000000". GB and GiB both mean 2**30 bytes: memory
    is sold in binary units, and an "8 GB" laptop has 8 GiB."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise PrometheanError(
            f"'{text}' is not a memory size; write a number with a unit, like 8GB, 512MB or 1.5GiB."
        )
    size = float(match.group(1)) * _UNITS[unit]
    if size < 1:
        raise PrometheanError(f"the memory size '{text}' must be more than zero.")
    return int(size)


def _parameter_counts(config: ModelConfig) -> tuple[int, int, int]:
    """(all parameters, those used by matmuls, the largest tensor) from the config alone."""
    with torch.device("meta"):  # shapes only; nothing is allocated
        from promethean.model import Transformer

        model = Transformer(config)
    total = model.num_parameters()
    matmul = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    if config.tie_embeddings:
        matmul -= model.lm_head.weight.numel()  # counted among the Linear modules already...
        matmul += config.vocab_size * config.n_embd  # ...but cast once, as the head
    largest = max(p.numel() for p in model.parameters())
    return total, matmul, largest


def layer_activation_elements(config: ModelConfig, layer: int = 0) -> int:
    """Elements autograd saves per token in block `layer` (see the module docstring)."""
    width, query, key_value = config.n_embd, config.n_head * config.head_size, config.kv_heads * config.head_size
    norm_output = width if config.norm == "layernorm" else 2 * width
    elements = 2 * width + 2 * norm_output  # residual inputs and the two pre-norms
    if config.layer_mixer(layer) == "ssm":
        inner, state = config.ssm_inner_size, config.ssm_state_size
        elements += inner * state + 13 * inner + config.ssm_dt_rank_size + 2 * state
    else:
        elements += query + 2 * key_value + query + config.n_head  # q, k, v, output, log-sum-exp
    if config.qk_norm and config.layer_mixer(layer) == "attention":
        elements += 2 * query + 2 * key_value
    if config.sandwich_norm:
        elements += 4 * width
    elements += 4 * config.d_ff if config.gated_mlp else 2 * config.d_ff
    return elements


def estimate_peak_memory(
    model_config: ModelConfig,
    micro_batch: int,
    block_size: int,
    dtype: str = "fp32",
    gradient_checkpointing: bool = False,
    optimizer: str = "adamw",
) -> MemoryEstimate:
    """The peak memory of a training step (forward, backward, optimizer step) in bytes, broken
    down by what holds it. `dtype` is the autocast dtype (fp32 means no autocast)."""
    if dtype not in DTYPE_NAMES:
        raise PrometheanError(f"unknown dtype '{dtype}'; use one of {', '.join(DTYPE_NAMES)}.")
    if optimizer not in OPTIMIZERS:
        raise PrometheanError(
            f"the memory planner knows {', '.join(OPTIMIZERS)}, not '{optimizer}'."
        )
    config = model_config
    parameters, matmul_parameters, largest = _parameter_counts(config)
    tokens = micro_batch * block_size
    autocast = dtype in AUTOCAST_DTYPES

    weights = FP32 * parameters
    gradients = FP32 * parameters
    optimizer_state = 2 * OPTIMIZERS[optimizer] * parameters
    autocast_weights = 2 * matmul_parameters if autocast else 0

    layers = [FP32 * tokens * layer_activation_elements(config, i) for i in range(config.n_layer)]
    if gradient_checkpointing:
        blocks = FP32 * tokens * config.n_embd * config.n_layer + max(layers)
    else:
        blocks = sum(layers)
    if config.ssm_layers:  # one SSM layer's reverse scan at a time
        blocks += FP32 * tokens * 6 * config.ssm_inner_size * config.ssm_state_size
    final_norm = FP32 * tokens * (2 if config.norm == "layernorm" else 3) * config.n_embd
    # The trainer's loss is fused with the head and chunked (promethean.model.loss): one chunk's
    # logits and probabilities, the hidden states' gradient, and the head's gradient (held from
    # the forward, then scaled into a second copy at the start of the backward).
    vocab, width = config.vocab_size, config.n_embd
    chunk_rows = min(tokens, max(1, CHUNK_ELEMENTS // vocab))
    element = 2 if autocast else FP32
    loss = 2 * element * chunk_rows * vocab + FP32 * tokens * width
    if autocast:
        loss += 2 * vocab * width  # the head weight cast for the chunked matmuls
    head_gradient = 2 * FP32 * vocab * width
    # Two candidate peaks: the start of the backward holds every activation and the loss's
    # buffers; the optimizer step holds every gradient and the step's temporaries.
    start_of_backward = int(ALLOCATOR_SLACK * (blocks + final_norm + loss + head_gradient))
    # torch's AdamW holds about two fp32 copies of the tensor it updates; the bf16-moment AdamW
    # works on fixed 16 MB slices.
    step_temporaries = {"adamw": 2 * FP32 * largest, "adamw-bf16": 4 * FP32 * min(largest, 1 << 22),
                        "sgd": 0}[optimizer]
    if start_of_backward >= gradients + step_temporaries:
        return MemoryEstimate(weights, 0, optimizer_state, autocast_weights, start_of_backward, 0)
    return MemoryEstimate(weights, gradients, optimizer_state, autocast_weights, 0, step_temporaries)


def plan_batch(
    model_config: ModelConfig,
    block_size: int,
    budget_bytes: int,
    target_batch: int,
    dtype: str = "fp32",
    gradient_checkpointing: bool = False,
    target_unit: str = "sequences",
    optimizer: str = "adamw",
) -> tuple[int, int]:
    """(micro_batch, grad_accum): the largest micro-batch whose estimated peak fits the budget,
    and enough accumulation that micro_batch x grad_accum reaches `target_batch` sequences (or
    tokens, with target_unit="tokens") per optimizer step."""
    if target_unit not in ("sequences", "tokens"):
        raise PrometheanError(f"target_unit must be 'sequences' or 'tokens', not '{target_unit}'.")
    if block_size < 1 or target_batch < 1:
        raise PrometheanError("the block size and the target batch must be at least 1.")
    sequences = target_batch if target_unit == "sequences" else math.ceil(target_batch / block_size)

    def fits(micro: int) -> bool:
        estimate = estimate_peak_memory(model_config, micro, block_size, dtype,
                                        gradient_checkpointing, optimizer)
        return estimate.total <= budget_bytes

    if not fits(1):
        smallest = estimate_peak_memory(model_config, 1, block_size, dtype, gradient_checkpointing, optimizer)
        advice = ("try a shorter block or a smaller model" if gradient_checkpointing
                  else "try --set gradient_checkpointing=true or a shorter block")
        raise PrometheanError(
            f"{model_config.name} needs {smallest.describe()} at micro-batch 1, block {block_size}; "
            f"the budget is {format_bytes(budget_bytes)}; {advice}."
        )
    low, high = 1, sequences  # the largest micro-batch that fits, by bisection (memory grows with it)
    while low < high:
        middle = (low + high + 1) // 2
        if fits(middle):
            low = middle
        else:
            high = middle - 1
    return low, math.ceil(sequences / low)


# ------------------------------------------------------------------ a training run under a budget


def model_config_for(source: str) -> ModelConfig:
    """The model config that a training run's `model` names (a checkpoint directory, a preset name
    or a preset .toml), read without building or loading any weights."""
    from promethean.checkpoint import resolve_model_source

    return resolve_model_source(source).config


def run_model_config(config) -> ModelConfig:
    """The model a training run (a TrainConfig) trains: its `model`'s config with the run's
    `model_overrides` applied (on a checkpoint, only those its weights allow)."""
    from promethean.checkpoint import apply_model_overrides, resolve_model_source

    source = resolve_model_source(config.model)
    return apply_model_overrides(source.config, config.model_overrides, source.checkpoint)


def fit_to_budget(config, budget: str | int):
    """`config` (a TrainConfig) with batch_size x grad_accum re-planned to fit `budget` ("8GB" or
    bytes): the largest micro-batch that fits and divides the effective batch, so the effective
    batch (batch_size x grad_accum sequences per optimizer step) stays exactly what was asked.
    Refuses with plan_batch's sentence when even micro-batch 1 does not fit.

    Returns (new config, MemoryEstimate of its peak)."""
    budget_bytes = parse_memory_size(budget) if isinstance(budget, str) else int(budget)
    model_config = run_model_config(config)
    block_size = config.block_size or model_config.context_length
    target = config.batch_size * config.grad_accum
    optimizer = "adamw-bf16" if config.optimizer_moments == "bf16" else "adamw"
    largest, _ = plan_batch(model_config, block_size, budget_bytes, target, config.dtype,
                            config.gradient_checkpointing, optimizer=optimizer)
    micro = max(d for d in range(1, largest + 1) if target % d == 0)
    planned = config.with_overrides(batch_size=micro, grad_accum=target // micro)
    estimate = estimate_peak_memory(model_config, micro, block_size, config.dtype,
                                    config.gradient_checkpointing, optimizer)
    return planned, estimate
