"""Learning rate: linear warmup, then a decay to `min_lr` at `max_steps` (or none).

After `warmup_steps` steps of linear warmup the schedule is one of `SCHEDULES`:

- "cosine" (the default, nanoGPT's and the founding cards'): half a cosine from `lr` down to
  `min_lr` at `max_steps`;
- "linear": a straight line from `lr` down to `min_lr` at `max_steps`;
- "constant": `lr` held to the end (`min_lr` is not used).

A plain function of the step number, applied before every optimizer step, so a resumed run needs
only the step to be back at exactly the same place in the schedule.
"""

from __future__ import annotations

import math

SCHEDULES = ("cosine", "linear", "constant")


def lr_at(step: int, lr: float, min_lr: float, warmup_steps: int, max_steps: int,
          schedule: str = "cosine") -> float:
    """The learning rate for optimizer step `step` (0-based)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)} (got {schedule!r})")
    if step < warmup_steps:
        return lr * (step + 1) / (warmup_steps + 1)
    if schedule == "constant":
        return lr
    if step >= max_steps:
        return min_lr
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    if schedule == "linear":
        return lr - progress * (lr - min_lr)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)
