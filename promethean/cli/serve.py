"""The `serve` command."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from promethean.context.defaults import MEMORY_PROMPT_TOKENS
from promethean.errors import PrometheanError
from promethean.inference import (
    DEFAULT_MAX_ADAPTER_ENGINES,
    DEFAULT_MAX_ADAPTERS,
    DEFAULT_MAX_BATCH_SIZE,
    DEFAULT_MAX_QUEUE,
    DEFAULT_PREFIX_CACHE_BYTES,
)
from promethean.cli.common import (
    app,
    DeviceOption,
)


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
    max_adapters: Annotated[int, typer.Option(
        help="Most adapters (served as NAME:ADAPTER) held at once on the CPU kernels, sharing the "
        "base model's batches (no copies); a request for another while all are in use gets 503; "
        "0: each adapter gets a merged copy of the model instead, as off the kernels.")
    ] = DEFAULT_MAX_ADAPTERS,
    max_adapter_engines: Annotated[int, typer.Option(
        help="Off the CPU kernels (a GPU): most adapters kept loaded, each a merged copy of the "
        "model.")] = DEFAULT_MAX_ADAPTER_ENGINES,
    device: DeviceOption = None,
    serve_dtype: Annotated[str, typer.Option(
        "--dtype", help="Weights to serve with: fp32, bf16 or int8 (adapters are merged in fp32 first).")] = "fp32",
    memory: Annotated[Optional[Path], typer.Option(
        help="Memory directory that chat requests with \"memory\": true recall from and remember into.")] = None,
    memory_tokens: Annotated[int, typer.Option(help="Most prompt tokens the recalled memories take.")] = MEMORY_PROMPT_TOKENS,
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
    prefix_cache_memory: Annotated[str, typer.Option(
        help="RAM for finished conversations' keys and values, so that a prompt starting with "
        "one (a chat's next turn) prefills only what is new; 0 turns reuse off.")
    ] = f"{DEFAULT_PREFIX_CACHE_BYTES >> 20}MB",
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
    if max_adapters < 0 or max_adapter_engines < 0:
        raise PrometheanError("--max-adapters and --max-adapter-engines must be at least 0.")
    from promethean.train.memory import parse_memory_size

    prefix_cache_bytes = 0 if prefix_cache_memory.strip() == "0" else \
        parse_memory_size(prefix_cache_memory)
    keys = list(api_key or [])
    if api_key_file is not None:
        try:
            keys += [line.strip() for line in api_key_file.read_text().splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as error:
            raise PrometheanError(f"cannot read the API key file {api_key_file}: {error}.") from None
    run_server(checkpoint, host=host, port=port, api_key=keys or None, chat_log=chat_log,
               shared_memory=shared_memory,
               max_batch_size=max_batch_size, max_queue=max_queue, device=device,
               max_adapter_engines=max_adapter_engines, max_adapters=max_adapters,
               dtype=serve_dtype, memory=memory,
               memory_tokens=memory_tokens, allowed_origins=tuple(allow_origin or ()),
               allow_hosts=tuple(allow_host or ()), prefix_cache_bytes=prefix_cache_bytes,
               limits=ServeLimits(max_body_bytes=max_body_bytes,
                                  max_history_tokens=max_chat_history_tokens,
                                  max_chats=max_chats, max_text_chars=max_text_chars,
                                  max_messages=max_messages))
