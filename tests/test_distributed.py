"""Distributed training under torchrun (2 CPU processes, gloo) against a one-process run.

The claim tested (see promethean.train.distributed): with world size W and accumulation A, rank r
draws the global micro-batches r, r + W, ... of the one-process stream, so a 2-process run with
grad_accum=1 makes the same updates as a 1-process run with grad_accum=2 and the same seed, up
to the order of floating-point additions. The per-step train losses (all-reduced means) and the
validation loss therefore match to LOSS_TOLERANCE = 1e-5 (absolute, fp32), and so do the final
weights (WEIGHT_TOLERANCE); only rank 0 writes, and its checkpoint loads with load_checkpoint.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from promethean.checkpoint import load_checkpoint
from promethean.errors import PrometheanError
from promethean.train.config import TrainConfig
from promethean.train.distributed import DistributedContext, ShardedWindowSampler, wrap_model
from promethean.train.trainer import train

REPO = Path(__file__).resolve().parents[1]
LOSS_TOLERANCE = 1e-5
WEIGHT_TOLERANCE = 1e-5
STEPS = 4
SETTINGS = {
    "model": "tiny-gpt2",
    "batch_size": 2,
    "block_size": 32,
    "max_steps": STEPS,
    "lr": 3e-3,
    "min_lr": 3e-4,
    "warmup_steps": 1,
    "eval_interval": STEPS,
    "eval_batches": 2,
    "log_interval": 1,
    "progress": False,
    "device": "cpu",
    "seed": 1,
}


# Tiny models: one thread is as fast and does not thrash a busy machine (conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread")


def _toml(settings: dict) -> str:
    return "".join(f"{key} = {json.dumps(value)}\n" for key, value in settings.items())


def _torchrun(tmp_path: Path, data_dir: Path, out: Path, *overrides: str) -> None:
    config = tmp_path / "run.toml"
    config.write_text(_toml({**SETTINGS, "data": str(data_dir), "out": str(out), "grad_accum": 1}))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--standalone",
        "-m",
        "promethean",
        "pretrain",
        str(config),
    ]
    for override in overrides:
        command += ["--set", override]
    result = subprocess.run(
        command, check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=180
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def single_run(data_dir, tmp_path_factory):
    """The reference: one process, grad_accum = 2 (= world size 2 x accumulation 1)."""
    out = tmp_path_factory.mktemp("single")
    result = train(TrainConfig(**SETTINGS, data=str(data_dir), out=str(out), grad_accum=2))
    return out, result


def _check_against_single(out: Path, single_out: Path) -> None:
    single, multi = _metrics(single_out), _metrics(out)
    assert [r["step"] for r in multi] == list(range(1, STEPS + 1))  # one line per step: rank 0's
    for a, b in zip(single, multi, strict=True):
        assert abs(a["train_loss"] - b["train_loss"]) < LOSS_TOLERANCE, (a, b)
        assert a["tokens"] == b["tokens"]
    assert abs(single[-1]["val_loss"] - multi[-1]["val_loss"]) < LOSS_TOLERANCE
    # Only rank 0 wrote: exactly the files of a one-process run, no leftovers of a second writer.
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in single_out.iterdir())
    final = load_checkpoint(out / f"step-{STEPS:06d}")
    reference = load_checkpoint(single_out / f"step-{STEPS:06d}")
    ours, theirs = final.model.state_dict(), reference.model.state_dict()
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert torch.allclose(ours[name], theirs[name], atol=WEIGHT_TOLERANCE, rtol=0), name


def test_ddp_two_processes_match_one_process_with_accumulation(tmp_path, data_dir, single_run):
    out = tmp_path / "ddp"
    _torchrun(tmp_path, data_dir, out)
    _check_against_single(out, single_run[0])


def test_fsdp_two_processes_match_one_process_with_accumulation(tmp_path, data_dir, single_run):
    out = tmp_path / "fsdp"
    _torchrun(tmp_path, data_dir, out, "distributed=fsdp")
    _check_against_single(out, single_run[0])
    # The gathered training state is complete: a plain one-process run resumes from it, with
    # accumulation 2 standing in for the two processes (the same micro-batches per step).
    config = TrainConfig(
        **{**SETTINGS, "max_steps": STEPS + 1},
        data=str(data_dir),
        out=str(tmp_path / "resumed"),
        grad_accum=2,
    )
    result = train(config, resume=out / f"step-{STEPS:06d}")
    assert result.steps == STEPS + 1


def test_sharded_sampler_interleaves_the_one_process_stream(data_dir):
    from promethean.data.batches import TokenDataset, WindowSampler

    dataset = TokenDataset(data_dir)
    single = WindowSampler(dataset, 2, 16, seed=3)
    expected = [single.next_batch()[0] for _ in range(6)]
    ranks = [ShardedWindowSampler(dataset, 2, 16, seed=3, rank=r, world_size=2) for r in (0, 1)]
    drawn = [ranks[i % 2].next_batch()[0] for i in range(6)]
    for a, b in zip(expected, drawn, strict=True):
        assert torch.equal(a, b)
    assert ranks[0].state_dict() == single.state_dict()  # global position, same form
    resumed = ShardedWindowSampler(dataset, 2, 16, seed=3, rank=1, world_size=2)
    resumed.load_state_dict(single.state_dict())
    # Resumed at global position 6, rank 1 draws global micro-batch 7.
    assert torch.equal(resumed.next_batch()[0], _nth(WindowSampler(dataset, 2, 16, seed=3), 7))
    odd = WindowSampler(dataset, 2, 16, seed=3)
    odd.next_batch()
    with pytest.raises(PrometheanError, match="multiple of the world size"):
        ShardedWindowSampler(dataset, 2, 16, seed=3, rank=0, world_size=2).load_state_dict(
            odd.state_dict()
        )


def _nth(sampler, n: int):
    for _ in range(n):
        sampler.next_batch()
    return sampler.next_batch()[0]


def test_one_process_is_not_wrapped_and_kinds_are_checked():
    model = torch.nn.Linear(2, 2)
    assert wrap_model(model, "ddp", DistributedContext()) is model
    with pytest.raises(PrometheanError, match="distributed must be one of"):
        wrap_model(model, "zero", DistributedContext())
