"""Model commands: `model list/info/init`, `generate`, `chat`."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from promethean.context.defaults import MEMORY_PROMPT_TOKENS
from promethean.errors import PrometheanError
from promethean.cli.common import (
    ModelSetOption,
    app,
    model_app,
    console,
    err_console,
    DeviceOption,
    OverwriteCheckpointOption,
    DtypeOption,
    _load_model,
)


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
        help="Most tokens of memories per prompt (at most half the room the reply leaves).")] = MEMORY_PROMPT_TOKENS,
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
