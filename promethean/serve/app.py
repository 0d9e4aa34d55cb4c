"""The HTTP server: an OpenAI-compatible API, the nanoGPT card's `/chat`, health and metrics.

Every route hands its prompt to a continuous-batching `Engine` (promethean.inference.engine);
the event loop only parses, validates and streams. The LoRA adapters of the checkpoint
(`CKPT/adapters/NAME`, served as model `BASE:NAME`) share the base model's engine and batches on
the CPU kernels (up to `max_adapters` held at once; a request for another one while all are in
use gets 503 with Retry-After); elsewhere each gets an engine over a merged copy of the model
(at most `max_adapter_engines`; see `pool`). Errors are JSON bodies in OpenAI's shape,
`{"error": {"message", "type", "param", "code"}}`, so the official client raises the right
exception with a readable message. A full engine queue answers 503 with Retry-After at once.

`GET /` is the web chat page (`serve/static/`, plain HTML and JS): it streams replies from
`/v1/chat/completions`. The page and its files need no API key (they are static and hold no
data); every call the page makes sends the key the user typed, kept in the tab's sessionStorage.

With a memory directory (`serve --memory DIR`), a chat request that says `"memory": true` gets the
memories most relevant to its last human message packed into its prompt (within a token budget
that also leaves room for the reply), the response names them (`"memories"`), and the finished
exchange is offered to the memory through the intake. The tree has no locking of its own, so
every read and write of it holds one lock, taken only in worker threads (never on the event loop
nor on an engine thread); the tree is saved atomically every `memory_save_seconds` when it
changed, and at shutdown.

This module builds the app and its routes; the pieces they use each have a module: `protocol`
(request and response bodies, the error schema), `server` (what the routes share, the chat turn
of both chat routes included), `pool` (the engines), `memory`, `auth` (API keys, browser rules)
and `telemetry` (metrics, the chat log).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from promethean.context.defaults import MEMORY_PROMPT_TOKENS
from promethean.data.chat import Turn, assistant_prompt
from promethean.errors import PrometheanError
from promethean.inference import (
    DEFAULT_MAX_ADAPTER_ENGINES,
    DEFAULT_MAX_ADAPTERS,
    DEFAULT_MAX_BATCH_SIZE,
    DEFAULT_MAX_QUEUE,
    DEFAULT_PREFIX_CACHE_BYTES,
)
from promethean.inference.engine import Engine, EngineStoppedError, RequestFailedError
from promethean.model import Transformer
from promethean.serve.auth import LOOPBACK_NAMES, Access, AuthoriseAndCount
from promethean.serve.memory import ServerMemory
from promethean.serve.pool import ModelVariants
from promethean.serve.protocol import (
    ApiError,
    ChatBody,
    ChatCompletionBody,
    CompletionBody,
    ServeLimits,
    chat_logprobs,
    completion_logprobs,
    finish_reason,
    memories_used,
    requested_tokens,
    sse_event,
    stream_error_event,
    token_usage,
    usage_chunk,
    wants_usage,
)
from promethean.serve.server import NO_MEMORY, Server
from promethean.serve.telemetry import ChatLog
from promethean.tokenizer import Tokenizer

# Imported from here by callers and tests: the server's pieces live in the modules above.
__all__ = ["ApiError", "ChatLog", "NO_MEMORY", "ServeLimits", "ServerMemory", "build_app",
           "create_app", "serve"]

STATIC_DIRECTORY = Path(__file__).parent / "static"
SERVE_DTYPES = ("fp32", "bf16", "int8")
GRACEFUL_SHUTDOWN_SECONDS = 10

log = logging.getLogger("promethean.serve")


def create_app(
    model: Transformer | None = None,
    tokenizer: Tokenizer | None = None,
    model_name: str = "promethean",
    api_key: str | list[str] | None = None,
    chat_log: str | Path | None = None,
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
    max_queue: int = DEFAULT_MAX_QUEUE,
    engine: Engine | None = None,
    checkpoint: str | Path | None = None,
    max_adapter_engines: int = DEFAULT_MAX_ADAPTER_ENGINES,
    dtype: str = "fp32",
    memory: ServerMemory | None = None,
    memory_save_seconds: float = 60.0,
    allowed_origins: tuple[str, ...] = (),
    allowed_hosts: tuple[str, ...] | None = None,
    limits: ServeLimits | None = None,
    shared_memory: bool = False,
    prefix_cache_bytes: int = DEFAULT_PREFIX_CACHE_BYTES,
    max_adapters: int = DEFAULT_MAX_ADAPTERS,
) -> FastAPI:
    """The FastAPI app for a model (or for an already running `engine`). With `checkpoint`, the
    directory the model was loaded from, its adapters are served too, as `MODEL_NAME:ADAPTER`
    (prepared as `dtype`, as the base model was). With `memory`, chat requests may ask for it.
    A request from a browser page of another origin than the server's own (or one of
    `allowed_origins`) is refused; with `allowed_hosts`, so is one whose Host header names
    another host. `api_key` may be several keys: each is then a user of its own. Memories and
    /chat conversations are per user (the key, and the OpenAI `user` field) unless
    `shared_memory` shares one memory among all."""
    if engine is None:
        engine = Engine(model, tokenizer, max_batch_size=max_batch_size, max_queue=max_queue,
                        prefix_cache_bytes=prefix_cache_bytes,
                        max_adapters=max_adapters if checkpoint is not None else 0)
    tokenizer = tokenizer or engine.tokenizer
    variants = ModelVariants(engine, model_name, checkpoint, max_adapter_engines, dtype)
    access = Access(api_key, allowed_origins, allowed_hosts)
    server = Server(engine, tokenizer, model_name,
                    ChatLog(chat_log) if chat_log is not None else None, variants, memory)
    server.limits = limits or ServeLimits()
    server.shared_memory = shared_memory

    async def save_memory_periodically() -> None:
        while True:
            await asyncio.sleep(memory_save_seconds)
            for each in server.every_memory():
                try:
                    await asyncio.to_thread(each.save)
                except Exception:  # noqa: BLE001 - the next save (or the one at shutdown) retries
                    log.exception("could not save the memory to %s", each.directory)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        saver = asyncio.create_task(save_memory_periodically()) if memory is not None else None
        try:
            yield
        finally:
            if saver is not None:
                saver.cancel()
            variants.shutdown()
            for each in server.every_memory():
                await asyncio.to_thread(each.save)

    app = FastAPI(title="Promethean", docs_url=None, redoc_url=None, lifespan=lifespan)
    default_openapi = app.openapi

    def openapi_with_bodies() -> dict[str, Any]:
        # The routes read their bodies themselves (bounded, with one-sentence errors), so
        # FastAPI does not see the models: their schemas are added here for clients and fuzzers.
        if app.openapi_schema is None:
            schema = default_openapi()
            schemas = schema.setdefault("components", {}).setdefault("schemas", {})
            for model in (CompletionBody, ChatCompletionBody, ChatBody):
                body = model.model_json_schema(ref_template="#/components/schemas/{model}")
                schemas.update(body.pop("$defs", {}))
                schemas[model.__name__] = body
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi_with_bodies
    app.state.server = server

    app.add_middleware(AuthoriseAndCount, access=access, metrics=server.metrics)
    if allowed_origins:  # CORS only when asked for: a page of those origins may then call in
        from starlette.middleware.cors import CORSMiddleware

        # Added last, so outermost: a preflight (which carries no API key) is answered here.
        app.add_middleware(CORSMiddleware, allow_origins=sorted(access.allowed_origins),
                           allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])

    @app.exception_handler(ApiError)
    async def api_error(_request: Request, error: ApiError):
        return error.response()

    # Every other refusal in the API's error shape too: an unknown route or method, a body the
    # framework itself rejects, and (logged) anything a route did not expect.
    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException):
        if error.status_code == 404:
            message = f"there is no route {request.url.path}."
            code = "not_found"
        elif error.status_code == 405:
            message = f"{request.url.path} does not take {request.method}."
            code = "method_not_allowed"
        else:
            message, code = str(error.detail), None
        return ApiError(error.status_code, message, code=code,
                        headers=getattr(error, "headers", None)).response()

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request: Request, error: RequestValidationError):
        first = (error.errors() or [{}])[0]
        param = ".".join(str(part) for part in first.get("loc", ())) or None
        return ApiError(400, f"{param}: {first.get('msg', 'invalid')}.", param=param,
                        code="invalid_value").response()

    @app.exception_handler(Exception)
    async def unexpected(_request: Request, error: Exception):
        log.exception("a request failed")
        return ApiError(500, f"the server failed on this request ({type(error).__name__}).",
                        error_type="server_error", code="internal_error").response()

    app.mount("/static", StaticFiles(directory=STATIC_DIRECTORY), name="static")

    @app.get("/", include_in_schema=False)
    async def web_chat():
        return FileResponse(STATIC_DIRECTORY / "index.html", media_type="text/html")

    @app.get("/health")
    async def health():
        alive = variants.base.alive
        status = {"status": "ok" if alive else "engine_down", "model": server.model_name,
                  "queue_depth": variants.queue_depth, "running": variants.running,
                  "memory": memory is not None}
        if not alive:  # say so this once, and start a new engine for the next request
            variants.revive()
            return JSONResponse(status, status_code=503)
        return status

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(server.metrics.render(variants.queue_depth, variants.running,
                                                       variants.counters()),
                                 media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": name, "object": "model",
                                            "created": server.created, "owned_by": "promethean"}
                                           for name in variants.names()]}

    @app.post("/v1/completions", openapi_extra=_documented_body(CompletionBody))
    async def completions(request: Request):
        body: CompletionBody = await server.body(request, CompletionBody)
        server.check_memory(body.memory)
        if body.memory:
            raise ApiError(400, "memory works with chat requests (/chat and /v1/chat/completions): "
                           "a plain completion has no conversation to recall for or to remember.",
                           param="memory", code="invalid_value")
        adapter = server.check_model(body.model)
        model_id = body.model or server.model_name
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if len(prompts) != 1:
            raise ApiError(400, "prompt must be one string (batches of prompts are not supported).",
                           param="prompt", code="invalid_value")
        prompt = server.tokenizer.encode_ordinary(prompts[0])
        server.check_prompt(prompt)
        params = server.sampling(body, server.max_tokens(requested_tokens(body), 16))
        handle = await server.submit(prompt, params, adapter)
        identifier, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(text: str, finish: str | None) -> dict[str, Any]:
            return {"id": identifier, "object": "text_completion", "created": created,
                    "model": model_id,
                    "choices": [{"text": text, "index": 0, "logprobs": None,
                                 "finish_reason": finish}]}

        echoed = prompts[0] if body.echo else ""
        if body.stream:
            async def events():
                try:
                    if echoed:
                        yield sse_event(chunk(echoed, None))
                    async for event in handle.aevents():
                        if event.completion is not None:
                            server.finished(handle, event.completion)
                            if event.text:
                                yield sse_event(chunk(event.text, None))
                            reason = finish_reason(event.completion.finish_reason)
                            yield sse_event(chunk("", reason))
                            if wants_usage(body):
                                yield sse_event(usage_chunk(chunk("", None), len(prompt),
                                                            len(event.completion.token_ids)))
                        elif event.text:
                            yield sse_event(chunk(event.text, None))
                    yield "data: [DONE]\n\n"
                except (RequestFailedError, EngineStoppedError) as error:
                    yield stream_error_event(error)  # the 200 is sent: the error is the last event
                finally:
                    handle.cancel()  # a no-op when finished; frees the row when the client left

            return StreamingResponse(events(), media_type="text/event-stream")
        completion = await server.wait(request, handle)
        result = chunk(echoed + completion.text, finish_reason(completion.finish_reason))
        if completion.logprobs is not None:
            result["choices"][0]["logprobs"] = completion_logprobs(server.tokenizer, completion,
                                                                   len(echoed))
        result["usage"] = token_usage(len(prompt), len(completion.token_ids))
        return result

    @app.post("/v1/chat/completions", openapi_extra=_documented_body(ChatCompletionBody))
    async def chat_completions(request: Request):
        body: ChatCompletionBody = await server.body(request, ChatCompletionBody)
        server.check_memory(body.memory)
        user = server.user_of(request, body)
        adapter = server.check_model(body.model)
        model_id = body.model or server.model_name
        if body.messages[-1].role != "user":
            raise ApiError(400, "the last message must be the user's.", param="messages",
                           code="invalid_value")
        identifier = f"chatcmpl-{uuid.uuid4().hex}"
        turn = await server.begin_chat_turn(
            "/v1/chat/completions", body, chat_id=body.chat_id or identifier, user=user,
            human=body.messages[-1].content,
            prompt=server.tokenizer.encode_ordinary(server.chat_prompt(body.messages)),
            prompt_text=lambda block: server.chat_prompt(body.messages, block),
            requested_tokens=requested_tokens(body), adapter=adapter)
        handle, created = turn.handle, int(time.time())

        def chunk(delta: dict[str, str], finish: str | None) -> dict[str, Any]:
            return {"id": identifier, "object": "chat.completion.chunk", "created": created,
                    "model": model_id,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

        if body.stream:
            async def events():
                try:
                    first = chunk({"role": "assistant", "content": ""}, None)
                    if turn.memories is not None:
                        first["memories"] = memories_used(turn.memories)
                    yield sse_event(first)
                    async for event in handle.aevents():
                        if event.text:
                            yield sse_event(chunk({"content": event.text}, None))
                        if event.completion is not None:
                            completion = event.completion
                            server.finished(handle, completion)
                            # Before the last events: a client that saw the end can recall it.
                            await turn.end(completion)
                            yield sse_event(chunk({}, finish_reason(completion.finish_reason)))
                            if wants_usage(body):
                                yield sse_event(usage_chunk(chunk({}, None), len(turn.prompt),
                                                            len(completion.token_ids)))
                    yield "data: [DONE]\n\n"
                except (RequestFailedError, EngineStoppedError) as error:
                    yield stream_error_event(error)  # the 200 is sent: the error is the last event
                finally:
                    handle.cancel()

            return StreamingResponse(events(), media_type="text/event-stream")
        completion = await server.wait(request, handle)
        await turn.end(completion)
        result = {"id": identifier, "object": "chat.completion", "created": created,
                  "model": model_id,
                  "choices": [{"index": 0,
                               "message": {"role": "assistant", "content": completion.text.strip()},
                               "logprobs": chat_logprobs(server.tokenizer, completion),
                               "finish_reason": finish_reason(completion.finish_reason)}],
                  "usage": token_usage(len(turn.prompt), len(completion.token_ids))}
        if turn.memories is not None:
            result["memories"] = memories_used(turn.memories)
        return result

    @app.post("/chat", openapi_extra=_documented_body(ChatBody))
    async def chat(request: Request):
        body: ChatBody = await server.body(request, ChatBody)
        server.check_memory(body.memory)
        chat_id = body.chat_id or uuid.uuid4().hex
        user = server.user_of(request, body)
        kept_as = (user, chat_id)  # a chat id continues only its own user's conversation
        history = list(server.chats.get(kept_as, []))
        human = Turn("human", body.message)
        turns, prompt = await asyncio.to_thread(server.conversation_prompt, history, human)
        turn = await server.begin_chat_turn(
            "/chat", body, chat_id=chat_id, user=user, human=body.message, prompt=prompt,
            prompt_text=lambda block: block + assistant_prompt(turns),
            requested_tokens=body.max_tokens)
        completion = await server.wait(request, turn.handle)
        reply = completion.text.strip()
        server.keep_chat(kept_as, history, [human, Turn("assistant", reply)])
        await turn.end(completion)
        result = {"response": reply, "chat_id": chat_id,
                  "finish_reason": finish_reason(completion.finish_reason),
                  "usage": token_usage(len(turn.prompt), len(completion.token_ids))}
        if turn.memories is not None:
            result["memories"] = memories_used(turn.memories)
        return result

    return app


def _documented_body(model: type[BaseModel]) -> dict[str, Any]:
    """The OpenAPI requestBody of a route that parses `model` from its raw body."""
    return {"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}}


def build_app(
    checkpoint: str | Path,
    api_key: str | list[str] | None = None,
    chat_log: str | Path | None = "chat.jsonl",
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
    max_queue: int = DEFAULT_MAX_QUEUE,
    device: str | None = None,
    max_adapter_engines: int = DEFAULT_MAX_ADAPTER_ENGINES,
    dtype: str = "fp32",
    memory: str | Path | None = None,
    memory_tokens: int = MEMORY_PROMPT_TOKENS,
    allowed_origins: tuple[str, ...] = (),
    allowed_hosts: tuple[str, ...] | None = None,
    limits: ServeLimits | None = None,
    shared_memory: bool = False,
    prefix_cache_bytes: int = DEFAULT_PREFIX_CACHE_BYTES,
    max_adapters: int = DEFAULT_MAX_ADAPTERS,
) -> FastAPI:
    """The app `promethean serve` runs: the checkpoint loaded and prepared as `dtype` (fp32, bf16
    or int8; see promethean.inference.quantize), and with `memory`, a memory directory that chat
    requests may recall from (opened with the embedder it was built with)."""
    from promethean.checkpoint import load_checkpoint
    from promethean.device import resolve_device

    if dtype not in SERVE_DTYPES:
        raise PrometheanError(f"--dtype must be one of {', '.join(SERVE_DTYPES)}, got '{dtype}'.")
    resolved = resolve_device(device)
    loaded = load_checkpoint(checkpoint, device=resolved)
    from promethean.inference.quantize import prepare_for_inference

    # Prepared in every dtype: on the CPU kernels a reply then never depends on the requests it
    # is batched with, nor on the adapters its neighbours use.
    model = prepare_for_inference(loaded.model, dtype)
    server_memory = None
    if memory is not None:
        server_memory = ServerMemory.open(memory, checkpoint, loaded.tokenizer,
                                          device=str(resolved), token_budget=memory_tokens)
    return create_app(model, loaded.tokenizer, model_name=Path(checkpoint).resolve().name,
                      api_key=api_key, chat_log=chat_log, max_batch_size=max_batch_size,
                      max_queue=max_queue, checkpoint=checkpoint,
                      max_adapter_engines=max_adapter_engines, dtype=dtype, memory=server_memory,
                      allowed_origins=allowed_origins, allowed_hosts=allowed_hosts,
                      limits=limits, shared_memory=shared_memory,
                      prefix_cache_bytes=prefix_cache_bytes, max_adapters=max_adapters)


def serve(checkpoint: str | Path, host: str = "127.0.0.1", port: int = 8000,
          allow_hosts: tuple[str, ...] = (), **settings) -> None:
    """Serve a checkpoint until interrupted (`settings`: those of `build_app`). Bound to a
    loopback address it answers only to loopback names (and `allow_hosts`): a page that has
    rebound its own name to 127.0.0.1 gets no answer; bound elsewhere, to any name unless
    `allow_hosts` are given."""
    import uvicorn

    if host in LOOPBACK_NAMES or host.startswith("127.") or allow_hosts:
        loopback = LOOPBACK_NAMES if host in LOOPBACK_NAMES or host.startswith("127.") else ()
        settings["allowed_hosts"] = (*loopback, host, *allow_hosts)
    # In-flight requests get this long to finish at shutdown (SIGTERM); then it completes.
    uvicorn.run(build_app(checkpoint, **settings), host=host, port=port, log_level="info",
                timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS)
