"""Training checkpoints: a model checkpoint plus everything an exact resume needs.

Beside `model.safetensors`, `config.json` and the tokenizer (written by
`promethean.checkpoint.save_checkpoint`), a training checkpoint holds

- `train_state.safetensors`: the optimizer's tensors (`optimizer.<param>.<name>`) and the torch
  RNG states (`rng.torch`, `rng.cuda.<i>`) as uint8 tensors;
- `train_state.json`: the step, token count, optimizer hyper-parameters per group, the grad
  scaler, numpy and Python RNG states, the data sampler's position, the best validation loss and
  the early-stopping counter.

The whole directory is written in one atomic switch by `save_checkpoint` (these files join the
model's in its staging directory, and their sha256 in its `checksums.json`, verified on resume),
so a crash mid-save leaves the previous checkpoint of that name intact. Nothing is pickled, and no non-finite tensor
is ever written: a model or optimizer holding NaN or infinity is refused with a sentence.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from promethean.checkpoint import (
    TRAINING_STATE_FILES,
    model_tensors,
    read_versioned_record,
    save_checkpoint,
)
from promethean.errors import CheckpointError
from promethean.files import atomic_directory, verify_checksums

STATE_JSON_FILE, STATE_TENSORS_FILE = TRAINING_STATE_FILES
STATE_FORMAT = "promethean-train-state"
STATE_VERSION = 1


@dataclass
class Progress:
    """The training loop's counters (`train.loop.run_loop`), saved in train_state.json."""

    step: int = 0  # optimizer steps taken (skipped ones included)
    tokens: int = 0  # training tokens consumed
    elapsed: float = 0.0  # seconds of training across all resumed legs
    skipped_steps: int = 0
    nonfinite_in_a_row: int = 0
    best_val_loss: float | None = None
    evals_without_improvement: int = 0
    # The train losses since the last evaluation: the evaluation line's mean over them.
    losses_since_evaluation: list[float] = field(default_factory=list)
    sampler: dict[str, Any] = field(default_factory=dict)
    # Which run (lineage) this is: kept on resume, new on a fresh start or a branch, so pruning
    # old checkpoints never touches another run's ("" for checkpoints older than run ids).
    run_id: str = ""


# ------------------------------------------------------------------------------ RNG states


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for index, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{index}"] = state
    kind, keys, position, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    record = {
        "numpy": [kind, keys.tolist(), int(position), int(has_gauss), float(cached)],
        "python": [version, list(internal), gauss_next],
    }
    return tensors, record


def set_rng_state(tensors: dict[str, torch.Tensor], record: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    cuda = sorted(
        (k for k in tensors if k.startswith("rng.cuda.")), key=lambda k: int(k.split(".")[-1])
    )
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda])
    kind, keys, position, has_gauss, cached = record["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), position, has_gauss, cached))
    version, internal, gauss_next = record["python"]
    random.setstate((version, tuple(internal), gauss_next))


# ------------------------------------------------------------------------------- optimizer


def optimizer_parts(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimizer's state as (tensors for safetensors, a JSON-able record): the trainer's
    checkpoints and a `learn` stage's saved progress both write it so."""
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, entries in state["state"].items():
        for name, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{index}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(index), {})[name] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def optimizer_state_from_parts(tensors: dict[str, torch.Tensor], record: dict) -> dict:
    """The state dict `optimizer_parts` took apart, for `optimizer.load_state_dict`."""
    entries: dict[int, dict[str, Any]] = {}
    for key, tensor in tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            entries.setdefault(int(index), {})[name] = tensor
    for index, values in record["scalars"].items():
        entries.setdefault(int(index), {}).update(values)
    groups = []
    for group in record["param_groups"]:
        group = dict(group)
        if isinstance(group.get("betas"), list):
            group["betas"] = tuple(group["betas"])
        groups.append(group)
    return {"state": entries, "param_groups": groups}


# ------------------------------------------------------------------------------ save / load


def _refuse_nonfinite(tensors: dict[str, torch.Tensor], what: str, directory: Path) -> None:
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise CheckpointError(
                f"refusing to write {directory}: {what} tensor '{name}' holds NaN or infinite "
                "values."
            )


def save_training_checkpoint(
    directory: str | Path,
    model: torch.nn.Module,
    tokenizer,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    progress: Progress,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Model, tokenizer and training state in one atomically written directory."""
    directory = Path(directory)
    _refuse_nonfinite(model_tensors(model), "model", directory)
    optimizer_tensors, optimizer_record = optimizer_parts(optimizer)
    _refuse_nonfinite(optimizer_tensors, "optimizer", directory)
    rng_tensors, rng_record = rng_state()
    record = {
        "format": STATE_FORMAT,
        "version": STATE_VERSION,
        "progress": asdict(progress),
        "optimizer": optimizer_record,
        "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
        "rng": rng_record,
    }

    def write_state(scratch: Path) -> None:
        save_file(
            {**optimizer_tensors, **rng_tensors},
            str(scratch / STATE_TENSORS_FILE),
            metadata={"format": "pt"},
        )
        (scratch / STATE_JSON_FILE).write_text(json.dumps(record, indent=2) + "\n")

    return save_checkpoint(directory, model, tokenizer, metadata, extra_files=write_state)


@dataclass
class TrainingState:
    progress: Progress
    optimizer: dict  # for optimizer.load_state_dict
    scaler: dict | None
    rng_tensors: dict[str, torch.Tensor]
    rng_record: dict[str, Any]

    def restore_rng(self) -> None:
        set_rng_state(self.rng_tensors, self.rng_record)


def load_training_state(directory: str | Path) -> TrainingState:
    """The training state beside a checkpoint's model files (checked, not yet applied)."""
    directory = Path(directory)
    json_path, tensors_path = directory / STATE_JSON_FILE, directory / STATE_TENSORS_FILE
    if not json_path.is_file() or not tensors_path.is_file():
        raise CheckpointError(
            f"{directory} holds no training state ({STATE_JSON_FILE} and {STATE_TENSORS_FILE}); "
            "it can be fine-tuned from but not resumed."
        )
    verify_checksums(directory, TRAINING_STATE_FILES, CheckpointError)
    record = read_versioned_record(json_path, STATE_FORMAT, STATE_VERSION, "training state")
    try:
        tensors = load_file(str(tensors_path))
    except SafetensorError as error:
        raise CheckpointError(
            f"{tensors_path} is not a readable safetensors file ({error})."
        ) from None
    if "rng.torch" not in tensors:
        raise CheckpointError(f"{tensors_path} is missing the torch RNG state.")
    try:
        progress = Progress(**record["progress"])
        optimizer = optimizer_state_from_parts(tensors, record["optimizer"])
        rng_record = record["rng"]
    except (KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"{json_path} is incomplete or malformed ({error}).") from None
    rng_tensors = {k: v for k, v in tensors.items() if k.startswith("rng.")}
    return TrainingState(progress, optimizer, record.get("scaler"), rng_tensors, rng_record)


# ------------------------------------------------------------- resumable state of a partial run


PARTIAL_STATE_TENSORS = "state.safetensors"
PARTIAL_STATE_RECORD = "progress.json"


@dataclass
class PartialState:
    """What `save_partial_state` wrote: the trained tensors (by their names), the optimizer's
    state dict, the loop's counters, the caller's own record, and the RNG (restored by
    `restore_rng`, just before the training continues)."""

    tensors: dict[str, torch.Tensor]
    optimizer: dict
    progress: Progress
    extra: dict[str, Any]
    rng_tensors: dict[str, torch.Tensor]
    rng_record: dict[str, Any]

    def restore_rng(self) -> None:
        set_rng_state(self.rng_tensors, self.rng_record)


def save_partial_state(directory: str | Path, fingerprint: str, tensors: dict[str, torch.Tensor],
                       optimizer: torch.optim.Optimizer, progress: Progress,
                       extra: dict[str, Any] | None = None) -> None:
    """The state of a training that trains a few tensors beside a model it does not save (a
    `learn` stage, chat tuning), written atomically to `directory`: those tensors, AdamW's
    moments, the RNG, the loop's counters and `extra` (JSON). `fingerprint` names the options
    that must be the same for a later command to continue it (`read_partial_state`)."""
    directory = Path(directory)
    trained = {f"param.{k}": v.detach().cpu().contiguous() for k, v in tensors.items()}
    _refuse_nonfinite(trained, "trained", directory)
    optimizer_tensors, optimizer_record = optimizer_parts(optimizer)
    rng_tensors, rng_record = rng_state()
    record = {"format": STATE_FORMAT, "version": STATE_VERSION, "fingerprint": fingerprint,
              "progress": asdict(progress), "optimizer": optimizer_record, "rng": rng_record,
              "extra": extra or {}}
    with atomic_directory(directory) as scratch:
        save_file({**trained, **optimizer_tensors, **rng_tensors},
                  str(scratch / PARTIAL_STATE_TENSORS))
        (scratch / PARTIAL_STATE_RECORD).write_text(json.dumps(record) + "\n")


def read_partial_state(directory: str | Path, fingerprint: str) -> PartialState | None:
    """The state `save_partial_state` left in `directory` when it was saved under
    `fingerprint`; None (and a warning when something was there) when
    there is none, it is damaged, or it belongs to other options: the training starts over."""
    import warnings

    directory = Path(directory)
    if not (directory / PARTIAL_STATE_RECORD).is_file():
        return None
    try:
        record = json.loads((directory / PARTIAL_STATE_RECORD).read_text())
        tensors = load_file(str(directory / PARTIAL_STATE_TENSORS))
        if record.get("fingerprint") != fingerprint:
            warnings.warn(f"{directory} holds an interrupted training with other options; this "
                          "one starts over (and replaces it).", stacklevel=2)
            return None
        progress = Progress(**record["progress"])
        optimizer = optimizer_state_from_parts(tensors, record["optimizer"])
        rng_record, extra = record["rng"], dict(record.get("extra") or {})
        if "rng.torch" not in tensors:
            raise KeyError("rng.torch")
    except (OSError, ValueError, KeyError, TypeError, AttributeError, SafetensorError):
        warnings.warn(f"{directory} is damaged; the training starts over.", stacklevel=2)
        return None
    trained = {k[len("param."):]: v for k, v in tensors.items() if k.startswith("param.")}
    rng_tensors = {k: v for k, v in tensors.items() if k.startswith("rng.")}
    return PartialState(trained, optimizer, progress, extra, rng_tensors, rng_record)
