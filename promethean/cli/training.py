"""Training commands: `pretrain`, `finetune`, `plot`, `quickstart`, and the options they share."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from promethean.errors import PrometheanError
from promethean.cli.common import (
    ModelSetOption,
    app,
    console,
    DeviceOption,
)


SetOption = Annotated[Optional[list[str]], typer.Option(
    "--set", help="Override a setting: key=value, the value a TOML literal (repeatable).")]
ResumeOption = Annotated[Optional[Path], typer.Option(
    "--resume", help="A training checkpoint (out/step-XXXXXX) to continue exactly.")]


RunOverwriteOption = Annotated[bool, typer.Option(
    "--overwrite", help="Let this run replace another run's step checkpoints and metrics in its "
    "out (a fresh start there, or a resume from an older step); other files are kept.")]
BranchOption = Annotated[Optional[Path], typer.Option(
    "--branch", help="With --resume: continue into this new run directory (out) instead, leaving "
    "the original run as it is.")]


BudgetOption = Annotated[Optional[str], typer.Option(
    "--memory-budget", help="Device memory to fit in (RAM on a CPU, the GPU's on a GPU; 8GB, "
    "512MB): micro-batch and accumulation are "
    "chosen to fit, keeping batch_size x grad_accum sequences per step; refused before training "
    "if nothing fits.")]


MinDeltaOption = Annotated[Optional[float], typer.Option(
    "--min-delta", help="Early stopping: the validation loss must improve by more than this to "
    "count as better (early_stopping_min_delta; default 0.001).")]
PatienceOption = Annotated[Optional[int], typer.Option(
    "--patience", help="Early stopping: evaluations without improvement before the run stops "
    "(early_stopping_patience; default 5).")]
MaxMinutesOption = Annotated[Optional[float], typer.Option(
    "--max-minutes", help="Wall-time budget (max_minutes), earlier legs of a resumed run "
    "included: when spent, the run evaluates, saves a checkpoint and stops.")]


def _knob_overrides(min_delta: float | None, patience: int | None,
                    max_minutes: float | None) -> list[str]:
    """The training options given as flags, as `--set` overrides (applied after --set)."""
    given = {"early_stopping_min_delta": min_delta, "early_stopping_patience": patience,
             "max_minutes": max_minutes}
    return [f"{key}={value!r}" for key, value in given.items() if value is not None]


def _run_training(config, resume: Path | None, device_memory_budget: str | None = None,
                  overwrite: bool = False, branch: Path | None = None) -> None:
    from promethean.train.trainer import train

    if branch is not None:
        if resume is None:
            raise PrometheanError("--branch continues a run elsewhere; give the --resume "
                                  "checkpoint to branch from.")
        config = config.model_copy(update={"out": str(branch)})

    if device_memory_budget is not None:
        from promethean.train.memory import fit_to_budget

        config, estimate = fit_to_budget(config, device_memory_budget)
        typer.echo(
            f"memory budget {device_memory_budget}: micro-batch {config.batch_size} x "
            f"{config.grad_accum} "
            f"accumulation ({config.batch_size * config.grad_accum} sequences a step), "
            f"estimated peak {estimate.describe()}", err=True,
        )
    result = train(config, resume=resume, overwrite=overwrite)
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, rank 0 alone reports
        best = "" if result.best_val_loss is None else f"; best val loss {result.best_val_loss:.4f} in {result.best_checkpoint}"
        skipped = f"; {result.skipped_steps} steps skipped (non-finite)" if result.skipped_steps else ""
        typer.echo(f"{result.stopped.replace('_', ' ')} at step {result.steps} ({result.tokens:,} tokens): "
                   f"checkpoint {result.final_checkpoint}{best}{skipped}")
    if result.signal is not None:
        # Saved, and resumable; the exit status still says it was stopped (128 + the signal).
        sys.exit(130 if result.signal == "SIGINT" else 143)


@app.command()
def pretrain(
    config: Annotated[Optional[Path], typer.Argument(
        help="Training config (.toml); see TrainConfig. Optional when --preset/--set give "
        "model, data and out.")] = None,
    preset: Annotated[Optional[str], typer.Option(
        "--preset", help="Model preset to train (short for --set model=NAME).")] = None,
    set_: SetOption = None,
    model_set: ModelSetOption = None,
    resume: ResumeOption = None,
    device_memory_budget: BudgetOption = None,
    overwrite: RunOverwriteOption = False,
    branch: BranchOption = None,
    min_delta: MinDeltaOption = None,
    patience: PatienceOption = None,
    max_minutes: MaxMinutesOption = None,
) -> None:
    """Train a model (a preset, or a checkpoint to continue from) on prepared token data."""
    from promethean.train.config import load_train_config

    overrides = [*([f"model={preset!r}"] if preset else []), *(set_ or []),
                 *_knob_overrides(min_delta, patience, max_minutes)]
    _run_training(load_train_config(config, overrides, model_set or ()), resume,
                  device_memory_budget, overwrite, branch)


@app.command()
def finetune(
    config: Annotated[Path, typer.Argument(help="Training config (.toml); its `model` is ignored.")],
    checkpoint: Annotated[Path, typer.Option("--checkpoint", help="The checkpoint to fine-tune.")],
    set_: SetOption = None,
    model_set: ModelSetOption = None,
    resume: ResumeOption = None,
    device_memory_budget: BudgetOption = None,
    overwrite: RunOverwriteOption = False,
    branch: BranchOption = None,
    min_delta: MinDeltaOption = None,
    patience: PatienceOption = None,
    max_minutes: MaxMinutesOption = None,
) -> None:
    """Fine-tune every weight of a checkpoint on prepared token data."""
    from promethean.checkpoint import read_checkpoint_record
    from promethean.train.config import load_train_config

    read_checkpoint_record(checkpoint)  # a clear sentence if it is not a checkpoint
    overrides = [*(set_ or []), *_knob_overrides(min_delta, patience, max_minutes),
                 f"model={str(checkpoint)!r}"]
    _run_training(load_train_config(config, overrides, model_set or ()), resume,
                  device_memory_budget, overwrite, branch)


@app.command()
def plot(
    run_dir: Annotated[Path, typer.Argument(help="A training run directory (holds metrics.jsonl).")],
    out: Annotated[Optional[Path], typer.Option(help="PNG to write (default RUN_DIR/metrics.png).")] = None,
) -> None:
    """Draw a run's train/validation loss and learning rate as a PNG."""
    from promethean.train.plot import plot_run

    console.print(f"wrote {plot_run(run_dir, out)}")


@app.command()
def quickstart(
    out: Annotated[Path, typer.Option(help="Where everything goes (corpus split, tokenizer, data, run, "
                                      "checkpoint, plot).")] = Path("runs/quickstart"),
    minutes: Annotated[float, typer.Option(help="Wall time for the training itself.")] = 5.0,
    device: DeviceOption = None,
    steps: Annotated[Optional[int], typer.Option(hidden=True, help="Fixed step count (tests).")] = None,
) -> None:
    """Train a small Shakespeare model from scratch in a few minutes, offline, and sample from it."""
    from promethean.quickstart import run_quickstart

    run_quickstart(out, minutes=minutes, device=device, steps=steps)
