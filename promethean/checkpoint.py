"""Checkpoints are directories: `model.safetensors`, `config.json` and `promethean-tokenizer.json`.

Nothing is ever unpickled, and a checkpoint is written to a staging directory that is switched
into place atomically (`promethean.files.atomic_directory`), so a crash mid-save leaves the
previous checkpoint intact. A save replaces only the checkpoint's own files: whatever else the
directory holds (`adapters/`, a continual run, a user's notes) is kept. `checksums.json` records
the sha256 of every file the save wrote; loading verifies them (a flipped byte is one sentence
naming the file), then checks every tensor against the config and names the first one that does
not fit.
(Training state files are added beside these by the trainer; this module is what every layer that
only needs a model — inference, serving, interop — reads.)
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from promethean.config import ModelConfig, Preset, load_preset, parse_model_config
from promethean.errors import CheckpointError
from promethean.files import (
    CHECKSUMS_FILE,
    atomic_directory,
    is_leftover,
    verify_checksums,
    write_checksums,
)
from promethean.model import Transformer
from promethean.tokenizer import (
    LEGACY_TOKENIZER_FILE,
    TOKENIZER_FILE,
    TOKENIZER_FILES,
    Tokenizer,
    load_tokenizer,
    tokenizer_record_path,
)

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
CHECKPOINT_FORMAT = "promethean-checkpoint"
CHECKPOINT_VERSION = 1
# Written beside the model by the trainer (promethean.train.state) for an exact resume.
TRAINING_STATE_FILES = ("train_state.json", "train_state.safetensors")
# The names a checkpoint save owns: replaced (or dropped) by every save, never carried over
# (so a checkpoint re-saved with another kind of tokenizer keeps no file of the old one).
CHECKPOINT_FILES = frozenset(
    {MODEL_FILE, CONFIG_FILE, CHECKSUMS_FILE, *TOKENIZER_FILES, *TRAINING_STATE_FILES}
)


@dataclass
class Checkpoint:
    model: Transformer
    tokenizer: Tokenizer
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def config(self) -> ModelConfig:
        return self.model.config


def stored_state(model: Transformer) -> dict[str, torch.Tensor]:
    """The tensors a checkpoint holds: tied weights once (safetensors refuses shared storage)."""
    state = model.state_dict()
    if model.config.tie_embeddings:
        state.pop("lm_head.weight", None)
    return state


def model_tensors(model: Transformer) -> dict[str, torch.Tensor]:
    return {name: t.detach().cpu().contiguous() for name, t in stored_state(model).items()}


def save_checkpoint(
    directory: str | Path,
    model: Transformer,
    tokenizer: Tokenizer,
    metadata: dict[str, Any] | None = None,
    *,
    extra_files: Callable[[Path], None] | None = None,
) -> Path:
    """Write the checkpoint's files (and what `extra_files(staging)` adds) in one atomic switch,
    keeping every other entry `directory` already holds."""
    directory = Path(directory)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise CheckpointError(
            f"the {tokenizer.kind} tokenizer has {tokenizer.vocab_size} ids but the model's "
            f"vocabulary is only {model.config.vocab_size}."
        )
    with atomic_directory(directory, carry_over=True, never_carry=CHECKPOINT_FILES) as scratch:
        save_file(model_tensors(model), str(scratch / MODEL_FILE), metadata={"format": "pt"})
        record = {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "model": model.config.model_dump(mode="json"),
            "metadata": metadata or {},
        }
        (scratch / CONFIG_FILE).write_text(json.dumps(record, indent=2) + "\n")
        tokenizer.save(scratch)
        if extra_files is not None:
            extra_files(scratch)
        write_checksums(scratch)
    return directory


def refuse_to_replace(directory: str | Path, overwrite: bool, option: str = "--out") -> None:
    """For commands that write a new checkpoint: refuse a directory that already holds something
    unless `overwrite` (and even then only the checkpoint's own files are replaced)."""
    directory = Path(directory)
    if not directory.exists():
        return
    if not directory.is_dir():
        raise CheckpointError(f"{directory} is a file; {option} names a checkpoint directory.")
    held = sorted(p.name for p in directory.iterdir() if not is_leftover(p.name))
    if not held or overwrite:
        return
    shown = ", ".join(held[:4]) + (f" and {len(held) - 4} more" if len(held) > 4 else "")
    if (directory / CONFIG_FILE).is_file():
        raise CheckpointError(
            f"{directory} already holds a checkpoint ({shown}); pass --overwrite to replace its "
            f"model (its other files, such as adapters/, are kept), or choose another {option}."
        )
    raise CheckpointError(
        f"{directory} already exists and holds {shown}; choose another {option}, or pass "
        "--overwrite to write the checkpoint beside them (nothing already there is deleted "
        "except an older checkpoint's own files)."
    )


def read_versioned_record(path: Path, record_format: str, version: int, kind: str) -> dict:
    """A JSON record that names its format and version, or a CheckpointError sentence."""
    try:
        record = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{path} is not valid JSON ({error}).") from None
    if not isinstance(record, dict) or record.get("format") != record_format:
        raise CheckpointError(f"{path} is not a Promethean {kind}.")
    if record.get("version") != version:
        raise CheckpointError(
            f"{path} has {kind} version {record.get('version')!r}; this Promethean reads "
            f"version {version}."
        )
    return record


def read_checkpoint_record(directory: str | Path) -> tuple[ModelConfig, dict[str, Any]]:
    """The model config and metadata of a checkpoint, without touching its tensors."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory {directory} does not exist.")
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{directory} is not a checkpoint: {CONFIG_FILE} is missing.")
    record = read_versioned_record(path, CHECKPOINT_FORMAT, CHECKPOINT_VERSION, "checkpoint config")
    config = parse_model_config(record.get("model"), source=f"the model config in {path}")
    return config, record.get("metadata") or {}


def _read_tensors(path: Path, expected: dict[str, torch.Size], device: torch.device):
    if not path.is_file():
        raise CheckpointError(f"{path.parent} is missing {MODEL_FILE}.")
    tensors = {}
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as reader:
            names = set(reader.keys())
            for name, shape in expected.items():
                if name not in names:
                    raise CheckpointError(
                        f"{path} is missing tensor '{name}' that the config requires."
                    )
                found = reader.get_slice(name).get_shape()
                if tuple(found) != tuple(shape):
                    raise CheckpointError(
                        f"tensor '{name}' in {path} has shape {tuple(found)} but the config "
                        f"needs {tuple(shape)}."
                    )
            for name in sorted(names - set(expected)):
                raise CheckpointError(
                    f"{path} has tensor '{name}' that the config does not describe."
                )
            for name in expected:
                tensors[name] = reader.get_tensor(name)
    except SafetensorError as error:
        raise CheckpointError(f"{path} is not a readable safetensors file ({error}).") from None
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise CheckpointError(f"tensor '{name}' in {path} holds NaN or infinite values.")
    return tensors


@dataclass(frozen=True)
class ModelSource:
    """What a command's model argument names: a checkpoint directory, or else a preset (a name
    or a .toml file). The one place that decides which; `config` reads no weights."""

    checkpoint: Path | None
    preset: Preset | None

    @property
    def config(self) -> ModelConfig:
        if self.checkpoint is not None:
            return read_checkpoint_record(self.checkpoint)[0]
        return self.preset.model


def resolve_model_source(spec: str | Path) -> ModelSource:
    """A checkpoint when `spec` is a directory (a name wins only when no such directory
    exists), else a preset, refused with load_preset's sentence when it is neither."""
    if Path(spec).is_dir():
        return ModelSource(Path(spec), None)
    return ModelSource(None, load_preset(str(spec)))


# Settings a trained checkpoint may be given another value of (`--model-set` on `finetune`):
# they change how its weights are used (positions, attention windows, regularisation), not what
# the weights are. Anything else is its architecture, fixed by the weights.
CHECKPOINT_ADJUSTABLE_SETTINGS = frozenset({
    "dropout", "rope_theta", "rope_local_theta", "sliding_window", "global_layers",
    "context_length", "norm_eps", "spike_threshold", "init_std",
})


def apply_model_overrides(config: ModelConfig, overrides: Mapping[str, Any] | None,
                          checkpoint: str | Path | None = None) -> ModelConfig:
    """`config` with `overrides` applied (validated as strictly as any config). For the config
    of `checkpoint`, only CHECKPOINT_ADJUSTABLE_SETTINGS may change, and never so that a weight
    changes shape (context_length with learned positions)."""
    if not overrides:
        return config
    changed_config = config.with_overrides(**overrides)
    if checkpoint is None:
        return changed_config
    before, after = config.model_dump(), changed_config.model_dump()
    changed = [key for key in after if after[key] != before[key] and key != "name"]
    fixed = [key for key in changed if key not in CHECKPOINT_ADJUSTABLE_SETTINGS]
    if fixed:
        key = fixed[0]
        raise CheckpointError(
            f"--model-set {key} cannot change on the checkpoint {checkpoint}: its weights were "
            f"trained with {key} = {before[key]!r}. A checkpoint can take other values of "
            f"{', '.join(sorted(CHECKPOINT_ADJUSTABLE_SETTINGS))}; to change its architecture, "
            "start a model from a preset."
        )
    with torch.device("meta"):
        old_shapes = {n: tuple(t.shape) for n, t in stored_state(Transformer(config)).items()}
        new_shapes = {n: tuple(t.shape) for n, t in stored_state(Transformer(changed_config)).items()}
    for name, shape in old_shapes.items():
        if new_shapes.get(name) != shape:
            raise CheckpointError(
                f"--model-set {', '.join(f'{k}={after[k]!r}' for k in changed)} would change the "
                f"shape of the checkpoint {checkpoint}'s weight {name} ({shape} -> "
                f"{new_shapes.get(name)}), which its weights cannot take."
            )
    return changed_config


def load_checkpoint(
    directory: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    *,
    verify: bool = True,
    model_overrides: Mapping[str, Any] | None = None,
) -> Checkpoint:
    """The checkpoint in `directory`; with `verify` (the default) every file is first checked
    against the sha256 recorded when it was written. `model_overrides` change settings that the
    weights allow (see `apply_model_overrides`)."""
    directory = Path(directory)
    config, metadata = read_checkpoint_record(directory)
    config = apply_model_overrides(config, model_overrides, directory)
    if verify:
        # Checkpoints written before the rename recorded the tokenizer as tokenizer.json.
        verify_checksums(directory, (CONFIG_FILE, TOKENIZER_FILE, LEGACY_TOKENIZER_FILE,
                                     MODEL_FILE), CheckpointError)
    if tokenizer_record_path(directory) is None:
        raise CheckpointError(f"{directory} is missing {TOKENIZER_FILE}.")
    tokenizer = load_tokenizer(directory)
    if tokenizer.vocab_size > config.vocab_size:
        raise CheckpointError(
            f"{directory} pairs a {tokenizer.kind} tokenizer of {tokenizer.vocab_size} ids with a "
            f"model vocabulary of only {config.vocab_size}."
        )
    device = torch.device(device)
    # Build on the meta device so the weights exist once in memory: the loaded tensors are
    # assigned in place of the meta ones rather than copied into a freshly initialised model.
    with torch.device("meta"):
        model = Transformer(config)
    expected = {name: t.shape for name, t in stored_state(model).items()}
    tensors = _read_tensors(directory / MODEL_FILE, expected, device)
    model.load_state_dict(tensors, strict=False, assign=True)
    model.tie_weights()
    if dtype is not None:
        model.to(dtype)
    return Checkpoint(model=model.eval(), tokenizer=tokenizer, metadata=metadata)

