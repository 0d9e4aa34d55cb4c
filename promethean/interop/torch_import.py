"""Import the PyTorch checkpoints (`.pt` files) of the systems Promethean absorbs, without running
any pickled code.

Four layouts are known, each written by its system's own `torch.save`:
- nanogpt: nanoGPT's `ckpt.pt` ({"model", "model_args", "iter_num", "optimizer", ...}), the GPT-2
  chat card's bare state dict `gpt2_nano.pt`, and its `finetuned_*.pt` ({"model_state_dict",
  "config": a pickled GPTConfig object, ...}). nn.Linear weights (no Conv1D transpose), a fused
  c_attn, LayerNorm with optional bias, the exact (erf) GELU of nn.GELU(), tied head.
- gemma3-scratch: the TinyStories card's `best_model_params.pt`, the state dict of the Gemma-3 of
  "LLMs from scratch" (tok_emb, blocks.N.att.W_query/..., four RMSNorms per block storing
  `scale` for a gain of 1 + scale, fc1/fc2/fc3 GeGLU-tanh, out_head). No config is stored: the
  card's config is the default, shapes override it, and `--config` overrides both.
- minimac: MiniMacLLM's `model.pt` ({"model_state_dict", "config": {...}, "loss", "epoch"}), a
  LLaMA-style ContinualLLM (token_embedding, layers.N.attention.q_proj/..., feed_forward.w1/w2/w3,
  attention_norm/ffn_norm, norm, lm_head).
- state-dict: any other state dict, with a mapping TOML naming where each tensor goes.

Safety: a file is read by `torch.load(weights_only=True)`, PyTorch's restricted unpickler, which
builds tensors and plain containers only. A file that also pickles a config object (a GPTConfig
dataclass) is first scanned for the globals it names; a class called GPTConfig, ModelConfig or
Config (from any module) is rebuilt as a plain stand-in holding its fields, and any other global
is refused with a sentence naming it, before anything is unpickled. nanoGPT's `meta.pkl` is read
by an unpickler that refuses every global (it holds only dicts, ints and strings).

A mapping TOML (`--mapping`) names tensors as patterns with a `{layer}` placeholder:

    [model]                      # ModelConfig fields (needed for state-dict; optional otherwise)
    n_layer = 2
    ...
    [tensors]                    # our name = their name, or a table with a transform
    "token_embedding.weight" = "tok.weight"
    "blocks.{layer}.attn.q_proj.weight" = "layers.{layer}.wq.weight"
    "blocks.{layer}.attn_norm.weight" = { from = "layers.{layer}.n1.g", transform = "add_one" }
    ignore = ["layers.{layer}.rotary.freqs"]   # their tensors that hold no learned state

Entries of [tensors] replace the built-in link of the same tensor of ours, so a mapping also
adapts one of the four known layouts to a variant's names.
"""

from __future__ import annotations

import io
import json
import pickle
import re
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from promethean.config import ModelConfig, parse_model_config, read_toml
from promethean.errors import CheckpointError, ConfigError
from promethean.interop.hf import _check_shapes

__all__ = [
    "FORMATS",
    "TensorMapping",
    "TorchImport",
    "char_tokenizer_from_meta",
    "describe",
    "import_torch",
    "read_mapping",
    "read_meta_pkl",
    "read_torch_file",
]

FORMATS = ("nanogpt", "gemma3-scratch", "minimac", "state-dict")

# Config classes pickled whole by the systems we read (nanoGPT-style GPTConfig, MiniMacLLM's
# ModelConfig); any module, since they are pickled as `model.GPTConfig`, `__main__.GPTConfig`...
CONFIG_CLASS_NAMES = ("GPTConfig", "ModelConfig", "Config")
# torch.compile wraps a model; its state dict then prefixes every name.
COMPILED_PREFIX = "_orig_mod."

# The TinyStories card's Gemma-3 (seeds/002), the notebook's 270M config with the GPT-2 vocabulary.
GEMMA3_SCRATCH_DEFAULTS: dict[str, Any] = {
    "vocab_size": 50257,
    "context_length": 32768,
    "emb_dim": 640,
    "n_heads": 4,
    "n_layers": 18,
    "hidden_dim": 2048,
    "head_dim": 256,
    "qk_norm": True,
    "n_kv_groups": 1,
    "rope_local_base": 10_000.0,
    "rope_base": 1_000_000.0,
    "sliding_window": 512,
    "layer_types": None,  # None: five sliding layers, then a full one, repeated (the notebook's)
    "query_pre_attn_scalar": 256,
}
GEMMA3_SCRATCH_EPS = 1e-6  # every RMSNorm of the notebook
SLIDING, FULL = "sliding_attention", "full_attention"

# MiniMacLLM's ModelConfig defaults (src/model/llm.py), for keys a saved config leaves out.
MINIMAC_DEFAULTS: dict[str, Any] = {
    "vocab_size": 32000,
    "d_model": 512,
    "num_layers": 12,
    "num_query_heads": 8,
    "num_kv_heads": 2,
    "d_ff": 2048,
    "max_seq_len": 2048,
    "norm_type": "rmsnorm",
    "ff_type": "swiglu",
    "norm_eps": 1e-6,
    "bias": False,
    "rope_base": 10_000.0,
    "tie_embeddings": True,
}
NANOGPT_LAYER_NORM_EPS = 1e-5  # model.py: F.layer_norm(input, ..., 1e-5)
GPT2_HEAD_SIZE = 64  # GPT-2's convention, used when a bare state dict cannot say its head count

TRANSFORMS = ("copy", "add_one", "transpose")


# ------------------------------------------------------------------------------ safe reading
class PickledConfig:
    """What a pickled config object becomes: its fields, and nothing of its class's code."""

    def __init__(self, fields: Mapping[str, Any] | None = None) -> None:
        self.fields = dict(fields or {})

    def __setstate__(self, state: Any) -> None:
        # Unpickling makes the instance with __new__, so __init__ has not run.
        self.fields = getattr(self, "fields", {})
        # A dataclass pickles its __dict__; one with __slots__ pickles (None, slots).
        if isinstance(state, tuple) and len(state) == 2:
            merged: dict[str, Any] = {}
            for part in state:
                if isinstance(part, Mapping):
                    merged.update(part)
            state = merged
        if not isinstance(state, Mapping):
            raise CheckpointError("a pickled config object holds something other than fields.")
        self.fields.update(state)


def _refusal(path: Path, global_name: str) -> str:
    return f"{path} holds a pickled reference to {global_name}, which could run code; refused."


def read_torch_file(path: str | Path) -> Any:
    """What `torch.save` wrote to `path`, unpickled by PyTorch's weights-only unpickler; config
    objects come back as `PickledConfig`. Refuses, with a sentence, anything else."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} is not a file" + (
            " (it is a directory)." if path.is_dir() else "; give the .pt file to import."))
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        # A global beyond tensors and containers: find out which before loading again. (Other
        # unpickling failures are reported by PyTorch as this same error.)
        if "global" not in str(error).lower():
            raise CheckpointError(f"{path} is not a PyTorch checkpoint ({_first_line(error)}).") from None
    except Exception as error:  # a damaged or foreign file fails in many ways; all mean this
        raise CheckpointError(f"{path} is not a PyTorch checkpoint ({_first_line(error)}).") from None
    if not zipfile.is_zipfile(path):
        raise CheckpointError(
            f"{path} is in PyTorch's legacy (pre-1.6) format and pickles objects other than "
            "tensors, which cannot be checked without running them; refused."
        )
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except (RuntimeError, ValueError, pickle.UnpicklingError) as error:
        raise CheckpointError(f"{path} cannot be read safely ({_first_line(error)}).") from None
    stand_ins = []
    for name in names:
        if name.rsplit(".", 1)[-1] not in CONFIG_CLASS_NAMES:
            raise CheckpointError(_refusal(path, name))
        stand_ins.append((PickledConfig, name))
    try:
        with torch.serialization.safe_globals(stand_ins):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - whatever the unpickler raised, the file is refused
        # A config object built some other way than fields (a __reduce__ with arguments).
        raise CheckpointError(
            f"{path} pickles its config in a way that cannot be read as plain fields "
            f"({_first_line(error)}); refused."
        ) from None


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return (text[0] if text else type(error).__name__).rstrip(".")


class _NoGlobalsUnpickler(pickle.Unpickler):
    def __init__(self, file: io.BufferedIOBase, path: Path) -> None:
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        raise CheckpointError(_refusal(self.path, f"{module}.{name}"))


def read_meta_pkl(path: str | Path) -> dict[str, Any]:
    """nanoGPT's `meta.pkl` ({"vocab_size", "itos", "stoi"}), unpickled with every global refused."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as error:
        raise CheckpointError(f"{path} cannot be read ({error.strerror}).") from None
    try:
        meta = _NoGlobalsUnpickler(io.BytesIO(data), path).load()
    except CheckpointError:
        raise
    except Exception as error:  # a corrupt pickle fails in many ways; all mean the same here
        raise CheckpointError(f"{path} is not a readable pickle ({_first_line(error)}).") from None
    itos = meta.get("itos") if isinstance(meta, dict) else None
    if not isinstance(itos, dict) or not itos:
        raise CheckpointError(f"{path} is not nanoGPT's meta.pkl (no 'itos' table of characters).")
    return meta


def char_tokenizer_from_meta(meta: Mapping[str, Any], path: Path):
    """(CharTokenizer, nanoGPT id -> our id) for nanoGPT's character table."""
    from promethean.tokenizer import CharTokenizer

    itos = meta["itos"]
    ids = sorted(itos)
    valid = (
        all(isinstance(i, int) for i in ids)
        and ids == list(range(len(ids)))
        and all(isinstance(itos[i], str) and len(itos[i]) == 1 for i in ids)
        and len({itos[i] for i in ids}) == len(ids)
    )
    if not valid:
        raise CheckpointError(
            f"{path} does not map the ids 0..{len(ids) - 1} to distinct single characters."
        )
    tokenizer = CharTokenizer(itos[i] for i in ids)
    return tokenizer, {i: tokenizer.id_of_character[itos[i]] for i in ids}


# ------------------------------------------------------------------------------ links
@dataclass(frozen=True)
class Link:
    """One tensor of theirs (a pattern, `{layer}` standing for the block index) and the
    tensor(s) of ours it holds; several when they fuse what we keep apart (nanoGPT's c_attn)."""

    theirs: str
    ours: tuple[str, ...]
    transform: str = "copy"


@dataclass
class TorchImport:
    """A converted checkpoint: our config and state dict, and what the conversion found."""

    config: ModelConfig
    state: dict[str, torch.Tensor]
    format: str
    notes: list[str] = field(default_factory=list)
    tokenizer: Any = None  # from nanoGPT's meta.pkl, when given


def _expand(pattern: str, layer: int) -> str:
    return pattern.replace("{layer}", str(layer))


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    return re.compile(re.escape(pattern).replace(re.escape("{layer}"), r"\d+") + "$")


def _apply_links(
    tensors: dict[str, torch.Tensor],
    links: list[Link],
    ignore: list[str],
    config: ModelConfig,
    path: Path,
    what: str,
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Our state dict from their tensors; every missing or unmatched tensor named in one sentence.
    Returns the state and the names of their tensors that were ignored."""
    state: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    missing: list[str] = []
    for link in links:
        layers = range(config.n_layer) if "{layer}" in link.theirs + "".join(link.ours) else [0]
        for layer in layers:
            theirs = _expand(link.theirs, layer)
            if theirs not in tensors:
                missing.append(theirs)
                continue
            used.add(theirs)
            ours = tuple(_expand(name, layer) for name in link.ours)
            state.update(_convert(tensors[theirs], ours, link.transform))
    ignore_patterns = [_pattern_regex(p) for p in ignore]
    ignored = sorted(n for n in tensors if n not in used and any(p.match(n) for p in ignore_patterns))
    unmatched = sorted(set(tensors) - used - set(ignored))
    if missing or unmatched:
        problems = []
        if missing:
            problems.append(f"lacks {len(missing)} tensors a {what} needs ({_names(missing)})")
        if unmatched:
            problems.append(
                f"holds {len(unmatched)} tensors that match nothing ({_names(unmatched)})"
            )
        raise CheckpointError(
            f"{path} " + " and ".join(problems) + "; a --mapping TOML can name where tensors go."
        )
    return state, ignored


def _names(names: list[str], shown: int = 8) -> str:
    listed = ", ".join(names[:shown])
    return listed + (f", and {len(names) - shown} more" if len(names) > shown else "")


def _convert(tensor: torch.Tensor, ours: tuple[str, ...], transform: str) -> dict[str, torch.Tensor]:
    if tensor.is_floating_point():
        tensor = tensor.float()  # Promethean checkpoints hold fp32 weights
    if transform == "add_one":
        tensor = tensor + 1.0
    elif transform == "transpose":
        tensor = tensor.t()
    if len(ours) == 1:
        return {ours[0]: tensor.contiguous().clone()}
    if tensor.shape[0] % len(ours) != 0:
        raise CheckpointError(
            f"a fused tensor of shape {tuple(tensor.shape)} does not split into {len(ours)} parts."
        )
    parts = tensor.chunk(len(ours), dim=0)
    return {name: part.clone() for name, part in zip(ours, parts, strict=True)}


# ------------------------------------------------------------------------------ mapping TOML
@dataclass
class TensorMapping:
    """A --mapping TOML: ModelConfig fields, links by our tensor's name pattern, and patterns of
    their tensors to ignore."""

    model: dict[str, Any]
    links: dict[str, Link]  # by our name pattern
    ignore: list[str]


def read_mapping(path: str | Path) -> TensorMapping:
    path = Path(path)
    data = read_toml(path)
    unknown = set(data) - {"model", "tensors"}
    if unknown:
        raise ConfigError(
            f"{path} has unknown top-level keys {sorted(unknown)}; expected [model] and [tensors]."
        )
    model = data.get("model", {})
    tensors = dict(data.get("tensors", {}))
    if not isinstance(model, dict) or not isinstance(tensors, dict):
        raise ConfigError(f"{path}: [model] and [tensors] must be tables.")
    ignore = tensors.pop("ignore", [])
    if not isinstance(ignore, list) or not all(isinstance(name, str) for name in ignore):
        raise ConfigError(f"{path}: tensors.ignore must be a list of tensor name patterns.")
    links = {}
    for ours, spec in tensors.items():
        if isinstance(spec, str):
            theirs, transform = spec, "copy"
        elif isinstance(spec, dict) and isinstance(spec.get("from"), str) and set(spec) <= {
            "from", "transform"
        }:
            theirs, transform = spec["from"], spec.get("transform", "copy")
        else:
            raise ConfigError(
                f"{path}: tensors.\"{ours}\" must be their tensor's name, or a table "
                "{ from = NAME, transform = ... }."
            )
        if transform not in TRANSFORMS:
            raise ConfigError(
                f"{path}: tensors.\"{ours}\" has transform '{transform}'; known transforms are "
                f"{', '.join(TRANSFORMS)}."
            )
        if ("{layer}" in ours) != ("{layer}" in theirs):
            raise ConfigError(
                f"{path}: tensors.\"{ours}\" = \"{theirs}\" must use {{layer}} on both sides or "
                "on neither."
            )
        links[ours] = Link(theirs, (ours,), transform)
    return TensorMapping(model=model, links=links, ignore=ignore)


def _with_mapping(links: list[Link], mapping: TensorMapping | None) -> list[Link]:
    """The built-in links with the mapping's entries in place of those of the same tensors."""
    if mapping is None:
        return links
    replaced = set(mapping.links)
    kept = []
    for link in links:
        if not replaced & set(link.ours):
            kept.append(link)
        elif len(link.ours) > 1:
            # A fused tensor split into several of ours: the mapping must then name each part.
            rest = [name for name in link.ours if name not in replaced]
            if rest:
                raise ConfigError(
                    f"the mapping names some but not all of the tensors {link.theirs} holds "
                    f"({', '.join(rest)} missing)."
                )
    return kept + list(mapping.links.values())


# ------------------------------------------------------------------------------ detection
def _strip_compiled(state: Mapping[str, Any]) -> tuple[dict[str, Any], bool]:
    stripped = any(name.startswith(COMPILED_PREFIX) for name in state)
    return {name.removeprefix(COMPILED_PREFIX): value for name, value in state.items()}, stripped


def _is_state_dict(value: Any) -> bool:
    return isinstance(value, Mapping) and bool(value) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items()
    )


def _detect(names: set[str]) -> str | None:
    if "transformer.wte.weight" in names:
        return "nanogpt"
    if "tok_emb.weight" in names and any(".att.W_query." in n for n in names):
        return "gemma3-scratch"
    if "token_embedding.weight" in names and any(".attention.q_proj." in n for n in names):
        return "minimac"
    return None


def _config_fields(value: Any) -> dict[str, Any] | None:
    if isinstance(value, PickledConfig):
        return dict(value.fields)
    if isinstance(value, Mapping):
        return dict(value)
    return None


# ------------------------------------------------------------------------------ import
def import_torch(
    path: str | Path,
    format: str | None = None,
    *,
    mapping: str | Path | None = None,
    config: str | Path | None = None,
    n_head: int | None = None,
    meta: str | Path | None = None,
) -> TorchImport:
    """Read a `.pt` file written by nanoGPT, the Gemma-3 from-scratch notebook or MiniMacLLM (or
    any state dict, with a `mapping`) into our config and state dict.

    `format` is detected from the tensor names when not given. `config` is a JSON or TOML file of
    the system's own config keys (the Gemma-3 notebook's, MiniMacLLM's, nanoGPT's model_args)
    overriding what the file says or the defaults. `n_head` gives the head count of a bare nanoGPT
    state dict. `meta` is nanoGPT's meta.pkl: the character vocabulary moves to a CharTokenizer.
    """
    path = Path(path)
    if format is not None and format not in FORMATS:
        raise ConfigError(f"unknown format '{format}'; use one of {', '.join(FORMATS)}.")
    mapping_ = read_mapping(mapping) if mapping is not None else None
    overrides = _read_config_file(Path(config)) if config is not None else {}
    loaded = read_torch_file(path)

    notes: list[str] = []
    state, file_config, extras = _split_checkpoint(loaded, path)
    state, compiled = _strip_compiled(state)
    if compiled:
        notes.append(f"removed the torch.compile prefix '{COMPILED_PREFIX}' from the tensor names")
    if extras:
        notes.append("ignored the file's " + ", ".join(extras))

    if format is None:
        format = _detect(set(state))
        if format is None and mapping_ is not None:
            format = "state-dict"
        if format is None:
            raise CheckpointError(
                f"cannot tell which system wrote {path} (its tensors are named like "
                f"{_names(sorted(state), 3)}); pass --format, or --format state-dict with a "
                "--mapping TOML."
            )
    fields = {**(file_config or {}), **overrides}
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in state.values()
                     if t.is_floating_point() and t.dtype != torch.float32})
    if dtypes:
        notes.append(f"converted its {', '.join(dtypes)} tensors to fp32")
    if format == "nanogpt":
        result = _import_nanogpt(state, fields, path, mapping_, n_head, notes)
    elif format == "gemma3-scratch":
        result = _import_gemma3_scratch(state, fields, path, mapping_, notes)
    elif format == "minimac":
        result = _import_minimac(state, fields, path, mapping_, file_config is not None, notes)
    else:
        result = _import_state_dict(state, path, mapping_, overrides, notes)
    if meta is not None:
        _use_char_vocabulary(result, Path(meta))
    return result


def _read_config_file(path: Path) -> dict[str, Any]:
    if path.suffix == ".toml":
        data = read_toml(path)
        return dict(data.get("model", data))
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist.") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ConfigError(f"{path} is not a readable JSON config ({_first_line(error)}).") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a JSON object of config keys.")
    return data


def _split_checkpoint(
    loaded: Any, path: Path
) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None, list[str]]:
    """(state dict, the config stored beside it, names of other entries left behind)."""
    if _is_state_dict(loaded):
        return dict(loaded), None, []
    if not isinstance(loaded, Mapping):
        raise CheckpointError(
            f"{path} holds a {type(loaded).__name__}, not a state dict or a checkpoint dict."
        )
    for state_key, config_keys in (("model", ("model_args", "config")),
                                   ("model_state_dict", ("config", "model_args"))):
        if state_key in loaded and _is_state_dict(loaded[state_key]):
            config = None
            for key in config_keys:
                config = _config_fields(loaded.get(key))
                if config is not None:
                    break
            # nanoGPT's "config" is the training script's settings; its model is in model_args.
            extras = sorted(k for k in loaded if k != state_key and k != "model_args"
                            and not (k == "config" and "model_args" not in loaded))
            return dict(loaded[state_key]), config, [_describe_extra(k, loaded[k]) for k in extras]
    keys = ", ".join(sorted(map(str, loaded))[:6])
    raise CheckpointError(
        f"{path} holds a dict without a state dict under 'model' or 'model_state_dict' "
        f"(its keys: {keys})."
    )


def _describe_extra(key: str, value: Any) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f"{key} ({value:g})" if isinstance(value, float) else f"{key} ({value})"
    if key == "optimizer":
        return "optimizer state"
    return key


def _count_parameters(state: Mapping[str, torch.Tensor]) -> int:
    seen, total = set(), 0
    for tensor in state.values():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if key not in seen:
            seen.add(key)
            total += tensor.numel()
    return total


def _require_int(fields: Mapping[str, Any], key: str, path: Path, what: str) -> int:
    value = fields.get(key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise CheckpointError(f"the {what} config of {path} has no integer '{key}' (got {value!r}).")
    return value


def _shape(state: Mapping[str, torch.Tensor], name: str, path: Path) -> tuple[int, ...]:
    if name not in state:
        raise CheckpointError(f"{path} has no tensor '{name}'.")
    return tuple(state[name].shape)


def _require_tensor(state, name: str, path: Path, what: str, mapping: TensorMapping | None) -> None:
    """A layout's anchor tensor, before its config is read (unless a mapping renames it)."""
    if name not in state and not (mapping and mapping.links):
        raise CheckpointError(f"{path} has no tensor '{name}', so it is not {what}.")


def _tie_or_untie(
    state: dict[str, torch.Tensor], head: str, embedding: str, notes: list[str], path: Path,
    what: str,
) -> bool:
    """Whether the head is the embedding (then its copy is dropped)."""
    if embedding not in state:
        raise CheckpointError(f"{path} has no tensor '{embedding}', so it is not {what}.")
    if head not in state:
        notes.append("the file has no separate output head: it is tied to the token embeddings")
        return True
    if state[head] is state[embedding] or (
        state[head].shape == state[embedding].shape and torch.equal(state[head], state[embedding])
    ):
        del state[head]
        return True
    return False


def _model_config(fields: dict[str, Any], path: Path) -> ModelConfig:
    return parse_model_config({"name": path.stem, **fields}, source=f"the config of {path}")


def _finish(
    tensors: dict[str, torch.Tensor],
    links: list[Link],
    ignore: list[str],
    config: ModelConfig,
    path: Path,
    format: str,
    what: str,
    notes: list[str],
) -> TorchImport:
    state, ignored = _apply_links(tensors, links, ignore, config, path, what)
    if config.tie_embeddings:
        state["lm_head.weight"] = state["token_embedding.weight"]
    if ignored:
        notes.append(f"ignored {len(ignored)} tensors without learned state ({_names(ignored, 3)})")
    _check_shapes(state, config, str(path))
    return TorchImport(config=config, state=state, format=format, notes=notes)


# ---- nanoGPT
def _import_nanogpt(state, fields, path, mapping, n_head, notes) -> TorchImport:
    n_embd = _shape(state, "transformer.wte.weight", path)[1]
    layers = {int(m.group(1)) for n in state if (m := re.match(r"transformer\.h\.(\d+)\.", n))}
    inferred = {
        "vocab_size": _shape(state, "transformer.wte.weight", path)[0],
        "n_embd": n_embd,
        "n_layer": max(layers) + 1 if layers else 0,
        "block_size": _shape(state, "transformer.wpe.weight", path)[0],
        "bias": "transformer.ln_f.bias" in state,
    }
    if "n_head" not in fields and n_head is None:
        if n_embd % GPT2_HEAD_SIZE != 0:
            raise CheckpointError(
                f"{path} stores no config, and its width {n_embd} is not a multiple of GPT-2's "
                f"head size {GPT2_HEAD_SIZE}; give the head count with --n-head."
            )
        n_head = n_embd // GPT2_HEAD_SIZE
        notes.append(
            f"the file does not say its head count: assumed {n_head} heads of {GPT2_HEAD_SIZE} "
            "(GPT-2's convention); pass --n-head if it was trained otherwise"
        )
    if not fields:
        notes.append("the file stores no config: sizes were read from the tensor shapes")
    fields = {**inferred, **fields, **({"n_head": n_head} if n_head is not None else {})}
    if float(fields.get("dropout", 0.0) or 0.0):
        notes.append(f"dropout {fields['dropout']} (a training setting) was set to 0")
    n_embd = _require_int(fields, "n_embd", path, "nanoGPT")
    config = _model_config({
        "vocab_size": _require_int(fields, "vocab_size", path, "nanoGPT"),
        "context_length": _require_int(fields, "block_size", path, "nanoGPT"),
        "n_layer": _require_int(fields, "n_layer", path, "nanoGPT"),
        "n_embd": n_embd,
        "n_head": _require_int(fields, "n_head", path, "nanoGPT"),
        "d_ff": 4 * n_embd,
        "mlp": "gelu_exact",  # nn.GELU(): the exact erf form
        "norm": "layernorm",
        "norm_eps": NANOGPT_LAYER_NORM_EPS,
        "bias": bool(fields.get("bias", True)),
        "position": "learned",
        "tie_embeddings": _tie_or_untie(
            state, "lm_head.weight", "transformer.wte.weight", notes, path, "a nanoGPT checkpoint"
        ),
        **(mapping.model if mapping else {}),
    }, path)
    kinds = ("weight", "bias") if config.bias else ("weight",)
    links = [Link("transformer.wte.weight", ("token_embedding.weight",)),
             Link("transformer.wpe.weight", ("position_embedding.weight",))]
    h, ours = "transformer.h.{layer}", "blocks.{layer}"
    for kind in kinds:
        links += [
            Link(f"{h}.ln_1.{kind}", (f"{ours}.attn_norm.{kind}",)),
            Link(f"{h}.attn.c_attn.{kind}", tuple(f"{ours}.attn.{p}_proj.{kind}" for p in "qkv")),
            Link(f"{h}.attn.c_proj.{kind}", (f"{ours}.attn.o_proj.{kind}",)),
            Link(f"{h}.ln_2.{kind}", (f"{ours}.mlp_norm.{kind}",)),
            Link(f"{h}.mlp.c_fc.{kind}", (f"{ours}.mlp.up_proj.{kind}",)),
            Link(f"{h}.mlp.c_proj.{kind}", (f"{ours}.mlp.down_proj.{kind}",)),
            Link(f"transformer.ln_f.{kind}", (f"final_norm.{kind}",)),
        ]
    if not config.tie_embeddings:
        links.append(Link("lm_head.weight", ("lm_head.weight",)))
    # Old nanoGPT checkpoints (no flash attention) carry the causal mask as a buffer `attn.bias`.
    ignore = [f"{h}.attn.bias", *(mapping.ignore if mapping else [])]
    return _finish(state, _with_mapping(links, mapping), ignore, config, path, "nanogpt",
                   "nanoGPT GPT of this size", notes)


# ---- Gemma-3 from scratch
def _import_gemma3_scratch(state, fields, path, mapping, notes) -> TorchImport:
    _require_tensor(state, "tok_emb.weight", path, "a Gemma-3 from-scratch state dict", mapping)
    unknown = set(fields) - set(GEMMA3_SCRATCH_DEFAULTS) - {"dtype"}
    if unknown:
        raise ConfigError(
            f"the Gemma-3 config has unknown keys {sorted(unknown)}; the notebook's keys are "
            f"{', '.join(GEMMA3_SCRATCH_DEFAULTS)}."
        )
    layers = {int(m.group(1)) for n in state if (m := re.match(r"blocks\.(\d+)\.", n))}
    inferred: dict[str, Any] = {}
    if "tok_emb.weight" in state:
        inferred["vocab_size"], inferred["emb_dim"] = _shape(state, "tok_emb.weight", path)
    if layers:
        inferred["n_layers"] = max(layers) + 1
    if "blocks.0.att.q_norm.scale" in state:
        head_dim = _shape(state, "blocks.0.att.q_norm.scale", path)[0]
        inferred["head_dim"] = head_dim
        inferred["n_heads"] = _shape(state, "blocks.0.att.W_query.weight", path)[0] // head_dim
        inferred["n_kv_groups"] = _shape(state, "blocks.0.att.W_key.weight", path)[0] // head_dim
    if "blocks.0.ff.fc1.weight" in state:
        inferred["hidden_dim"] = _shape(state, "blocks.0.ff.fc1.weight", path)[0]
    c = {**GEMMA3_SCRATCH_DEFAULTS, **inferred, **fields}
    notes.append("the file stores no config: sizes were read from the tensor shapes, the rest "
                 "(context, window, RoPE bases, layer types) is the TinyStories card's unless "
                 "--config says otherwise")
    n_layers = int(c["n_layers"])
    layer_types = c["layer_types"]
    if layer_types is None:
        layer_types = [FULL if (i + 1) % 6 == 0 else SLIDING for i in range(n_layers)]
    if not isinstance(layer_types, list) or set(layer_types) - {FULL, SLIDING} or len(
        layer_types
    ) != n_layers:
        raise ConfigError(
            f"layer_types must list '{SLIDING}' or '{FULL}' for each of the {n_layers} layers."
        )
    if not c["qk_norm"]:
        raise ConfigError("a Gemma-3 from-scratch model without qk_norm is not supported.")
    shifts = sorted(n for n in state if n.endswith(".shift"))
    nonzero = [n for n in shifts if bool(state[n].any())]
    if nonzero:
        raise CheckpointError(
            f"{path} has RMSNorms with a non-zero shift ({_names(nonzero, 3)}), which our "
            "RMSNorm does not have; refused rather than converted approximately."
        )
    global_layers = tuple(i for i, kind in enumerate(layer_types) if kind == FULL)
    sliding = len(global_layers) < n_layers
    context = int(c["context_length"])
    local, glob = float(c["rope_local_base"]), float(c["rope_base"])
    model_fields = {
        "vocab_size": int(c["vocab_size"]),
        "context_length": context,
        "n_layer": n_layers,
        "n_embd": int(c["emb_dim"]),
        "n_head": int(c["n_heads"]),
        "n_kv_head": int(c["n_kv_groups"]) if int(c["n_kv_groups"]) != int(c["n_heads"]) else None,
        "head_dim": int(c["head_dim"]),
        "d_ff": int(c["hidden_dim"]),
        "mlp": "geglu_tanh",
        "norm": "rmsnorm",
        "norm_eps": GEMMA3_SCRATCH_EPS,
        # The notebook stores the gain's offset from one, as our unit-offset form does.
        "norm_unit_offset": True,
        "sandwich_norm": True,
        "bias": False,
        "position": "rope",
        "rope_theta": glob,
        "rope_local_theta": local if sliding and local != glob else None,
        "sliding_window": min(int(c["sliding_window"]), context) if sliding else None,
        "global_layers": global_layers if sliding and global_layers else None,
        "qk_norm": True,
        "query_pre_attn_scalar": float(c["query_pre_attn_scalar"]),
        "embedding_scale": True,
        "tie_embeddings": _tie_or_untie(
            state, "out_head.weight", "tok_emb.weight", notes, path, "a Gemma-3 from-scratch "
            "state dict"
        ),
        **(mapping.model if mapping else {}),
    }
    config = _model_config(model_fields, path)
    b, ours = "blocks.{layer}", "blocks.{layer}"
    links = [Link("tok_emb.weight", ("token_embedding.weight",)),
             Link("final_norm.scale", ("final_norm.weight",))]
    for theirs, mine in (("att.W_query", "attn.q_proj"), ("att.W_key", "attn.k_proj"),
                         ("att.W_value", "attn.v_proj"), ("att.out_proj", "attn.o_proj"),
                         ("ff.fc1", "mlp.gate_proj"), ("ff.fc2", "mlp.up_proj"),
                         ("ff.fc3", "mlp.down_proj")):
        links.append(Link(f"{b}.{theirs}.weight", (f"{ours}.{mine}.weight",)))
    for theirs, mine in (("att.q_norm", "attn.q_norm"), ("att.k_norm", "attn.k_norm"),
                         ("input_layernorm", "attn_norm"),
                         ("post_attention_layernorm", "attn_post_norm"),
                         ("pre_feedforward_layernorm", "mlp_norm"),
                         ("post_feedforward_layernorm", "mlp_post_norm")):
        links.append(Link(f"{b}.{theirs}.scale", (f"{ours}.{mine}.weight",)))
    if not config.tie_embeddings:
        links.append(Link("out_head.weight", ("lm_head.weight",)))
    # Zero shifts add nothing (checked above); RoPE tables and masks are computed, not learned.
    ignore = [*shifts, "cos_local", "sin_local", "cos_global",
              "sin_global", *(mapping.ignore if mapping else [])]
    return _finish(state, _with_mapping(links, mapping), ignore, config, path, "gemma3-scratch",
                   "Gemma-3 from-scratch model of this size", notes)


# ---- MiniMacLLM
def _import_minimac(state, fields, path, mapping, had_config, notes) -> TorchImport:
    _require_tensor(state, "token_embedding.weight", path, "a MiniMacLLM checkpoint", mapping)
    if not had_config and not fields:
        notes.append("the file stores no config: MiniMacLLM's defaults were checked against the "
                     "tensor shapes")
    unknown_types = {}
    c = {**MINIMAC_DEFAULTS, **fields}
    if c["norm_type"] not in ("rmsnorm", "layernorm"):
        unknown_types["norm_type"] = c["norm_type"]
    if c["ff_type"] not in ("swiglu", "gelu"):
        unknown_types["ff_type"] = c["ff_type"]
    if unknown_types:
        described = ", ".join(f"{k} = '{v}'" for k, v in unknown_types.items())
        raise CheckpointError(
            f"{path} uses {described}, which our Transformer does not compute (supported: "
            "norm_type rmsnorm or layernorm, ff_type swiglu or gelu)."
        )
    if c["norm_type"] == "layernorm" and c["bias"]:
        raise CheckpointError(
            f"{path} has biased projections with bias-free LayerNorms, a combination our "
            "Transformer does not have."
        )
    if float(c.get("dropout", 0.0) or 0.0):
        notes.append(f"dropout {c['dropout']} (a training setting) was set to 0")
    for key in ("vocab_size", "d_model", "num_layers", "num_query_heads", "num_kv_heads", "d_ff",
                "max_seq_len"):
        _require_int(c, key, path, "MiniMacLLM")
    gated = c["ff_type"] == "swiglu"
    config = _model_config({
        "vocab_size": c["vocab_size"],
        "context_length": c["max_seq_len"],
        "n_layer": c["num_layers"],
        "n_embd": c["d_model"],
        "n_head": c["num_query_heads"],
        "n_kv_head": c["num_kv_heads"] if c["num_kv_heads"] != c["num_query_heads"] else None,
        "d_ff": c["d_ff"],
        "mlp": "swiglu" if gated else "gelu_exact",  # their FeedForward uses F.gelu (exact)
        "norm": c["norm_type"],
        "norm_eps": float(c["norm_eps"]),
        "bias": bool(c["bias"]),
        "position": "rope",
        "rope_theta": float(c["rope_base"]),
        "tie_embeddings": _tie_or_untie(
            state, "lm_head.weight", "token_embedding.weight", notes, path, "a MiniMacLLM "
            "checkpoint"
        ),
        **(mapping.model if mapping else {}),
    }, path)
    kinds = ("weight", "bias") if config.bias else ("weight",)
    a, ours = "layers.{layer}", "blocks.{layer}"
    links = [Link("token_embedding.weight", ("token_embedding.weight",)),
             Link("norm.weight", ("final_norm.weight",)),
             Link(f"{a}.attention_norm.weight", (f"{ours}.attn_norm.weight",)),
             Link(f"{a}.ffn_norm.weight", (f"{ours}.mlp_norm.weight",))]
    # w1 is the gate (silu), w3 the up projection, w2 the down projection; ungated: w1 up, w2 down.
    feed_forward = (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")) if gated else (
        ("w1", "up_proj"), ("w2", "down_proj"))
    for kind in kinds:
        links += [Link(f"{a}.attention.{p}.{kind}", (f"{ours}.attn.{p}.{kind}",))
                  for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
        links += [Link(f"{a}.feed_forward.{theirs}.{kind}", (f"{ours}.mlp.{mine}.{kind}",))
                  for theirs, mine in feed_forward]
    if not config.tie_embeddings:
        links.append(Link("lm_head.weight", ("lm_head.weight",)))
    ignore = ["rope.inv_freq", "rope.cos_cached", "rope.sin_cached",
              *(mapping.ignore if mapping else [])]
    return _finish(state, _with_mapping(links, mapping), ignore, config, path, "minimac",
                   "MiniMacLLM ContinualLLM of this size", notes)


# ---- any state dict
def _import_state_dict(state, path, mapping, overrides, notes) -> TorchImport:
    if mapping is None:
        raise ConfigError("--format state-dict needs a --mapping TOML naming where each tensor goes.")
    fields = {**mapping.model, **overrides}
    if not fields:
        raise ConfigError(
            "--format state-dict needs the model's config: a [model] table in the mapping or a "
            "--config file of ModelConfig fields."
        )
    config = _model_config(fields, path)
    links = list(mapping.links.values())
    if config.tie_embeddings and "lm_head.weight" in mapping.links:
        raise ConfigError("the mapping names lm_head.weight, but the config ties the head to the "
                          "token embeddings (set tie_embeddings = false).")
    return _finish(state, links, mapping.ignore, config, path, "state-dict",
                   "model with this mapping", notes)


# ---- nanoGPT's character vocabulary
def _use_char_vocabulary(result: TorchImport, meta_path: Path) -> None:
    """Move the rows of nanoGPT's character ids to the ids of Promethean's CharTokenizer."""
    meta = read_meta_pkl(meta_path)
    tokenizer, new_ids = char_tokenizer_from_meta(meta, meta_path)
    config, state = result.config, result.state
    if len(new_ids) > config.vocab_size:
        raise CheckpointError(
            f"{meta_path} lists {len(new_ids)} characters, but the model has only "
            f"{config.vocab_size} token ids."
        )
    # Ids 0..256 (raw bytes and <|endoftext|>) come first in a CharTokenizer; the model's rows
    # past its characters (vocabulary padding) follow them, in order.
    padding = config.vocab_size - len(new_ids)
    vocab = tokenizer.vocab_size + padding
    order = torch.empty(config.vocab_size, dtype=torch.long)
    for old, new in new_ids.items():
        order[old] = new
    order[len(new_ids):] = torch.arange(tokenizer.vocab_size, vocab)

    def moved(table: torch.Tensor) -> torch.Tensor:
        out = table.new_zeros(vocab, table.shape[1])
        out[order] = table
        return out

    tied = config.tie_embeddings
    state["token_embedding.weight"] = moved(state["token_embedding.weight"])
    state["lm_head.weight"] = (state["token_embedding.weight"] if tied
                               else moved(state["lm_head.weight"]))
    result.config = config.with_overrides(vocab_size=vocab)
    result.tokenizer = tokenizer
    result.notes.append(
        f"nanoGPT's {len(new_ids)} characters moved to a char tokenizer's ids 257-"
        f"{256 + len(new_ids)}; its ids 0-256 (byte fallback and <|endoftext|>) were never "
        "trained: their rows are zero, so each gets logit 0 and can still be sampled; a short "
        "fine-tune on the model's own data pushes them down"
    )


def describe(result: TorchImport) -> list[str]:
    """Lines for a person: what was read, and what was assumed or left behind."""
    c = result.config
    architecture = {
        "nanogpt": "GPT-2 (nanoGPT: learned positions, LayerNorm, exact GELU)",
        "gemma3-scratch": "Gemma-3 (from scratch: GQA, QK-norm, sandwich norms, dual RoPE, "
                          "sliding window)",
        "minimac": "LLaMA-style (MiniMacLLM: GQA, RoPE, SwiGLU, RMSNorm)",
        "state-dict": "as the mapping's config describes",
    }[result.format]
    heads = f"{c.n_head} heads" + (f" / {c.kv_heads} kv" if c.kv_heads != c.n_head else "")
    lines = [
        f"format: {result.format}; architecture: {architecture}",
        f"model: {c.n_layer} layers, width {c.n_embd}, {heads}, vocabulary {c.vocab_size}, "
        f"context {c.context_length}, {'tied' if c.tie_embeddings else 'separate'} output head",
        f"parameters: {_count_parameters(result.state):,}",
    ]
    lines += [f"note: {note}" for note in result.notes]
    return lines
