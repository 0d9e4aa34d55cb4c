"""The optimizer step that every training in the package takes, and how it is reported.

Pretraining and full fine-tuning (`train.trainer`), a continual-learning stage
(`continual.learn`) and chat tuning (`continual.chat_tuning`) read different data and save
different things, but each of their optimizer steps is this one, so that a fix to how a step
is taken reaches all three:

1. `set_learning_rate`: the schedule's rate on every parameter group;
2. the caller's forward and backward (scaled by the fp16 `GradScaler` when there is one);
3. `optimizer_step`: unscale, clip the gradient norm, step unless the loss or the norm is NaN or
   infinite (counted in `NonFiniteSteps`; with fp16 the scaler skips overflowing steps itself),
   and clear the gradients; `refuse_a_runaway` stops a run whose steps keep failing (the
   trainer's `max_nonfinite_in_a_row`, 5 by default), with a sentence saying what to do.

`evaluation_line` is the one console line each evaluation prints.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from promethean.errors import PrometheanError

@dataclass
class NonFiniteSteps:
    """Steps skipped for a NaN or infinite loss or gradient: in all, and in a row now. The
    trainer's TrainingProgress carries the same two fields, saved with its checkpoints."""

    skipped_steps: int = 0
    nonfinite_in_a_row: int = 0


def refuse_a_runaway(counts, step: int, limit: int, advice: str) -> None:
    """Raise when `limit` steps in a row have failed: the run is diverging, not unlucky."""
    if counts.nonfinite_in_a_row >= limit:
        raise PrometheanError(
            f"training stopped at step {step}: {counts.nonfinite_in_a_row} steps in a row had a "
            f"NaN or infinite loss or gradient; {advice}"
        )


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def optimizer_step(
    optimizer: torch.optim.Optimizer,
    parameters: Iterable[torch.nn.Parameter],
    loss: float,
    grad_clip: float | None,
    counts,
    scaler: torch.amp.GradScaler | None = None,
    as_float: Callable[[torch.Tensor], float] = float,
) -> float:
    """Take the step whose gradients the caller's backward left: unscale (fp16), clip to
    `grad_clip` (None: measure only), step when `loss` and the norm are finite, clear the
    gradients. `counts` (a NonFiniteSteps, or anything with its two fields) is updated; returns
    the gradient norm before clipping. `as_float` reads the norm (a DTensor under FSDP)."""
    if scaler is not None:
        scaler.unscale_(optimizer)
    grad_norm = as_float(torch.nn.utils.clip_grad_norm_(
        list(parameters), grad_clip if grad_clip is not None else math.inf))
    finite = math.isfinite(loss) and math.isfinite(grad_norm)
    if scaler is not None and math.isfinite(loss):
        # fp16 overflow in the gradients is routine: the scaler skips and lowers its scale.
        scaler.step(optimizer)
        scaler.update()
        if not finite:
            counts.skipped_steps += 1
        counts.nonfinite_in_a_row = 0
    elif finite:
        optimizer.step()
        counts.nonfinite_in_a_row = 0
    else:
        counts.skipped_steps += 1
        counts.nonfinite_in_a_row += 1
        if scaler is not None:
            scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


def evaluation_line(step: int, max_steps: int, train_loss: float, val_loss: float,
                    bits_per_byte: float | None, lr: float, tokens_per_second: float) -> str:
    """One evaluation as a console line, e.g.
    `step 200/2000  train 2.314  val 2.401  bpb 1.120  lr 2.9e-4  41,200 tok/s` (without bpb
    when the caller has no byte count to measure it by)."""
    mantissa, exponent = f"{lr:.1e}".split("e")
    bits = "" if bits_per_byte is None else f"bpb {bits_per_byte:.3f}  "
    return (f"step {step}/{max_steps}  train {train_loss:.3f}  val {val_loss:.3f}  "
            f"{bits}lr {mantissa}e{int(exponent)}  {tokens_per_second:,.0f} tok/s")


def print_line(bar, bar_shown: bool, line: str) -> None:
    """A console line on stderr: through the progress bar's console while one is drawn (so the
    bar redraws below it), else plainly."""
    if bar_shown:
        bar.console.print(line, markup=False, highlight=False, soft_wrap=True)
    else:
        import sys

        print(line, file=sys.stderr, flush=True)


class WallBudget:
    """A wall-time budget (`max_minutes`; None is none) counted from when it is made, for the
    loops that run in one leg (a `learn` stage, chat tuning). The trainer's budget also counts
    the earlier legs of a resumed run, so it keeps its own (Progress.elapsed)."""

    def __init__(self, minutes: float | None, clock: Callable[[], float] | None = None) -> None:
        import time

        if minutes is not None and not (math.isfinite(minutes) and minutes > 0):
            raise PrometheanError(f"max_minutes must be a positive number of minutes, got {minutes}.")
        self.minutes = minutes
        self.clock = clock or time.perf_counter
        self.started = self.clock()

    def spent(self) -> bool:
        return self.minutes is not None and self.clock() - self.started >= self.minutes * 60
