"""Model configuration and named presets.

An architecture is a config, not a class: GPT-2, LLaMA and Gemma-3 are presets of the one
`Transformer`, differing only in the values below. Presets live in `presets/*.toml`; each has a
top-level `tokenizer` key and a `[model]` table validated strictly by `ModelConfig`.
"""

from __future__ import annotations

import difflib
import json
import math
import sys
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from promethean.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

PRESET_DIR = Path(__file__).parent / "presets"


class ModelConfig(BaseModel):
    """Every knob of the Transformer. Unknown keys and impossible combinations are rejected."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    name: str = "custom"
    vocab_size: int = Field(gt=0)
    context_length: int = Field(gt=0)
    n_layer: int = Field(gt=0)
    n_embd: int = Field(gt=0)
    n_head: int = Field(gt=0)
    # Key/value heads for grouped-query attention; None means one per query head (plain MHA).
    n_kv_head: int | None = Field(default=None, gt=0)
    # Width of one head; None means n_embd // n_head. Gemma-3 sets it wider than that.
    head_dim: int | None = Field(default=None, gt=0)
    d_ff: int = Field(gt=0)
    # gelu: GPT-2's MLP with the tanh approximation of GELU; gelu_exact: the same MLP with the
    # exact (erf) GELU, as nanoGPT's nn.GELU() computes; swiglu / geglu_tanh: gated variants.
    mlp: Literal["gelu", "swiglu", "geglu_tanh", "gelu_exact"] = "gelu"
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    norm_eps: float = Field(default=1e-5, gt=0)
    # Gemma's RMSNorm multiplies by (1 + weight) with the weight initialised to 0. Storing the
    # offset form keeps the gain exact in bf16, where 1 + small would round to steps of 2^-7.
    norm_unit_offset: bool = False
    # Gemma-3 also normalises the output of each sublayer before it joins the residual stream.
    sandwich_norm: bool = False
    bias: bool = False
    position: Literal["learned", "rope"] = "learned"
    rope_theta: float = Field(default=10_000.0, gt=0)
    # RoPE base for sliding-window layers when it differs from the global layers' (Gemma-3).
    rope_local_theta: float | None = Field(default=None, gt=0)
    sliding_window: int | None = Field(default=None, gt=0)
    # With a sliding window, the layers (0-based) that still attend globally; the rest slide.
    global_layers: tuple[int, ...] | None = None
    qk_norm: bool = False
    # Attention scores are scaled by query_pre_attn_scalar ** -0.5 (default: head_dim).
    query_pre_attn_scalar: float | None = Field(default=None, gt=0)
    # Multiply token embeddings by sqrt(n_embd) (Gemma).
    embedding_scale: bool = False
    tie_embeddings: bool = True
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    init_std: float = Field(default=0.02, gt=0)
    # Each block's mixer, as a pattern repeated over the layers: layer i uses
    # mixer_pattern[i % len(mixer_pattern)]. ("attention",) is a plain Transformer, ("ssm",) a pure
    # state-space model, ("ssm", "attention") interleaves the two (the SSSM hybrid).
    mixer_pattern: tuple[Literal["attention", "ssm"], ...] = ("attention",)
    # The selective state-space mixer (model/ssm.py): N state dimensions per channel, channels =
    # ssm_expand * n_embd, a causal depthwise convolution of ssm_conv_kernel taps, and a step size
    # projected through ssm_dt_rank dimensions (None: ceil(n_embd / 16), as Mamba).
    ssm_state_size: int = Field(default=16, gt=0)
    ssm_expand: int = Field(default=2, gt=0)
    ssm_conv_kernel: int = Field(default=4, gt=0)
    ssm_dt_rank: int | None = Field(default=None, gt=0)
    # State updates smaller than this in magnitude are suppressed (straight-through gradients);
    # 0 makes the mixer a plain selective scan.
    spike_threshold: float = Field(default=0.1, ge=0.0)

    @model_validator(mode="after")
    def _check_combinations(self) -> ModelConfig:
        if self.head_dim is None and self.n_embd % self.n_head != 0:
            raise ValueError(
                f"n_head ({self.n_head}) must divide n_embd ({self.n_embd}) evenly, "
                "or head_dim must be set explicitly"
            )
        if self.n_head % self.kv_heads != 0:
            raise ValueError(
                f"n_kv_head ({self.kv_heads}) must divide n_head ({self.n_head}) so that each "
                "key/value head serves a whole group of query heads"
            )
        if self.sliding_window is not None and self.sliding_window > self.context_length:
            raise ValueError(
                f"sliding_window ({self.sliding_window}) cannot be larger than "
                f"context_length ({self.context_length})"
            )
        if self.global_layers is not None:
            if self.sliding_window is None:
                raise ValueError("global_layers only makes sense together with sliding_window")
            bad = [i for i in self.global_layers if not 0 <= i < self.n_layer]
            if bad:
                raise ValueError(
                    f"global_layers {bad} are outside the model's layers 0..{self.n_layer - 1}"
                )
            if len(set(self.global_layers)) != len(self.global_layers):
                raise ValueError("global_layers lists a layer more than once")
        if self.norm_unit_offset and self.norm != "rmsnorm":
            raise ValueError("norm_unit_offset applies to norm = 'rmsnorm' only")
        if self.position == "learned" and self.rope_local_theta is not None:
            raise ValueError("rope_local_theta needs position = 'rope'")
        if self.rope_local_theta is not None and self.sliding_window is None:
            raise ValueError("rope_local_theta applies to sliding-window layers, so it needs sliding_window")
        if self.position == "rope" and self.head_size % 2 != 0:
            raise ValueError(f"RoPE needs an even head size, got {self.head_size}")
        if not self.mixer_pattern:
            raise ValueError("mixer_pattern must name at least one mixer, 'attention' or 'ssm'")
        if self.n_layer % len(self.mixer_pattern) != 0:
            raise ValueError(
                f"mixer_pattern has {len(self.mixer_pattern)} entries, which does not divide "
                f"n_layer ({self.n_layer}); the pattern repeats over the layers, so its length "
                "must divide the number of layers"
            )
        if self.global_layers is not None:
            ssm = [i for i in self.global_layers if self.layer_mixer(i) == "ssm"]
            if ssm:
                raise ValueError(f"global_layers {ssm} are SSM layers, which do not attend at all")
        return self

    # Derived values, so that no caller repeats the defaulting rules above.
    @property
    def gated_mlp(self) -> bool:
        return self.mlp in ("swiglu", "geglu_tanh")

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head if self.n_kv_head is not None else self.n_head

    @property
    def head_size(self) -> int:
        return self.head_dim if self.head_dim is not None else self.n_embd // self.n_head

    @property
    def ssm_inner_size(self) -> int:
        return self.ssm_expand * self.n_embd

    @property
    def ssm_dt_rank_size(self) -> int:
        return self.ssm_dt_rank if self.ssm_dt_rank is not None else math.ceil(self.n_embd / 16)

    def layer_mixer(self, layer: int) -> str:
        """'attention' or 'ssm': what mixes the tokens in block `layer`."""
        return self.mixer_pattern[layer % len(self.mixer_pattern)]

    @property
    def ssm_layers(self) -> list[int]:
        return [layer for layer in range(self.n_layer) if self.layer_mixer(layer) == "ssm"]

    def is_sliding_layer(self, layer: int) -> bool:
        if self.sliding_window is None or self.layer_mixer(layer) == "ssm":
            return False
        return self.global_layers is None or layer not in self.global_layers

    def layer_window(self, layer: int) -> int | None:
        return self.sliding_window if self.is_sliding_layer(layer) else None

    def layer_rope_theta(self, layer: int) -> float:
        if self.rope_local_theta is not None and self.is_sliding_layer(layer):
            return self.rope_local_theta
        return self.rope_theta

    def with_overrides(self, **overrides: Any) -> ModelConfig:
        """A copy with some values changed, validated as strictly as the original."""
        overrides = resolve_aliases(overrides, ModelConfig.model_fields, MODEL_SETTING_ALIASES,
                                    "model config")
        return parse_model_config({**self.model_dump(), **overrides}, source="model config")

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), indent=2)


class SettingNote(UserWarning):
    """A setting was read under another name (a seed card's `learning_rate` as `lr`, say); the
    command line shows it as one `note:` line."""


# The names the founding systems (nanoGPT, the TinyStories Gemma-3, the GPT-2 chat, MiniMacLLM,
# the SSSM card) and transformers give model settings, and ours for them.
MODEL_SETTING_ALIASES = {
    "d_model": "n_embd", "emb_dim": "n_embd", "hidden_size": "n_embd", "n_embed": "n_embd",
    "num_layers": "n_layer", "n_layers": "n_layer", "num_hidden_layers": "n_layer",
    "num_heads": "n_head", "n_heads": "n_head", "num_query_heads": "n_head",
    "num_attention_heads": "n_head",
    "num_kv_heads": "n_kv_head", "n_kv_heads": "n_kv_head", "num_key_value_heads": "n_kv_head",
    "n_kv_groups": "n_kv_head",
    "intermediate_size": "d_ff", "hidden_dim": "d_ff", "ffn_dim": "d_ff", "n_inner": "d_ff",
    "max_seq_len": "context_length", "max_position_embeddings": "context_length",
    "n_positions": "context_length", "n_ctx": "context_length", "block_size": "context_length",
    "max_length": "context_length",
    "ssmm_state_size": "ssm_state_size", "state_size": "ssm_state_size",
    "d_state": "ssm_state_size", "d_conv": "ssm_conv_kernel", "expand": "ssm_expand",
    "rms_norm_eps": "norm_eps", "layer_norm_epsilon": "norm_eps", "layer_norm_eps": "norm_eps",
    "rope_base": "rope_theta", "rope_local_base": "rope_local_theta",
    "sliding_window_size": "sliding_window", "window_size": "sliding_window",
    "tie_word_embeddings": "tie_embeddings", "weight_tying": "tie_embeddings",
    "attention_dropout": "dropout", "resid_pdrop": "dropout",
}


def closest_setting(name: str, known: Iterable[str], aliases: Mapping[str, str]) -> str | None:
    """The known setting `name` most likely meant (a misspelling of it or of one of its
    aliases), or None when nothing is close."""
    candidates = [*known, *aliases]
    match = difflib.get_close_matches(name, candidates, n=1, cutoff=0.6)
    if not match:
        lowered = name.lower()
        match = [candidate for candidate in candidates if candidate == lowered]
    if not match:
        return None
    return aliases.get(match[0], match[0])


def shown_key(name: str) -> str:
    """A setting's name quoted for a sentence; control characters escaped, so that a key with a
    newline in it still gives one line."""
    return f"'{name}'" if name.isprintable() else repr(name)


def unknown_setting_sentence(name: str, known: Iterable[str], aliases: Mapping[str, str]) -> str:
    known = list(known)
    closest = closest_setting(name, known, aliases)
    if closest is not None:
        return f"{shown_key(name)} is not a known setting; did you mean '{closest}'?"
    return f"{shown_key(name)} is not a known setting (known settings: {', '.join(known)})"


def resolve_aliases(data: Mapping[str, Any], known: Iterable[str], aliases: Mapping[str, str],
                    source: str) -> dict[str, Any]:
    """`data` with every alias replaced by our name for it, each with a note; an alias given
    beside the setting it names is refused (which of the two was meant?)."""
    known = set(known)
    resolved: dict[str, Any] = {}
    for key, value in data.items():
        if key in known or key not in aliases:
            resolved[key] = value
            continue
        ours = aliases[key]
        if ours in data or ours in resolved:
            raise ConfigError(
                f"{source} sets both '{key}' and '{ours}', which are the same setting; keep one."
            )
        warnings.warn(f"'{key}' is read as '{ours}', Promethean's name for it.", SettingNote,
                      stacklevel=3)
        resolved[ours] = value
    return resolved


def describe_validation_error(
    error: ValidationError, source: str, settings: type[BaseModel],
    aliases: Mapping[str, str] | None = None,
) -> str:
    """Turn pydantic's report on a `settings` model into one sentence a user can act on."""
    problems = []
    for item in error.errors():
        location = ".".join(str(part) for part in item["loc"])
        if item["type"] == "extra_forbidden":
            problems.append(unknown_setting_sentence(location, settings.model_fields, aliases or {}))
        elif item["type"] == "missing":
            problems.append(f"'{location}' is required but missing")
        elif item["type"] == "value_error":
            problems.append(str(item["ctx"]["error"]))
        else:
            problems.append(f"'{location}' {item['msg'].lower()} (got {item['input']!r})")
    sentence = "; ".join(problems)
    return f"{source} is invalid: {sentence}" + ("" if sentence.endswith("?") else ".")


def parse_model_config(data: Any, source: str = "model config") -> ModelConfig:
    """Validate a mapping into a ModelConfig or raise ConfigError with one sentence."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source} must be a table of settings, got {type(data).__name__}.")
    data = resolve_aliases(data, ModelConfig.model_fields, MODEL_SETTING_ALIASES, source)
    # TOML and JSON have no tuples; the frozen config stores these as tuples.
    for key in ("global_layers", "mixer_pattern"):
        if isinstance(data.get(key), list):
            data[key] = tuple(data[key])
    try:
        return ModelConfig(**data)
    except ValidationError as error:
        raise ConfigError(
            describe_validation_error(error, source, ModelConfig, MODEL_SETTING_ALIASES)
        ) from None


@dataclass(frozen=True)
class Preset:
    """A named starting point: a model config and the tokenizer it was sized for."""

    name: str
    model: ModelConfig
    tokenizer: str


def list_presets() -> list[str]:
    return sorted(path.stem for path in PRESET_DIR.glob("*.toml"))


def read_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist.") from None
    except IsADirectoryError:
        raise ConfigError(f"{path} is a directory; give a config file (TOML).") from None
    except OSError as error:
        raise ConfigError(f"config file {path} cannot be read ({error.strerror}).") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not valid TOML: it is not UTF-8 text.") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path} is not valid TOML: {error}.") from None


def load_preset_file(path: str | Path) -> Preset:
    path = Path(path)
    data = read_toml(path)
    unknown = set(data) - {"tokenizer", "model"}
    if unknown:
        raise ConfigError(
            f"{path} has unknown top-level keys {sorted(unknown)}; expected 'tokenizer' and [model]."
        )
    if "model" not in data:
        raise ConfigError(f"{path} has no [model] table.")
    model_table = {"name": path.stem, **data["model"]}
    model = parse_model_config(model_table, source=f"[model] in {path.name}")
    tokenizer = data.get("tokenizer", "bytes")
    if not isinstance(tokenizer, str):
        raise ConfigError(f"'tokenizer' in {path} must be a string.")
    return Preset(name=path.stem, model=model, tokenizer=tokenizer)


def load_preset(name: str) -> Preset:
    """Load a preset by name (see `list_presets()`), or from a path to a .toml file."""
    if name.endswith(".toml") or "/" in name:
        return load_preset_file(name)
    path = PRESET_DIR / f"{name}.toml"
    if not path.exists():
        raise ConfigError(
            f"unknown preset '{name}'; available presets: {', '.join(list_presets())}."
        )
    return load_preset_file(path)
