"""A training run killed with SIGKILL anywhere, inside saves too, loses nothing it had saved: the
newest checkpoint always loads (checksums verified), the next run resumes from it, and the run
ends with exactly the losses and weights of a run that was never interrupted.

The kills come from two sources: a test hook that stops a save at a chosen moment (written but
not switched in; switched in but the old copy not yet removed) so the kill lands inside it, and
seeded random moments while the run trains, saves and prunes (checkpoint every 2 steps, keep 2).
"""

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from promethean.checkpoint import load_checkpoint
from promethean.files import PAUSE_ENV, PAUSE_MARKER_ENV, is_leftover

from promethean.train.config import load_train_config
from promethean.train.state import load_training_state
from promethean.train.trainer import step_directories, train

REPO = Path(__file__).resolve().parent.parent
# One thread, as in the in-process reference run (the one_thread fixture): same arithmetic.
SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}

pytestmark = pytest.mark.usefixtures("one_thread")

MAX_STEPS = 40
# (what to wait for before the kill): a save paused at a moment, a random delay in training, or a
# random delay once a save has started.
KILLS = [
    "random",
    "staged:step-*",  # a step checkpoint fully written beside its final name, not yet in place
    "random",
    "staged:best",
    "switched:best",  # the new best in place, the old one set aside and not yet removed
    "random",
    "in-a-save",  # a random moment after a save has begun writing its staging directory
    "random",
    "in-a-save",
    "random",
]


def write_config(path: Path, data_dir: Path, out: Path) -> Path:
    path.write_text(
        f'model = "tiny-gpt2"\ndata = "{data_dir}"\nout = "{out}"\nbatch_size = 2\n'
        f"grad_accum = 1\nblock_size = 32\nmax_steps = {MAX_STEPS}\nlr = 3e-3\nmin_lr = 3e-4\n"
        "warmup_steps = 3\neval_interval = 4\neval_batches = 1\nlog_interval = 1\n"
        'checkpoint_interval = 2\nkeep_last = 2\ndevice = "cpu"\nprogress = false\nseed = 3\n'
    )
    return path


def metrics_by_step(out: Path) -> dict[int, dict]:
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [line["step"] for line in lines]
    assert steps == sorted(set(steps)), f"metrics.jsonl mixes runs: steps {steps}"
    return {line["step"]: line for line in lines}


def newest_step(out: Path) -> int:
    return max(step_directories(out), default=0)


def start_run(config: Path, out: Path, moment: str, marker: Path) -> subprocess.Popen:
    env = dict(SUBPROCESS_ENV)
    if ":" in moment:
        env[PAUSE_ENV] = moment
        env[PAUSE_MARKER_ENV] = str(marker)
    resume = ["--resume", str(out)] if step_directories(out) else []
    return subprocess.Popen(
        [sys.executable, "-m", "promethean", "pretrain", str(config), *resume],
        env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def wait_for(condition, process: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + 120
    while not condition():
        if process.poll() is not None:
            stdout, stderr = process.communicate()
            pytest.fail(f"the run ended (exit {process.returncode}) before {what}:\n{stderr}")
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def test_kill_9_anywhere_loses_nothing_and_the_run_ends_as_if_never_interrupted(data_dir, tmp_path):
    config = write_config(tmp_path / "run.toml", data_dir, tmp_path / "crashed")
    out = tmp_path / "crashed"
    straight_out = tmp_path / "straight"
    straight = train(load_train_config(config, [f"out={straight_out}"]))
    assert straight.steps == MAX_STEPS

    rng = random.Random(18)
    for number, moment in enumerate(KILLS):
        marker = tmp_path / f"paused-{number}"
        before = newest_step(out)
        process = start_run(config, out, moment, marker)
        if moment == "random":
            # Once this run has trained past its resume point, kill it a random few steps on:
            # in a step, a metrics write, a save, a prune.
            # (The first run waits for its first checkpoint: before it, there is nothing to keep.)
            def trained() -> bool:
                path = out / "metrics.jsonl"
                return (path.is_file() and f'"step": {before + 1},' in path.read_text()
                        and newest_step(out) > 0)
            wait_for(trained, process, f"step {before + 1}")
            time.sleep(rng.uniform(0.0, 0.4))
        elif moment == "in-a-save":
            def saving() -> bool:
                return newest_step(out) > 0 and any(
                    is_leftover(name) and ".partial-" in name and str(process.pid) in name
                    for name in os.listdir(out)
                )
            wait_for(saving, process, "a save")
            time.sleep(rng.uniform(0.0, 0.05))
        else:
            wait_for(marker.is_file, process, f"a save paused at {moment}")
        process.kill()
        process.communicate()
        assert process.returncode == -9, f"kill {number} ({moment}): the run ended on its own"

        newest = newest_step(out)
        assert newest >= before, f"kill {number} ({moment}) lost checkpoint step {before}"
        assert newest > 0, f"kill {number} ({moment}) came before the first checkpoint"
        checkpoint = step_directories(out)[newest]
        load_checkpoint(checkpoint)  # verifies every file's sha256
        assert load_training_state(checkpoint).progress.step == newest
        if ":" in moment:
            # The kill fell inside a save: the leftover it left is there until the next run.
            assert any(is_leftover(p.name) for p in out.iterdir()), sorted(os.listdir(out))

    assert newest_step(out) < MAX_STEPS, "the kills came too late to interrupt the run"
    finished = train(load_train_config(config), resume=out)
    assert finished.steps == MAX_STEPS
    assert not [p.name for p in out.iterdir() if is_leftover(p.name)]
    assert sorted(step_directories(out)) == [MAX_STEPS - 2, MAX_STEPS]

    # Every step's loss, each evaluation and the final weights equal the uninterrupted run's.
    expected, got = metrics_by_step(straight_out), metrics_by_step(out)
    assert sorted(got) == sorted(expected) == list(range(1, MAX_STEPS + 1))
    for step, line in expected.items():
        for key in ("train_loss", "grad_norm", "val_loss", "lr", "tokens"):
            if key in line:
                assert got[step][key] == pytest.approx(line[key], rel=0, abs=1e-6), (step, key)
    final_a = load_checkpoint(straight.final_checkpoint).model.state_dict()
    final_b = load_checkpoint(finished.final_checkpoint).model.state_dict()
    for name, tensor in final_a.items():
        torch.testing.assert_close(final_b[name], tensor, rtol=0, atol=1e-6)
    best_a = load_checkpoint(straight_out / "best").model.state_dict()
    best_b = load_checkpoint(out / "best").model.state_dict()
    for name, tensor in best_a.items():
        torch.testing.assert_close(best_b[name], tensor, rtol=0, atol=1e-6)
