"""The HTTP server: an OpenAI-compatible API, the nanoGPT card's `/chat`, health and metrics.

Every route hands its prompt to a continuous-batching `Engine` (promethean.inference.engine);
the event loop only parses, validates and streams. The base model has one engine; each LoRA
adapter of the checkpoint (`CKPT/adapters/NAME`, served as model `BASE:NAME`) gets an engine of its
own over its own copy of the model with the adapter merged in (base decode speed, no per-row
adapter switching), built on first use; at most `max_adapter_engines` are kept, the least recently
used idle one being shut down to make room. Errors are JSON bodies in OpenAI's shape,
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
"""

from __future__ import annotations

import asyncio
import hmac
import json
import hashlib
import logging
from collections import OrderedDict
from dataclasses import dataclass
import os
import threading
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from promethean.context.intake import Intake
from promethean.context.tree import TREE_FILE, Memory, MemoryTree
from promethean.continual.adapters import check_name, list_adapters, load_adapter_onto
from promethean.data.chat import Turn, assistant_prompt, render_turn
from promethean.errors import PrometheanError
from promethean.inference.engine import (
    Engine,
    EngineStoppedError,
    QueueFullError,
    RequestFailedError,
    RequestHandle,
)
from promethean.inference.generate import SEED_MAX, SEED_MIN, SamplingParams
from promethean.model import Transformer
from promethean.tokenizer import Tokenizer

RETRY_AFTER_SECONDS = 1
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
STATIC_DIRECTORY = Path(__file__).parent / "static"
SERVE_DTYPES = ("fp32", "bf16", "int8")
NO_MEMORY = ("memory was requested but this server was started without a memory directory "
             "(--memory DIR).")

log = logging.getLogger("promethean.serve")


class ApiError(Exception):
    """A request the server refuses, with the HTTP status and an OpenAI-style error body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 error_type: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.error_type, self.headers = error_type, headers

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.error_type,
                          "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


# ------------------------------------------------------------------------- request bodies
class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Body):
    include_usage: bool = False


# OpenAI request parameters this server does not implement: a request that sets one (to anything
# but its no-op value) is refused with a 400 that names it, never silently ignored.
UNSUPPORTED_PARAMETERS = {
    "tools": (None, []),
    "tool_choice": (None, "none"), "functions": (None, []), "function_call": (None, "none"),
    "response_format": (None, {"type": "text"}), "logit_bias": (None, {}),
    "frequency_penalty": (None, 0, 0.0), "presence_penalty": (None, 0, 0.0),
    "best_of": (None, 1), "suffix": (None, ""), "audio": (None,), "modalities": (None, ["text"]),
    "prediction": (None,), "parallel_tool_calls": (None, True, False),
}


class _SamplingFields(_Body):
    model: str | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None  # the chat API's newer name for max_tokens
    stream_options: StreamOptions | None = None
    user: str | None = None
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=1)
    repetition_penalty: float = Field(1.0, gt=0)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    stream: bool = False
    n: int = Field(1, ge=1, le=1)


class CompletionBody(_SamplingFields):
    prompt: str | list[str]
    echo: bool = False  # the prompt's text before the completion's
    logprobs: int | None = Field(None, ge=0, le=5)  # the chosen token's, and this many others'
    memory: bool = False  # refused: a plain completion has no conversation to recall or remember


class ChatMessage(_Body):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatCompletionBody(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    memory: bool = False  # our extension: recall memories into the prompt, remember the exchange
    chat_id: str | None = None  # our extension: groups turns in the chat log


class ChatBody(_Body):
    message: str = Field(min_length=1)
    logprobs: bool | int | None = None  # refused unless false or null: see the /chat route
    top_logprobs: int | None = None
    chat_id: str | None = None
    user: str | None = None  # as the OpenAI field: whose conversation and memory this is
    max_tokens: int | None = None
    temperature: float = Field(0.8, ge=0, le=2)  # the chat card's defaults
    top_k: int | None = Field(200, ge=1)
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    memory: bool = False


@dataclass(frozen=True)
class ServeLimits:
    """How much one request may ask of the server; each refusal names its limit (400 or 413)."""

    max_body_bytes: int = 1 << 20  # a request body
    max_text_chars: int = 100_000  # a prompt, a message's content, /chat's message
    max_messages: int = 256  # messages of a chat completion
    max_chat_id_chars: int = 200
    max_stop_chars: int = 200  # each stop string
    max_history_tokens: int = 4096  # a /chat conversation kept by the server; oldest turns go
    max_chats: int = 1000  # /chat conversations kept; the least recently used go

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if value < 1:
                raise PrometheanError(f"the serve limit {name} must be at least 1, got {value}.")


def _too_long(what: str, limit_name: str, limit: int, param: str) -> ApiError:
    return ApiError(400, f"{what} is longer than {limit:,} (the server's {limit_name}).",
                    param=param, code="too_long")


def check_sizes(body: BaseModel, limits: ServeLimits) -> None:
    """Refuse a parsed body whose texts, messages, stop strings or chat id pass the limits."""
    texts: list[tuple[str, str]] = []
    prompt = getattr(body, "prompt", None)
    if prompt is not None:
        texts += [("prompt", text) for text in ([prompt] if isinstance(prompt, str) else prompt)]
    messages = getattr(body, "messages", None)
    if messages is not None:
        if len(messages) > limits.max_messages:
            raise ApiError(400, f"messages holds {len(messages)} messages, more than "
                           f"{limits.max_messages} (the server's max_messages).",
                           param="messages", code="too_long")
        texts += [("messages.content", message.content) for message in messages]
    if getattr(body, "message", None) is not None:
        texts.append(("message", body.message))
    for param, text in texts:
        if len(text) > limits.max_text_chars:
            raise _too_long(f"{param} ({len(text):,} characters)", "max_text_chars",
                            limits.max_text_chars, param)
    chat_id = getattr(body, "chat_id", None)
    if chat_id is not None and len(chat_id) > limits.max_chat_id_chars:
        raise _too_long(f"chat_id ({len(chat_id):,} characters)", "max_chat_id_chars",
                        limits.max_chat_id_chars, "chat_id")
    stops = getattr(body, "stop", None)
    for stop in ([stops] if isinstance(stops, str) else stops or []):
        if len(stop) > limits.max_stop_chars:
            raise _too_long(f"a stop string ({len(stop):,} characters)", "max_stop_chars",
                            limits.max_stop_chars, "stop")


async def read_body(request: Request, limits: ServeLimits) -> bytes:
    """The request body, refused (413) as soon as it passes max_body_bytes: never read whole."""
    limit = limits.max_body_bytes
    refusal = ApiError(413, f"the request body is larger than {limit:,} bytes (the server's "
                       "max_body_bytes).", code="body_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise refusal
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise refusal
        chunks.append(chunk)
    return b"".join(chunks)


def _refuse_unsupported(data: dict) -> None:
    for name, no_ops in UNSUPPORTED_PARAMETERS.items():
        if name in data and not any(data[name] == value and type(data[name]) is type(value)
                                    for value in no_ops):
            raise ApiError(400, f"{name} is not supported by this server; leave it out.",
                           param=name, code="unsupported_parameter")


def _parse(model: type[BaseModel], raw: bytes) -> Any:
    try:
        data = json.loads(raw)
        # JSON may spell a lone UTF-16 surrogate ("\ud800"): not text any tokenizer can take.
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ApiError(400, f"the request body is not valid JSON ({error}).", code="invalid_json")
    except UnicodeEncodeError:
        raise ApiError(400, "the request body holds a lone UTF-16 surrogate (such as \\ud800), "
                       "which is not text.", code="invalid_json") from None
    except RecursionError:
        raise ApiError(400, "the request body is nested too deeply to be a request.",
                       code="invalid_json") from None
    except ValueError as error:  # an integer of more digits than Python converts (4,300)
        raise ApiError(400, f"the request body holds a number too long to read ({error}).",
                       code="invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object.", code="invalid_json")
    _refuse_unsupported(data)
    try:
        return model.model_validate(data)
    except ValidationError as error:
        first = error.errors()[0]
        param = ".".join(str(part) for part in first["loc"]) or None
        raise ApiError(400, f"{param}: {first['msg']}.", param=param, code="invalid_value")


# -------------------------------------------------------------------------------- metrics
class Metrics:
    """Counters and a latency histogram, rendered in Prometheus' text format."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = {}
        self.prompt_tokens = 0
        self.generated_tokens = 0
        self.latency_counts = [0] * len(LATENCY_BUCKETS)
        self.latency_sum = 0.0
        self.latency_count = 0

    def record_request(self, route: str, status: int) -> None:
        with self._lock:
            self.requests[route, status] = self.requests.get((route, status), 0) + 1

    def record_generation(self, prompt_tokens: int, generated_tokens: int, seconds: float) -> None:
        with self._lock:
            self.prompt_tokens += prompt_tokens
            self.generated_tokens += generated_tokens
            self.latency_sum += seconds
            self.latency_count += 1
            for index, bound in enumerate(LATENCY_BUCKETS):
                if seconds <= bound:
                    self.latency_counts[index] += 1

    def render(self, queue_depth: int, running: int) -> str:
        """The metrics text; `queue_depth` and `running` are summed over every engine."""
        with self._lock:
            lines = ["# HELP promethean_requests_total HTTP requests by route and status.",
                     "# TYPE promethean_requests_total counter"]
            for (route, status), count in sorted(self.requests.items()):
                lines.append(f'promethean_requests_total{{route="{route}",status="{status}"}} {count}')
            lines += [
                "# HELP promethean_prompt_tokens_total Prompt tokens of finished generations.",
                "# TYPE promethean_prompt_tokens_total counter",
                f"promethean_prompt_tokens_total {self.prompt_tokens}",
                "# HELP promethean_generated_tokens_total Tokens generated.",
                "# TYPE promethean_generated_tokens_total counter",
                f"promethean_generated_tokens_total {self.generated_tokens}",
                "# HELP promethean_queue_depth Requests waiting to join the decode batch.",
                "# TYPE promethean_queue_depth gauge",
                f"promethean_queue_depth {queue_depth}",
                "# HELP promethean_running_requests Requests in the decode batch.",
                "# TYPE promethean_running_requests gauge",
                f"promethean_running_requests {running}",
                "# HELP promethean_request_latency_seconds Time from submission to the last token.",
                "# TYPE promethean_request_latency_seconds histogram",
            ]
            for bound, count in zip(LATENCY_BUCKETS, self.latency_counts):
                lines.append(f'promethean_request_latency_seconds_bucket{{le="{bound}"}} {count}')
            lines += [
                f'promethean_request_latency_seconds_bucket{{le="+Inf"}} {self.latency_count}',
                f"promethean_request_latency_seconds_sum {self.latency_sum}",
                f"promethean_request_latency_seconds_count {self.latency_count}",
            ]
        return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------- chat log
class ChatLog:
    """Append-only JSONL of chat turns: one line per turn, written whole under a lock and fsynced,
    so concurrent requests never interleave and a crash loses no acknowledged turn."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._owner_only = False

    def append(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, ensure_ascii=False) + "\n"
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # Created owner-only (0600): the log holds every user's words.
            descriptor = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            with open(descriptor, "a", encoding="utf-8") as file:
                if not self._owner_only:  # a log from before, made with the umask's mode
                    os.fchmod(descriptor, 0o600)
                    self._owner_only = True
                file.write(line)
                file.flush()
                os.fsync(file.fileno())


# --------------------------------------------------------------------------------- memory
def _embedder_for_memory(directory: Path, checkpoint: str | Path | None, device: str):
    """(embedder, model or None): the hashed n-gram embedder when the memory was built with one
    (what `promethean memory add` uses without --checkpoint), else the checkpoint's own
    mean-pooled hidden states, from a copy of the weights of its own (the engine's model must not
    run a forward hook on another thread)."""
    from promethean.context.embed import HashedNgramEmbedder, embedder_for

    recorded = None
    if (directory / TREE_FILE).is_file():
        try:
            record = json.loads((directory / TREE_FILE).read_text())
            recorded = record.get("info", {}).get("embedder")
        except (OSError, ValueError):
            recorded = None  # open_memory below reports the damaged tree
    if isinstance(recorded, str) and recorded.startswith("hashed-ngrams-"):
        return HashedNgramEmbedder(int(recorded.rsplit("-", 1)[1])), None
    if checkpoint is None:
        raise PrometheanError("a memory embedded with a model needs the checkpoint it was made "
                              "with.")
    embedder, _tokenizer, model = embedder_for(str(checkpoint), device=device)
    return embedder, model


class ServerMemory:
    """A memory directory the server recalls from and remembers into (module docstring). Every
    method takes the lock and may block: call them from worker threads."""

    def __init__(self, directory: str | Path, tree: MemoryTree, embedder, intake: Intake,
                 token_budget: int = 256, k: int = 5) -> None:
        self.directory, self.tree = Path(directory), tree
        self.embedder, self.intake = embedder, intake
        self.token_budget, self.k = token_budget, k
        self.lock = threading.Lock()
        self.changed = False
        self._intake_for = None  # tree -> Intake, set by open(): how for_user() builds one

    @classmethod
    def open(cls, directory: str | Path, checkpoint: str | Path | None, tokenizer: Tokenizer,
             device: str = "cpu", token_budget: int = 256, k: int = 5) -> ServerMemory:
        """Open (or start) the memory in `directory`, with the intake `promethean memory add`
        uses: the model's surprise is a salience signal when the embedder is the model."""
        from promethean.context.intake import MemoryAwareBatcher, activation_bytes_per_token
        from promethean.context.retrieval import open_memory

        if token_budget < 1 or k < 1:
            raise PrometheanError("the memory token budget and k must be at least 1.")
        directory = Path(directory)
        embedder, model = _embedder_for_memory(directory, checkpoint, device)
        tree = open_memory(directory, embedder)
        if model is None:
            intake = Intake(tree, embedder, tokenizer=tokenizer)
        else:
            batcher = MemoryAwareBatcher(tokenizer.encode_ordinary, token_budget=4096,
                                         memory_budget=256 * 2**20,
                                         bytes_per_token=activation_bytes_per_token(model.config),
                                         max_row_tokens=model.config.context_length)
            intake = Intake(tree, embedder, tokenizer=tokenizer, batcher=batcher,
                            surprise=embedder.loss_per_token, vocab_size=model.config.vocab_size)
        memory = cls(directory, tree, embedder, intake, token_budget, k)
        memory._intake_for = lambda user_tree: (
            Intake(user_tree, embedder, tokenizer=tokenizer) if model is None else
            Intake(user_tree, embedder, tokenizer=tokenizer, batcher=batcher,
                   surprise=embedder.loss_per_token, vocab_size=model.config.vocab_size))
        return memory

    def for_user(self, user: str) -> ServerMemory:
        """The memory of one user: a directory of its own under `users/` (named by a hash of the
        user, never the user's words), with this memory's embedder and intake settings."""
        from promethean.context.retrieval import open_memory

        name = hashlib.sha256(user.encode("utf-8", "surrogatepass")).hexdigest()[:32]
        directory = self.directory / "users" / name
        tree = open_memory(directory, self.embedder)
        intake = self._intake_for(tree) if self._intake_for else Intake(tree, self.embedder)
        memory = ServerMemory(directory, tree, self.embedder, intake, self.token_budget, self.k)
        memory._intake_for = self._intake_for
        return memory

    def recall(self, query: str, count_tokens, room: int) -> tuple[str, list[Memory]]:
        """The memory block for `query` within min(room, token_budget) tokens, and its memories."""
        from promethean.context.retrieval import memory_context

        budget = min(room, self.token_budget)
        if budget <= 0:
            return "", []
        with self.lock:
            return memory_context(self.tree, self.embedder, query, count_tokens, budget, self.k)

    def remember(self, human: str, assistant: str, source: str) -> list[int]:
        from promethean.context.retrieval import remember_exchange

        if not human.strip() or not assistant.strip():
            return []  # the intake takes no empty turn
        with self.lock:
            accepted = remember_exchange(self.intake, [Turn("human", human),
                                                       Turn("assistant", assistant)], source)
            self.changed = self.changed or bool(accepted)
            return accepted

    def save(self) -> bool:
        """Write the tree (atomically) if it changed since the last save; True if it did."""
        with self.lock:
            if not self.changed:
                return False
            self.tree.prune()
            self.tree.save(self.directory)
            _owner_only(self.directory)
            self.changed = False
            return True


def _owner_only(directory: Path) -> None:
    """Memories are one user's words: the directory and its files readable by the owner only."""
    for path in [directory, *directory.iterdir()]:
        try:
            path.chmod(0o700 if path.is_dir() else 0o600)
        except OSError:  # a file another process just replaced: the next save sets it
            pass


def _memories_used(memories: list[Memory]) -> list[dict[str, Any]]:
    return [{"id": int(m.id), "text": m.text,
             "score": None if m.score is None else round(float(m.score), 4)} for m in memories]


# ------------------------------------------------------------------------- model variants
class ModelVariants:
    """The base model's engine and, built lazily, one engine per adapter (see the module
    docstring). An engine is only shut down when every request given to it has finished."""

    def __init__(self, base: Engine, base_name: str, checkpoint: str | Path | None,
                 max_adapter_engines: int, dtype: str = "fp32") -> None:
        self.base, self.base_name = base, base_name
        self.checkpoint = Path(checkpoint) if checkpoint is not None else None
        self.max_adapter_engines = max_adapter_engines
        self.dtype = dtype  # what the base was prepared as; adapter engines are prepared alike
        self.engines: dict[str, Engine] = {}  # adapter name -> engine, least recently used first
        self.handles: dict[str, list[RequestHandle]] = {}
        self._loading = asyncio.Lock()
        self.closing = False

    def names(self) -> list[str]:
        adapters = list_adapters(self.checkpoint) if self.checkpoint is not None else []
        return [self.base_name] + [f"{self.base_name}:{name}" for name in adapters]

    def adapter_of(self, model: str | None) -> str | None:
        """The adapter a request's `model` names (None: the base); 404 for anything unknown."""
        if model is None or model == self.base_name:
            return None
        base, _, adapter = model.partition(":")
        known = self.names()
        if base == self.base_name and adapter and model in known:
            return check_name(adapter)
        raise ApiError(404, f"the model '{model}' does not exist; this server serves "
                       f"{', '.join(repr(name) for name in known)}.", param="model",
                       code="model_not_found")

    def revive(self) -> bool:
        """Start a new engine on the same model where an engine thread has died (a bug: every
        failure the engine can pin on requests ends only those); False while shutting down."""
        if self.closing:
            return False
        if not self.base.alive:
            self.base = Engine(self.base.model, self.base.tokenizer,
                               max_batch_size=self.base.max_batch_size,
                               max_queue=self.base.max_queue)
        for name, engine in list(self.engines.items()):
            if not engine.alive:
                self.engines.pop(name)  # rebuilt on its next request
                self.handles.pop(name, None)
        return True

    async def engine(self, adapter: str | None) -> Engine:
        if adapter is None:
            self.revive()
            return self.base
        async with self._loading:  # one build at a time; later callers find it built
            if adapter not in self.engines:
                try:
                    model = await asyncio.to_thread(self._adapted_model, adapter)
                except PrometheanError as error:  # a damaged or mismatched adapter on disk
                    raise ApiError(500, f"the adapter '{adapter}' could not be loaded: {error}",
                                   param="model", error_type="server_error",
                                   code="adapter_load_failed")
                self.engines[adapter] = Engine(model, self.base.tokenizer,
                                               max_batch_size=self.base.max_batch_size,
                                               max_queue=self.base.max_queue)
                self.handles[adapter] = []
                self._evict(keep=adapter)
            self.engines[adapter] = self.engines.pop(adapter)  # now the most recently used
            return self.engines[adapter]

    def _adapted_model(self, adapter: str) -> Transformer:
        # A prepared base cannot take a merge: merge into fresh fp32 weights, then prepare.
        from promethean.checkpoint import load_checkpoint
        from promethean.inference.quantize import prepare_for_inference

        model = load_checkpoint(self.checkpoint, device=self.base.device).model.eval()
        load_adapter_onto(model, self.checkpoint, adapter)
        return prepare_for_inference(model, self.dtype)

    @property
    def queue_depth(self) -> int:
        return self.base.queue_depth + sum(e.queue_depth for e in list(self.engines.values()))

    @property
    def running(self) -> int:
        return self.base.running + sum(e.running for e in list(self.engines.values()))

    def track(self, adapter: str | None, handle: RequestHandle) -> None:
        if adapter is not None:
            handles = self.handles[adapter]
            handles[:] = [h for h in handles if not h.done]
            handles.append(handle)

    def _evict(self, keep: str) -> None:
        """Shut down least recently used adapter engines with nothing in flight while there are
        more than allowed (when all are busy the limit is exceeded until they finish)."""
        for name in list(self.engines):
            if len(self.engines) <= self.max_adapter_engines:
                return
            if name != keep and all(handle.done for handle in self.handles[name]):
                self.engines.pop(name).shutdown(timeout=0)
                del self.handles[name]

    def shutdown(self) -> None:
        self.closing = True
        for engine in [self.base, *self.engines.values()]:
            engine.shutdown()


# ----------------------------------------------------------------------------------- app
class Server:
    """What the routes share: the engine, the tokenizer, metrics, the chat log, chat histories."""

    def __init__(self, engine: Engine, tokenizer: Tokenizer, model_name: str,
                 api_key: str | list[str] | None, chat_log: ChatLog | None,
                 variants: ModelVariants | None = None, memory: ServerMemory | None = None) -> None:
        self.engine = engine
        self.memory = memory
        # Browser safety (see _AuthoriseAndCount.browser_refusal); create_app sets them.
        self.allowed_origins: frozenset[str] = frozenset()
        self.allowed_hosts: frozenset[str] | None = None
        self.variants = variants or ModelVariants(engine, model_name, None, 0)
        self.tokenizer = tokenizer
        self.model_name = model_name
        # "Bearer KEY" header -> the key's name ("" when there is one key: one user).
        keys = [api_key] if isinstance(api_key, str) else list(api_key or [])
        if any(not key for key in keys):
            raise PrometheanError("an API key must not be empty.")
        self.api_keys: dict[bytes, str] = {
            f"Bearer {key}".encode(): "" if len(keys) == 1 else f"key{index + 1}"
            for index, key in enumerate(keys)}
        self.api_key = keys[0] if keys else None
        self.shared_memory = False  # create_app sets it
        self.user_memories: dict[str, ServerMemory] = {}
        self.chat_log = chat_log
        self.metrics = Metrics()
        self.context_length = engine.model.config.context_length
        self.limits = ServeLimits()  # create_app sets the app's
        # /chat conversations: (user, chat id) -> [(turn, its tokens)], least recently used first.
        self.chats: OrderedDict[tuple[str, str], list[tuple[Turn, int]]] = OrderedDict()
        self.created = int(time.time())

    # -------------------------------------------------------------- validation helpers
    async def body(self, request: Request, model: type[BaseModel]) -> Any:
        """The request's body as `model`: read within max_body_bytes, parsed, and checked
        against the size limits (and stream_options against stream)."""
        body = _parse(model, await read_body(request, self.limits))
        check_sizes(body, self.limits)
        if isinstance(body, _SamplingFields):
            check_options(body)
        return body

    def check_model(self, name: str | None) -> str | None:
        """The adapter that `name` asks for (None: the base model); 404 for an unknown model."""
        return self.variants.adapter_of(name)

    def max_tokens(self, value: int | None, default: int) -> int:
        limit = self.context_length - 1
        if value is None:
            return min(default, limit)
        if not 1 <= value <= limit:
            raise ApiError(400, f"max_tokens must be between 1 and {limit} (the model's context "
                           f"is {self.context_length} tokens), got {value}.", param="max_tokens",
                           code="invalid_value")
        return value

    def check_prompt(self, prompt: list[int]) -> None:
        if not prompt:
            raise ApiError(400, "the prompt is empty.", param="prompt", code="invalid_value")
        if len(prompt) >= self.context_length:
            raise ApiError(400, f"the prompt is {len(prompt)} tokens but the model's context is "
                           f"{self.context_length}; shorten it.", param="prompt",
                           code="context_length_exceeded")

    def sampling(self, body: _SamplingFields | ChatBody, max_tokens: int,
                 extra_stops: tuple[str, ...] = ()) -> SamplingParams:
        logprobs = None
        if isinstance(body, ChatBody) and (body.logprobs or body.top_logprobs is not None):
            raise ApiError(400, "logprobs is not supported on /chat; ask /v1/chat/completions.",
                           param="logprobs", code="unsupported_parameter")
        if isinstance(body, ChatCompletionBody):
            if body.top_logprobs is not None and not body.logprobs:
                raise ApiError(400, "top_logprobs goes with logprobs: true.",
                               param="top_logprobs", code="invalid_value")
            logprobs = (body.top_logprobs or 0) if body.logprobs else None
        elif isinstance(body, CompletionBody):
            logprobs = body.logprobs
        if logprobs is not None and getattr(body, "stream", False):
            raise ApiError(400, "logprobs in a stream is not supported; ask without stream.",
                           param="logprobs", code="unsupported_parameter")
        stops = getattr(body, "stop", None)
        stops = (stops,) if isinstance(stops, str) else tuple(stops or ())
        if len(stops) > 4 or any(not stop for stop in stops):
            raise ApiError(400, "stop takes at most 4 non-empty strings.", param="stop",
                           code="invalid_value")
        return SamplingParams(
            max_new_tokens=max_tokens,
            temperature=body.temperature,
            top_k=body.top_k,
            top_p=getattr(body, "top_p", None),
            repetition_penalty=getattr(body, "repetition_penalty", 1.0),
            stop_token_ids=(self.tokenizer.eot_id,),
            stop_strings=tuple(dict.fromkeys(extra_stops + stops)),
            seed=body.seed,
            logprobs=logprobs,
        )

    async def submit(self, prompt: list[int], params: SamplingParams,
                     adapter: str | None = None) -> RequestHandle:
        engine = await self.variants.engine(adapter)
        try:
            handle = engine.submit(prompt, params)
        except (QueueFullError, EngineStoppedError) as error:
            raise ApiError(503, str(error), error_type="server_overloaded", code="overloaded",
                           headers={"Retry-After": str(RETRY_AFTER_SECONDS)})
        except PrometheanError as error:
            raise ApiError(400, str(error), param="prompt", code="invalid_value")
        handle.bind_loop(asyncio.get_running_loop())
        self.variants.track(adapter, handle)
        return handle

    async def wait(self, request: Request, handle: RequestHandle):
        """The completion, cancelling the generation if the client goes away meanwhile."""
        async def collect():
            async for event in handle.aevents():
                if event.completion is not None:
                    return event.completion

        task = asyncio.ensure_future(collect())
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.25)
            if done:
                try:
                    completion = task.result()
                except EngineStoppedError as error:
                    raise ApiError(503, str(error), error_type="server_error", code="shutting_down",
                                   headers={"Retry-After": str(RETRY_AFTER_SECONDS)})
                except RequestFailedError as error:
                    raise ApiError(500, str(error), error_type="server_error",
                                   code="generation_failed")
                self.finished(handle, completion)
                return completion
            if await request.is_disconnected():
                handle.cancel()

    def finished(self, handle: RequestHandle, completion) -> None:
        seconds = time.monotonic() - handle.submitted_at
        self.metrics.record_generation(handle.prompt_length, len(completion.token_ids), seconds)

    def conversation_prompt(self, history: list[tuple[Turn, int]], human: Turn
                            ) -> tuple[list[Turn], list[int]]:
        """The prompt for the next reply in a kept conversation: as many of its latest turns as
        fit the context with the new one, whole exchanges dropped oldest first, chosen from each
        turn's stored token count (one pass, then one encoding; no re-encoding per drop)."""
        room = self.context_length - 1 - len(self.tokenizer.encode_ordinary(
            assistant_prompt([human])))
        start, used = len(history), 0
        while start > 0 and used + history[start - 1][1] <= room:
            start -= 1
            used += history[start][1]
        start += start % 2  # whole exchanges: begin at a human turn
        turns = [turn for turn, _ in history[start:]] + [human]
        prompt = self.tokenizer.encode_ordinary(assistant_prompt(turns))
        while len(prompt) >= self.context_length and len(turns) > 1:  # turns' tokens merged
            turns = turns[2:] if len(turns) > 2 else turns[1:]
            prompt = self.tokenizer.encode_ordinary(assistant_prompt(turns))
        return turns, prompt

    def keep_chat(self, chat_id: tuple[str, str], history: list[tuple[Turn, int]],
                  new: list[Turn]) -> None:
        """Store a conversation with its new turns: at most max_history_tokens of it (the oldest
        exchanges dropped) and at most max_chats conversations (the least recently used)."""
        limits = self.limits
        kept = history + [(turn, len(self.tokenizer.encode_ordinary(render_turn(turn))))
                          for turn in new]
        total, start = sum(tokens for _, tokens in kept), 0
        while total > limits.max_history_tokens and start + 2 <= len(kept):
            total -= kept[start][1] + kept[start + 1][1]
            start += 2
        self.chats[chat_id] = kept[start:]
        self.chats.move_to_end(chat_id)
        while len(self.chats) > limits.max_chats:
            self.chats.popitem(last=False)

    def chat_prompt(self, messages: list[ChatMessage], memory_block: str = "") -> str:
        """System messages, then the recalled memories, then the conversation."""
        system = "".join(m.content.strip() + "\n" for m in messages if m.role == "system")
        turns = [Turn("human" if m.role == "user" else "assistant", m.content)
                 for m in messages if m.role != "system"]
        return system + memory_block + assistant_prompt(turns)

    # --------------------------------------------------------------------------- memory
    def user_of(self, request: Request, body: BaseModel) -> str:
        """Who a request speaks for: its API key's name where several keys are configured, and
        the OpenAI `user` field; "" for the one default user."""
        key_name = getattr(request.state, "key_name", "")
        user = getattr(body, "user", None) or ""
        return f"{key_name}\x1f{user}" if key_name or user else ""

    def memory_of(self, user: str) -> ServerMemory:
        """The memory a user recalls from and remembers into: the shared one for the default
        user or with shared_memory, else the user's own."""
        if self.shared_memory or not user:
            return self.memory
        if user not in self.user_memories:
            self.user_memories[user] = self.memory.for_user(user)
        return self.user_memories[user]

    def every_memory(self) -> list[ServerMemory]:
        return [self.memory, *self.user_memories.values()] if self.memory is not None else []

    def check_memory(self, wanted: bool) -> None:
        if wanted and self.memory is None:
            raise ApiError(400, NO_MEMORY, param="memory", code="memory_unavailable")

    async def recall(self, user: str, query: str, prompt_tokens: int, max_new_tokens: int
                     ) -> tuple[str, list[Memory]]:
        """The memory block for a prompt of `prompt_tokens` tokens, from `user`'s memory: it
        takes at most the room left in the context once the reply's `max_new_tokens` are set
        aside."""
        room = self.context_length - 1 - prompt_tokens - max_new_tokens
        memory = await asyncio.to_thread(self.memory_of, user)
        return await asyncio.to_thread(memory.recall, query, self.count_tokens, room)

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer.encode_ordinary(text))

    async def remember(self, user: str, human: str, completion, source: str) -> None:
        """Offer a finished exchange to `user`'s memory. A failure is logged, not raised: the
        reply has been given by then."""
        if completion.finish_reason == "cancelled":
            return
        try:
            memory = await asyncio.to_thread(self.memory_of, user)
            await asyncio.to_thread(memory.remember, human, completion.text.strip(), source)
        except Exception:  # noqa: BLE001 - the server keeps serving; the log says what broke
            log.exception("could not remember an exchange")

    def log_turn(self, chat_id: str, human: str, completion, route: str) -> None:
        """Append a finished turn (not one whose client left before the reply was complete)."""
        assistant = completion.text.strip()
        if self.chat_log is not None and completion.finish_reason != "cancelled":
            self.chat_log.append({"chat_id": chat_id, "time": time.time(), "route": route,
                                  "human": human, "assistant": assistant})


KNOWN_ROUTES = {"/", "/health", "/metrics", "/chat", "/v1/models", "/v1/completions",
                "/v1/chat/completions"}


def _is_open(path: str) -> bool:
    """Routes that need no API key: health, and the web page with its static files (they hold
    no data; the API calls the page makes carry the key)."""
    return path in ("/", "/health") or path.startswith("/static/")


class _AuthoriseAndCount:
    """ASGI middleware: the API key check (every route but the open ones) and request counting.
    Plain ASGI rather than `@app.middleware`, which would hide a client's disconnect from the
    routes."""

    def __init__(self, app, server: Server) -> None:
        self.app = app
        self.server = server

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        route = (path if path in KNOWN_ROUTES
                 else "/static" if path.startswith("/static/") else "other")
        refusal = self.browser_refusal(scope)
        if refusal is not None:
            self.server.metrics.record_request(route, refusal.status)
            await refusal.response()(scope, receive, send)
            return
        keys = self.server.api_keys
        if keys and not _is_open(path):
            given = dict(scope["headers"]).get(b"authorization", b"")
            # Every key compared, in constant time each: which one matched says nothing by timing.
            matches = [name for header, name in keys.items() if hmac.compare_digest(given, header)]
            if matches:
                scope.setdefault("state", {})["key_name"] = matches[0]
            else:
                    response = ApiError(401, "a valid API key is required: send the header "
                                        "'Authorization: Bearer KEY'.", error_type="authentication_error",
                                        code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
                    self.server.metrics.record_request(route, 401)
                    await response.response()(scope, receive, send)
                    return
        status = 500

        async def send_and_note_status(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note_status)
        finally:
            self.server.metrics.record_request(route, status)

    def browser_refusal(self, scope) -> ApiError | None:
        """A request a browser may have been made to send: from a page of another origin (any
        site can POST a form or a text/plain body here, no CORS preflight asked), or, on a
        loopback server, under a Host name it does not answer to (a DNS-rebinding page)."""
        headers = dict(scope["headers"])
        host = headers.get(b"host", b"").decode("latin-1")
        allowed_hosts = self.server.allowed_hosts
        if allowed_hosts is not None and _host_name(host).lower() not in allowed_hosts:
            return ApiError(403, f"this server does not answer to the Host '{host}'; start it "
                            "with --allow-host NAME to allow a name.",
                            error_type="permission_error", code="host_not_allowed")
        origin = headers.get(b"origin")
        if origin is None:  # not sent by a browser page (curl, the openai client, ...)
            return None
        origin_text = origin.decode("latin-1")
        own = f"{scope.get('scheme', 'http')}://{host}"
        if origin_text != own and origin_text not in self.server.allowed_origins:
            return ApiError(403, f"a page from {origin_text} may not call this server: only its "
                            "own page, or an origin given with --allow-origin.",
                            error_type="permission_error", code="origin_not_allowed")
        return None


def _host_name(host: str) -> str:
    """The name of a Host header without its port ('[::1]:8000' -> '::1')."""
    if host.startswith("["):
        return host[1:].partition("]")[0]
    return host.rpartition(":")[0] if host.count(":") == 1 else host


GRACEFUL_SHUTDOWN_SECONDS = 10
# The names a loopback-bound server answers to by default.
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


def _finish_reason(reason: str) -> str:
    return reason if reason in ("stop", "length") else "stop"


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def _stream_error(error: PrometheanError) -> str:
    """The last event of a stream that failed after it began: OpenAI's error object."""
    code = "shutting_down" if isinstance(error, EngineStoppedError) else "generation_failed"
    return _sse({"error": {"message": str(error), "type": "server_error", "param": None,
                           "code": code}})


def create_app(
    model: Transformer | None = None,
    tokenizer: Tokenizer | None = None,
    model_name: str = "promethean",
    api_key: str | list[str] | None = None,
    chat_log: str | Path | None = None,
    max_batch_size: int = 16,
    max_queue: int = 64,
    engine: Engine | None = None,
    checkpoint: str | Path | None = None,
    max_adapter_engines: int = 2,
    dtype: str = "fp32",
    memory: ServerMemory | None = None,
    memory_save_seconds: float = 60.0,
    allowed_origins: tuple[str, ...] = (),
    allowed_hosts: tuple[str, ...] | None = None,
    limits: ServeLimits | None = None,
    shared_memory: bool = False,
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
        engine = Engine(model, tokenizer, max_batch_size=max_batch_size, max_queue=max_queue)
    tokenizer = tokenizer or engine.tokenizer
    variants = ModelVariants(engine, model_name, checkpoint, max_adapter_engines, dtype)
    server = Server(engine, tokenizer, model_name, api_key,
                    ChatLog(chat_log) if chat_log is not None else None, variants, memory)
    server.limits = limits or ServeLimits()
    server.shared_memory = shared_memory
    server.allowed_origins = frozenset(origin.rstrip("/") for origin in allowed_origins)
    server.allowed_hosts = (None if allowed_hosts is None
                            else frozenset(name.lower() for name in allowed_hosts))

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

    app.add_middleware(_AuthoriseAndCount, server=server)
    if allowed_origins:  # CORS only when asked for: a page of those origins may then call in
        from starlette.middleware.cors import CORSMiddleware

        # Added last, so outermost: a preflight (which carries no API key) is answered here.
        app.add_middleware(CORSMiddleware, allow_origins=sorted(server.allowed_origins),
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
        return PlainTextResponse(server.metrics.render(variants.queue_depth, variants.running),
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
        params = server.sampling(body, server.max_tokens(_requested_tokens(body), 16))
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
                        yield _sse(chunk(echoed, None))
                    async for event in handle.aevents():
                        if event.completion is not None:
                            server.finished(handle, event.completion)
                            if event.text:
                                yield _sse(chunk(event.text, None))
                            yield _sse(chunk("", _finish_reason(event.completion.finish_reason)))
                            if _wants_usage(body):
                                yield _sse(_usage_chunk(chunk("", None), len(prompt),
                                                        len(event.completion.token_ids)))
                        elif event.text:
                            yield _sse(chunk(event.text, None))
                    yield "data: [DONE]\n\n"
                except (RequestFailedError, EngineStoppedError) as error:
                    yield _stream_error(error)  # the 200 is sent: the error is the last event
                finally:
                    handle.cancel()  # a no-op when finished; frees the row when the client left

            return StreamingResponse(events(), media_type="text/event-stream")
        completion = await server.wait(request, handle)
        result = chunk(echoed + completion.text, _finish_reason(completion.finish_reason))
        if completion.logprobs is not None:
            result["choices"][0]["logprobs"] = _completion_logprobs(server.tokenizer, completion,
                                                                    len(echoed))
        result["usage"] = _usage(len(prompt), len(completion.token_ids))
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
        human = body.messages[-1].content
        prompt = server.tokenizer.encode_ordinary(server.chat_prompt(body.messages))
        server.check_prompt(prompt)
        params = server.sampling(body, server.max_tokens(_requested_tokens(body), 128),
                                 extra_stops=("\n",))
        memories: list[Memory] = []
        if body.memory:
            block, memories = await server.recall(user, human, len(prompt), params.max_new_tokens)
            prompt = server.tokenizer.encode_ordinary(server.chat_prompt(body.messages, block))
            server.check_prompt(prompt)
        handle = await server.submit(prompt, params, adapter)
        identifier, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        chat_id = body.chat_id or identifier

        def chunk(delta: dict[str, str], finish: str | None) -> dict[str, Any]:
            return {"id": identifier, "object": "chat.completion.chunk", "created": created,
                    "model": model_id,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

        if body.stream:
            async def events():
                try:
                    first = chunk({"role": "assistant", "content": ""}, None)
                    if body.memory:
                        first["memories"] = _memories_used(memories)
                    yield _sse(first)
                    async for event in handle.aevents():
                        if event.text:
                            yield _sse(chunk({"content": event.text}, None))
                        if event.completion is not None:
                            completion = event.completion
                            server.finished(handle, completion)
                            server.log_turn(chat_id, human, completion, "/v1/chat/completions")
                            yield _sse(chunk({}, _finish_reason(completion.finish_reason)))
                            if _wants_usage(body):
                                yield _sse(_usage_chunk(chunk({}, None), len(prompt),
                                                        len(completion.token_ids)))
                            if body.memory:  # before [DONE]: a client that saw it can recall it
                                await server.remember(user, human, completion, "serve")
                    yield "data: [DONE]\n\n"
                except (RequestFailedError, EngineStoppedError) as error:
                    yield _stream_error(error)  # the 200 is sent: the error is the last event
                finally:
                    handle.cancel()

            return StreamingResponse(events(), media_type="text/event-stream")
        completion = await server.wait(request, handle)
        reply = completion.text.strip()
        server.log_turn(chat_id, human, completion, "/v1/chat/completions")
        result = {"id": identifier, "object": "chat.completion", "created": created,
                  "model": model_id,
                  "choices": [{"index": 0, "message": {"role": "assistant", "content": reply},
                               "logprobs": _chat_logprobs(server.tokenizer, completion),
                               "finish_reason": _finish_reason(completion.finish_reason)}],
                  "usage": _usage(len(prompt), len(completion.token_ids))}
        if body.memory:
            await server.remember(user, human, completion, "serve")
            result["memories"] = _memories_used(memories)
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
        server.check_prompt(prompt)
        params = server.sampling(body, server.max_tokens(body.max_tokens, 128), extra_stops=("\n",))
        memories: list[Memory] = []
        if body.memory:
            block, memories = await server.recall(user, body.message, len(prompt),
                                                  params.max_new_tokens)
            prompt = server.tokenizer.encode_ordinary(block + assistant_prompt(turns))
            server.check_prompt(prompt)
        handle = await server.submit(prompt, params)
        completion = await server.wait(request, handle)
        reply = completion.text.strip()
        server.keep_chat(kept_as, history, [human, Turn("assistant", reply)])
        server.log_turn(chat_id, body.message, completion, "/chat")
        result = {"response": reply, "chat_id": chat_id,
                  "finish_reason": _finish_reason(completion.finish_reason),
                  "usage": _usage(len(prompt), len(completion.token_ids))}
        if body.memory:
            await server.remember(user, body.message, completion, "serve")
            result["memories"] = _memories_used(memories)
        return result

    return app


def _completion_logprobs(tokenizer: Tokenizer, completion, offset: int) -> dict[str, Any]:
    """The completions API's logprobs: each token's text, log-probability, the most likely
    tokens' (by text) and where each token's text starts."""
    tokens, chosen, top, offsets = [], [], [], []
    for token_id, (logprob, best) in zip(completion.token_ids, completion.logprobs):
        text = tokenizer.decode([token_id])
        tokens.append(text)
        chosen.append(logprob)
        top.append({tokenizer.decode([index]): value for index, value in best})
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": chosen, "top_logprobs": top,
            "text_offset": offsets}


def _chat_logprobs(tokenizer: Tokenizer, completion) -> dict[str, Any] | None:
    """The chat API's logprobs: {"content": [{token, logprob, bytes, top_logprobs}]}."""
    if completion.logprobs is None:
        return None

    def entry(token_id: int, logprob: float) -> dict[str, Any]:
        text = tokenizer.decode([token_id])
        return {"token": text, "logprob": logprob,
                "bytes": list(text.encode("utf-8", "surrogatepass"))}

    return {"content": [{**entry(token_id, logprob),
                         "top_logprobs": [entry(index, value) for index, value in best]}
                        for token_id, (logprob, best) in zip(completion.token_ids,
                                                             completion.logprobs)]}


def _documented_body(model: type[BaseModel]) -> dict[str, Any]:
    """The OpenAPI requestBody of a route that parses `model` from its raw body."""
    return {"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}}


def _requested_tokens(body: _SamplingFields) -> int | None:
    """max_completion_tokens (the chat API's newer name) where given, else max_tokens."""
    if body.max_completion_tokens is not None:
        return body.max_completion_tokens
    return body.max_tokens


def check_options(body: _SamplingFields) -> None:
    if body.stream_options is not None and not body.stream:
        raise ApiError(400, "stream_options goes with stream: true.", param="stream_options",
                       code="invalid_value")


def _wants_usage(body: _SamplingFields) -> bool:
    return body.stream_options is not None and body.stream_options.include_usage


def _usage_chunk(template: dict[str, Any], prompt_tokens: int, completion_tokens: int
                 ) -> dict[str, Any]:
    """OpenAI's last chunk of a stream with stream_options.include_usage: no choices, the usage."""
    return {**template, "choices": [], "usage": _usage(prompt_tokens, completion_tokens)}


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def build_app(
    checkpoint: str | Path,
    api_key: str | list[str] | None = None,
    chat_log: str | Path | None = "chat.jsonl",
    max_batch_size: int = 16,
    max_queue: int = 64,
    device: str | None = None,
    max_adapter_engines: int = 2,
    dtype: str = "fp32",
    memory: str | Path | None = None,
    memory_tokens: int = 256,
    allowed_origins: tuple[str, ...] = (),
    allowed_hosts: tuple[str, ...] | None = None,
    limits: ServeLimits | None = None,
    shared_memory: bool = False,
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
    # is batched with (adapters are merged into fresh fp32 copies and prepared alike).
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
                      limits=limits, shared_memory=shared_memory)


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
