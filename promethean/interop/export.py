"""Export a checkpoint for other runtimes: HF transformers (with PEFT adapters), ONNX and GGUF.

`export_checkpoint(CKPT, format, out)` is what `promethean export` calls:

- `hf`: the transformers directory that `hf.export_hf` writes, plus every LoRA adapter of the
  checkpoint (`CKPT/adapters/NAME`) in PEFT's format under `OUT/adapters/NAME`, so that
  `PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(OUT), OUT/adapters/NAME)`
  computes what our model with that adapter computes.
- `onnx`: one `.onnx` file mapping `input_ids` (batch, sequence) to `logits` (batch, sequence,
  vocab), in float32, through torch's dynamo exporter; every preset is expressible, the SSM
  mixers included (their scan becomes an ONNX `Scan`).
- `gguf`: one `.gguf` file for llama.cpp, GPT-2 (`gpt2`) and LLaMA-style (`llama`) models only,
  float32 tensors under llama.cpp's names, with the tokenizer as a byte-level BPE.

Every output is written under a temporary name beside its destination and renamed into place,
so an interrupted export never leaves half a file where a good one was.

Layout differences handled here:
- PEFT targets HF's module names. GPT-2 fuses the query, key and value projections into one
  `c_attn`; separate LoRA updates on them are exactly one LoRA on `c_attn` whose A stacks the
  three A's and whose B is block-diagonal, of rank 3r with alpha 3·alpha (same alpha / r), given
  through PEFT's `rank_pattern` / `alpha_pattern`.
- llama.cpp's LLaMA applies rotary embeddings to adjacent pairs (2i, 2i+1); ours, like HF's,
  rotates pairs (i, i + d/2). The rows of each head's query and key projections are interleaved
  accordingly (the permutation llama.cpp's own converter applies to HF checkpoints), which leaves
  every attention score unchanged.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import re
import warnings
from collections.abc import Iterator, Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from promethean.checkpoint import load_checkpoint, read_checkpoint_record
from promethean.config import ModelConfig
from promethean.errors import PrometheanError
from promethean.files import atomic_directory, atomic_file
from promethean.interop.hf import _family_of, _problems_for, _tensor_links, export_hf
from promethean.model import Transformer
from promethean.tokenizer import END_OF_TEXT, Tokenizer, save_beside_hf_file

__all__ = ["FORMATS", "ExportError", "default_output", "export_checkpoint", "gguf_problem"]

FORMATS = ("hf", "onnx", "gguf")
# Beside the checkpoint directory CKPT: CKPT-hf/, CKPT.onnx, CKPT.gguf.
DEFAULT_SUFFIXES = {"hf": "-hf", "onnx": ".onnx", "gguf": ".gguf"}
INSTALL_HINT = "pip install 'promethean[export]'"
# The packages each format needs beyond the core ones (module name, as pip knows it).
REQUIRED_PACKAGES = {"hf": (), "onnx": ("onnx", "onnxscript"), "gguf": ("gguf",)}

PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_ADAPTERS_DIR = "adapters"

ONNX_OPSET = 18
# ONNX files are single protobufs, which cannot exceed 2 GiB.
ONNX_MAX_BYTES = 2 * 1024**3 - 64 * 1024**2


class ExportError(PrometheanError):
    """A checkpoint cannot be exported as asked."""


# ------------------------------------------------------------------------------ entry point
def default_output(checkpoint: str | os.PathLike[str], export_format: str) -> Path:
    """Where an export goes when no --out is given: beside the checkpoint directory."""
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(checkpoint.name + DEFAULT_SUFFIXES[export_format])


def export_checkpoint(
    checkpoint: str | os.PathLike[str],
    export_format: str,
    out: str | os.PathLike[str] | None = None,
    *,
    overwrite: bool = False,
) -> Path:
    """Export the checkpoint directory `checkpoint` as `export_format` to `out` (default:
    `default_output`) and return the path written. Everything that can be refused (format,
    checkpoint, architecture, missing packages, existing output) is refused before any work."""
    if export_format not in FORMATS:
        raise ExportError(
            f"unknown export format '{export_format}'; choose one of {', '.join(FORMATS)}."
        )
    config, _metadata = read_checkpoint_record(checkpoint)
    _check_expressible(config, export_format)
    _require_packages(export_format)
    out = Path(out) if out is not None else default_output(checkpoint, export_format)
    if out.exists() and not overwrite:
        raise ExportError(f"{out} already exists; pass --overwrite to replace it.")
    if export_format != "hf" and out.is_dir():
        raise ExportError(f"{out} is a directory; the {export_format} export writes one file.")
    if out.resolve() == Path(checkpoint).resolve():
        raise ExportError(f"the export cannot replace the checkpoint it reads ({out}).")
    if export_format == "hf":
        return _export_hf_with_adapters(Path(checkpoint), out)
    # ONNX Runtime and llama.cpp are float32-first on CPU: both exports are written in float32.
    loaded = load_checkpoint(checkpoint, dtype=torch.float32)
    if export_format == "onnx":
        return export_onnx(loaded.model, out)
    return export_gguf(loaded.model, loaded.tokenizer, out)


def _check_expressible(config: ModelConfig, export_format: str) -> None:
    if export_format == "gguf":
        problem = gguf_problem(config)
        if problem:
            raise ExportError(problem)
    elif export_format == "hf":
        # The same sentence export_hf would give, before the weights are read.
        from promethean.interop.hf import model_config_to_hf

        model_config_to_hf(config)


def _require_packages(export_format: str) -> None:
    missing = [name for name in REQUIRED_PACKAGES[export_format] if not _importable(name)]
    if missing:
        raise ExportError(
            f"exporting to {export_format.upper()} needs the {' and '.join(missing)} "
            f"package{'s' if len(missing) > 1 else ''}: {INSTALL_HINT}"
        )


def _importable(name: str) -> bool:
    try:
        importlib.import_module(name)
    except ImportError:
        return False
    return True


# ------------------------------------------------------------------------------ hf + PEFT
def _export_hf_with_adapters(checkpoint: Path, out: Path) -> Path:
    from promethean.continual.adapters import (
        Adapters,
        adapter_directory,
        checkpoint_sha256,
        list_adapters,
    )

    loaded = load_checkpoint(checkpoint)
    model, tokenizer = loaded.model, loaded.tokenizer
    names = list_adapters(checkpoint)
    adapters = None
    if names:
        adapters = Adapters(model, base_sha256=checkpoint_sha256(checkpoint))
        for name in names:
            adapters.load(adapter_directory(checkpoint, name), name, activate=False)
    special = {"bos_token_id": tokenizer.eot_id, "eos_token_id": tokenizer.eot_id}
    with atomic_directory(out) as staging:
        # Into the (empty) staging directory: the model and its adapters appear together.
        export_hf(model, staging, special_token_ids=special, overwrite=True)
        write_hf_tokenizer(tokenizer, staging, model.config.context_length)
        # So that `convert from-hf` takes back this very tokenizer, kind and fingerprint (a char
        # one too, which has no HF file).
        save_beside_hf_file(tokenizer, staging)
        for name in names:
            write_peft_adapter(adapters, name, staging / PEFT_ADAPTERS_DIR / name, out.resolve())
    return out


def write_hf_tokenizer(tokenizer: Tokenizer, directory: Path, context_length: int) -> bool:
    """`tokenizer.json` + `tokenizer_config.json` that transformers' AutoTokenizer loads as a
    fast tokenizer encoding as ours does; False (nothing written) for a char tokenizer, which a
    byte-level BPE cannot express."""
    end_of_text = getattr(tokenizer, "end_of_text", END_OF_TEXT)
    if tokenizer.kind in ("bpe", "hf"):  # already a Hugging Face tokenizer: written as it is
        definition = tokenizer.hf_tokenizer.to_str()
    else:
        vocabulary = byte_level_vocabulary(tokenizer)
        if vocabulary is None:
            return False
        from tokenizers import AddedToken, decoders, models, pre_tokenizers
        from tokenizers import Tokenizer as HFTokenizer

        tokens, merges = vocabulary
        hf_tokenizer = HFTokenizer(models.BPE(
            vocab={text: token_id for token_id, text in enumerate(tokens)},
            merges=[tuple(merge.split(" ")) for merge in merges],
        ))
        # No prefix space, as GPT-2 and our tokenizers: decode(encode(s)) == s.
        hf_tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf_tokenizer.decoder = decoders.ByteLevel()
        hf_tokenizer.add_special_tokens([AddedToken(END_OF_TEXT, special=True)])
        definition = hf_tokenizer.to_str()
    settings = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": end_of_text,
        "eos_token": end_of_text,
        "model_max_length": context_length,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
    }
    (directory / "tokenizer.json").write_text(definition, "utf-8")
    (directory / "tokenizer_config.json").write_text(json.dumps(settings, indent=2) + "\n", "utf-8")
    return True


def _peft_targets(config: ModelConfig, modules: list[str]) -> dict[str, list[tuple[str, int, int]]]:
    """HF module name -> [(our module, its slice index, number of slices)] for each of `modules`.

    One HF module holds several of ours when HF fuses them (GPT-2's c_attn: q, k, v)."""
    family = _family_of(config)
    where: dict[str, tuple[str, int, int]] = {"lm_head": ("lm_head", 0, 1)}
    for link in _tensor_links(config, family):
        if not link.hf_name.endswith(".weight"):
            continue
        for index, ours in enumerate(link.ours):
            where[ours.removesuffix(".weight")] = (
                link.hf_name.removesuffix(".weight"), index, len(link.ours)
            )
    targets: dict[str, list[tuple[str, int, int]]] = {}
    for module in modules:
        if module not in where:
            raise ExportError(
                f"the adapter's layer {module} has no counterpart in the HF {family} layout."
            )
        hf_module, index, parts = where[module]
        targets.setdefault(hf_module, []).append((module, index, parts))
    return targets


def write_peft_adapter(adapters: Any, name: str, directory: Path, base_model: Path) -> Path:
    """Adapter `name` of `adapters` as a PEFT LoRA directory for the HF export of its model."""
    info = adapters.infos[name]
    config: ModelConfig = adapters.model.config
    rank, alpha = info.config.rank, float(info.config.alpha)
    lora_a, lora_b = adapters.lora_A[name], adapters.lora_B[name]
    tensors: dict[str, torch.Tensor] = {}
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, float] = {}
    for hf_module, parts in _peft_targets(config, info.modules).items():
        a_parts, b_parts = [], []
        for module, _index, _count in parts:
            key = adapters._key(module)
            a_parts.append(lora_a[key].detach().float().cpu())
            b_parts.append(lora_b[key].detach().float().cpu())
        fused_parts = parts[0][2]
        if fused_parts == 1:
            a, b = a_parts[0], b_parts[0]
        else:
            # Slices of a fused output: stack the A's, and give each B its own rows (its slice of
            # the output) and columns (its own A's rows); the rest of B is zero.
            slice_rows = b_parts[0].shape[0]
            a = torch.cat(a_parts, dim=0)
            b = torch.zeros(slice_rows * fused_parts, rank * len(parts))
            for column, ((_module, index, _count), part) in enumerate(zip(parts, b_parts)):
                b[index * slice_rows : (index + 1) * slice_rows,
                  column * rank : (column + 1) * rank] = part
            pattern = re.escape(hf_module)
            rank_pattern[pattern] = rank * len(parts)
            alpha_pattern[pattern] = alpha * len(parts)  # keeps alpha / rank, the scaling
        tensors[f"base_model.model.{hf_module}.lora_A.weight"] = a.contiguous()
        tensors[f"base_model.model.{hf_module}.lora_B.weight"] = b.contiguous()
    record = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(base_model),
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": info.config.dropout,
        "target_modules": sorted({hf_module for hf_module in _peft_targets(config, info.modules)}),
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        # GPT-2's Conv1D layers store weights as (in, out); PEFT transposes the update for them.
        "fan_in_fan_out": _family_of(config) == "gpt2",
        "bias": "none",
        "modules_to_save": None,
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
        "inference_mode": True,
        "layers_to_transform": None,
        "layers_pattern": None,
    }
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / PEFT_WEIGHTS_FILE), metadata={"format": "pt"})
    (directory / PEFT_CONFIG_FILE).write_text(json.dumps(record, indent=2) + "\n", "utf-8")
    return directory


# ------------------------------------------------------------------------------ ONNX
class _LogitsOnly(nn.Module):
    """input_ids (B, T) -> logits (B, T, vocab): the one signature the ONNX graph has."""

    def __init__(self, model: Transformer) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids).logits


def _sequential_scan(delta, A, update, initial_state=None, chunk=None):
    """`ssm.selective_scan` as one step per token through torch's `scan` operator, which the
    exporter writes as an ONNX `Scan` over however many tokens come: the chunked parallel scan
    loops over a number of chunks fixed at export time. Same values (float32), same shapes."""
    from torch._higher_order_ops.scan import scan

    delta, A, update = delta.float(), A.float(), update.float()
    decay = torch.exp(delta[..., None] * A)  # (B, T, D, N)
    state = torch.zeros_like(update[:, 0]) if initial_state is None else initial_state.float()

    def step(state, inputs):
        decay_t, update_t = inputs
        state = decay_t * state + update_t
        return state, state.clone()

    _final, states = scan(step, state, (decay, update), dim=1)
    return states


@contextlib.contextmanager
def _scan_for_export() -> Iterator[None]:
    # SelectiveSSM.forward looks `selective_scan` up in its module at each call, so replacing it
    # there for the length of the export swaps the scan and nothing else.
    from promethean.model import ssm

    original = ssm.selective_scan
    ssm.selective_scan = _sequential_scan
    try:
        yield
    finally:
        ssm.selective_scan = original


def _example_length(config: ModelConfig) -> int:
    """A traced length longer than every sliding window, so that the windowed masks are built
    in their general form (shorter inputs take a mask-free shortcut), and at least 2 (a length of
    1 would be taken for a constant)."""
    windows = [config.layer_window(layer) for layer in range(config.n_layer)]
    longest_window = max((window for window in windows if window is not None), default=8)
    return min(config.context_length, longest_window + 1)


def export_onnx(model: Transformer, out: str | os.PathLike[str]) -> Path:
    """Write `model`'s forward pass (float32) as an ONNX file: input `input_ids` (int64, batch x
    sequence, both dynamic, sequence up to the context length) -> output `logits`."""
    out = Path(out)
    model = model.float().eval()
    parameter_bytes = sum(p.numel() * 4 for p in model.parameters())
    if parameter_bytes > ONNX_MAX_BYTES:
        raise ExportError(
            f"this model's {parameter_bytes / 1024**2:,.0f} MiB of float32 weights do not fit in "
            "one ONNX file, which is limited to 2 GiB."
        )
    config = model.config
    example = torch.zeros((2, _example_length(config)), dtype=torch.long)
    batch = torch.export.Dim("batch")
    sequence = torch.export.Dim("sequence", max=config.context_length)
    with (
        atomic_file(out) as partial,
        _scan_for_export(),
        _quiet_exporter(),
        torch.no_grad(),
    ):
        torch.onnx.export(
            _LogitsOnly(model),
            (example,),
            str(partial),
            dynamo=True,
            input_names=["input_ids"],
            output_names=["logits"],
            dynamic_shapes={"input_ids": {0: batch, 1: sequence}},
            opset_version=ONNX_OPSET,
            external_data=False,
            verbose=False,
        )
    return out


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The exporter's progress lines and internal deprecation warnings say nothing to a user."""
    import logging

    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with (
            warnings.catch_warnings(),
            open(os.devnull, "w") as sink,
            contextlib.redirect_stdout(sink),
        ):
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


# ------------------------------------------------------------------------------ GGUF
def gguf_problem(config: ModelConfig) -> str | None:
    """Why `config` cannot be written as GGUF (one sentence), or None when it can."""
    if config.ssm_layers:
        return (
            f"cannot export to GGUF: the selective state-space (SSM) layers {config.ssm_layers} "
            "have no counterpart in llama.cpp's GPT-2 or LLaMA architectures."
        )
    family = _family_of(config)
    if family == "gemma3_text":
        return (
            "cannot export to GGUF: only GPT-2 and LLaMA-style models are written as GGUF, and "
            "this is a Gemma-3-style model (sandwich norms, QK-norm, embedding scaling)."
        )
    problems = _problems_for(config, family)
    if family == "llama" and config.mlp != "swiglu":
        problems.append(f"mlp = '{config.mlp}' (llama.cpp's LLaMA has a SwiGLU MLP)")
    if config.mlp == "gelu_exact":
        problems.append("mlp = 'gelu_exact' (llama.cpp computes GELU in its tanh approximation)")
    if problems:
        return (
            f"cannot export to GGUF as llama.cpp's {family} architecture, which cannot express: "
            + "; ".join(problems) + "."
        )
    return None


def gguf_architecture(config: ModelConfig) -> str:
    return "gpt2" if _family_of(config) == "gpt2" else "llama"


def permute_for_gguf_rotary(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Reorder each head's output rows from (i, i + d/2) pairs to adjacent (2i, 2i + 1) pairs:
    row 2i + j of a head takes row j * d/2 + i. Works on weights (rows x in) and biases (rows)."""
    rows = weight.shape[0]
    return (
        weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:])
        .transpose(1, 2)
        .reshape(weight.shape)
    )


def gguf_tensors(model: Transformer) -> dict[str, torch.Tensor]:
    """llama.cpp's tensor names and float32 values for `model`, in llama.cpp's layout."""
    config = model.config
    state = {name: t.detach().float().cpu() for name, t in model.state_dict().items()}
    architecture = gguf_architecture(config)
    kinds = ("weight", "bias") if config.bias else ("weight",)
    tensors = {"token_embd.weight": state["token_embedding.weight"]}
    if architecture == "gpt2":
        tensors["position_embd.weight"] = state["position_embedding.weight"]
    for layer in range(config.n_layer):
        ours, theirs = f"blocks.{layer}", f"blk.{layer}"
        norm_kinds = ("weight", "bias") if config.norm == "layernorm" and config.bias else ("weight",)
        for kind in norm_kinds:
            tensors[f"{theirs}.attn_norm.{kind}"] = state[f"{ours}.attn_norm.{kind}"]
            tensors[f"{theirs}.ffn_norm.{kind}"] = state[f"{ours}.mlp_norm.{kind}"]
        for kind in kinds:
            q, k, v = (state[f"{ours}.attn.{p}_proj.{kind}"] for p in ("q", "k", "v"))
            if architecture == "gpt2":
                tensors[f"{theirs}.attn_qkv.{kind}"] = torch.cat((q, k, v), dim=0)
            else:
                tensors[f"{theirs}.attn_q.{kind}"] = permute_for_gguf_rotary(q, config.n_head)
                tensors[f"{theirs}.attn_k.{kind}"] = permute_for_gguf_rotary(k, config.kv_heads)
                tensors[f"{theirs}.attn_v.{kind}"] = v
                tensors[f"{theirs}.ffn_gate.{kind}"] = state[f"{ours}.mlp.gate_proj.{kind}"]
            tensors[f"{theirs}.attn_output.{kind}"] = state[f"{ours}.attn.o_proj.{kind}"]
            tensors[f"{theirs}.ffn_up.{kind}"] = state[f"{ours}.mlp.up_proj.{kind}"]
            tensors[f"{theirs}.ffn_down.{kind}"] = state[f"{ours}.mlp.down_proj.{kind}"]
    final_kinds = ("weight", "bias") if config.norm == "layernorm" and config.bias else ("weight",)
    for kind in final_kinds:
        tensors[f"output_norm.{kind}"] = state[f"final_norm.{kind}"]
    if not config.tie_embeddings:
        # llama.cpp reads the token embeddings as the head when output.weight is absent.
        tensors["output.weight"] = state["lm_head.weight"]
    return {name: tensor.contiguous() for name, tensor in tensors.items()}


def gguf_metadata(config: ModelConfig) -> dict[str, Any]:
    """The architecture keys llama.cpp reads, prefixed by the architecture's name."""
    architecture = gguf_architecture(config)
    keys: dict[str, Any] = {
        "context_length": config.context_length,
        "embedding_length": config.n_embd,
        "block_count": config.n_layer,
        "feed_forward_length": config.d_ff,
        "attention.head_count": config.n_head,
    }
    if architecture == "gpt2":
        keys["attention.layer_norm_epsilon"] = float(config.norm_eps)
    else:
        keys.update({
            "attention.head_count_kv": config.kv_heads,
            "attention.layer_norm_rms_epsilon": float(config.norm_eps),
            "rope.freq_base": float(config.rope_theta),
            "rope.dimension_count": config.head_size,
            "attention.key_length": config.head_size,
            "attention.value_length": config.head_size,
            "vocab_size": config.vocab_size,
        })
    return {f"{architecture}.{key}": value for key, value in keys.items()}


@lru_cache(maxsize=1)
def _byte_symbols() -> tuple[str, ...]:
    """GPT-2's printable stand-in for each byte value (`bytes_to_unicode`), by byte."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    symbols = {byte: chr(byte) for byte in printable}
    extra = 0
    for byte in range(256):
        if byte not in symbols:
            symbols[byte] = chr(256 + extra)
            extra += 1
    return tuple(symbols[byte] for byte in range(256))


def _symbols_of(data: bytes) -> str:
    table = _byte_symbols()
    return "".join(table[byte] for byte in data)


def _tiktoken_merges(ranks: Mapping[bytes, int]) -> list[str]:
    """The BPE merges that reproduce tiktoken's ranks: each token of two or more bytes is the
    merge of the two parts that BPE with only lower ranks leaves it in (what llama.cpp's own
    converter does for tiktoken vocabularies)."""
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) < 2:
            continue
        parts = [bytes([byte]) for byte in token]
        while True:
            best = None
            for index in range(len(parts) - 1):
                pair_rank = ranks.get(parts[index] + parts[index + 1])
                if pair_rank is not None and pair_rank < rank and (best is None or pair_rank < best[1]):
                    best = (index, pair_rank)
            if best is None:
                break
            index = best[0]
            parts[index : index + 2] = [parts[index] + parts[index + 1]]
        if len(parts) != 2:
            raise ExportError(f"the GPT-2 ranks cannot be written as BPE merges (token {rank}).")
        merges.append(f"{_symbols_of(parts[0])} {_symbols_of(parts[1])}")
    return merges


def byte_level_vocabulary(tokenizer: Tokenizer) -> tuple[list[str], list[str]] | None:
    """(tokens by id, merges) of `tokenizer` as a GPT-2-style byte-level BPE, or None for a kind
    that is not one (char: its characters are ids of their own, beside their bytes)."""
    if tokenizer.kind == "bytes":
        return [*_byte_symbols(), END_OF_TEXT], []
    if tokenizer.kind == "gpt2":
        ranks = tokenizer.encoding._mergeable_ranks
        tokens = [""] * len(ranks)
        for token, rank in ranks.items():
            tokens[rank] = _symbols_of(token)
        return [*tokens, END_OF_TEXT], _tiktoken_merges(ranks)
    if tokenizer.kind in ("bpe", "hf"):
        definition = json.loads(tokenizer.hf_tokenizer.to_str())
        if not _is_byte_level_bpe(definition):
            return None
        tokens = [""] * tokenizer.vocab_size
        for text, token_id in tokenizer.hf_tokenizer.get_vocab(with_added_tokens=True).items():
            tokens[token_id] = text
        merges = [
            merge if isinstance(merge, str) else " ".join(merge)
            for merge in definition["model"]["merges"]
        ]
        return tokens, merges
    return None


def _is_byte_level_bpe(definition: dict) -> bool:
    """A Hugging Face tokenizer definition whose model is BPE over GPT-2's byte symbols."""
    def uses_byte_level(part: object) -> bool:
        if not isinstance(part, dict):
            return False
        if part.get("type") == "ByteLevel":
            return True
        return any(uses_byte_level(inner) for inner in part.get("pretokenizers") or [])

    model = definition.get("model") or {}
    return model.get("type") == "BPE" and uses_byte_level(definition.get("pre_tokenizer"))


def gguf_vocabulary(tokenizer: Tokenizer, vocab_size: int) -> tuple[list[str], list[int], list[str]]:
    """(tokens, token types, merges) of `tokenizer` as a byte-level BPE for llama.cpp, padded to
    the model's `vocab_size` with unused `[PADn]` tokens."""
    from gguf import TokenType

    vocabulary = byte_level_vocabulary(tokenizer)
    if vocabulary is None:
        raise ExportError(
            f"cannot export to GGUF: the {tokenizer.kind} tokenizer maps characters to ids in a "
            "way llama.cpp's tokenizers cannot reproduce; only bytes, gpt2, bpe and byte-level BPE hf "
            "tokenizers can."
        )
    tokens, merges = vocabulary
    end_of_text = getattr(tokenizer, "end_of_text", END_OF_TEXT)
    types = [
        int(TokenType.CONTROL) if text == end_of_text else int(TokenType.NORMAL) for text in tokens
    ]
    for token_id in range(len(tokens), vocab_size):
        tokens.append(f"[PAD{token_id}]")
        types.append(int(TokenType.UNUSED))
    return tokens, types, merges


def export_gguf(model: Transformer, tokenizer: Tokenizer, out: str | os.PathLike[str]) -> Path:
    """Write `model` and `tokenizer` as one float32 GGUF file for llama.cpp."""
    import gguf

    out = Path(out)
    config = model.config
    problem = gguf_problem(config)
    if problem:
        raise ExportError(problem)
    tokens, types, merges = gguf_vocabulary(tokenizer, config.vocab_size)
    tensors = gguf_tensors(model)
    architecture = gguf_architecture(config)
    with atomic_file(out) as partial:
        writer = _gguf_writer_class()(partial, architecture)
        writer.add_name(config.name)
        writer.add_file_type(gguf.LlamaFileType.ALL_F32)
        for key, value in gguf_metadata(config).items():
            if isinstance(value, float):
                writer.add_float32(key, value)
            else:
                writer.add_uint32(key, int(value))
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("gpt-2")
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        # llama.cpp refuses a gpt2 tokenizer without a merges key, even when there are none
        # (the bytes tokenizer): write the array whatever its length.
        writer.add_key_value(
            gguf.Keys.Tokenizer.MERGES, merges, gguf.GGUFValueType.ARRAY,
            sub_type=gguf.GGUFValueType.STRING,
        )
        writer.add_bos_token_id(tokenizer.eot_id)
        writer.add_eos_token_id(tokenizer.eot_id)
        writer.add_add_bos_token(False)
        for name, tensor in tensors.items():
            writer.add_tensor(name, tensor.numpy())
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return out


def _gguf_writer_class():
    import gguf

    class EmptyArrayWriter(gguf.GGUFWriter):
        """gguf's writer refuses an empty array, which the format allows (a count of 0)."""

        def _pack_val(self, val, vtype, add_vtype, sub_type=None):
            if vtype == gguf.GGUFValueType.ARRAY and len(val) == 0:
                packed = self._pack("I", vtype) if add_vtype else b""
                element = sub_type if sub_type is not None else gguf.GGUFValueType.STRING
                return packed + self._pack("I", element) + self._pack("Q", 0)
            return super()._pack_val(val, vtype, add_vtype, sub_type)

    return EmptyArrayWriter
