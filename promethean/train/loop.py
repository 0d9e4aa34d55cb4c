"""The one training loop: every training in the package is `run_loop` with its own hooks.

Pretraining and full fine-tuning (`train.trainer`), a continual-learning stage
(`continual.learn`) and chat tuning (`continual.chat_tuning`) read different data and save
different things; what they share is this loop, so that a fix to how training runs reaches all
three. `run_loop(plan, hooks, progress)` runs optimizer steps from `progress.step` to the plan's
last step, each of them:

1. `set_learning_rate`: the schedule's rate (`plan.learning_rate(step)`) on every group;
2. `hooks.train_step(step)`: the caller's forward and backward (accumulation, autocast, the
   fp16 `GradScaler`'s scaling, an EWC penalty: all the caller's), returning a `TrainedStep`;
3. `optimizer_step`: unscale, clip the gradient norm, step unless the loss or the norm is NaN or
   infinite (counted in the progress; with fp16 the scaler skips overflowing steps itself), and
   clear the gradients; `refuse_a_runaway` stops a run whose steps keep failing
   (`max_nonfinite_in_a_row`, 5 by default) with a sentence saying what to do;
4. the counters (`train.state.Progress`: step, tokens, elapsed across every resumed leg, the
   non-finite counts, the best validation loss and the early-stopping count);
5. a metrics record every `log_every` steps and at each evaluation (`plan.metrics`, one dict a
   record: step, tokens, train_loss, grad_norm, the hooks' own fields, the validation numbers
   with mean_train_loss, lr, tokens_per_second, elapsed, skipped_steps);
6. an evaluation (`hooks.evaluate`) every `eval_every` steps, at the schedule's end, and on the
   step that spends `max_minutes`: one console line (`evaluation_line`, its train loss the mean
   over the steps since the previous evaluation), and early stopping: an improvement of more
   than `min_delta` over `progress.best_val_loss` calls `hooks.keep_best`, `patience`
   evaluations without one end the run;
7. the stop decisions, in this order: early stopping, a signal (SIGINT/SIGTERM set a flag that
   is read at the step boundary; a second Ctrl-C interrupts at once), `max_minutes` spent,
   `until_step` reached; else every `checkpoint_every` steps `hooks.save_progress`, from which
   the caller's resume continues exactly.

The loop does not save at its end: `LoopOutcome.stopped` says why it ended, and the caller saves
what that calls for (the trainer a step checkpoint whatever the reason, `learn` and chat tuning
their resumable state when interrupted, their results otherwise). Under torchrun every decision
that must be the same on every rank goes through `plan.agree` (`distributed.any_rank`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import signal
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from promethean.errors import PrometheanError
from promethean.train.config import TrainConfig
from promethean.train.state import Progress

# The clock of the wall-time budget (max_minutes) and of Progress.elapsed; tests replace it.
wall_clock = time.perf_counter


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
    gradients. `counts` (a Progress, or anything with its two non-finite counters) is updated;
    returns the gradient norm before clipping. `as_float` reads the norm (a DTensor under FSDP)."""
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


def progress_bar(enabled: bool):
    """The progress bar every training draws on stderr (rich; nothing when not `enabled`)."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("step {task.completed}/{task.total}"),
        TextColumn("{task.fields[tokens_per_second]:,.0f} tok/s"),
        TextColumn("loss {task.fields[loss]:.4f}"),
        TextColumn("lr {task.fields[lr]:.2e}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        disable=not enabled,
    )


def json_safe(value: Any) -> Any:
    """Non-finite floats become null so every metrics line is valid JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return json_safe(dataclasses.asdict(value))
    return value


class WallBudget:
    """A wall-time budget (`max_minutes`; None is none) that also counts `spent_before` seconds
    (the earlier legs of a resumed run). `elapsed()` reads the clock once."""

    def __init__(self, minutes: float | None, spent_before: float = 0.0) -> None:
        check_max_minutes(minutes)
        self.minutes = minutes
        self.spent_before = spent_before
        self.started = wall_clock()  # read at call time: tests replace the module's clock

    def elapsed(self) -> float:
        return self.spent_before + (wall_clock() - self.started)

    def spent_by(self, elapsed: float) -> bool:
        return self.minutes is not None and elapsed >= self.minutes * 60


def check_max_minutes(minutes: float | None) -> None:
    if minutes is not None and not (math.isfinite(minutes) and minutes > 0):
        raise PrometheanError(f"max_minutes must be a positive number of minutes, got {minutes}.")


class StopFlag:
    """Set by SIGINT/SIGTERM while `installed`; the loop reads it at each step boundary."""

    def __init__(self) -> None:
        self.signal_name: str | None = None

    def __bool__(self) -> bool:
        return self.signal_name is not None

    @contextlib.contextmanager
    def installed(self):
        if threading.current_thread() is not threading.main_thread():
            yield self  # signal handlers can only be set from the main thread
            return

        def handler(number, frame):
            if self.signal_name is not None and number == signal.SIGINT:
                raise KeyboardInterrupt  # a second Ctrl-C does not wait for the step to end
            self.signal_name = signal.Signals(number).name

        previous = {
            number: signal.signal(number, handler) for number in (signal.SIGINT, signal.SIGTERM)
        }
        try:
            yield self
        finally:
            for number, old in previous.items():
                signal.signal(number, old)


# ------------------------------------------------------------------------------ the loop


@dataclass
class TrainedStep:
    """What a hook's forward and backward tell the loop about one step."""

    objective: float  # the loss the backward took (its finiteness decides the step)
    tokens: int  # tokens the step trained on
    train_loss: float | None = None  # the model's loss, when the objective adds to it (EWC)
    fields: dict[str, Any] = field(default_factory=dict)  # more for a logged step's record


@dataclass
class LoopHooks:
    """The caller's parts of the loop; all but `train_step` may be left out."""

    train_step: Callable[[int], TrainedStep]
    evaluate: Callable[[], dict[str, float]] | None = None  # "val_loss" (+ "val_bits_per_byte")
    # Each evaluation's record (step, the val_ numbers, mean_train_loss) as it is made.
    on_evaluation: Callable[[dict[str, Any]], None] | None = None
    keep_best: Callable[[Progress], None] | None = None  # the validation loss just improved
    save_progress: Callable[[Progress], None] | None = None  # a resumable state at this step
    record_fields: Callable[[], dict[str, Any]] | None = None  # more for every metrics record


@dataclass
class LoopPlan:
    description: str  # the progress bar's label
    optimizer: torch.optim.Optimizer
    parameters: list[torch.nn.Parameter]  # the ones clipped
    max_steps: int  # the schedule's length
    learning_rate: Callable[[int], float]  # the rate of (0-based) step
    grad_clip: float | None = 1.0
    max_nonfinite_in_a_row: int = field(
        default_factory=lambda: TrainConfig.model_fields["max_nonfinite_in_a_row"].default)
    runaway_advice: str = "lower the learning rate."
    until_step: int | None = None  # stop there as an interruption would, schedule unchanged
    log_every: int = 10
    eval_every: int | None = None  # None: only at the end (when there is an evaluate hook)
    patience: int | None = None
    min_delta: float = 0.0
    checkpoint_every: int | None = None
    max_minutes: float | None = None
    show_progress: bool = True
    metrics: Callable[[dict[str, Any]], None] | None = None
    scaler: torch.amp.GradScaler | None = None
    as_float: Callable[[torch.Tensor], float] = float
    agree: Callable[[bool], bool] = bool  # True on every rank when True on any (torchrun)
    is_main: bool = True  # the process that prints and writes


@dataclass
class LoopOutcome:
    # "max_steps", "early_stopping", "interrupted", "max_minutes" or "until_step"
    stopped: str
    losses: list[tuple[int, float]]  # (step, train loss) of every step of this leg
    signal: str | None = None  # "SIGINT" or "SIGTERM" when interrupted


def run_loop(plan: LoopPlan, hooks: LoopHooks, progress: Progress) -> LoopOutcome:
    """Run `plan`'s steps from `progress.step` (updated in place); see the module docstring."""
    last_step = plan.max_steps if plan.until_step is None else min(plan.max_steps, plan.until_step)
    budget = WallBudget(plan.max_minutes, spent_before=progress.elapsed)
    stop_flag = StopFlag()
    losses: list[tuple[int, float]] = []
    since_evaluation = progress.losses_since_evaluation
    stopped = "max_steps"
    window_started, window_tokens = time.perf_counter(), 0
    with stop_flag.installed(), progress_bar(plan.show_progress and plan.is_main) as bar:
        task = bar.add_task(plan.description, total=plan.max_steps, completed=progress.step,
                            tokens_per_second=0.0, loss=math.nan, lr=0.0)
        while progress.step < last_step:
            lr = plan.learning_rate(progress.step)
            set_learning_rate(plan.optimizer, lr)
            trained = hooks.train_step(progress.step)
            grad_norm = optimizer_step(plan.optimizer, plan.parameters, trained.objective,
                                       plan.grad_clip, progress, plan.scaler, plan.as_float)
            train_loss = trained.objective if trained.train_loss is None else trained.train_loss
            progress.step += 1
            progress.tokens += trained.tokens
            window_tokens += trained.tokens
            progress.elapsed = budget.elapsed()
            logged_loss = train_loss if math.isfinite(train_loss) else math.nan
            losses.append((progress.step, logged_loss))
            since_evaluation.append(logged_loss)
            refuse_a_runaway(progress, progress.step, plan.max_nonfinite_in_a_row,
                             plan.runaway_advice)

            tokens_per_second = window_tokens / max(time.perf_counter() - window_started, 1e-9)
            is_last = progress.step >= last_step
            # Every rank stops at the same step, so the main process's clock decides for all.
            out_of_time = plan.max_minutes is not None and plan.agree(
                budget.spent_by(progress.elapsed) and plan.is_main)
            record: dict[str, Any] = {}
            if progress.step % plan.log_every == 0 or is_last or out_of_time:
                record.update(train_loss=train_loss, grad_norm=grad_norm, **trained.fields)
            evaluate = hooks.evaluate is not None and (
                (plan.eval_every is not None and progress.step % plan.eval_every == 0)
                or progress.step == plan.max_steps
                or (out_of_time and not is_last)
            )
            if evaluate:
                record.setdefault("train_loss", train_loss)
                record.update(hooks.evaluate())
                finite = [loss for loss in since_evaluation if math.isfinite(loss)]
                mean_train_loss = sum(finite) / len(finite) if finite else math.nan
                since_evaluation.clear()
                record["mean_train_loss"] = mean_train_loss
                if hooks.on_evaluation is not None:
                    hooks.on_evaluation({"step": progress.step, **{
                        k: v for k, v in record.items() if k.startswith("val_")},
                        "mean_train_loss": mean_train_loss})
                if plan.is_main:
                    print_line(bar, plan.show_progress, evaluation_line(
                        progress.step, plan.max_steps, mean_train_loss, record["val_loss"],
                        record.get("val_bits_per_byte"), lr, tokens_per_second))
                val_loss, best = record["val_loss"], progress.best_val_loss
                if best is None or best - val_loss > plan.min_delta:
                    progress.best_val_loss = val_loss
                    progress.evals_without_improvement = 0
                    if hooks.keep_best is not None:
                        hooks.keep_best(progress)
                else:
                    progress.evals_without_improvement += 1
            if record:
                record = {"step": progress.step, "tokens": progress.tokens, **record, "lr": lr,
                          "tokens_per_second": tokens_per_second, "elapsed": progress.elapsed,
                          "skipped_steps": progress.skipped_steps}
                if hooks.record_fields is not None:
                    record.update(hooks.record_fields())
                if plan.metrics is not None and plan.is_main:
                    plan.metrics(record)
                window_started, window_tokens = time.perf_counter(), 0
            bar.update(task, completed=progress.step, tokens_per_second=tokens_per_second,
                       loss=train_loss, lr=lr)

            if plan.patience is not None and progress.evals_without_improvement >= plan.patience:
                stopped = "early_stopping"
            elif plan.agree(bool(stop_flag)):
                stopped = "interrupted"
            elif out_of_time and not is_last:
                stopped = "max_minutes"
            elif plan.until_step is not None and progress.step >= plan.until_step \
                    and progress.step < plan.max_steps:
                stopped = "until_step"
            elif (plan.checkpoint_every and progress.step % plan.checkpoint_every == 0
                  and not is_last and hooks.save_progress is not None):
                hooks.save_progress(progress)
            if stopped != "max_steps":
                break
    return LoopOutcome(stopped, losses,
                       stop_flag.signal_name if stopped == "interrupted" else None)
