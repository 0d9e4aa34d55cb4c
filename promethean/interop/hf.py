"""Read and write Hugging Face model directories (GPT-2, LLaMA, Gemma-3 text) without transformers.

An HF model directory is a `config.json` plus weights in `model.safetensors` (or shards listed in
`model.safetensors.index.json`). `import_hf` turns one into a `ModelConfig` and a state dict that
`Transformer(config).load_state_dict(state, strict=True)` accepts; `export_hf` writes the reverse,
which `transformers.AutoModelForCausalLM.from_pretrained` loads. Only checkpoints whose computation
our `Transformer` reproduces exactly are accepted: anything else (rope scaling, logit softcapping,
another activation, ...) is refused with a sentence rather than converted approximately.

Weights are never unpickled, so `pytorch_model.bin` checkpoints are refused.

Differences in layout handled here:
- GPT-2 stores its projections as `Conv1D` weights, shaped (in, out) — the transpose of
  `nn.Linear` — and fuses the query, key and value projections into one `c_attn` along the output.
- Gemma's RMSNorm multiplies by (1 + weight) with weight initialised to 0; ours multiplies by the
  weight itself, so Gemma norm weights are shifted by one on the way in and out.
- Tied embeddings: the output head is stored once (safetensors refuses tensors sharing memory), and
  a tied checkpoint that also carries `lm_head.weight` (older GPT-2 files) has it ignored, as
  transformers does.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file, save_file

from promethean.config import ModelConfig, parse_model_config
from promethean.errors import CheckpointError, ConfigError
from promethean.files import atomic_directory
from promethean.model.transformer import Transformer

__all__ = ["export_hf", "hf_config_to_model_config", "import_hf", "model_config_to_hf"]

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
PICKLED_WEIGHT_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json")

# HF activation names that compute exactly what our MLP computes.
TANH_GELU_ACTIVATIONS = ("gelu_pytorch_tanh", "gelu_new")
SILU_ACTIVATIONS = ("silu", "swish")
# transformers' "gelu" is the exact (erf) GELU, our mlp = "gelu_exact" (nanoGPT's nn.GELU()).
EXACT_GELU_ACTIVATION = "gelu"
# What export writes: gelu_pytorch_tanh is literally F.gelu(approximate="tanh"), as in our MLP.
EXPORTED_TANH_GELU = "gelu_pytorch_tanh"

# transformers' class defaults for the keys read below, so that a config.json that leaves a key
# out means here what it means to transformers (configs written by hand or by old versions do).
GPT2_DEFAULTS: dict[str, Any] = {
    "vocab_size": 50257,
    "n_positions": 1024,
    "n_embd": 768,
    "n_layer": 12,
    "n_head": 12,
    "n_inner": None,
    "activation_function": "gelu_new",
    "layer_norm_epsilon": 1e-5,
    "scale_attn_weights": True,
    "scale_attn_by_inverse_layer_idx": False,
    "add_cross_attention": False,
    "tie_word_embeddings": True,
}
LLAMA_DEFAULTS: dict[str, Any] = {
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": None,
    "head_dim": None,
    "hidden_act": "silu",
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10_000.0,
    "attention_bias": False,
    "mlp_bias": False,
    "tie_word_embeddings": False,
}
GEMMA3_DEFAULTS: dict[str, Any] = {
    "vocab_size": 262_208,
    "hidden_size": 2304,
    "intermediate_size": 9216,
    "num_hidden_layers": 26,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 256,
    "hidden_activation": "gelu_pytorch_tanh",
    "max_position_embeddings": 131_072,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1_000_000.0,
    "rope_local_base_freq": 10_000.0,
    "attention_bias": False,
    "query_pre_attn_scalar": 256,
    "sliding_window": 4096,
    "sliding_window_pattern": 6,
    "layer_types": None,
    "final_logit_softcapping": None,
    "attn_logit_softcapping": None,
    "use_bidirectional_attention": False,
    "tie_word_embeddings": True,
}

GLOBAL_LAYER_TYPE = "full_attention"
SLIDING_LAYER_TYPE = "sliding_attention"

# The HF class of each model_type: what export declares and import expects.
ARCHITECTURES = {
    "gpt2": "GPT2LMHeadModel",
    "llama": "LlamaForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
    "gemma3": "Gemma3ForConditionalGeneration",
}
# Import also takes a multimodal Gemma-3 whose config names its text-only class.
IMPORTABLE_ARCHITECTURES = {
    **{model_type: (name,) for model_type, name in ARCHITECTURES.items()},
    "gemma3": ("Gemma3ForConditionalGeneration", "Gemma3ForCausalLM"),
}


# ------------------------------------------------------------------------------ config: HF -> ours
def hf_config_to_model_config(hf_config: Mapping[str, Any], name: str = "hf") -> ModelConfig:
    """The `ModelConfig` equivalent to an HF `config.json` mapping, or a `ConfigError` sentence."""
    model_type = hf_config.get("model_type")
    if model_type not in ARCHITECTURES:
        raise ConfigError(
            f"model_type {model_type!r} is not supported; supported types are "
            f"{', '.join(sorted(ARCHITECTURES))}."
        )
    _check_architecture(hf_config)
    if model_type == "gpt2":
        fields = _gpt2_fields(hf_config)
    elif model_type == "llama":
        fields = _llama_fields(hf_config)
    else:
        fields = _gemma3_fields(_gemma3_text_config(hf_config))
    return parse_model_config({"name": name, **fields}, source=f"the {model_type} config")


def _check_architecture(hf_config: Mapping[str, Any]) -> None:
    """Sequence-classification or bare-backbone checkpoints have no language-model head."""
    accepted = IMPORTABLE_ARCHITECTURES[hf_config["model_type"]]
    declared = hf_config.get("architectures")
    if declared and not set(accepted) & set(declared):
        raise ConfigError(
            f"config.json declares architectures {declared}, but only {' or '.join(accepted)} "
            f"checkpoints of model_type {hf_config['model_type']!r} can be imported."
        )


def _with_defaults(hf_config: Mapping[str, Any], defaults: Mapping[str, Any]) -> dict[str, Any]:
    return {**defaults, **{key: value for key, value in hf_config.items() if key in defaults}}


def _refuse_unless(condition: bool, sentence: str) -> None:
    if not condition:
        raise ConfigError(sentence)


def _gpt2_fields(hf_config: Mapping[str, Any]) -> dict[str, Any]:
    c = _with_defaults(hf_config, GPT2_DEFAULTS)
    _refuse_unless(
        c["activation_function"] in (*TANH_GELU_ACTIVATIONS, EXACT_GELU_ACTIVATION),
        f"GPT-2 activation_function {c['activation_function']!r} is not supported; only GELU, "
        f"exact ({EXACT_GELU_ACTIVATION}) or in its tanh approximation "
        f"({', '.join(TANH_GELU_ACTIVATIONS)}), is.",
    )
    _refuse_unless(
        c["scale_attn_weights"] and not c["scale_attn_by_inverse_layer_idx"],
        "GPT-2 attention must be scaled by 1/sqrt(head size) only (scale_attn_weights = true, "
        "scale_attn_by_inverse_layer_idx = false).",
    )
    _refuse_unless(not c["add_cross_attention"], "GPT-2 with cross-attention is not supported.")
    n_embd = int(c["n_embd"])
    return {
        "vocab_size": int(c["vocab_size"]),
        "context_length": int(c["n_positions"]),
        "n_layer": int(c["n_layer"]),
        "n_embd": n_embd,
        "n_head": int(c["n_head"]),
        "d_ff": int(c["n_inner"]) if c["n_inner"] is not None else 4 * n_embd,
        "mlp": "gelu_exact" if c["activation_function"] == EXACT_GELU_ACTIVATION else "gelu",
        "norm": "layernorm",
        "norm_eps": float(c["layer_norm_epsilon"]),
        "bias": True,
        "position": "learned",
        "tie_embeddings": bool(c["tie_word_embeddings"]),
    }


def _gated_mlp_kind(activation: str, family: str) -> str:
    if activation in SILU_ACTIVATIONS:
        return "swiglu"
    if activation in TANH_GELU_ACTIVATIONS:
        return "geglu_tanh"
    raise ConfigError(
        f"{family} activation {activation!r} is not supported; supported activations are "
        f"{', '.join(SILU_ACTIVATIONS + TANH_GELU_ACTIVATIONS)}."
    )


def _plain_rope_theta(settings: Mapping[str, Any], fallback_theta: Any, where: str) -> float:
    """The base of an unscaled RoPE described by `settings` (a rope_parameters-style dict)."""
    rope_type = settings.get("rope_type", settings.get("type", "default"))
    _refuse_unless(
        rope_type == "default",
        f"{where} uses rope type {rope_type!r}; only plain RoPE (type 'default') is supported.",
    )
    return float(settings.get("rope_theta", fallback_theta))


def _llama_fields(hf_config: Mapping[str, Any]) -> dict[str, Any]:
    c = _with_defaults(hf_config, LLAMA_DEFAULTS)
    # transformers 5 keeps RoPE settings in `rope_parameters`; older configs have `rope_theta` and
    # `rope_scaling`. As in transformers, a `rope_scaling` entry takes precedence.
    rope_settings = hf_config.get("rope_scaling") or hf_config.get("rope_parameters") or {}
    _refuse_unless(
        isinstance(rope_settings, Mapping),
        "LLaMA rope_parameters must be a single table of settings.",
    )
    rope_theta = _plain_rope_theta(rope_settings, c["rope_theta"], "the LLaMA config")
    _refuse_unless(
        bool(c["attention_bias"]) == bool(c["mlp_bias"]),
        "LLaMA configs with attention_bias different from mlp_bias are not supported; "
        "our models have biases on all projections or on none.",
    )
    n_embd, n_head = int(c["hidden_size"]), int(c["num_attention_heads"])
    head_dim = c["head_dim"]
    return {
        "vocab_size": int(c["vocab_size"]),
        "context_length": int(c["max_position_embeddings"]),
        "n_layer": int(c["num_hidden_layers"]),
        "n_embd": n_embd,
        "n_head": n_head,
        "n_kv_head": _kv_heads(c["num_key_value_heads"], n_head),
        # Keep the default (None) when the head width is the usual one, so configs stay canonical.
        "head_dim": None if head_dim is None or int(head_dim) * n_head == n_embd else int(head_dim),
        "d_ff": int(c["intermediate_size"]),
        "mlp": _gated_mlp_kind(c["hidden_act"], "LLaMA"),
        "norm": "rmsnorm",
        "norm_eps": float(c["rms_norm_eps"]),
        "bias": bool(c["attention_bias"]),
        "position": "rope",
        "rope_theta": rope_theta,
        "tie_embeddings": bool(c["tie_word_embeddings"]),
    }


def _kv_heads(num_key_value_heads: Any, n_head: int) -> int | None:
    if num_key_value_heads is None or int(num_key_value_heads) == n_head:
        return None
    return int(num_key_value_heads)


def _gemma3_text_config(hf_config: Mapping[str, Any]) -> dict[str, Any]:
    """The text-model settings: the config itself, or the `text_config` of a multimodal Gemma-3."""
    if hf_config["model_type"] == "gemma3_text":
        return dict(hf_config)
    text_config = dict(hf_config.get("text_config") or {})
    # The multimodal config decides whether the output head is tied when its text part is silent.
    text_config.setdefault(
        "tie_word_embeddings",
        hf_config.get("tie_word_embeddings", GEMMA3_DEFAULTS["tie_word_embeddings"]),
    )
    return text_config


def _gemma3_fields(text_config: Mapping[str, Any]) -> dict[str, Any]:
    c = _with_defaults(text_config, GEMMA3_DEFAULTS)
    for key in ("final_logit_softcapping", "attn_logit_softcapping"):
        _refuse_unless(c[key] is None, f"Gemma-3 configs with {key} set are not supported.")
    _refuse_unless(
        not c["use_bidirectional_attention"],
        "Gemma-3 with bidirectional attention is not supported; only causal language models are.",
    )
    _refuse_unless(
        not c["attention_bias"],
        "Gemma-3 with attention_bias is not supported, since its MLP would still have no bias.",
    )
    n_layer = int(c["num_hidden_layers"])
    layer_types = c["layer_types"]
    if layer_types is None:
        # Older configs give only a period: every `pattern`-th layer attends globally.
        pattern = int(c["sliding_window_pattern"])
        layer_types = [
            GLOBAL_LAYER_TYPE if (layer + 1) % pattern == 0 else SLIDING_LAYER_TYPE
            for layer in range(n_layer)
        ]
    unknown = set(layer_types) - {GLOBAL_LAYER_TYPE, SLIDING_LAYER_TYPE}
    _refuse_unless(not unknown, f"Gemma-3 layer types {sorted(unknown)} are not supported.")
    _refuse_unless(
        len(layer_types) == n_layer,
        f"Gemma-3 layer_types lists {len(layer_types)} layers but num_hidden_layers is {n_layer}.",
    )
    global_theta, local_theta = _gemma3_rope_thetas(text_config, c)

    global_layers = tuple(i for i, kind in enumerate(layer_types) if kind == GLOBAL_LAYER_TYPE)
    has_sliding_layers = len(global_layers) < n_layer
    if has_sliding_layers:
        _refuse_unless(
            c["sliding_window"] is not None,
            "the Gemma-3 config has sliding-window layers but no sliding_window.",
        )
    n_embd, n_head = int(c["hidden_size"]), int(c["num_attention_heads"])
    return {
        "vocab_size": int(c["vocab_size"]),
        "context_length": int(c["max_position_embeddings"]),
        "n_layer": n_layer,
        "n_embd": n_embd,
        "n_head": n_head,
        "n_kv_head": _kv_heads(c["num_key_value_heads"], n_head),
        "head_dim": int(c["head_dim"]),
        "d_ff": int(c["intermediate_size"]),
        "mlp": _gated_mlp_kind(c["hidden_activation"], "Gemma-3"),
        "norm": "rmsnorm",
        "norm_eps": float(c["rms_norm_eps"]),
        "sandwich_norm": True,
        "norm_unit_offset": True,
        "bias": False,
        "position": "rope",
        "rope_theta": global_theta,
        "rope_local_theta": (
            local_theta if has_sliding_layers and local_theta != global_theta else None
        ),
        # A window at least as long as the context never drops a key for sequences that fit in
        # the context, which is all we run, so it is the context length exactly.
        "sliding_window": (
            min(int(c["sliding_window"]), int(c["max_position_embeddings"]))
            if has_sliding_layers
            else None
        ),
        # Our None means "every layer slides", so an all-sliding model lists no global layer.
        "global_layers": global_layers if has_sliding_layers and global_layers else None,
        "qk_norm": True,
        "query_pre_attn_scalar": float(c["query_pre_attn_scalar"]),
        "embedding_scale": True,
        "tie_embeddings": bool(c["tie_word_embeddings"]),
    }


def _gemma3_rope_thetas(
    text_config: Mapping[str, Any], c: Mapping[str, Any]
) -> tuple[float, float]:
    """(global, local) RoPE bases from either transformers 5's per-layer-type `rope_parameters`
    or the older `rope_theta` / `rope_local_base_freq` / `rope_scaling` keys."""
    rope_parameters = text_config.get("rope_parameters") or {}
    per_type_keys = {GLOBAL_LAYER_TYPE, SLIDING_LAYER_TYPE}
    _refuse_unless(
        isinstance(rope_parameters, Mapping) and set(rope_parameters) <= per_type_keys,
        "Gemma-3 rope_parameters must be given per layer type ('full_attention', "
        "'sliding_attention').",
    )
    global_settings = dict(rope_parameters.get(GLOBAL_LAYER_TYPE) or {})
    # Older configs' `rope_scaling` applies to the global layers only, as in transformers.
    global_settings.update(text_config.get("rope_scaling") or {})
    local_settings = rope_parameters.get(SLIDING_LAYER_TYPE) or {}
    global_theta = _plain_rope_theta(
        global_settings, c["rope_theta"], "the Gemma-3 config (global layers)"
    )
    local_theta = _plain_rope_theta(
        local_settings, c["rope_local_base_freq"], "the Gemma-3 config (sliding layers)"
    )
    return global_theta, local_theta


# ------------------------------------------------------------------------------ config: ours -> HF
def _family_of(config: ModelConfig) -> str:
    """The HF model_type a config is exported as; `_problems_for` says whether it fits."""
    if config.position == "learned":
        return "gpt2"
    if config.sandwich_norm or config.qk_norm or config.embedding_scale:
        return "gemma3_text"
    return "llama"


def _problems_for(config: ModelConfig, family: str) -> list[str]:
    """What in `config` the HF family cannot express (empty when the export is exact)."""
    problems = []

    def require(condition: bool, problem: str) -> None:
        if not condition:
            problems.append(problem)

    default_scale = config.query_pre_attn_scalar in (None, float(config.head_size))
    if family == "gpt2":
        require(
            config.mlp in ("gelu", "gelu_exact"), f"mlp = '{config.mlp}' (GPT-2 has a plain GELU MLP)"
        )
        require(config.norm == "layernorm", "norm = 'rmsnorm' (GPT-2 uses LayerNorm)")
        require(config.bias, "bias = false (GPT-2 has biases everywhere)")
        require(config.kv_heads == config.n_head, "grouped-query attention")
        require(config.head_size * config.n_head == config.n_embd, "head_dim != n_embd / n_head")
        require(config.sliding_window is None, "a sliding window")
        require(not config.qk_norm, "QK-norm")
        require(not config.sandwich_norm, "sandwich norms")
        require(not config.embedding_scale, "embedding scaling")
        require(default_scale, "query_pre_attn_scalar != head size")
    elif family == "llama":
        require(config.gated_mlp, "an ungated GELU MLP with RoPE (LLaMA's MLP is gated)")
        require(config.norm == "rmsnorm", "norm = 'layernorm' (LLaMA uses RMSNorm)")
        require(not config.norm_unit_offset, "(1 + weight) norms (LLaMA's gain is the weight)")
        require(config.sliding_window is None, "a sliding window without Gemma-3's other features")
        require(default_scale, "query_pre_attn_scalar != head size")
    else:
        require(
            config.sandwich_norm and config.qk_norm and config.embedding_scale,
            "only some of Gemma-3's sandwich norms, QK-norm and embedding scaling "
            "(it has all three)",
        )
        require(config.gated_mlp, "an ungated GELU MLP (Gemma-3's MLP is gated)")
        require(config.norm == "rmsnorm", "norm = 'layernorm' (Gemma-3 uses RMSNorm)")
        require(not config.bias, "bias = true (Gemma-3's MLP has no biases)")
        scalar = config.query_pre_attn_scalar or config.head_size
        # transformers validates query_pre_attn_scalar as an int.
        require(float(scalar).is_integer(), "a fractional query_pre_attn_scalar")
    return problems


def model_config_to_hf(
    config: ModelConfig,
    dtype: torch.dtype = torch.float32,
    special_token_ids: Mapping[str, int | None] | None = None,
) -> dict[str, Any]:
    """The HF `config.json` mapping for `config`, or a `ConfigError` naming what HF cannot express.

    `special_token_ids` may give bos_token_id / eos_token_id / pad_token_id; they default to None
    because the tokenizer is not part of the model config.
    """
    if config.ssm_layers:
        raise ConfigError(
            f"this model cannot be exported to HF transformers: its selective state-space (SSM) "
            f"layers {config.ssm_layers} have no counterpart in the GPT-2, LLaMA or Gemma-3 "
            "layouts; keep it as a Promethean checkpoint."
        )
    family = _family_of(config)
    problems = _problems_for(config, family)
    if problems:
        raise ConfigError(
            f"this model cannot be exported as an HF {family} model, which cannot express: "
            + "; ".join(problems)
            + "."
        )
    tokens = {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
    unknown = set(special_token_ids or {}) - set(tokens)
    if unknown:
        raise ConfigError(f"special_token_ids only takes {sorted(tokens)}, not {sorted(unknown)}.")
    tokens.update(special_token_ids or {})
    dtype_name = str(dtype).removeprefix("torch.")
    common = {
        "architectures": [ARCHITECTURES[family]],
        "model_type": family,
        # transformers 5 reads `dtype`; earlier versions read `torch_dtype`.
        "dtype": dtype_name,
        "torch_dtype": dtype_name,
        "vocab_size": config.vocab_size,
        "tie_word_embeddings": config.tie_embeddings,
        "initializer_range": config.init_std,
        **tokens,
    }
    if family == "gpt2":
        return {
            **common,
            "n_positions": config.context_length,
            "n_embd": config.n_embd,
            "n_layer": config.n_layer,
            "n_head": config.n_head,
            "n_inner": config.d_ff,
            "activation_function": (
                EXACT_GELU_ACTIVATION if config.mlp == "gelu_exact" else EXPORTED_TANH_GELU
            ),
            "layer_norm_epsilon": config.norm_eps,
            "resid_pdrop": config.dropout,
            "embd_pdrop": config.dropout,
            "attn_pdrop": config.dropout,
            "scale_attn_weights": True,
            "scale_attn_by_inverse_layer_idx": False,
            "reorder_and_upcast_attn": False,
        }
    gated = {
        **common,
        "hidden_size": config.n_embd,
        "intermediate_size": config.d_ff,
        "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head,
        "num_key_value_heads": config.kv_heads,
        "head_dim": config.head_size,
        "max_position_embeddings": config.context_length,
        "rms_norm_eps": config.norm_eps,
        "attention_bias": config.bias,
        "attention_dropout": config.dropout,
    }
    activation = "silu" if config.mlp == "swiglu" else EXPORTED_TANH_GELU
    if family == "llama":
        return {
            **gated,
            "hidden_act": activation,
            "mlp_bias": config.bias,
            # Both spellings: transformers 5 reads rope_parameters, earlier versions rope_theta.
            "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
            "rope_theta": config.rope_theta,
        }
    local_theta = config.rope_local_theta or config.rope_theta
    layer_types = [
        SLIDING_LAYER_TYPE if config.is_sliding_layer(layer) else GLOBAL_LAYER_TYPE
        for layer in range(config.n_layer)
    ]
    return {
        **gated,
        "hidden_activation": activation,
        "query_pre_attn_scalar": int(config.query_pre_attn_scalar or config.head_size),
        # transformers builds a sliding-window mask even when no layer uses it and fails without a
        # window; with every layer global the value is never applied, so the context length does.
        "sliding_window": config.sliding_window or config.context_length,
        "layer_types": layer_types,
        "rope_parameters": {
            GLOBAL_LAYER_TYPE: {"rope_type": "default", "rope_theta": config.rope_theta},
            SLIDING_LAYER_TYPE: {"rope_type": "default", "rope_theta": local_theta},
        },
        # Older transformers versions read these instead of rope_parameters.
        "rope_theta": config.rope_theta,
        "rope_local_base_freq": local_theta,
        "final_logit_softcapping": None,
        "attn_logit_softcapping": None,
        "use_bidirectional_attention": False,
    }


# ------------------------------------------------------------------------------ tensor layout
@dataclass(frozen=True)
class TensorLink:
    """One HF tensor and the tensor(s) of ours it holds.

    `ours` has several names when HF fuses tensors that we keep apart (GPT-2's c_attn holds the
    query, key and value projections, concatenated along the output dimension)."""

    hf_name: str
    ours: tuple[str, ...]
    # conv1d: stored (in, out), transposed from nn.Linear; unit_offset_norm: HF multiplies by
    # (1 + weight), we by the weight.
    transform: Literal["copy", "conv1d", "unit_offset_norm"] = "copy"


def _tensor_links(config: ModelConfig, family: str) -> list[TensorLink]:
    """Every tensor of the HF checkpoint, in HF's canonical (CausalLM) naming."""
    if family == "gpt2":
        return _gpt2_links(config)
    return _gated_links(config, gemma=family == "gemma3_text")


def _gpt2_links(config: ModelConfig) -> list[TensorLink]:
    links = [
        TensorLink("transformer.wte.weight", ("token_embedding.weight",)),
        TensorLink("transformer.wpe.weight", ("position_embedding.weight",)),
    ]
    for i in range(config.n_layer):
        hf, ours = f"transformer.h.{i}", f"blocks.{i}"
        for kind in ("weight", "bias"):
            links += [
                TensorLink(f"{hf}.ln_1.{kind}", (f"{ours}.attn_norm.{kind}",)),
                TensorLink(
                    f"{hf}.attn.c_attn.{kind}",
                    tuple(f"{ours}.attn.{p}_proj.{kind}" for p in ("q", "k", "v")),
                    "conv1d",
                ),
                TensorLink(f"{hf}.attn.c_proj.{kind}", (f"{ours}.attn.o_proj.{kind}",), "conv1d"),
                TensorLink(f"{hf}.ln_2.{kind}", (f"{ours}.mlp_norm.{kind}",)),
                TensorLink(f"{hf}.mlp.c_fc.{kind}", (f"{ours}.mlp.up_proj.{kind}",), "conv1d"),
                TensorLink(f"{hf}.mlp.c_proj.{kind}", (f"{ours}.mlp.down_proj.{kind}",), "conv1d"),
            ]
    links += [
        TensorLink(f"transformer.ln_f.{kind}", (f"final_norm.{kind}",))
        for kind in ("weight", "bias")
    ]
    if not config.tie_embeddings:
        links.append(TensorLink("lm_head.weight", ("lm_head.weight",)))
    return links


def _gated_links(config: ModelConfig, gemma: bool) -> list[TensorLink]:
    # Gemma stores (gain - 1); a config already in that form copies its norms unchanged.
    norm = "unit_offset_norm" if gemma and not config.norm_unit_offset else "copy"
    kinds = ("weight", "bias") if config.bias else ("weight",)
    links = [TensorLink("model.embed_tokens.weight", ("token_embedding.weight",))]
    for i in range(config.n_layer):
        hf, ours = f"model.layers.{i}", f"blocks.{i}"
        links.append(
            TensorLink(f"{hf}.input_layernorm.weight", (f"{ours}.attn_norm.weight",), norm)
        )
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            links += [
                TensorLink(f"{hf}.self_attn.{proj}.{kind}", (f"{ours}.attn.{proj}.{kind}",))
                for kind in kinds
            ]
        for proj in ("gate_proj", "up_proj", "down_proj"):
            links += [
                TensorLink(f"{hf}.mlp.{proj}.{kind}", (f"{ours}.mlp.{proj}.{kind}",))
                for kind in kinds
            ]
        if gemma:
            # Gemma's post_attention_layernorm normalises the attention output (our
            # attn_post_norm); LLaMA's of the same name is the pre-MLP norm (our mlp_norm).
            links += [
                TensorLink(f"{hf}.self_attn.q_norm.weight", (f"{ours}.attn.q_norm.weight",), norm),
                TensorLink(f"{hf}.self_attn.k_norm.weight", (f"{ours}.attn.k_norm.weight",), norm),
                TensorLink(
                    f"{hf}.post_attention_layernorm.weight",
                    (f"{ours}.attn_post_norm.weight",),
                    norm,
                ),
                TensorLink(
                    f"{hf}.pre_feedforward_layernorm.weight", (f"{ours}.mlp_norm.weight",), norm
                ),
                TensorLink(
                    f"{hf}.post_feedforward_layernorm.weight",
                    (f"{ours}.mlp_post_norm.weight",),
                    norm,
                ),
            ]
        else:
            links.append(
                TensorLink(f"{hf}.post_attention_layernorm.weight", (f"{ours}.mlp_norm.weight",))
            )
    links.append(TensorLink("model.norm.weight", ("final_norm.weight",), norm))
    if not config.tie_embeddings:
        links.append(TensorLink("lm_head.weight", ("lm_head.weight",)))
    return links


def _expected_state_shapes(config: ModelConfig) -> dict[str, torch.Size]:
    """Names and shapes of `Transformer(config).state_dict()`, without allocating any memory."""
    with torch.device("meta"):
        model = Transformer(config)
    return {name: tensor.shape for name, tensor in model.state_dict().items()}


# ------------------------------------------------------------------------------ import
def import_hf(path: str | os.PathLike[str]) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Read an HF model directory into a config and a state dict for `Transformer(config)`.

    Tensors keep the checkpoint's dtype, except Gemma norm weights, which are shifted by one in
    float32 so that the shift loses no precision. Dropout is left at 0 (HF's training-time dropout
    rates are not carried over).
    """
    directory = Path(path)
    if not directory.is_dir():
        raise CheckpointError(f"{directory} is not a directory holding an HF model.")
    hf_config = _read_hf_config(directory)
    config = hf_config_to_model_config(hf_config, name=directory.resolve().name)
    family = "gemma3_text" if hf_config["model_type"] == "gemma3" else hf_config["model_type"]
    hf_tensors = _canonical_names(_read_weights(directory), family)

    state: dict[str, torch.Tensor] = {}
    for link in _tensor_links(config, family):
        if link.hf_name not in hf_tensors:
            raise CheckpointError(f"the checkpoint in {directory} has no tensor '{link.hf_name}'.")
        state.update(_to_ours(hf_tensors.pop(link.hf_name), link))
    if config.tie_embeddings:
        # A tied checkpoint may still carry the head; transformers ignores it, and so do we.
        hf_tensors.pop("lm_head.weight", None)
        state["lm_head.weight"] = state["token_embedding.weight"]
    if hf_tensors:
        unexpected = ", ".join(sorted(hf_tensors)[:5])
        raise CheckpointError(
            f"the checkpoint in {directory} holds {len(hf_tensors)} tensors that a "
            f"{ARCHITECTURES[family]} with this config does not have (e.g. {unexpected})."
        )
    _check_shapes(state, config, f"the checkpoint in {directory}")
    return config, state


def _read_hf_config(directory: Path) -> dict[str, Any]:
    config_path = directory / CONFIG_FILE
    if not config_path.is_file():
        raise CheckpointError(
            f"{directory} has no {CONFIG_FILE}; an HF model directory needs one beside its weights."
        )
    try:
        hf_config = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{config_path} is not valid JSON: {error}.") from None
    if not isinstance(hf_config, dict):
        raise CheckpointError(f"{config_path} must hold a JSON object.")
    return hf_config


def _read_weights(directory: Path) -> dict[str, torch.Tensor]:
    single, index = directory / WEIGHTS_FILE, directory / WEIGHTS_INDEX_FILE
    if single.is_file():
        return load_file(single)
    if index.is_file():
        return _read_sharded_weights(directory, index)
    if any((directory / name).is_file() for name in PICKLED_WEIGHT_FILES):
        raise CheckpointError(
            f"{directory} holds only PyTorch pickle weights (pytorch_model.bin), but only "
            f"safetensors weights ({WEIGHTS_FILE}) are supported, because loading a pickle can "
            "run arbitrary code."
        )
    raise CheckpointError(f"{directory} has neither {WEIGHTS_FILE} nor {WEIGHTS_INDEX_FILE}.")


def _read_sharded_weights(directory: Path, index: Path) -> dict[str, torch.Tensor]:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        raise CheckpointError(
            f"{index} is not a valid safetensors index (no 'weight_map')."
        ) from None
    tensors: dict[str, torch.Tensor] = {}
    for shard_name in sorted(set(weight_map.values())):
        shard = directory / shard_name
        # The index names files relative to the directory; anything else is not ours to read.
        if shard.parent.resolve() != directory.resolve() or not shard.is_file():
            raise CheckpointError(f"{index} lists a shard '{shard_name}' that {directory} lacks.")
        tensors.update(load_file(shard))
    missing = set(weight_map) - set(tensors)
    if missing:
        raise CheckpointError(
            f"the shards in {directory} lack {len(missing)} tensors their index lists "
            f"(e.g. {sorted(missing)[0]})."
        )
    return tensors


# Buffers some checkpoints carry that hold no learned state: GPT-2's causal-mask buffers and old
# LLaMA checkpoints' rotary frequencies (we compute both from the config).
_REDUNDANT_SUFFIXES = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")
# A multimodal Gemma-3 checkpoint also holds an image encoder, which a text model leaves behind.
_VISION_PREFIXES = (
    "vision_tower.",
    "multi_modal_projector.",
    "model.vision_tower.",
    "model.multi_modal_projector.",
)
# Where each layout keeps the text model, mapped to the CausalLM naming of `_tensor_links`.
_TEXT_MODEL_PREFIXES = {
    "model.language_model.": "model.",  # transformers 5 Gemma3ForConditionalGeneration
    "language_model.model.": "model.",  # transformers 4 Gemma3ForConditionalGeneration
    "language_model.lm_head.": "lm_head.",
}


def _canonical_names(tensors: dict[str, torch.Tensor], family: str) -> dict[str, torch.Tensor]:
    """Rename a checkpoint's tensors to the CausalLM naming and drop ones without learned state."""
    renamed = {}
    for name, tensor in tensors.items():
        if name.endswith(_REDUNDANT_SUFFIXES) or name.startswith(_VISION_PREFIXES):
            continue
        for prefix, canonical in _TEXT_MODEL_PREFIXES.items():
            if name.startswith(prefix):
                name = canonical + name.removeprefix(prefix)
                break
        # GPT-2 files saved from the bare GPT2Model (the original release) lack the prefix.
        if family == "gpt2" and not name.startswith(("transformer.", "lm_head.")):
            name = "transformer." + name
        renamed[name] = tensor
    return renamed


def _to_ours(tensor: torch.Tensor, link: TensorLink) -> dict[str, torch.Tensor]:
    if link.transform == "conv1d" and tensor.ndim == 2:
        tensor = tensor.t()
    elif link.transform == "unit_offset_norm":
        tensor = tensor.float() + 1.0
    if len(link.ours) == 1:
        return {link.ours[0]: tensor.contiguous()}
    # Parts of a fused tensor are views of one buffer; copies let the state dict be saved (which
    # safetensors refuses for tensors sharing memory) or edited one tensor at a time.
    parts = tensor.chunk(len(link.ours), dim=0)
    return {name: part.clone() for name, part in zip(link.ours, parts, strict=True)}


def _check_shapes(state: Mapping[str, torch.Tensor], config: ModelConfig, what: str) -> None:
    expected = _expected_state_shapes(config)
    missing = sorted(set(expected) - set(state))
    if missing:
        raise CheckpointError(
            f"{what} lacks {len(missing)} tensors of the model (e.g. {missing[0]})."
        )
    extra = sorted(set(state) - set(expected))
    if extra:
        raise CheckpointError(f"{what} holds tensors the model does not have (e.g. {extra[0]}).")
    for name, shape in expected.items():
        if state[name].shape != shape:
            raise CheckpointError(
                f"{what} gives {name} the shape {tuple(state[name].shape)}, but the config "
                f"implies {tuple(shape)}."
            )


# ------------------------------------------------------------------------------ export
def export_hf(
    source: Transformer | tuple[ModelConfig, Mapping[str, torch.Tensor]],
    out_dir: str | os.PathLike[str],
    *,
    dtype: torch.dtype | None = None,
    special_token_ids: Mapping[str, int | None] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a model as an HF directory (config.json + model.safetensors) and return its path.

    `source` is a `Transformer` or a (config, state dict) pair. Tensors are written in `dtype`
    (default: as they are). The directory appears complete or not at all: it is written next to
    `out_dir` under a temporary name and renamed into place. An existing non-empty `out_dir` is
    refused unless `overwrite` is true.
    """
    if isinstance(source, Transformer):
        config, state = source.config, source.state_dict()
    else:
        config, state = source
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite and not (out_dir.is_dir() and not any(out_dir.iterdir())):
        raise CheckpointError(f"{out_dir} already exists; pass overwrite=True to replace it.")

    _check_shapes(state, config, "the state dict to export")
    head, embedding = state["lm_head.weight"], state["token_embedding.weight"]
    if config.tie_embeddings and head is not embedding and not torch.equal(head, embedding):
        raise CheckpointError(
            "the config ties the output head to the token embeddings, but the state dict gives "
            "them different values."
        )
    # The config first: it refuses what HF cannot express before any tensor is converted.
    hf_config = model_config_to_hf(config, dtype or embedding.dtype, special_token_ids)
    hf_tensors = _hf_tensors(state, config, _family_of(config), dtype)

    out_dir.parent.mkdir(parents=True, exist_ok=True)

    with atomic_directory(out_dir) as staging:
        save_file(hf_tensors, staging / WEIGHTS_FILE, metadata={"format": "pt"})
        (staging / CONFIG_FILE).write_text(json.dumps(hf_config, indent=2) + "\n", "utf-8")
    return out_dir


def _hf_tensors(
    state: Mapping[str, torch.Tensor], config: ModelConfig, family: str, dtype: torch.dtype | None
) -> dict[str, torch.Tensor]:
    hf_tensors = {}
    seen_storages: set[int] = set()
    for link in _tensor_links(config, family):
        parts = [state[name].detach().cpu() for name in link.ours]
        tensor = torch.cat(parts, dim=0) if len(parts) > 1 else parts[0]
        if link.transform == "conv1d" and tensor.ndim == 2:
            tensor = tensor.t()
        elif link.transform == "unit_offset_norm":
            tensor = tensor.float() - 1.0
        tensor = tensor.to(dtype or parts[0].dtype).contiguous()
        # safetensors refuses tensors that share memory (views of one buffer in a hand-made state
        # dict); such a tensor gets a copy of its own.
        storage = tensor.untyped_storage().data_ptr()
        if storage in seen_storages:
            tensor = tensor.clone()
        seen_storages.add(tensor.untyped_storage().data_ptr())
        hf_tensors[link.hf_name] = tensor
    return hf_tensors
