"""What the routes share (`Server`): the size and sampling checks, submitting to an engine and
waiting on it, the /chat conversations the server keeps, each user's memory, and the chat turn
both chat routes take (`begin_chat_turn`, `ChatTurn.end`): recall, encode, check, submit, then log
and remember. The routes themselves differ only in their protocol.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from pydantic import BaseModel

from promethean.context.tree import Memory
from promethean.data.chat import Turn, assistant_prompt, render_turn
from promethean.errors import PrometheanError
from promethean.inference.adapter_slots import AdapterSlotsFullError
from promethean.inference.engine import (
    Engine,
    EngineStoppedError,
    QueueFullError,
    RequestFailedError,
    RequestHandle,
)
from promethean.inference.generate import SamplingParams
from promethean.serve.memory import ServerMemory
from promethean.serve.pool import ModelVariants
from promethean.serve.protocol import (
    ApiError,
    ChatBody,
    ChatCompletionBody,
    ChatMessage,
    CompletionBody,
    SamplingFields,
    ServeLimits,
    check_options,
    check_sizes,
    parse_body,
    read_body,
)
from promethean.serve.telemetry import ChatLog, Metrics
from promethean.tokenizer import Tokenizer

RETRY_AFTER_SECONDS = 1
CHAT_MAX_TOKENS = 128  # a chat reply's length when the request does not say
NO_MEMORY = ("memory was requested but this server was started without a memory directory "
             "(--memory DIR).")

log = logging.getLogger("promethean.serve")


class Server:
    """What the routes share: the engine, the tokenizer, metrics, the chat log, chat histories."""

    def __init__(self, engine: Engine, tokenizer: Tokenizer, model_name: str,
                 chat_log: ChatLog | None, variants: ModelVariants | None = None,
                 memory: ServerMemory | None = None) -> None:
        self.engine = engine
        self.memory = memory
        self.variants = variants or ModelVariants(engine, model_name, None, 0)
        self.tokenizer = tokenizer
        self.model_name = model_name
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
        body = parse_body(model, await read_body(request, self.limits))
        check_sizes(body, self.limits)
        if isinstance(body, SamplingFields):
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

    def sampling(self, body: SamplingFields | ChatBody, max_tokens: int,
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
        weights = await self.variants.slot_adapter(adapter)
        try:
            handle = (engine.submit(prompt, params) if weights is None
                      else engine.submit(prompt, params, adapter=weights))
        except (QueueFullError, EngineStoppedError) as error:
            raise ApiError(503, str(error), error_type="server_overloaded", code="overloaded",
                           headers={"Retry-After": str(RETRY_AFTER_SECONDS)})
        except AdapterSlotsFullError as error:
            raise ApiError(503, str(error), error_type="server_overloaded", code="adapters_busy",
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

    # ------------------------------------------------------------------------ chat turn
    async def begin_chat_turn(self, route: str, body: ChatBody | ChatCompletionBody, *,
                              chat_id: str, user: str, human: str, prompt: list[int],
                              prompt_text: Callable[[str], str], requested_tokens: int | None,
                              adapter: str | None = None) -> ChatTurn:
        """Start the reply to `human` on a chat route: `prompt` is the conversation's tokens, and
        where the body asks for memory, `prompt_text(memory_block)` is the conversation's text
        with the memories recalled for `human` put in, encoded and checked again. Every refusal
        comes before the request is submitted."""
        self.check_prompt(prompt)
        # A reply is one turn of the chat format, which ends at its line's end.
        params = self.sampling(body, self.max_tokens(requested_tokens, CHAT_MAX_TOKENS),
                               extra_stops=("\n",))
        memories = None
        if body.memory:
            block, memories = await self.recall(user, human, len(prompt), params.max_new_tokens)
            prompt = self.tokenizer.encode_ordinary(prompt_text(block))
            self.check_prompt(prompt)
        handle = await self.submit(prompt, params, adapter)
        return ChatTurn(self, route, chat_id, user, human, prompt, handle, memories)


@dataclass
class ChatTurn:
    """A human message on a chat route and the reply being generated for it."""

    server: Server
    route: str
    chat_id: str
    user: str
    human: str
    prompt: list[int]  # what was submitted, memories included
    handle: RequestHandle
    memories: list[Memory] | None  # those recalled into the prompt; None: memory not asked for

    async def end(self, completion) -> None:
        """Log the finished turn and, where memory was asked for, offer the exchange to the
        user's memory (neither for a reply whose client left before it was complete)."""
        if self.server.chat_log is not None:
            self.server.chat_log.append_turn(self.chat_id, self.human, completion, self.route)
        if self.memories is not None:
            await self.server.remember(self.user, self.human, completion, "serve")
