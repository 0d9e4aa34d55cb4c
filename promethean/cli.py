"""The `promethean` command. Each verb is a thin call into the modules that own the logic.

Bad input raises PrometheanError somewhere below; `main()` prints its sentence and exits 1, so
no user ever sees a traceback for a mistake of theirs.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from promethean.errors import PrometheanError
from promethean.inference import (
    DEFAULT_MAX_ADAPTER_ENGINES,
    DEFAULT_MAX_BATCH_SIZE,
    DEFAULT_MAX_QUEUE,
)

app = typer.Typer(
    help="Train, adapt, remember and serve small language models on one modest machine.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
model_app = typer.Typer(help="Inspect and create models.", no_args_is_help=True)
convert_app = typer.Typer(help="Convert to and from Hugging Face transformers layouts.",
                          no_args_is_help=True)
data_app = typer.Typer(help="Corpora and their preparation into token files.", no_args_is_help=True)
tokenizer_app = typer.Typer(help="Train and inspect tokenizers.", no_args_is_help=True)
app.add_typer(model_app, name="model")
app.add_typer(convert_app, name="convert")
app.add_typer(data_app, name="data")
app.add_typer(tokenizer_app, name="tokenizer")
memory_app = typer.Typer(help="The context memory: add, search, stats, prune.", no_args_is_help=True)
app.add_typer(memory_app, name="memory")

console = Console()
err_console = Console(stderr=True)

DeviceOption = Annotated[
    Optional[str], typer.Option("--device", help="cpu, cuda, cuda:N or mps (default: best available).")
]
OverwriteCheckpointOption = Annotated[bool, typer.Option(
    "--overwrite", help="Write into a directory that already holds files: a checkpoint there has "
    "its model files replaced; everything else in it (adapters/, your files) is kept.")]
DtypeOption = Annotated[str, typer.Option(
    "--dtype", help="fp32, bf16, fp16 or int8 (weight-only). bf16 and int8 are converted from "
    "fp32 weights after any adapter merge.")]


def _load_model(source: str, device_name: str | None, dtype_name: str, seed: int = 0,
                adapter: str | None = None):
    """A checkpoint directory, or a preset name (random weights, said so on stderr), with the
    checkpoint's adapter `adapter` merged in; fp32, bf16 and int8 are prepared for inference
    (`promethean.inference.quantize`: bf16 and int8 from the fp32 weights after the merge, and
    each with the fused decode step where it runs), fp16 is loaded directly."""
    import torch

    from promethean.checkpoint import load_checkpoint, resolve_model_source
    from promethean.device import resolve_device, resolve_dtype
    from promethean.inference.quantize import check_inference_dtype, prepare_for_inference
    from promethean.model import Transformer
    from promethean.tokenizer import get_tokenizer

    device = resolve_device(device_name)
    check_inference_dtype(dtype_name)
    prepared = dtype_name in ("fp32", "bf16", "int8")
    dtype = torch.float32 if prepared else resolve_dtype(dtype_name, device)
    resolved = resolve_model_source(source)
    if adapter is not None and resolved.checkpoint is None:
        raise PrometheanError(f"--adapter needs a checkpoint directory; '{source}' is a preset.")
    if resolved.checkpoint is not None:
        checkpoint = load_checkpoint(source, device=device, dtype=dtype)
        model, tokenizer = checkpoint.model, checkpoint.tokenizer
        if adapter is not None:
            from promethean.continual.adapters import load_adapter_onto

            load_adapter_onto(model, source, adapter)  # merged into the weights: base speed
        if prepared:
            prepare_for_inference(model, dtype_name)
        return model, tokenizer
    preset = resolved.preset
    err_console.print(
        f"[yellow]note:[/] '{source}' is a preset, not a checkpoint: the weights are random."
    )
    torch.manual_seed(seed)
    with torch.device(device):
        model = Transformer(preset.model)
    if prepared:
        return prepare_for_inference(model, dtype_name), get_tokenizer(preset.tokenizer)
    return model.to(dtype).eval(), get_tokenizer(preset.tokenizer)


@model_app.command("list")
def model_list() -> None:
    """List the presets."""
    from promethean.config import list_presets

    for name in list_presets():
        console.print(name)


@model_app.command("info")
def model_info(source: Annotated[str, typer.Argument(help="Preset name, preset .toml or checkpoint.")]) -> None:
    """Print a model's architecture and parameter counts."""
    import torch

    from promethean.checkpoint import resolve_model_source
    from promethean.model import Transformer

    config = resolve_model_source(source).config
    with torch.device("meta"):  # counting needs shapes, not memory
        model = Transformer(config)
    table = Table(title=f"{config.name}", show_header=False)
    sliding = sum(config.is_sliding_layer(i) for i in range(config.n_layer))
    rows = [
        ("layers", f"{config.n_layer} ({sliding} sliding-window, {config.n_layer - sliding} global)"),
        ("width", str(config.n_embd)),
        ("heads", f"{config.n_head} query / {config.kv_heads} key-value, head size {config.head_size}"),
        ("mlp", f"{config.mlp}, {config.d_ff}"),
        ("norm", f"{config.norm}{' (sandwich)' if config.sandwich_norm else ''}"),
        ("positions", config.position),
        ("context", str(config.context_length)),
        ("vocabulary", str(config.vocab_size)),
        ("total parameters", f"{model.num_parameters():,}"),
        ("non-embedding parameters", f"{model.num_non_embedding_parameters():,}"),
        ("embedding parameters", f"{model.num_embedding_parameters():,}"),
    ]
    if config.ssm_layers:
        attention = config.n_layer - len(config.ssm_layers)
        rows.insert(1, ("mixers", (
            f"selective SSM in layers {config.ssm_layers} (state {config.ssm_state_size}, "
            f"expand {config.ssm_expand}, spike threshold {config.spike_threshold}), "
            f"attention in {attention}")))
    for key, value in rows:
        table.add_row(key, value)
    console.print(table)


@model_app.command("init")
def model_init(
    preset: Annotated[str, typer.Argument(help="Preset name or .toml file.")],
    out: Annotated[Path, typer.Option("--out", help="Checkpoint directory to write.")],
    seed: Annotated[int, typer.Option(help="Seed for the random weights.")] = 0,
    model_set: ModelSetOption = None,
    overwrite: OverwriteCheckpointOption = False,
) -> None:
    """Write a checkpoint with freshly initialised weights."""
    import torch

    from promethean.checkpoint import refuse_to_replace, save_checkpoint

    refuse_to_replace(out, overwrite)
    from promethean.config import load_preset
    from promethean.model import Transformer
    from promethean.tokenizer import get_tokenizer

    from promethean.checkpoint import apply_model_overrides
    from promethean.train.config import parse_model_override

    chosen = load_preset(preset)
    config = apply_model_overrides(chosen.model, dict(map(parse_model_override, model_set or ())))
    torch.manual_seed(seed)
    model = Transformer(config)
    save_checkpoint(out, model, get_tokenizer(chosen.tokenizer), {"preset": chosen.name, "seed": seed})
    console.print(f"wrote {out} ({model.num_parameters():,} parameters)")


@app.command()
def generate(
    source: Annotated[str, typer.Argument(help="Checkpoint directory or preset name.")],
    prompt: Annotated[list[str], typer.Option("--prompt", "-p", help="Prompt text (repeat for a batch).")],
    max_new_tokens: Annotated[int, typer.Option(help="Most tokens to add.")] = 128,
    temperature: Annotated[float, typer.Option(help="0 means greedy.")] = 0.8,
    top_k: Annotated[Optional[int], typer.Option(help="Sample among the k likeliest tokens.")] = 200,
    top_p: Annotated[Optional[float], typer.Option(help="Nucleus sampling mass.")] = None,
    repetition_penalty: Annotated[float, typer.Option(help="> 1 discourages repeats.")] = 1.0,
    stop: Annotated[Optional[list[str]], typer.Option(help="Stop string (repeatable).")] = None,
    stop_at_end_of_text: Annotated[bool, typer.Option(help="Stop at <|endoftext|>.")] = True,
    seed: Annotated[Optional[int], typer.Option(help="Seed for sampling (and preset weights).")] = None,
    crop: Annotated[bool, typer.Option(help="Keep only the most recent tokens of a long prompt.")] = False,
    device: DeviceOption = None,
    dtype: DtypeOption = "fp32",
    adapter: Annotated[Optional[str], typer.Option(
        "--adapter", help="A LoRA adapter of the checkpoint (CHECKPOINT/adapters/NAME) to apply.")] = None,
) -> None:
    """Generate text from a checkpoint (or a randomly initialised preset)."""
    from promethean.inference.generate import SamplingParams, generate_text, stream

    model, tokenizer = _load_model(source, device, dtype, seed=seed or 0, adapter=adapter)
    params = SamplingParams(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        repetition_penalty=repetition_penalty,
        stop_token_ids=(tokenizer.eot_id,) if stop_at_end_of_text else (),
        stop_strings=tuple(stop or ()),
        seed=seed,
    )
    if len(prompt) == 1:
        sys.stdout.write(prompt[0])
        for piece in stream(model, tokenizer, prompt[0], params, crop=crop):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        return
    for text, completion in zip(prompt, generate_text(model, tokenizer, prompt, params, crop=crop)):
        console.rule(f"finish: {completion.finish_reason}")
        sys.stdout.write(text + completion.text + "\n")


@app.command()
def chat(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint directory to chat with.")],
    adapter: Annotated[Optional[str], typer.Option(
        "--adapter", help="A LoRA adapter of the checkpoint (CHECKPOINT/adapters/NAME) to apply.")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Most tokens per reply.")] = 128,
    temperature: Annotated[float, typer.Option(help="0 means greedy.")] = 0.8,
    top_k: Annotated[Optional[int], typer.Option(help="Sample among the k likeliest tokens.")] = 200,
    seed: Annotated[Optional[int], typer.Option(help="Seed for sampling.")] = None,
    device: DeviceOption = None,
    dtype: DtypeOption = "fp32",
    memory: Annotated[Optional[Path], typer.Option(
        "--memory", help="A memory directory (created if absent): relevant memories go into each "
        "prompt, and every exchange is remembered there for later sessions.")] = None,
    memory_tokens: Annotated[int, typer.Option(
        help="Most tokens of memories per prompt (at most half the room the reply leaves).")] = 256,
) -> None:
    """Chat in the terminal ('Human: ...' / 'Assistant: ...'); /exit or end of input ends it."""
    from promethean.inference.chat import ChatSession, run_chat
    from promethean.inference.generate import SamplingParams

    if not checkpoint.is_dir():
        raise PrometheanError(f"{checkpoint} is not a checkpoint directory.")
    model, tokenizer = _load_model(str(checkpoint), device, dtype, adapter=adapter)
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                            seed=seed)
    session_memory = None
    if memory is not None:
        from promethean.context.retrieval import SessionMemory

        if memory_tokens < 1:
            raise PrometheanError(f"--memory-tokens must be at least 1, got {memory_tokens}.")
        room = model.config.context_length - max_new_tokens
        session_memory = SessionMemory.open(memory, model, tokenizer,
                                            token_budget=max(1, min(memory_tokens, room // 2)))
    if sys.stdin.isatty():
        err_console.print("chat: type a message and press Enter; /exit or Ctrl-D ends.")
    try:
        run_chat(ChatSession(model, tokenizer, params, memory=session_memory), sys.stdin, sys.stdout)
    finally:  # /exit, end of input (Ctrl-D) and Ctrl-C alike: what was said is kept
        if session_memory is not None:
            session_memory.save()


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


# ------------------------------------------------------------------------- tokenizer commands


@tokenizer_app.command("train")
def tokenizer_train(
    corpus: Annotated[str, typer.Argument(
        help="A named corpus (e.g. shakespeare), or a local file, folder or glob.")],
    out: Annotated[Path, typer.Option("--out", help="Directory to write the tokenizer to.")],
    vocab_size: Annotated[Optional[int], typer.Option(
        help="Ids in all, <|endoftext|> included (default: 8000 for bpe, 512 for char).")] = None,
    kind: Annotated[str, typer.Option(
        help="bpe (byte-level BPE) or char (characters, bytes for the rest).")] = "bpe",
) -> None:
    """Train a tokenizer on a corpus; pass its directory wherever a tokenizer is asked for."""
    from promethean.data.corpora import open_corpus
    from promethean.tokenizer import DEFAULT_VOCAB_SIZES, train_tokenizer, write_tokenizer_directory

    source = open_corpus(corpus)
    with err_console.status(f"training a {kind} tokenizer on {source.name}"):
        # documents() is lazy, so a bad --kind or --vocab-size is refused before any is read.
        tokenizer = train_tokenizer(kind, source.documents(), vocab_size)
    write_tokenizer_directory(tokenizer, out)
    # Plain echo, not rich: corpus text may hold [brackets], and long lines should not be wrapped.
    typer.echo(
        f"wrote {out}: a {kind} tokenizer of {tokenizer.vocab_size:,} ids trained on {source.name} "
        f"(fingerprint {tokenizer.fingerprint[:12]})"
    )
    requested = DEFAULT_VOCAB_SIZES[kind] if vocab_size is None else vocab_size
    if tokenizer.vocab_size < requested:
        typer.echo(
            f"note: asked for {requested:,} ids; the corpus had nothing more to learn.", err=True
        )
    sample = next(source.documents())[:100]
    ids = tokenizer.encode(sample)
    typer.echo(f"sample: {sample!r}")
    typer.echo(f"  {len(ids)} tokens, {len(sample) / len(ids):.2f} characters each: {ids}")
    typer.echo(f"  pieces: {[tokenizer.decode([token]) for token in ids]}")


# ------------------------------------------------------------------------------ data commands


@data_app.command("prepare")
def data_prepare(
    corpus: Annotated[str, typer.Argument(
        help="A named corpus (see `data list`), or a local file, folder or glob.")],
    tokenizer: Annotated[str, typer.Option(
        "--tokenizer", help="bytes, gpt2, or a tokenizer directory (trained here, a Hugging Face "
        "tokenizer.json, or vocab.json + merges.txt/merges.json).")],
    out: Annotated[Path, typer.Option(
        "--out", help="Directory to write train.bin, val.bin and meta.json to.")],
    workers: Annotated[Optional[int], typer.Option(
        help="Tokenizing processes (default: every core this process may use).")] = None,
    val_fraction: Annotated[Optional[float], typer.Option(
        help="Share of documents for validation, chosen by a hash of their text "
        "(default 0.005).")] = None,
    text_field: Annotated[str, typer.Option(
        help="The text field of .jsonl and .parquet records.")] = "text",
    overwrite: Annotated[bool, typer.Option(
        help="Replace data prepared differently (other tokenizer, source or settings).")] = False,
    val: Annotated[Optional[str], typer.Option(
        "--val", help="A separate validation file (folder or glob) to tokenize as the val split "
        "instead of carving --val-fraction out of the corpus; corpus documents identical to one "
        "of its documents are left out of train.")] = None,
) -> None:
    """Tokenize a corpus into flat token files for training, in parallel."""
    from promethean.data.corpora import open_corpus
    from promethean.data.prepare import (
        DEFAULT_VAL_FRACTION,
        default_workers,
        prepare,
        start_worker_server,
    )
    from promethean.tokenizer import resolve_tokenizer

    if val is not None and val_fraction is not None:
        raise PrometheanError("--val names the validation data and --val-fraction carves it out "
                              "of the corpus; give one of them, not both.")
    if (default_workers() if workers is None else workers) > 1:
        start_worker_server()  # its start-up overlaps the corpus hashing below
    source = open_corpus(corpus, text_field=text_field)
    val_source = open_corpus(val, text_field=text_field) if val is not None else None
    chosen = resolve_tokenizer(tokenizer)
    separate = {} if val_source is None else {
        "val_documents": val_source.documents(), "val_source_name": val_source.name,
        "val_source_sha256": val_source.fingerprint(),
    }
    result = prepare(
        source.documents(), chosen, out, source_name=source.name,
        source_sha256=source.fingerprint(), workers=workers,
        val_fraction=DEFAULT_VAL_FRACTION if val_fraction is None else val_fraction,
        overwrite=overwrite, source_replaced_bytes=lambda: source.stats.replaced_bytes, **separate,
    )
    splits = result.meta["splits"]
    if result.already_prepared:
        typer.echo(f"already prepared: {out} holds {source.name} with tokenizer {chosen.kind} and "
                   "these settings; nothing to do.")
        return

    def count(number: int, noun: str) -> str:
        return f"{number:,} {noun}{'' if number == 1 else 's'}"

    train, val = (
        f"{name} {count(splits[name]['tokens'], 'token')} in "
        f"{count(splits[name]['documents'], 'document')}"
        for name in ("train", "val")
    )
    typer.echo(
        f"wrote {out}: {count(result.documents, 'document')}, {count(result.tokens, 'token')} "
        f"({chosen.kind}, {result.meta['dtype']}) in {result.seconds:.1f} s, "
        f"{result.tokens / max(result.seconds, 1e-9):,.0f} tokens/s; {train}, {val}"
    )
    if result.meta.get("val_duplicates_dropped"):
        typer.echo(f"note: {count(result.meta['val_duplicates_dropped'], 'corpus document')} "
                   f"identical to a document of {val} left out of train.", err=True)
    if splits["val"]["documents"] == 0:
        typer.echo("note: val.bin is empty; documents are split whole and this corpus has too few "
                   "(or --val-fraction is 0), so evaluate on another prepared corpus.", err=True)


@data_app.command("list")
def data_list() -> None:
    """List the named corpora (any local file, folder or glob works too)."""
    from promethean.data.corpora import is_cached, list_corpora

    table = Table(title="named corpora")
    for column in ("name", "description", "size", "license", "network"):
        table.add_column(column, overflow="fold")
    for info in list_corpora():
        if info.needs_network:
            network = "yes (hub)"
        else:
            network = "no" if is_cached(info.name) else "once (PyPI)"
        table.add_row(info.name, info.description, info.size, info.license, network)
    console.print(table)


SetOption = Annotated[Optional[list[str]], typer.Option(
    "--set", help="Override a setting: key=value, the value a TOML literal (repeatable).")]
ModelSetOption = Annotated[Optional[list[str]], typer.Option(
    "--model-set", help="Override a model setting: key=value, a TOML literal (repeatable); on a "
    "checkpoint only those its weights allow (rope_theta, sliding_window, context_length, ...).")]
ResumeOption = Annotated[Optional[Path], typer.Option(
    "--resume", help="A training checkpoint (out/step-XXXXXX) to continue exactly.")]


RunOverwriteOption = Annotated[bool, typer.Option(
    "--overwrite", help="Let this run replace another run's step checkpoints and metrics in its "
    "out (a fresh start there, or a resume from an older step); other files are kept.")]
BranchOption = Annotated[Optional[Path], typer.Option(
    "--branch", help="With --resume: continue into this new run directory (out) instead, leaving "
    "the original run as it is.")]


BudgetOption = Annotated[Optional[str], typer.Option(
    "--memory-budget", help="Memory to fit in (8GB, 512MB): micro-batch and accumulation are "
    "chosen to fit, keeping batch_size x grad_accum sequences per step; refused before training "
    "if nothing fits.")]


MinDeltaOption = Annotated[Optional[float], typer.Option(
    "--min-delta", help="Early stopping: the validation loss must improve by more than this to "
    "count as better (early_stopping_min_delta; default 0.001).")]
PatienceOption = Annotated[Optional[int], typer.Option(
    "--patience", help="Early stopping: evaluations without improvement before the run stops "
    "(early_stopping_patience; default 5).")]
MaxMinutesOption = Annotated[Optional[float], typer.Option(
    "--max-minutes", help="Wall-time budget (max_minutes), earlier legs of a resumed run "
    "included: when spent, the run evaluates, saves a checkpoint and stops.")]


def _knob_overrides(min_delta: float | None, patience: int | None,
                    max_minutes: float | None) -> list[str]:
    """The training options given as flags, as `--set` overrides (applied after --set)."""
    given = {"early_stopping_min_delta": min_delta, "early_stopping_patience": patience,
             "max_minutes": max_minutes}
    return [f"{key}={value!r}" for key, value in given.items() if value is not None]


def _run_training(config, resume: Path | None, memory_budget: str | None = None,
                  overwrite: bool = False, branch: Path | None = None) -> None:
    from promethean.train.trainer import train

    if branch is not None:
        if resume is None:
            raise PrometheanError("--branch continues a run elsewhere; give the --resume "
                                  "checkpoint to branch from.")
        config = config.model_copy(update={"out": str(branch)})

    if memory_budget is not None:
        from promethean.train.memory import fit_to_budget

        config, estimate = fit_to_budget(config, memory_budget)
        typer.echo(
            f"memory budget {memory_budget}: micro-batch {config.batch_size} x {config.grad_accum} "
            f"accumulation ({config.batch_size * config.grad_accum} sequences a step), "
            f"estimated peak {estimate.describe()}", err=True,
        )
    result = train(config, resume=resume, overwrite=overwrite)
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, rank 0 alone reports
        best = "" if result.best_val_loss is None else f"; best val loss {result.best_val_loss:.4f} in {result.best_checkpoint}"
        skipped = f"; {result.skipped_steps} steps skipped (non-finite)" if result.skipped_steps else ""
        typer.echo(f"{result.stopped.replace('_', ' ')} at step {result.steps} ({result.tokens:,} tokens): "
                   f"checkpoint {result.final_checkpoint}{best}{skipped}")
    if result.signal is not None:
        # Saved, and resumable; the exit status still says it was stopped (128 + the signal).
        sys.exit(130 if result.signal == "SIGINT" else 143)


@app.command()
def pretrain(
    config: Annotated[Optional[Path], typer.Argument(
        help="Training config (.toml); see TrainConfig. Optional when --preset/--set give "
        "model, data and out.")] = None,
    preset: Annotated[Optional[str], typer.Option(
        "--preset", help="Model preset to train (short for --set model=NAME).")] = None,
    set_: SetOption = None,
    model_set: ModelSetOption = None,
    resume: ResumeOption = None,
    memory_budget: BudgetOption = None,
    overwrite: RunOverwriteOption = False,
    branch: BranchOption = None,
    min_delta: MinDeltaOption = None,
    patience: PatienceOption = None,
    max_minutes: MaxMinutesOption = None,
) -> None:
    """Train a model (a preset, or a checkpoint to continue from) on prepared token data."""
    from promethean.train.config import load_train_config

    overrides = [*([f"model={preset!r}"] if preset else []), *(set_ or []),
                 *_knob_overrides(min_delta, patience, max_minutes)]
    _run_training(load_train_config(config, overrides, model_set or ()), resume, memory_budget,
                  overwrite, branch)


@app.command()
def finetune(
    config: Annotated[Path, typer.Argument(help="Training config (.toml); its `model` is ignored.")],
    checkpoint: Annotated[Path, typer.Option("--checkpoint", help="The checkpoint to fine-tune.")],
    set_: SetOption = None,
    model_set: ModelSetOption = None,
    resume: ResumeOption = None,
    memory_budget: BudgetOption = None,
    overwrite: RunOverwriteOption = False,
    branch: BranchOption = None,
    min_delta: MinDeltaOption = None,
    patience: PatienceOption = None,
    max_minutes: MaxMinutesOption = None,
) -> None:
    """Fine-tune every weight of a checkpoint on prepared token data."""
    from promethean.checkpoint import read_checkpoint_record
    from promethean.train.config import load_train_config

    read_checkpoint_record(checkpoint)  # a clear sentence if it is not a checkpoint
    overrides = [*(set_ or []), *_knob_overrides(min_delta, patience, max_minutes),
                 f"model={str(checkpoint)!r}"]
    _run_training(load_train_config(config, overrides, model_set or ()), resume, memory_budget,
                  overwrite, branch)


@app.command()
def plot(
    run_dir: Annotated[Path, typer.Argument(help="A training run directory (holds metrics.jsonl).")],
    out: Annotated[Optional[Path], typer.Option(help="PNG to write (default RUN_DIR/metrics.png).")] = None,
) -> None:
    """Draw a run's train/validation loss and learning rate as a PNG."""
    from promethean.train.plot import plot_run

    console.print(f"wrote {plot_run(run_dir, out)}")


@app.command()
def quickstart(
    out: Annotated[Path, typer.Option(help="Where everything goes (corpus split, tokenizer, data, run, "
                                      "checkpoint, plot).")] = Path("runs/quickstart"),
    minutes: Annotated[float, typer.Option(help="Wall time for the training itself.")] = 5.0,
    device: DeviceOption = None,
    steps: Annotated[Optional[int], typer.Option(hidden=True, help="Fixed step count (tests).")] = None,
) -> None:
    """Train a small Shakespeare model from scratch in a few minutes, offline, and sample from it."""
    from promethean.quickstart import run_quickstart

    run_quickstart(out, minutes=minutes, device=device, steps=steps)


# ------------------------------------------------------------------------- continual learning


@app.command()
def learn(
    checkpoint: Annotated[Path, typer.Option("--checkpoint", help="The base checkpoint (LoRA), or "
                                             "the last stage's checkpoint (--full).")],
    domain: Annotated[str, typer.Option("--domain", help="Name of the domain being learned.")],
    data: Annotated[str, typer.Option("--data", help="A named corpus, a local file/folder/glob, or "
                                      "a prepared data directory.")],
    update_steps: Annotated[int, typer.Option("--update-steps", help="Optimizer steps.")],
    run: Annotated[Optional[Path], typer.Option("--run", help="Run directory holding continual.json "
                   "(default: the checkpoint's run, else CHECKPOINT/continual).")] = None,
    use_ewc: Annotated[bool, typer.Option("--use-ewc", help="Elastic weight consolidation.")] = False,
    ewc_lambda: Annotated[Optional[float], typer.Option("--ewc-lambda", help="EWC strength, on "
                          "the Fisher of the sequence log-likelihood (default 0.15).")] = None,
    ewc_gamma: Annotated[Optional[float], typer.Option("--ewc-gamma", help="Online EWC decay "
                         "(default 1).")] = None,
    replay: Annotated[Optional[float], typer.Option("--replay", help="Share of each batch "
                      "replayed from earlier domains (default 0: no replay).")] = None,
    replay_quota: Annotated[Optional[int], typer.Option("--replay-quota", help="Windows kept per "
                            "domain (default 512).")] = None,
    lora_rank: Annotated[Optional[int], typer.Option("--lora-rank", help="LoRA rank (default 8).")] = None,
    lora_alpha: Annotated[Optional[float], typer.Option("--lora-alpha", help="LoRA alpha "
                                                        "(default 2 x rank).")] = None,
    lora_dropout: Annotated[Optional[float], typer.Option("--lora-dropout", help="(default 0)")] = None,
    target: Annotated[Optional[list[str]], typer.Option("--target", help="Layers to adapt: a last "
                      "name part (q_proj) or a regex over full names (repeatable; default: every "
                      "block linear layer).")] = None,
    lora_head: Annotated[bool, typer.Option("--lora-head", help="Adapt the output head (lm_head) "
                         "too, besides the --target layers.")] = False,
    full: Annotated[bool, typer.Option("--full", help="Fine-tune every weight instead of LoRA.")] = False,
    from_base: Annotated[bool, typer.Option("--from-base", help="The stage's adapter starts fresh "
                         "on the base, independent of earlier stages; load it by its domain "
                         "name.")] = False,
    adapter_name: Annotated[Optional[str], typer.Option("--adapter-name", help="Adapter name "
                            "(default: the domain).")] = None,
    base_domain: Annotated[Optional[str], typer.Option("--base-domain", help="NAME=DATA: the domain "
                           "the checkpoint was trained on, measured from the first stage.")] = None,
    lr: Annotated[Optional[float], typer.Option("--lr", help="Peak learning rate (default 2e-3 "
                                                "LoRA, 3e-4 full).")] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", help="(default 8)")] = None,
    block_size: Annotated[Optional[int], typer.Option("--block-size", help="(default 256)")] = None,
    eval_batches: Annotated[Optional[int], typer.Option("--eval-batches", help="Cap on validation "
                            "batches per domain (default: the whole split).")] = None,
    val_fraction: Annotated[Optional[float], typer.Option("--val-fraction", help="Validation "
                            "share when --data is a corpus to prepare (default 0.02).")] = None,
    seed: Annotated[Optional[int], typer.Option("--seed", help="(default 0)")] = None,
    device: DeviceOption = None,
) -> None:
    """Learn a new domain (a LoRA adapter, or full fine-tuning) and record every domain's loss."""
    from promethean.continual.adapters import DEFAULT_TARGETS
    from promethean.continual.learn import LearnOptions, learn

    base = None
    if base_domain is not None:
        name, separator, path = base_domain.partition("=")
        if not separator or not name or not path:
            raise PrometheanError(f"--base-domain '{base_domain}' is not of the form NAME=DATA.")
        base = (name, path)
    targets = tuple(target) if target else DEFAULT_TARGETS
    if lora_head and "lm_head" not in targets:
        targets += ("lm_head",)
    # Only what was given: LearnOptions holds the defaults.
    given = {key: value for key, value in {
        "lora_rank": lora_rank, "lora_dropout": lora_dropout, "ewc_lambda": ewc_lambda,
        "ewc_gamma": ewc_gamma, "replay": replay, "replay_quota": replay_quota,
        "batch_size": batch_size, "block_size": block_size, "val_fraction": val_fraction,
        "seed": seed,
    }.items() if value is not None}
    result = learn(LearnOptions(
        checkpoint=str(checkpoint), domain=domain, data=data, update_steps=update_steps,
        run=str(run) if run else None, full=full, from_base=from_base,
        adapter_name=adapter_name, lora_alpha=lora_alpha, target_modules=targets,
        use_ewc=use_ewc, base_domain=base, lr=lr, eval_batches=eval_batches, device=device,
        **given,
    ))
    typer.echo(f"stage {result.stage} ({result.domain}): wrote {result.output} "
               f"({result.trainable_parameters:,} trained parameters, {result.seconds:.0f} s)")
    for name, values in result.val.items():
        typer.echo(f"  {name}: validation loss {values['loss']:.4f}, perplexity "
                   f"{values['perplexity']:.1f}")


@app.command()
def forgetting(
    runs: Annotated[list[Path], typer.Argument(help="Continual-learning run directories.")],
    out: Annotated[Optional[Path], typer.Option(help="Heatmap PNG (default RUN/forgetting.png; "
                                                "one run only).")] = None,
) -> None:
    """Print a continual run's loss matrix, forgetting and transfer, and draw its heatmap; given
    several runs, also compare them."""
    from promethean.continual.forgetting import (
        draw_heatmap,
        forgetting_report,
        print_comparison,
        print_report,
    )

    if out is not None and len(runs) > 1:
        raise PrometheanError("--out names one heatmap; give one run with it.")
    reports = [forgetting_report(run) for run in runs]
    for report in reports:
        print_report(report, console)
        console.print(f"wrote {draw_heatmap(report, out)}")
    if len(reports) > 1:
        print_comparison(reports, console)


@app.command("finetune-chat")
def finetune_chat(
    checkpoint: Annotated[Path, typer.Argument(help="The checkpoint that served the chats.")],
    log: Annotated[Path, typer.Option("--log", help="The server's chat log (serve --chat-log).")] = Path("chat.jsonl"),
    name: Annotated[str, typer.Option("--name", help="Adapter name: CHECKPOINT/adapters/NAME.")] = "chat",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an adapter of that name.")] = False,
    rank: Annotated[int, typer.Option("--rank", help="LoRA rank.")] = 8,
    alpha: Annotated[Optional[float], typer.Option("--alpha", help="LoRA alpha (default 2 x rank).")] = None,
    lr: Annotated[float, typer.Option("--lr", help="Peak learning rate (warmup, then cosine).")] = 2e-3,
    max_steps: Annotated[int, typer.Option("--max-steps", help="Most optimizer steps.")] = 1000,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Examples per step.")] = 8,
    block_size: Annotated[Optional[int], typer.Option("--block-size", help="Longest example in "
                          "tokens (default: the model's context).")] = None,
    eval_every: Annotated[int, typer.Option("--eval-every", help="Steps between validations.")] = 20,
    patience: Annotated[Optional[int], typer.Option("--patience", help="Validations without "
                        "improvement before stopping (default: the trainer's, 5).")] = None,
    val_fraction: Annotated[float, typer.Option("--val-fraction", help="Share of the "
                            "conversations held out (at least one).")] = 0.1,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    device: DeviceOption = None,
) -> None:
    """Train a LoRA adapter on the logged chats (replies only), keeping the best by validation."""
    from promethean.continual.chat_tuning import ChatTuningOptions
    from promethean.continual.chat_tuning import finetune_chat as run_finetune_chat

    result = run_finetune_chat(ChatTuningOptions(
        checkpoint=str(checkpoint), log=str(log), name=name, overwrite=overwrite, rank=rank,
        alpha=alpha, lr=lr, max_steps=max_steps, batch_size=batch_size, block_size=block_size,
        eval_every=eval_every, patience=patience, val_fraction=val_fraction, seed=seed,
        device=device,
    ))
    (train_chats, val_chats), (train_examples, val_examples) = result.conversations, result.examples
    typer.echo(f"conversations: {train_chats} to train on ({train_examples} examples), {val_chats} "
               f"held out for validation ({val_examples} examples); log format: {result.log_format}")
    typer.echo(f"{result.steps} steps ({result.stopped.replace('_', ' ')}): best validation loss "
               f"{result.best_val_loss:.4f} at step {result.best_step}, base model "
               f"{result.base_val_loss:.4f}")
    typer.echo(f"wrote {result.output} ({result.trainable_parameters:,} trained parameters, "
               f"{result.seconds:.0f} s): use it with --adapter {name}, or serve it as "
               f"{checkpoint.resolve().name}:{name}")


# ------------------------------------------------------------------------------ memory
MemoryDirArgument = Annotated[Path, typer.Argument(help="Memory directory (a memory tree).")]
MemoryModelOption = Annotated[Optional[str], typer.Option(
    "--checkpoint", "-c", help="Embed with this checkpoint's mean-pooled hidden states (and score "
    "surprise with it). Without it: hashed character n-grams, no model needed.")]
HashedDimOption = Annotated[int, typer.Option(help="Dimensions of the hashed n-gram embedder.")]


def _memory_embedder(checkpoint: str | None, dim: int):
    from promethean.context.embed import embedder_for

    if checkpoint is None:
        err_console.print("[yellow]note:[/] no --checkpoint: using the hashed character n-gram "
                          "embedder (spelling, not meaning).")
    return embedder_for(checkpoint, dim)


@memory_app.command("add")
def memory_add(
    directory: MemoryDirArgument,
    text: Annotated[Optional[list[str]], typer.Option("--text", "-t", help="A text to remember (repeatable).")] = None,
    file: Annotated[Optional[Path], typer.Option(help="JSON lines of intake records, or plain text "
                                                 "(one document per blank-line-separated paragraph).")] = None,
    checkpoint: MemoryModelOption = None,
    dim: HashedDimOption = 256,
    min_salience: Annotated[float, typer.Option(help="Drop texts scoring below this (0..1).")] = 0.0,
    near_duplicate: Annotated[float, typer.Option(help="Cosine above which a text is a near duplicate.")] = 0.95,
    max_items: Annotated[Optional[int], typer.Option(help="Keep at most this many memories.")] = None,
    max_bytes: Annotated[Optional[str], typer.Option(help="Keep the memory within this size (e.g. 50MB).")] = None,
    replay: Annotated[Optional[Path], typer.Option(help="Also feed accepted texts to this replay buffer (needs --checkpoint).")] = None,
    block_size: Annotated[int, typer.Option(help="Replay window length in tokens.")] = 256,
) -> None:
    """Remember texts: the intake scores salience, drops duplicates, and stores the rest."""
    import json

    from promethean.context.intake import DocumentRecord, Intake, parse_records
    from promethean.context.retrieval import open_memory
    from promethean.train.memory import parse_memory_size

    records = [DocumentRecord(text=t) for t in text or [] if t.strip()]
    if file is not None:
        if not file.is_file():
            raise PrometheanError(f"{file} does not exist.")
        content = file.read_text(errors="replace")
        if file.suffix in (".jsonl", ".json"):
            try:
                raw = [json.loads(line) for line in content.splitlines() if line.strip()]
            except json.JSONDecodeError as error:
                raise PrometheanError(f"{file} is not JSON lines ({error.msg}, line {error.lineno}).") from None
            records += _intake_records(raw, file)
        else:
            records += [DocumentRecord(text=p.strip(), source=str(file))
                        for p in content.split("\n\n") if p.strip()]
    if not records:
        raise PrometheanError("nothing to remember: give --text or --file.")
    if replay is not None and checkpoint is None:
        raise PrometheanError("--replay needs --checkpoint (replay windows are the model's tokens).")
    embedder, tokenizer, model = _memory_embedder(checkpoint, dim)
    tree = open_memory(directory, embedder)
    tree.set_budget(max_items, parse_memory_size(max_bytes) if max_bytes is not None else None)
    buffer = None
    if replay is not None:
        from promethean.continual.replay import ReplayBuffer

        buffer = ReplayBuffer(replay, block_size)
    batcher = None
    if model is not None:  # model passes bounded by the activations of a padded batch
        from promethean.context.intake import MemoryAwareBatcher, activation_bytes_per_token

        batcher = MemoryAwareBatcher(tokenizer.encode_ordinary, token_budget=4096,
                                     memory_budget=256 * 2**20,
                                     bytes_per_token=activation_bytes_per_token(model.config),
                                     max_row_tokens=model.config.context_length)
    intake = Intake(tree, embedder, tokenizer=tokenizer, replay=buffer, batcher=batcher,
                    surprise=embedder.loss_per_token if model is not None else None,
                    vocab_size=model.config.vocab_size if model is not None else None,
                    near_duplicate=near_duplicate, min_salience=min_salience)
    report = intake.process(records)
    tree.prune()
    tree.save(directory)
    summary = report.summary()
    typer.echo(f"remembered {summary['accepted']} of {len(records)} texts in {directory} "
               f"({summary['exact_duplicates']} exact and {summary['near_duplicates']} near "
               f"duplicates, {summary['low_salience']} below salience {min_salience}); "
               f"{len(tree)} memories now.")
    if buffer is not None:
        typer.echo(f"replay windows offered: {summary['replay_windows']}")


@memory_app.command("search")
def memory_search(
    directory: MemoryDirArgument,
    query: Annotated[str, typer.Argument(help="What to look for.")],
    k: Annotated[int, typer.Option("-k", help="How many memories.")] = 5,
    beam: Annotated[int, typer.Option(help="Search beam width (wider: slower, more exact).")] = 32,
    checkpoint: MemoryModelOption = None,
    dim: HashedDimOption = 256,
    prompt: Annotated[bool, typer.Option(help="Print the chat prompt the memories would make.")] = False,
    token_budget: Annotated[int, typer.Option(help="Token budget of the memory block (--prompt).")] = 256,
) -> None:
    """Find the memories closest to a query."""
    from promethean.context.retrieval import chat_prompt_with_memory, open_memory, retrieve
    from promethean.data.chat import Turn

    embedder, tokenizer, _model = _memory_embedder(checkpoint, dim)
    tree = open_memory(directory, embedder, create=False)
    if prompt:
        if tokenizer is None:  # no model: count bytes, an upper bound on any tokenizer's count
            from promethean.tokenizer import ByteTokenizer

            tokenizer = ByteTokenizer()
        sys.stdout.write(chat_prompt_with_memory([Turn("human", query)], tree, embedder, tokenizer,
                                                 token_budget, k, beam) + "\n")
        return
    table = Table("id", "score", "salience", "text")
    for memory in retrieve(tree, embedder, query, k, beam):
        snippet = " ".join(memory.text.split())
        table.add_row(str(memory.id), f"{memory.score:.3f}", f"{memory.salience:.3f}",
                      snippet[:100] + ("…" if len(snippet) > 100 else ""))
    console.print(table)


@memory_app.command("stats")
def memory_stats(directory: MemoryDirArgument) -> None:
    """Size, shape and budget of a memory."""
    from promethean.context.tree import MemoryTree

    tree = MemoryTree.load(directory)
    table = Table("what", "value")
    for key, value in {**tree.stats(), **tree.info}.items():
        table.add_row(key, f"{value:.3f}" if isinstance(value, float) else str(value))
    console.print(table)


@memory_app.command("prune")
def memory_prune(
    directory: MemoryDirArgument,
    max_items: Annotated[Optional[int], typer.Option(help="Keep at most this many memories.")] = None,
    max_bytes: Annotated[Optional[str], typer.Option(help="Keep the memory within this size (e.g. 50MB).")] = None,
) -> None:
    """Evict the least salient (then oldest) memories down to a budget, and keep that budget."""
    from promethean.context.tree import MemoryTree
    from promethean.train.memory import parse_memory_size

    if max_items is None and max_bytes is None:
        raise PrometheanError("give --max-items and/or --max-bytes.")
    tree = MemoryTree.load(directory)
    tree.set_budget(max_items, parse_memory_size(max_bytes) if max_bytes is not None else None)
    evicted = tree.prune()
    tree.save(directory)
    typer.echo(f"evicted {len(evicted)} memories; {len(tree)} remain ({tree.total_bytes:,} bytes).")


@app.command()
def serve(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint directory to serve.")],
    host: Annotated[str, typer.Option(help="Address to bind (loopback only by default).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    api_key: Annotated[Optional[list[str]], typer.Option(
        "--api-key", help="Require 'Authorization: Bearer KEY' on every route but /health; "
        "repeatable: each key is then a user of its own.")] = None,
    api_key_file: Annotated[Optional[Path], typer.Option(
        help="A file of API keys, one per line (as --api-key, kept out of the process list).")] = None,
    shared_memory: Annotated[bool, typer.Option(
        help="One memory for every user (by default each user, by key or by the OpenAI 'user' "
        "field, has a memory and conversations of its own).")] = False,
    chat_log: Annotated[Path, typer.Option(help="JSONL file every chat turn is appended to.")] = Path("chat.jsonl"),
    max_batch_size: Annotated[int, typer.Option(help="Most requests decoded together.")] = DEFAULT_MAX_BATCH_SIZE,
    max_queue: Annotated[int, typer.Option(help="Most requests waiting; more get 503.")] = DEFAULT_MAX_QUEUE,
    max_adapter_engines: Annotated[int, typer.Option(
        help="Most adapters (served as NAME:ADAPTER) kept loaded, each a merged copy of the model.")] = DEFAULT_MAX_ADAPTER_ENGINES,
    device: DeviceOption = None,
    serve_dtype: Annotated[str, typer.Option(
        "--dtype", help="Weights to serve with: fp32, bf16 or int8 (adapters are merged in fp32 first).")] = "fp32",
    memory: Annotated[Optional[Path], typer.Option(
        help="Memory directory that chat requests with \"memory\": true recall from and remember into.")] = None,
    memory_tokens: Annotated[int, typer.Option(help="Most prompt tokens the recalled memories take.")] = 256,
    allow_origin: Annotated[Optional[list[str]], typer.Option(
        "--allow-origin", help="A web origin (https://app.example) whose pages may call this "
        "server; repeatable. Others are refused (403).")] = None,
    max_body_bytes: Annotated[int, typer.Option(help="Largest request body; larger get 413.")] = 1 << 20,
    max_chat_history_tokens: Annotated[int, typer.Option(
        help="Tokens of each /chat conversation the server keeps (the oldest turns go).")] = 4096,
    max_chats: Annotated[int, typer.Option(
        help="/chat conversations kept (the least recently used go).")] = 1000,
    max_text_chars: Annotated[int, typer.Option(
        help="Longest prompt, message or /chat message, in characters.")] = 100_000,
    max_messages: Annotated[int, typer.Option(help="Most messages in a chat completion.")] = 256,
    allow_host: Annotated[Optional[list[str]], typer.Option(
        "--allow-host", help="A Host name to answer to besides the loopback ones (or, bound "
        "elsewhere, the only ones); repeatable.")] = None,
) -> None:
    """Serve a checkpoint: the web chat at /, OpenAI-compatible /v1 API, /chat, /health and /metrics."""
    from promethean.serve.app import ServeLimits
    from promethean.serve.app import serve as run_server

    if not checkpoint.is_dir():
        raise PrometheanError(f"{checkpoint} is not a checkpoint directory.")
    if not 0 <= port <= 65535:
        raise PrometheanError(f"--port must be from 0 to 65535, got {port}.")
    keys = list(api_key or [])
    if api_key_file is not None:
        try:
            keys += [line.strip() for line in api_key_file.read_text().splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as error:
            raise PrometheanError(f"cannot read the API key file {api_key_file}: {error}.") from None
    run_server(checkpoint, host=host, port=port, api_key=keys or None, chat_log=chat_log,
               shared_memory=shared_memory,
               max_batch_size=max_batch_size, max_queue=max_queue, device=device,
               max_adapter_engines=max_adapter_engines, dtype=serve_dtype, memory=memory,
               memory_tokens=memory_tokens, allowed_origins=tuple(allow_origin or ()),
               allow_hosts=tuple(allow_host or ()),
               limits=ServeLimits(max_body_bytes=max_body_bytes,
                                  max_history_tokens=max_chat_history_tokens,
                                  max_chats=max_chats, max_text_chars=max_text_chars,
                                  max_messages=max_messages))


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings (replaced non-UTF-8 bytes, ...) as one plain line, not Python's file:line form;
    a setting read under another name is a note."""
    from promethean.config import SettingNote

    label = "note" if issubclass(category, SettingNote) else "warning"
    sys.stderr.write(f"{label}: {message}\n")


def _one_line(message: str) -> str:
    """The message with control characters (a newline or an escape in a file name, say) written
    as escapes, so that an error is always exactly one line a script can match."""
    import unicodedata

    return "".join(
        char if char == " " or not unicodedata.category(char).startswith(("C", "Z"))
        else char.encode("unicode_escape").decode("ascii")
        for char in message
    )


def _intake_records(raw: list, file: Path) -> list:
    """Intake records from JSON lines: the intake's own records, or chat log lines (ours, the
    GPT-2 chat card's user/assistant pairs, OpenAI messages), each conversation one chat record."""
    from promethean.context.intake import ChatRecord, ChatTurn, parse_records
    from promethean.continual.chat_tuning import PROMETHEAN_LOG_FORMAT
    from promethean.data.chat import foreign_chat_exchanges

    chats, formats, others = [], set(), []
    for record in raw:
        foreign = foreign_chat_exchanges(record)
        if foreign is None and isinstance(record, dict) and "kind" not in record and all(
                isinstance(record.get(k), str) for k in ("chat_id", "human", "assistant")):
            foreign = (PROMETHEAN_LOG_FORMAT, [(record["human"], record["assistant"])])
        if foreign is None:
            others.append(record)
            continue
        formats.add(foreign[0])
        turns = [ChatTurn(role=role, text=said) for human, assistant in foreign[1]
                 for role, said in (("human", human), ("assistant", assistant)) if said.strip()]
        if turns:
            chats.append(ChatRecord(turns=turns, source=str(file)))
    if formats:
        typer.echo(f"{file}: {len(chats)} conversations (log format: {', '.join(sorted(formats))})")
    return parse_records(others) + chats


def _os_error_sentence(error: OSError) -> str:
    """The OS's refusal in the user's terms: the path they gave, not a staging name beside it."""
    import errno

    from promethean.files import leftover_of

    filename = getattr(error, "filename", None)
    if not filename:
        return f"{error.strerror or error}."
    path = Path(str(filename))
    if (final := leftover_of(path.name)) is not None:
        path = path.with_name(final)
    if error.errno == errno.EEXIST and path.exists() and not path.is_dir():
        return f"{path} is a file, and a directory is needed there."
    return f"{error.strerror or error} ({path})."


def main() -> None:
    import warnings

    # Typer raises click's exceptions (vendored in newer Typer): found through BadParameter's
    # bases so that this works with either.
    click_exception = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")
    warnings.showwarning = _show_warning
    try:
        # standalone_mode=False: click hands usage errors to us instead of printing its boxed
        # message and exiting 2, so they become one `error:` line and exit 1 like the rest.
        status = app(standalone_mode=False)
        if isinstance(status, int) and status:
            sys.exit(status)
    except click_exception as error:
        context = getattr(error, "ctx", None)
        if type(error).__name__ == "NoArgsIsHelpError":  # `promethean model`: its help
            sys.stdout.write(error.format_message() + "\n")
            sys.exit(0)
        command = context.command_path if context is not None else "promethean"
        message = _one_line(" ".join(error.format_message().split()).rstrip("."))
        sys.stderr.write(f"error: {message} ({_one_line(command)} --help lists the arguments "
                         "and options).\n")
        sys.exit(1)
    except typer.Abort:  # Ctrl-C or end of input at a prompt
        err_console.print("interrupted")
        sys.exit(130)
    except PrometheanError as error:
        # Plain write: one unwrapped line that scripts can match whatever the terminal width.
        sys.stderr.write(f"error: {_one_line(str(error))}\n")
        sys.exit(1)
    except OSError as error:  # a path the OS refuses (unwritable, not a directory, in use, ...)
        sys.stderr.write(_one_line(f"error: {_os_error_sentence(error)}") + "\n")
        sys.exit(1)
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
