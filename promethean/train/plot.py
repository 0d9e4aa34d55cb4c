"""Draw a run's metrics: train and validation loss against step, and the learning rate.

A run directory holds `metrics.jsonl`, one JSON object per line (the trainer writes `step`,
`train_loss`, `lr` on log lines and `val_loss` on evaluation lines; other keys are ignored).
"""

from __future__ import annotations

import json
from pathlib import Path

from promethean.errors import PrometheanError
from promethean.files import atomic_file

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "metrics.png"


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise PrometheanError(f"{run_dir} has no {METRICS_FILE}; is it a training run directory?")
    records = []
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise PrometheanError(
                    f"{path} line {line_number} is not valid JSON ({error.msg})."
                ) from None
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                raise PrometheanError(f"{path} line {line_number} has no integer 'step'.")
            records.append(record)
    if not records:
        raise PrometheanError(f"{path} holds no metrics yet.")
    return records


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], float(r[key])) for r in records if isinstance(r.get(key), (int, float))]
    return [step for step, _ in points], [value for _, value in points]


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write the PNG (default RUN_DIR/metrics.png) and return its path."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed, and none is there on a server
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    out = Path(out) if out is not None else Path(run_dir) / PLOT_FILE
    figure, (loss_axes, lr_axes) = plt.subplots(
        2, 1, figsize=(8, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]}
    )
    for key, label in (("train_loss", "train"), ("val_loss", "validation")):
        steps, values = _series(records, key)
        if steps:
            loss_axes.plot(steps, values, label=label, marker="o" if key == "val_loss" else None)
    loss_axes.set_ylabel("loss (nats/token)")
    loss_axes.set_title(Path(run_dir).resolve().name)
    loss_axes.grid(alpha=0.3)
    if loss_axes.lines:
        loss_axes.legend()
    steps, values = _series(records, "lr")
    lr_axes.plot(steps, values, color="tab:green")
    lr_axes.set_ylabel("learning rate")
    lr_axes.set_xlabel("step")
    lr_axes.grid(alpha=0.3)
    figure.tight_layout()
    try:
        with atomic_file(out) as partial:
            figure.savefig(partial, format="png", dpi=110)
    finally:
        plt.close(figure)
    return out
