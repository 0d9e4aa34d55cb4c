"""Data-parallel training through PyTorch's own engine: `torchrun` + DDP (or FSDP behind a flag).

`torchrun --nproc_per_node N -m promethean pretrain run.toml` starts N copies of the ordinary
trainer; each finds `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR` and `MASTER_PORT` in its
environment, and `session()` joins them into one process group (nccl on CUDA, gloo otherwise),
each on the device of its local rank. Without those variables (or with WORLD_SIZE=1) nothing is
initialised and the trainer runs exactly as a single process.

How the ranks' batches relate to a one-process run (so the two can be compared exactly):
micro-batches are numbered globally, and micro-batch number `g` is always drawn from a generator
seeded with `(seed, 0, g)`, as a one-process `WindowSampler` draws its `g`-th batch. With world
size W and accumulation A, optimizer step `s` consumes global micro-batches `s*W*A ... s*W*A +
W*A - 1`; rank `r` takes those at positions `r, r + W, r + 2W, ...` (`ShardedWindowSampler`).
DDP averages gradients over ranks and each rank divides its loss by A, so the update is the mean
over all W*A micro-batches: exactly the update of a one-process run with accumulation W*A, up to
the order of floating-point additions. The saved data position is the global micro-batch count,
so a checkpoint resumes exactly under any world size whose W*A is the same.

Only rank 0 writes (checkpoints, metrics, progress bar); the others wait at barriers. Every rank
evaluates the whole validation split itself (the same weights give the same loss, so early
stopping decides alike everywhere, and rank 0's value is broadcast to be sure).
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist

from promethean.data.batches import Batch, TokenDataset, WindowSampler
from promethean.errors import PrometheanError

KINDS = ("ddp", "fsdp")


@dataclass(frozen=True)
class DistributedContext:
    """Where this process stands: rank, world size, its device; `enabled` when world size > 1."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str | None = None

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise PrometheanError(f"environment variable {name}={raw!r} is not an integer.") from None


def launched_by_torchrun() -> bool:
    return _env_int("WORLD_SIZE", 1) > 1


def init(device: torch.device) -> DistributedContext:
    """Join the process group torchrun described (if any); `device` is the resolved config device.

    On CUDA each rank takes `cuda:LOCAL_RANK`; on CPU every rank uses the CPU (gloo backend).
    """
    world_size = _env_int("WORLD_SIZE", 1)
    if world_size <= 1:
        return DistributedContext(device=device)
    rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if name not in os.environ:
            raise PrometheanError(
                f"WORLD_SIZE is {world_size} but {name} is not set; launch with torchrun."
            )
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    elif device.type == "cpu":
        backend = "gloo"
    else:
        raise PrometheanError(
            f"distributed training runs on CUDA (nccl) or CPU (gloo), not on '{device.type}'."
        )
    if not dist.is_initialized():
        dist.init_process_group(
            backend=backend,
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(minutes=30),
            **({"device_id": device} if backend == "nccl" else {}),
        )
    return DistributedContext(rank, world_size, local_rank, device, backend)


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def session(device: torch.device) -> Iterator[DistributedContext]:
    """`init(device)`, and the process group destroyed afterwards whatever happens. After a
    normal end every rank first waits for the others: a rank that tore its group down while a
    peer was still finishing was seen to abort at exit under gloo ("terminate called without an
    active exception", once in a loaded CI run), failing a training that had completed. After an
    error there is no wait (the peers may never come; torchrun ends them)."""
    context = init(device)
    try:
        yield context
    except BaseException:
        if context.enabled:
            cleanup()
        raise
    if context.enabled:
        try:
            dist.barrier()
        finally:
            cleanup()


# ------------------------------------------------------------------------------ collectives


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def is_main_process() -> bool:
    return not _active() or dist.get_rank() == 0


def barrier() -> None:
    if _active():
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def _reduce_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_mean(value: float) -> float:
    """The mean of `value` over all ranks (the value itself without a process group)."""
    if not _active():
        return float(value)
    tensor = torch.tensor([float(value)], dtype=torch.float64, device=_reduce_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return float(tensor.item()) / dist.get_world_size()


def any_rank(flag: bool) -> bool:
    """True when `flag` is true on at least one rank."""
    if not _active():
        return bool(flag)
    tensor = torch.tensor([1 if flag else 0], dtype=torch.int32, device=_reduce_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item())


def broadcast_float(value: float) -> float:
    """Rank 0's `value` on every rank."""
    if not _active():
        return float(value)
    tensor = torch.tensor([float(value)], dtype=torch.float64, device=_reduce_device())
    dist.broadcast(tensor, src=0)
    return float(tensor.item())


# ------------------------------------------------------------------------------- the model


def wrap_model(model: torch.nn.Module, kind: str, context: DistributedContext) -> torch.nn.Module:
    """The module to train with: DistributedDataParallel, or FSDP2 (`fully_shard`, in place)."""
    if kind not in KINDS:
        raise PrometheanError(f"distributed must be one of {', '.join(KINDS)}, not '{kind}'.")
    if not context.enabled:
        return model
    if kind == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [context.device.index] if context.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids)
    from torch.distributed.fsdp import fully_shard  # FSDP2; runs on CPU + gloo too

    for block in getattr(model, "blocks", []):
        fully_shard(block)
    fully_shard(model)
    return model


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain model inside a DDP wrapper (the model itself otherwise)."""
    return getattr(model, "module", model)


@contextlib.contextmanager
def gradient_sync(model: torch.nn.Module, enabled: bool) -> Iterator[None]:
    """Skip the gradient all-reduce on all but the last micro-step of an accumulation."""
    if enabled:
        yield
    elif hasattr(model, "no_sync"):  # DDP
        with model.no_sync():
            yield
    elif hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


def as_float(value) -> float:
    """A Python float from a tensor or DTensor (FSDP's gradient norm is a DTensor)."""
    if hasattr(value, "full_tensor"):
        value = value.full_tensor()
    return float(value)


# -------------------------------------------------------------------------------- the data


class ShardedWindowSampler(WindowSampler):
    """A rank's share of the one-process stream of training windows.

    `step` counts global micro-batches (all ranks together); this rank draws global micro-batch
    `step + rank`, each from a generator seeded `(seed, 0, global index)` exactly as the
    one-process `WindowSampler` draws its batches, then `step` advances by the world size. With
    world size 1 it is a `WindowSampler`; its state has the same form, so checkpoints move freely
    between one-process and distributed runs.
    """

    def __init__(
        self,
        dataset: TokenDataset,
        batch_size: int,
        block_size: int,
        split: str = "train",
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        device: str | torch.device | None = None,
    ) -> None:
        super().__init__(dataset, batch_size, block_size, split, seed=seed, rank=0, device=device)
        if not 0 <= rank < world_size:
            raise PrometheanError(f"rank {rank} is outside world size {world_size}.")
        self.global_rank, self.world_size = rank, world_size

    def next_batch(self) -> Batch:
        generator = np.random.default_rng([self.seed, 0, self.step + self.global_rank])
        batch = self.dataset.sample_batch(
            self.split, self.batch_size, self.block_size, generator, self.device
        )
        self.step += self.world_size
        return batch

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        if self.rank != 0:
            raise PrometheanError(
                "the saved data position comes from a per-rank stream (rank "
                f"{self.rank}), which a distributed run cannot continue exactly."
            )
        if self.step % self.world_size:
            raise PrometheanError(
                f"the saved data position ({self.step} micro-batches) is not a multiple of the "
                f"world size {self.world_size}; resume with a world size that divides it."
            )


# ------------------------------------------------------------------------------ checkpoints


def full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, config=None):
    """(model, optimizer) whose states rank 0 can save with `save_training_checkpoint`.

    Under DDP they are the plain model and the optimizer themselves (every rank holds all of
    both). Under FSDP the shards are gathered (a collective: every rank must call this) into an
    unsharded copy on rank 0's CPU, with an optimizer over that copy holding the full moments.
    """
    if not _is_fully_sharded(model):
        return unwrap(model), optimizer
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = get_model_state_dict(model, options=options)
    optimizer_state = get_optimizer_state_dict(model, optimizer, options=options)
    if not is_main_process():
        return None, None
    from promethean.model import Transformer
    from promethean.train.optim import build_optimizer

    with torch.device("cpu"):
        copy = Transformer(model.config)  # built normally: buffers (rotary tables) are computed
    copy.load_state_dict(model_state)
    group = optimizer.param_groups[0]
    weight_decay = config.weight_decay if config is not None else group["weight_decay"]
    copy_optimizer = build_optimizer(copy, group["lr"], weight_decay, tuple(group["betas"]))
    # The full optimizer state is keyed by parameter name; the copy's optimizer by position.
    positions = {
        id(p): i for i, p in enumerate(p for g in copy_optimizer.param_groups for p in g["params"])
    }
    by_name = {name: positions[id(p)] for name, p in copy.named_parameters() if id(p) in positions}
    missing = [name for name in optimizer_state["state"] if name not in by_name]
    if missing:
        raise PrometheanError(
            f"the gathered FSDP optimizer state names parameters the model lacks ({missing[0]})."
        )
    state = {by_name[name]: value for name, value in optimizer_state["state"].items()}
    groups = copy_optimizer.state_dict()["param_groups"]
    copy_optimizer.load_state_dict({"state": state, "param_groups": groups})
    return copy, copy_optimizer


def _is_fully_sharded(model: torch.nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - older torch
        return False
    return isinstance(model, FSDPModule)
