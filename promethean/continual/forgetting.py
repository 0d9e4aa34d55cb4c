"""How much a continual run forgot: the stage x domain matrix and the numbers drawn from it.

`R[s][d]` is domain d's exact validation loss (nats per token) after stage s; stage 0 is the base
model. A domain is *learned* at the stage that trained on it (the base model's own domain, given
as `--base-domain`, at stage 0). Losses are lower-is-better, so the measures (GEM's, Lopez-Paz &
Ranzato 2017, written for losses) are:

- forgetting of an earlier domain d: `R[last][d] - min over stages s >= learned(d), s < last of
  R[s][d]` (how far its loss now stands above the best it ever had; 0 is no forgetting), also as
  a relative increase;
- backward transfer: the mean over earlier domains of `R[learned(d)][d] - R[last][d]`; negative
  means later stages made earlier domains worse (forgetting), positive that they helped;
- forward transfer: the mean over domains learned at stage s >= 2 of `R[0][d] - R[s - 1][d]`:
  how much the earlier stages had already lowered a domain's loss before it was learned (only
  defined when at least two domains were learned after the base).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from promethean.continual.run_record import read_run
from promethean.errors import PrometheanError

HEATMAP_FILE = "forgetting.png"


@dataclass
class ForgettingReport:
    run: Path
    method: str
    stages: list[str]  # row labels: "0 base", "1 kjv", ...
    domains: list[str]  # columns, in the order they became known
    loss: list[list[float | None]]  # [stage][domain], None where never measured
    learned_at: dict[str, int]
    forgetting: dict[str, float] = field(default_factory=dict)  # absolute, nats
    relative_forgetting: dict[str, float] = field(default_factory=dict)
    change_from_base: dict[str, float] = field(default_factory=dict)  # relative, last vs stage 0
    backward_transfer: float | None = None
    forward_transfer: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "run": str(self.run), "method": self.method, "stages": self.stages,
            "domains": self.domains, "loss": self.loss, "learned_at": self.learned_at,
            "forgetting": self.forgetting, "relative_forgetting": self.relative_forgetting,
            "change_from_base": self.change_from_base,
            "backward_transfer": self.backward_transfer, "forward_transfer": self.forward_transfer,
        }


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def forgetting_report(run: str | Path) -> ForgettingReport:
    run = Path(run)
    record = read_run(run)
    stages = record.get("stages") or []
    if len(stages) < 2:
        raise PrometheanError(f"{run} has no learned stage yet; run `promethean learn` first.")
    domains = list(record["domains"])
    learned_at = {name: int(entry["learned_at_stage"]) for name, entry in record["domains"].items()}
    labels = [f"{s['stage']} {s['domain'] or 'base'}" for s in stages]
    matrix = [[(s["val"].get(d) or {}).get("loss") for d in domains] for s in stages]
    last = len(stages) - 1
    report = ForgettingReport(run, record["method"], labels, domains, matrix, learned_at)
    backward = []
    for column, domain in enumerate(domains):
        final = matrix[last][column]
        start = learned_at[domain]
        if final is None or start >= last:
            continue
        history = [row[column] for row in matrix[start:last] if row[column] is not None]
        if history:
            best = min(history)
            report.forgetting[domain] = final - best
            report.relative_forgetting[domain] = (final - best) / best
        at_learning = matrix[start][column]
        if at_learning is not None:
            backward.append(at_learning - final)
        if matrix[0][column] is not None:
            report.change_from_base[domain] = (final - matrix[0][column]) / matrix[0][column]
    forward = []
    for column, domain in enumerate(domains):
        start = learned_at[domain]
        if start >= 2 and matrix[start - 1][column] is not None and matrix[0][column] is not None:
            forward.append(matrix[0][column] - matrix[start - 1][column])
    report.backward_transfer = _mean(backward)
    report.forward_transfer = _mean(forward)
    return report


def _perplexity(loss: float) -> float:
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf


def print_report(report: ForgettingReport, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    table = Table(title=f"{report.run} ({report.method}): validation loss / perplexity")
    table.add_column("stage")
    for domain in report.domains:
        table.add_column(f"{domain} (learned {report.learned_at[domain]})", justify="right")
    for label, row in zip(report.stages, report.loss):
        table.add_row(label, *("-" if value is None else f"{value:.4f} / {_perplexity(value):.1f}"
                               for value in row))
    console.print(table)
    summary = Table(title="forgetting after the last stage", show_header=True)
    for column in ("domain", "forgetting (nats)", "relative", "change vs base"):
        summary.add_column(column, justify="right")
    for domain in report.domains:
        if domain in report.forgetting:
            summary.add_row(domain, f"{report.forgetting[domain]:+.4f}",
                            f"{100 * report.relative_forgetting[domain]:+.2f}%",
                            f"{100 * report.change_from_base.get(domain, math.nan):+.2f}%")
    console.print(summary)

    def show(value):
        return "n/a" if value is None else f"{value:+.4f} nats"

    console.print(f"backward transfer: {show(report.backward_transfer)} "
                  "(negative: later stages raised earlier domains' loss)")
    console.print(f"forward transfer: {show(report.forward_transfer)} "
                  "(positive: earlier stages had lowered a domain's loss before it was learned)")


def draw_heatmap(report: ForgettingReport, out: str | Path | None = None) -> Path:
    """The loss matrix as a heatmap, each cell annotated with loss and perplexity."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    out = Path(out) if out is not None else report.run / HEATMAP_FILE
    values = np.array([[math.nan if v is None else v for v in row] for row in report.loss])
    figure, axes = plt.subplots(figsize=(2.2 + 1.9 * len(report.domains),
                                         1.4 + 0.6 * len(report.stages)))
    image = axes.imshow(np.ma.masked_invalid(values), cmap="viridis_r", aspect="auto")
    axes.set_xticks(range(len(report.domains)), report.domains)
    axes.set_yticks(range(len(report.stages)), report.stages)
    axes.set_xlabel("domain (validation)")
    axes.set_ylabel("after stage")
    for row, line in enumerate(report.loss):
        for column, value in enumerate(line):
            text = "-" if value is None else f"{value:.3f}\nppl {_perplexity(value):.0f}"
            axes.text(column, row, text, ha="center", va="center", fontsize=8, color="white"
                      if value is not None and value > np.nanmean(values) else "black")
    figure.colorbar(image, ax=axes, label="validation loss (nats/token)")
    axes.set_title(f"{report.run.name}: {report.method}")
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    temporary = out.with_name(f".{out.name}.partial.png")
    figure.savefig(temporary, dpi=110)
    plt.close(figure)
    temporary.replace(out)
    return out


def print_comparison(reports: list[ForgettingReport], console=None) -> None:
    """Runs side by side: each domain's loss when it was learned and after the last stage, and
    its change against the base model, so that methods on the same stages can be compared."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    domains: list[str] = []
    for report in reports:
        domains += [d for d in report.domains if d not in domains]
    table = Table(title="runs compared: loss when learned -> after the last stage (change vs base)")
    table.add_column("run")
    for domain in domains:
        table.add_column(domain, justify="right")
    table.add_column("backward transfer", justify="right")
    for report in reports:
        cells = []
        for domain in domains:
            if domain not in report.domains:
                cells.append("-")
                continue
            column = report.domains.index(domain)
            learned = report.loss[report.learned_at[domain]][column]
            final = report.loss[-1][column]
            base = report.loss[0][column]
            if learned is None or final is None:
                cells.append("-")
                continue
            change = "" if base is None else f" ({100 * (final - base) / base:+.1f}%)"
            cells.append(f"{learned:.4f} -> {final:.4f}{change}")
        backward = report.backward_transfer
        table.add_row(f"{report.run.name} ({report.method})", *cells,
                      "n/a" if backward is None else f"{backward:+.4f}")
    console.print(table)
