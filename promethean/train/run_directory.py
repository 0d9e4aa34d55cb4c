"""A training run's directory (`out`): its step checkpoints (`step-XXXXXX`, the best in
`best`), `metrics.jsonl`, which run (lineage) each checkpoint belongs to, and the claim a run
makes on `out` before it starts, so that no run mixes with or destroys another's (the trainer's
docstring says when each is refused)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from promethean.errors import PrometheanError
from promethean.files import clean_directory, remove_tree

METRICS_FILE = "metrics.jsonl"
BEST_DIR = "best"
STEP_PREFIX = "step-"


def step_dir_name(step: int) -> str:
    return f"{STEP_PREFIX}{step:06d}"


def step_directories(out: Path) -> dict[int, Path]:
    """{step: path} of the complete step checkpoints in `out`."""
    found = {}
    if out.is_dir():
        for path in out.glob(f"{STEP_PREFIX}*"):
            digits = path.name[len(STEP_PREFIX) :]
            if digits.isdigit() and path.is_dir():
                found[int(digits)] = path
    return dict(sorted(found.items()))


def run_lineage(checkpoint: Path) -> str | None:
    """The run id a training checkpoint belongs to ("" for ones written before run ids), or None
    when its training state cannot be read."""
    from promethean.train.state import STATE_JSON_FILE

    try:
        record = json.loads((checkpoint / STATE_JSON_FILE).read_text())
        return str(record["progress"].get("run_id", ""))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def resolve_resume(resume: str | Path | None) -> Path | None:
    """`--resume` names a training checkpoint, or a run directory: then its newest step."""
    from promethean.train.state import STATE_JSON_FILE

    if resume is None:
        return None
    resume = Path(resume)
    if resume.is_dir() and not (resume / STATE_JSON_FILE).is_file():
        steps = step_directories(resume)
        if steps:
            return steps[max(steps)]
    return resume


@dataclass
class RunClaim:
    """What a run may do to its `out` before it starts (see `claim_run_directory`)."""

    run_id: str
    remove: list[Path] = field(default_factory=list)  # checkpoints the user asked to replace
    metrics_up_to: int | None = None  # keep metrics lines up to this step; None: start afresh


def claim_run_directory(out: Path, resume: Path | None, resumed_step: int | None,
                        resumed_run_id: str | None, overwrite: bool) -> RunClaim:
    """Refuse, with one sentence, a run that would mix with or destroy another run in `out`;
    otherwise say which of the tool's own files it replaces (only with `overwrite`)."""
    import uuid

    steps = step_directories(out)
    metrics = out / METRICS_FILE
    has_metrics = metrics.is_file() and metrics.stat().st_size > 0
    held = [p.name for p in steps.values()] + [n for n in (BEST_DIR,) if (out / n).is_dir()]
    held += [METRICS_FILE] if has_metrics else []
    if resume is None:
        if held and not overwrite:
            shown = ", ".join(held[-3:])
            newest = f" --resume {steps[max(steps)]}" if steps else " --resume"
            raise PrometheanError(
                f"{out} already holds a training run ({shown}); continue it with{newest}, start "
                "over in it with --overwrite (its step checkpoints and metrics are replaced; "
                "adapters and other files are kept), or choose another out."
            )
        return RunClaim(uuid.uuid4().hex, remove=list(steps.values()) if overwrite else [])
    assert resumed_step is not None
    resume_inside = resume.resolve().parent == out.resolve()
    foreign = [p for p in steps.values() if run_lineage(p) != resumed_run_id]
    newer = [p for step, p in steps.items() if step > resumed_step and p not in foreign]
    if foreign and not overwrite:
        raise PrometheanError(
            f"{out} holds checkpoints of another run ({foreign[-1].name}); resume {resume} into "
            "a new directory (--branch DIR), or pass --overwrite to replace them."
        )
    if has_metrics and not steps and not resume_inside and not overwrite:
        raise PrometheanError(
            f"{out} holds another run's {METRICS_FILE}; resume {resume} into a new directory "
            "(--branch DIR), or pass --overwrite to replace it."
        )
    if newer and not overwrite:
        raise PrometheanError(
            f"{out} has checkpoints newer than {resume} (step {resumed_step}): "
            f"{', '.join(p.name for p in newer[-3:])}; resuming there would replace them. Resume "
            f"from {newer[-1]} to continue the run, resume into a new directory to branch "
            "(--branch DIR), or pass --overwrite to discard them."
        )
    if foreign or newer:  # overwrite: a new lineage, the discarded checkpoints removed
        return RunClaim(uuid.uuid4().hex, remove=foreign + newer, metrics_up_to=resumed_step)
    if not resume_inside:  # a branch: the run continues elsewhere as a lineage of its own
        return RunClaim(uuid.uuid4().hex, metrics_up_to=resumed_step)
    return RunClaim(resumed_run_id or "", metrics_up_to=resumed_step)


def apply_claim(out: Path, claim: RunClaim) -> None:
    """Remove what the claim replaces, and what interrupted writes left in `out`, and cut
    metrics.jsonl back to the resumed step."""
    from promethean.files import atomic_file

    clean_directory(out)
    for path in claim.remove:
        remove_tree(path)
    metrics = out / METRICS_FILE
    if not metrics.is_file():
        return
    kept = []
    if claim.metrics_up_to is not None:
        for line in metrics.read_text(errors="replace").splitlines(keepends=True):
            try:
                step = json.loads(line).get("step")
            except (ValueError, AttributeError):
                continue  # a line torn by a crash
            if isinstance(step, int) and step <= claim.metrics_up_to:
                kept.append(line if line.endswith("\n") else line + "\n")
    with atomic_file(metrics) as partial:
        partial.write_text("".join(kept))
