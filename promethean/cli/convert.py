"""Conversion commands: `convert from-hf/from-torch/to-hf` and `export`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from promethean.errors import PrometheanError
from promethean.cli.common import (
    app,
    convert_app,
    console,
    OverwriteCheckpointOption,
)


@convert_app.command("from-hf")
def convert_from_hf(
    source: Annotated[Path, typer.Argument(help="A transformers model directory (safetensors).")],
    out: Annotated[Path, typer.Option("--out", help="Checkpoint directory to write.")],
    tokenizer: Annotated[Optional[str], typer.Option(help=(
        "gpt2, bytes, or a tokenizer directory (Promethean's, a Hugging Face tokenizer.json, or "
        "vocab.json + merges.txt/merges.json). Default: the source directory's own tokenizer, "
        "else gpt2 when the vocabulary holds it."))] = None,
    overwrite: OverwriteCheckpointOption = False,
) -> None:
    """Import a GPT2LMHeadModel, LlamaForCausalLM or Gemma3ForCausalLM directory."""
    import torch

    from promethean.checkpoint import refuse_to_replace, save_checkpoint

    refuse_to_replace(out, overwrite)
    from promethean.interop.hf import import_hf
    from promethean.model import Transformer

    config, state = import_hf(source)
    chosen = _imported_model_tokenizer(tokenizer, source, config.vocab_size)
    with torch.device("meta"):
        model = Transformer(config)
    model.load_state_dict(state, strict=True, assign=True)
    model.tie_weights()
    save_checkpoint(out, model, chosen, {"imported_from": str(source)})
    typer.echo(f"wrote {out} ({model.num_parameters():,} parameters, {chosen.kind} tokenizer)")


def _imported_model_tokenizer(spec: str | None, source: Path, vocab_size: int):
    """The tokenizer named by --tokenizer; else the one in the source's directory (an HF export
    or hub download carries its own); else GPT-2's when the model's vocabulary holds it."""
    from promethean.tokenizer import (
        GPT2Tokenizer,
        get_tokenizer,
        has_tokenizer_files,
        load_tokenizer,
    )

    if spec is not None:
        return get_tokenizer(spec)
    directory = source if source.is_dir() else source.parent
    if has_tokenizer_files(directory):
        return load_tokenizer(directory)
    if vocab_size >= GPT2Tokenizer.vocab_size:
        return get_tokenizer("gpt2")
    raise PrometheanError(
        f"the model's vocabulary has {vocab_size} ids, fewer than GPT-2's "
        f"{GPT2Tokenizer.vocab_size}, and {directory} holds no tokenizer; name its tokenizer with "
        "--tokenizer (bytes or a tokenizer directory)."
    )


@convert_app.command("from-torch")
def convert_from_torch(
    source: Annotated[Path, typer.Argument(help="A PyTorch .pt file (read without running pickled code).")],
    out: Annotated[Path, typer.Option("--out", help="Checkpoint directory to write.")],
    source_format: Annotated[Optional[str], typer.Option(
        "--format", help="nanogpt, gemma3-scratch, minimac or state-dict (default: detected "
        "from the tensor names).")] = None,
    tokenizer: Annotated[Optional[str], typer.Option(
        help="gpt2, bytes, a tokenizer directory, or nanoGPT's meta.pkl (its characters become "
        "a char tokenizer). Default: gpt2 when the vocabulary holds it.")] = None,
    mapping: Annotated[Optional[Path], typer.Option(
        "--mapping", help="TOML naming where tensors go ([tensors] ours = theirs, {layer} "
        "placeholders; [model] config).")] = None,
    config: Annotated[Optional[Path], typer.Option(
        "--config", help="JSON or TOML of the system's own config keys (the Gemma-3 notebook's, "
        "MiniMacLLM's, nanoGPT's model_args; ModelConfig fields for state-dict), overriding the "
        "file's or the defaults.")] = None,
    n_head: Annotated[Optional[int], typer.Option(
        "--n-head", min=1, help="Head count of a bare nanoGPT state dict (default: width / 64).")] = None,
    overwrite: OverwriteCheckpointOption = False,
) -> None:
    """Import a nanoGPT, Gemma-3-from-scratch or MiniMacLLM .pt checkpoint (or any state dict)."""
    import torch

    from promethean.checkpoint import refuse_to_replace, save_checkpoint

    refuse_to_replace(out, overwrite)
    from promethean.interop.torch_import import describe, import_torch
    from promethean.model import Transformer
    from promethean.tokenizer import GPT2Tokenizer, get_tokenizer

    meta = tokenizer if tokenizer is not None and tokenizer.endswith(".pkl") else None
    result = import_torch(source, source_format, mapping=mapping, config=config, n_head=n_head,
                          meta=meta)
    if result.tokenizer is not None:
        chosen = result.tokenizer
    elif tokenizer is not None:
        chosen = get_tokenizer(tokenizer)
    elif result.config.vocab_size >= GPT2Tokenizer.vocab_size:
        chosen = get_tokenizer("gpt2")
    else:
        raise PrometheanError(
            f"the model's vocabulary has {result.config.vocab_size} ids, fewer than GPT-2's "
            f"{GPT2Tokenizer.vocab_size}; name its tokenizer with --tokenizer (bytes, a tokenizer "
            "directory, or nanoGPT's meta.pkl)."
        )
    with torch.device("meta"):
        model = Transformer(result.config)
    model.load_state_dict(result.state, strict=True, assign=True)
    model.tie_weights()
    save_checkpoint(out, model, chosen, {"imported_from": str(source), "format": result.format,
                                         "notes": result.notes})
    for line in describe(result):
        typer.echo(line)
    typer.echo(f"wrote {out} ({model.num_parameters():,} parameters, {chosen.kind} tokenizer)")


@convert_app.command("to-hf")
def convert_to_hf(
    checkpoint: Annotated[Path, typer.Argument(help="A Promethean checkpoint directory.")],
    out: Annotated[Path, typer.Option("--out", help="transformers directory to write.")],
) -> None:
    """Export a checkpoint to the matching transformers layout."""
    from promethean.checkpoint import load_checkpoint
    from promethean.interop.hf import export_hf

    export_hf(load_checkpoint(checkpoint).model, out)
    console.print(f"wrote {out}")


@app.command("export")
def export(
    checkpoint: Annotated[Path, typer.Argument(help="A Promethean checkpoint directory.")],
    export_format: Annotated[
        str, typer.Option("--format", help="hf (transformers + PEFT adapters), onnx or gguf.")
    ],
    out: Annotated[
        Optional[Path],
        typer.Option("--out", help="Where to write (default: beside CKPT as CKPT-hf, CKPT.onnx, CKPT.gguf)."),
    ] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing output.")] = False,
) -> None:
    """Export a checkpoint for transformers/PEFT, ONNX Runtime or llama.cpp."""
    from promethean.interop.export import export_checkpoint

    written = export_checkpoint(checkpoint, export_format, out, overwrite=overwrite)
    console.print(f"wrote {written}")
