"""`TrainConfig`: every knob of a training run, read from TOML plus `--set key=value` overrides.

A config file holds the settings at its top level:

    model = "tiny-gpt2"          # a preset name, a preset .toml, or a checkpoint directory
    data = "data/shakespeare-bytes"
    out = "runs/shakespeare"
    batch_size = 8
    max_steps = 2000

Overrides are parsed as TOML literals (`lr=3e-4`, `compile=true`, `eval_batches=20`), so they are
as strictly typed as the file; a value that is not a TOML literal is taken as a string
(`out=runs/other`). Unknown keys and impossible combinations are refused with one sentence.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from promethean.config import describe_validation_error, read_toml
from promethean.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib


class TrainConfig(BaseModel):
    """A training run. Defaults follow the founding cards (beta2 0.95, clipping 0.5, patience 5)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    model: str  # preset name, preset .toml, or checkpoint directory (fine-tuning)
    data: str  # a prepared token directory (promethean.data.prepare)
    out: str  # where checkpoints and metrics.jsonl go
    batch_size: int = Field(default=8, gt=0)  # sequences per micro-batch
    grad_accum: int = Field(default=1, gt=0)  # micro-batches per optimizer step
    block_size: int | None = Field(default=None, gt=0)  # None: the model's context length
    max_steps: int = Field(default=1000, gt=0)
    # The run's length in epochs instead of steps: max_steps becomes ceil(max_epochs x the train
    # split's tokens / tokens per optimizer step) (see promethean.train.trainer.steps_for_epochs;
    # windows are drawn at random, so an epoch is as many tokens as the split, not a pass that
    # visits each window once). Setting both max_steps and max_epochs is refused.
    max_epochs: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    # A wall-time budget, earlier legs of a resumed run included: when it is spent, the loop
    # evaluates, saves a checkpoint and stops (TrainResult.stopped == "max_minutes").
    max_minutes: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    lr: float = Field(default=6e-4, gt=0)
    min_lr: float = Field(default=6e-5, ge=0)
    warmup_steps: int = Field(default=100, ge=0)
    # After warmup: "cosine" decay to min_lr at max_steps, a "linear" one, or "constant" lr
    # (promethean.train.schedule).
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    # Dropout on embeddings, attention weights and each sublayer's output (train mode only; zero at
    # evaluation). None keeps the model's own (ModelConfig.dropout: 0 in every preset, or what a
    # checkpoint was trained with); a value replaces it, and the checkpoints record it.
    dropout: float | None = Field(default=None, ge=0, lt=1)
    weight_decay: float = Field(default=0.1, ge=0)
    beta1: float = Field(default=0.9, ge=0, lt=1)
    beta2: float = Field(default=0.95, ge=0, lt=1)
    grad_clip: float | None = Field(default=0.5, gt=0)  # None: no clipping
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    # AdamW's moments: fp32 (torch.optim.AdamW), or bf16 to save 4 bytes per parameter.
    optimizer_moments: Literal["fp32", "bf16"] = "fp32"
    device: str = "auto"
    compile: bool = False
    gradient_checkpointing: bool = False
    log_interval: int = Field(default=10, gt=0)
    eval_interval: int = Field(default=200, gt=0)
    eval_batches: int | None = Field(default=None, gt=0)  # None: the whole val split
    checkpoint_interval: int | None = Field(default=None, gt=0)  # None: only at the end
    keep_last: int = Field(default=3, gt=0)  # periodic step-* checkpoints kept
    early_stopping_patience: int | None = Field(default=5, gt=0)  # evals without improvement
    early_stopping_min_delta: float = Field(default=0.001, ge=0)
    seed: int = Field(default=0, ge=0)
    max_nonfinite_in_a_row: int = Field(default=5, gt=0)
    progress: bool = True  # a rich progress bar on stderr
    # Under torchrun: DistributedDataParallel, or FSDP (fully_shard; CUDA only). Ignored in one
    # process. See promethean.train.distributed for how ranks share the batches.
    distributed: Literal["ddp", "fsdp"] = "ddp"

    @model_validator(mode="after")
    def _check_combinations(self) -> TrainConfig:
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr ({self.min_lr}) cannot be larger than lr ({self.lr})")
        if self.max_epochs is not None and "max_steps" in self.model_fields_set:
            raise ValueError(
                f"max_steps ({self.max_steps}) and max_epochs ({self.max_epochs}) both set the "
                "run's length; set only one of them"
            )
        return self

    def with_overrides(self, **overrides: Any) -> TrainConfig:
        # Only the settings given: a default is not a choice (max_steps beside max_epochs).
        return parse_train_config(
            {**self.model_dump(exclude_unset=True), **overrides}, source="training config"
        )


def parse_train_config(data: Any, source: str = "training config") -> TrainConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"{source} must be a table of settings, got {type(data).__name__}.")
    try:
        return TrainConfig(**data)
    except ValidationError as error:
        raise ConfigError(describe_validation_error(error, source, TrainConfig)) from None


def parse_override(text: str) -> tuple[str, Any]:
    """'key=value' -> (key, value), the value read as a TOML literal (else as a string)."""
    key, separator, raw = text.partition("=")
    key, raw = key.strip(), raw.strip()
    if not separator or not key:
        raise ConfigError(f"override '{text}' is not of the form key=value.")
    if key not in TrainConfig.model_fields:
        known = ", ".join(TrainConfig.model_fields)
        raise ConfigError(f"override '{key}' is not a known setting (known settings: {known}).")
    try:
        value = tomllib.loads(f"value = {raw}")["value"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key, value


def load_train_config(
    path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> TrainConfig:
    """A TrainConfig from a TOML file (optional) with `key=value` overrides applied on top."""
    data: dict[str, Any] = {}
    source = "training config"
    if path is not None:
        data = read_toml(Path(path))
        source = f"training config {path}"
    for text in overrides:
        key, value = parse_override(text)
        data[key] = value
    return parse_train_config(data, source=source)
