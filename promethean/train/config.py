"""`TrainConfig`: every knob of a training run, read from TOML plus `--set key=value` overrides.

A config file holds the settings at its top level:

    model = "tiny-gpt2"          # a preset name, a preset .toml, or a checkpoint directory
    data = "data/shakespeare-bytes"
    out = "runs/shakespeare"
    batch_size = 8
    max_steps = 2000

Overrides are parsed as TOML literals (`lr=3e-4`, `compile=true`, `eval_batches=20`), so they are
as strictly typed as the file; a value that is not a TOML literal is taken as a string
(`out=runs/other`). Unknown keys and impossible combinations are refused with one sentence, a
misspelt key with the setting it most likely meant ("did you mean 'lr'?").

The founding systems' names are understood, each with a one-line note: `learning_rate` is `lr`,
`gradient_accumulation_steps` is `grad_accum`, `max_iters` is `max_steps` (TRAIN_SETTING_ALIASES).
Model settings in a training config (`n_layer`, `d_model`, a `ssmm_config` or nanoGPT
`model_args` table) go to `model_overrides`, which changes the model as `--model-set` does: any
setting of a preset; on a checkpoint only those that keep its trained weights meaningful
(promethean.checkpoint.apply_model_overrides).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from promethean.config import (
    MODEL_SETTING_ALIASES,
    ModelConfig,
    describe_validation_error,
    read_toml,
    resolve_aliases,
    unknown_setting_sentence,
)
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
    # Where the decay ends; None (not given) is 6e-5, or for an lr below 6e-4 a tenth of it
    # (nanoGPT's and the cards' rule), so that a small lr (the SSSM card's 2e-5) is not refused
    # for being below a floor it never chose.
    min_lr: float | None = Field(default=None, ge=0)
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
    # Model settings changed for this run ({"dropout": 0.1}, {"n_layer": 4}): `--model-set`, or
    # a [model_overrides] table. Checked against the model when the run starts.
    model_overrides: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check_combinations(self) -> TrainConfig:
        if self.min_lr is None:  # frozen: set once here, and still not counted as given
            object.__setattr__(self, "min_lr", 6e-5 if self.lr >= 6e-4 else self.lr / 10)
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr ({self.min_lr}) cannot be larger than lr ({self.lr})")
        unknown = [key for key in self.model_overrides if key not in ModelConfig.model_fields]
        if unknown:
            raise ValueError("model_overrides: " + unknown_setting_sentence(
                unknown[0], ModelConfig.model_fields, MODEL_SETTING_ALIASES))
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


# The founding systems' names for training settings (nanoGPT, transformers' Trainer, the seed
# cards), and ours.
TRAIN_SETTING_ALIASES = {
    "learning_rate": "lr", "gradient_accumulation_steps": "grad_accum",
    "max_length": "block_size", "seq_len": "block_size", "max_seq_length": "block_size",
    "save_steps": "checkpoint_interval", "eval_steps": "eval_interval",
    "max_iters": "max_steps", "eval_iters": "eval_batches", "warmup_iters": "warmup_steps",
    "num_train_epochs": "max_epochs", "epochs": "max_epochs", "num_epochs": "max_epochs",
    "logging_steps": "log_interval", "log_steps": "log_interval",
    "max_grad_norm": "grad_clip", "gradient_clip": "grad_clip", "clip_grad_norm": "grad_clip",
    "out_dir": "out", "output_dir": "out", "model_name": "model",
    "patience": "early_stopping_patience", "min_delta": "early_stopping_min_delta",
    "use_gradient_checkpointing": "gradient_checkpointing",
    "per_device_train_batch_size": "batch_size", "min_learning_rate": "min_lr",
}
# Tables of model settings inside a training config: the SSSM card's, nanoGPT's.
MODEL_SETTING_TABLES = ("model_overrides", "model_args", "model_config", "ssmm_config")


def _model_settings_in(data: dict[str, Any], source: str) -> dict[str, Any]:
    """Take the model settings out of a training config's `data` (in place): the tables above
    and top-level keys that name a model setting rather than a training one."""
    import warnings

    from promethean.config import SettingNote

    found: dict[str, Any] = {}
    for table in MODEL_SETTING_TABLES:
        if table not in data:
            continue
        values = data.pop(table)
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: '{table}' must be a table of model settings.")
        if table != "model_overrides":
            warnings.warn(f"'{table}' is read as model settings (model_overrides).",
                          SettingNote, stacklevel=4)
        found.update(values)
    training = set(TrainConfig.model_fields) | set(TRAIN_SETTING_ALIASES)
    for key in [key for key in data if key not in training]:
        if key in ModelConfig.model_fields or key in MODEL_SETTING_ALIASES:
            warnings.warn(f"'{key}' is a model setting: applied to the model as --model-set "
                          f"{key}=... would.", SettingNote, stacklevel=4)
            found[key] = data.pop(key)
    return resolve_aliases(found, ModelConfig.model_fields, MODEL_SETTING_ALIASES, source)


def parse_train_config(data: Any, source: str = "training config") -> TrainConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"{source} must be a table of settings, got {type(data).__name__}.")
    data = dict(data)
    model_settings = _model_settings_in(data, source)
    data = resolve_aliases(data, TrainConfig.model_fields, TRAIN_SETTING_ALIASES, source)
    if model_settings:
        data["model_overrides"] = {**data.get("model_overrides", {}), **model_settings}
    try:
        return TrainConfig(**data)
    except ValidationError as error:
        raise ConfigError(
            describe_validation_error(error, source, TrainConfig, TRAIN_SETTING_ALIASES)
        ) from None


def _key_and_literal(text: str, what: str) -> tuple[str, Any]:
    key, separator, raw = text.partition("=")
    key, raw = key.strip(), raw.strip()
    if not separator or not key:
        raise ConfigError(f"{what} '{text}' is not of the form key=value.")
    try:
        value = tomllib.loads(f"value = {raw}")["value"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key, value


def parse_override(text: str) -> tuple[str, Any]:
    """'key=value' -> (key, value), the value read as a TOML literal (else as a string). A seed
    card's name for a setting is read as ours (with a note); a model setting is refused here,
    with the option that sets it."""
    key, value = _key_and_literal(text, "override")
    if key in TrainConfig.model_fields:
        return key, value
    if key in TRAIN_SETTING_ALIASES:
        return next(iter(resolve_aliases({key: value}, TrainConfig.model_fields,
                                         TRAIN_SETTING_ALIASES, "override").items()))
    if key in ModelConfig.model_fields or key in MODEL_SETTING_ALIASES:
        raise ConfigError(f"override '{key}' is a model setting; set it with --model-set "
                          f"{key}={value}.")
    sentence = unknown_setting_sentence(key, TrainConfig.model_fields, TRAIN_SETTING_ALIASES)
    raise ConfigError(f"override {sentence}" + ("" if sentence.endswith("?") else "."))


def parse_model_override(text: str) -> tuple[str, Any]:
    """'key=value' for `--model-set`: a ModelConfig setting (or a seed card's name for one)."""
    key, value = _key_and_literal(text, "--model-set")
    resolved = resolve_aliases({key: value}, ModelConfig.model_fields, MODEL_SETTING_ALIASES,
                               "--model-set")
    ours = next(iter(resolved))
    if ours not in ModelConfig.model_fields or ours == "name":
        sentence = unknown_setting_sentence(key, ModelConfig.model_fields, MODEL_SETTING_ALIASES)
        raise ConfigError(f"--model-set {sentence}" + ("" if sentence.endswith("?") else "."))
    if isinstance(value, list) and ours in ("global_layers", "mixer_pattern"):
        value = tuple(value)
    return ours, value


def load_train_config(
    path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
    model_overrides: list[str] | tuple[str, ...] = (),
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
    if model_overrides:
        data["model_overrides"] = {**data.get("model_overrides", {}),
                                   **dict(parse_model_override(text) for text in model_overrides)}
    return parse_train_config(data, source=source)
