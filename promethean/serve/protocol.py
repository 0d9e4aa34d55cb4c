"""What goes over the wire: the request bodies, the limits one request must keep, the error
schema, and the pieces of the response bodies and server-sent events the routes share.

Errors are JSON bodies in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, so the
official client raises the right exception with a readable message. A body is read by the server
itself (bounded by max_body_bytes, never read whole first) and parsed strictly: a wrong type, an
unknown value or an OpenAI parameter this server does not implement is refused with one sentence
that names the parameter.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from promethean.context.tree import Memory
from promethean.errors import PrometheanError
from promethean.inference.engine import EngineStoppedError
from promethean.inference.generate import SEED_MAX, SEED_MIN
from promethean.tokenizer import Tokenizer


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


class SamplingFields(_Body):
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


class CompletionBody(SamplingFields):
    prompt: str | list[str]
    echo: bool = False  # the prompt's text before the completion's
    logprobs: int | None = Field(None, ge=0, le=5)  # the chosen token's, and this many others'
    memory: bool = False  # refused: a plain completion has no conversation to recall or remember


class ChatMessage(_Body):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatCompletionBody(SamplingFields):
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


def parse_body(model: type[BaseModel], raw: bytes) -> Any:
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


# ------------------------------------------------------------------------ response bodies
def finish_reason(reason: str) -> str:
    """OpenAI's finish_reason for the engine's: "stop" and "length" as they are, any other
    (a cancelled generation) as "stop"."""
    return reason if reason in ("stop", "length") else "stop"


def sse_event(payload: dict[str, Any]) -> str:
    """One server-sent event of a stream."""
    return f"data: {json.dumps(payload)}\n\n"


def stream_error_event(error: PrometheanError) -> str:
    """The last event of a stream that failed after it began: OpenAI's error object."""
    code = "shutting_down" if isinstance(error, EngineStoppedError) else "generation_failed"
    return sse_event({"error": {"message": str(error), "type": "server_error", "param": None,
                                "code": code}})


def completion_logprobs(tokenizer: Tokenizer, completion, offset: int) -> dict[str, Any]:
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


def chat_logprobs(tokenizer: Tokenizer, completion) -> dict[str, Any] | None:
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


def requested_tokens(body: SamplingFields) -> int | None:
    """max_completion_tokens (the chat API's newer name) where given, else max_tokens."""
    if body.max_completion_tokens is not None:
        return body.max_completion_tokens
    return body.max_tokens


def check_options(body: SamplingFields) -> None:
    if body.stream_options is not None and not body.stream:
        raise ApiError(400, "stream_options goes with stream: true.", param="stream_options",
                       code="invalid_value")


def wants_usage(body: SamplingFields) -> bool:
    return body.stream_options is not None and body.stream_options.include_usage


def usage_chunk(template: dict[str, Any], prompt_tokens: int, completion_tokens: int
                 ) -> dict[str, Any]:
    """OpenAI's last chunk of a stream with stream_options.include_usage: no choices, the usage."""
    return {**template, "choices": [], "usage": token_usage(prompt_tokens, completion_tokens)}


def token_usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def memories_used(memories: list[Memory]) -> list[dict[str, Any]]:
    """The `memories` a chat response names: those recalled into its prompt."""
    return [{"id": int(m.id), "text": m.text,
             "score": None if m.score is None else round(float(m.score), 4)} for m in memories]
