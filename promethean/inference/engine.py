"""Continuous batching: many requests share one running decode batch, joining and leaving it at
every step.

One background thread owns the model. Each step it admits waiting requests (prefilled together
in a cache of their own, left-padded as `generate` pads uneven prompts), merges that cache into
the running batch cache, then runs one batched decode step for every row.
Finished and cancelled rows leave the batch before the next step.

Merging caches of different lengths (`KVCache.concat_rows`, promethean.model.cache): every row
of a cache shares one slot count, and a row's left padding says where its real tokens begin
(positions and masks already handle that for uneven prompts). So a newcomer with fewer slots than
the batch is left-padded to the batch's length, and when a newcomer is longer the whole batch is
left-padded instead. Columns that are padding for every row are trimmed whenever rows leave
(`KVCache.trim_common_padding`), so the slot count stays that of the longest live row. This keeps
one batched forward per step (the point of batching) rather than a loop over per-row caches.

With `prefix_cache_bytes`, a finished row's cache is kept (`promethean.inference.prefix_cache`)
and a newcomer whose prompt starts with a kept sequence is prefilled alone, after a copy of the
reused slots, then joins the batch as any newcomer does: a chat's next turn runs only its new
tokens. Only on Promethean's kernels (a prepared model on the CPU), where that changes no output.

With `max_adapters`, requests may name a LoRA adapter (`submit(..., adapter=)`): up to that many
are held side by side in the model's layers (`promethean.inference.adapter_slots`) and rows of
the base and of several adapters share every prefill and decode step, each row getting its own
adapter's update. Also only on the kernels; a reused prefix must come from the same adapter.

Sampling (`process_logits`, `pick_tokens`, one generator per request), stop tokens, stop strings
and streamed text that never splits a UTF-8 character or shows a stop string's beginning early
are the pieces `promethean.inference.generate` uses for a single batch.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

import torch

from promethean.errors import PrometheanError
from promethean.inference import DEFAULT_MAX_BATCH_SIZE, DEFAULT_MAX_QUEUE
from promethean.inference.generate import (
    GREEDY,
    Completion,
    SamplingParams,
    StopWatcher,
    fit_prompt,
    greedy_tokens,
    pick_tokens,
    process_logits,
    sampling_generator,
)
from promethean.inference.adapter_slots import AdapterSlots, SlotAdapter
from promethean.inference.prefix_cache import PrefixStore
from promethean.model import Transformer
from promethean.model.cache import KVCache
from promethean.tokenizer import Tokenizer


class QueueFullError(PrometheanError):
    """The engine's waiting queue is full: the caller should retry later (HTTP 503)."""


class EngineStoppedError(PrometheanError):
    """The engine was shut down before the request could finish."""


class RequestFailedError(PrometheanError):
    """Something went wrong while working on this request (HTTP 500); the engine and every
    other request carry on."""


def _failure(error: BaseException) -> RequestFailedError:
    detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return RequestFailedError(f"generation failed: {detail.rstrip('.')}.")


@dataclass
class StreamEvent:
    """One step's news for a request: new token ids and the text now safe to show; `completion`
    is set on the last event."""

    token_ids: list[int]
    text: str
    completion: Completion | None = None


# ---------------------------------------------------------------------------- requests
@dataclass
class _Request:
    prompt: list[int]
    params: SamplingParams
    handle: RequestHandle
    budget: int
    watcher: StopWatcher
    generator: torch.Generator | None = None
    seen: torch.Tensor | None = None  # (V,) tokens seen, for the repetition penalty
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[tuple[float, list[tuple[int, float]]]] = field(default_factory=list)
    shown: int = 0  # characters of text already streamed
    stop_at: int | None = None
    finish_reason: str | None = None
    cached: int = 0  # slots of this row's sequence held in the cache (prompt, then tokens fed)
    slot: int = -1  # the adapter slot of its rows (-1: the base model)
    namespace: object = None  # its adapter's key: prefixes are reused within an adapter only

    def cached_tokens(self) -> list[int]:
        """The tokens whose keys and values the row's cache holds."""
        return (self.prompt + self.token_ids)[: self.cached]


class RequestHandle:
    """The caller's side of a request: stream its events (sync or async), wait for the result, or
    cancel it (the row leaves the batch at the next step)."""

    def __init__(self, prompt_length: int) -> None:
        self.prompt_length = prompt_length
        self.submitted_at = time.monotonic()
        self.first_token_at: float | None = None
        self._events: queue.Queue[StreamEvent | BaseException] = queue.Queue()
        self._cancelled = threading.Event()
        self._done = threading.Event()
        self._completion: Completion | None = None
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._async_events: asyncio.Queue | None = None
        self._on_done: list = []  # called once, with no arguments, when the request ends

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def cancel(self) -> None:
        self._cancelled.set()

    def bind_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        """Deliver events to an asyncio queue on `loop` as well (call before iterating async)."""
        self._loop = loop
        self._async_events = asyncio.Queue()

    def _push(self, item: StreamEvent | BaseException) -> None:
        if isinstance(item, StreamEvent) and item.completion is not None:
            self._completion = item.completion
        if isinstance(item, BaseException):
            self._error = item
        self._events.put(item)
        if (isinstance(item, BaseException) or item.completion is not None) and \
                not self._done.is_set():
            self._done.set()
            for callback in self._on_done:
                callback()
        if self._loop is not None:
            try:
                self._loop.call_soon_threadsafe(self._async_events.put_nowait, item)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                pass

    def events(self) -> Iterator[StreamEvent]:
        while True:
            item = self._events.get()
            if isinstance(item, BaseException):
                raise item
            yield item
            if item.completion is not None:
                return

    async def aevents(self) -> AsyncIterator[StreamEvent]:
        if self._async_events is None:
            raise RuntimeError("call bind_loop() before iterating a request asynchronously")
        while True:
            item = await self._async_events.get()
            if isinstance(item, BaseException):
                raise item
            yield item
            if item.completion is not None:
                return

    def result(self, timeout: float | None = None) -> Completion:
        if not self._done.wait(timeout):
            raise TimeoutError("the request did not finish in time")
        if self._error is not None:
            raise self._error
        return self._completion


# ------------------------------------------------------------------------------ engine
def token_logprobs(logits: torch.Tensor, token: int, top: int
                   ) -> tuple[float, list[tuple[int, float]]]:
    """The chosen token's log-probability under the model's (V,) logits, and the `top` most
    likely tokens'."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    best = torch.topk(logprobs, top).indices.tolist() if top else []
    return float(logprobs[token]), [(index, float(logprobs[index])) for index in best]


def _is_plain_greedy(params: SamplingParams) -> bool:
    return params.greedy and params.repetition_penalty == 1.0


class Engine:
    """Serve many generation requests with one model (see the module docstring)."""

    def __init__(
        self,
        model: Transformer,
        tokenizer: Tokenizer | None = None,
        max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
        max_queue: int = DEFAULT_MAX_QUEUE,
        prefix_cache_bytes: int = 0,
        max_adapters: int = 0,
    ) -> None:
        if max_batch_size < 1 or max_queue < 0 or prefix_cache_bytes < 0 or max_adapters < 0:
            raise PrometheanError("max_batch_size must be at least 1, max_queue, the prefix "
                                  "cache's bytes and max_adapters at least 0.")
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.device = next(model.parameters()).device
        self._waiting: deque[_Request] = deque()
        self._condition = threading.Condition()
        self._running: list[_Request] = []
        self._cache: KVCache | None = None
        self._last_tokens: torch.Tensor | None = None
        self._stopped = False
        self._admitting: list[_Request] = []  # taken from the queue, not yet in the batch
        self.peak_batch_size = 0  # the most rows decoded together so far
        # The batch cache's bytes after each step (its buffers, padding and room included), the
        # tokens its rows hold, and the peaks of both: what a paged cache would need is the tokens.
        self.kv_bytes = self.kv_tokens = self.peak_kv_bytes = self.peak_kv_tokens = 0
        # Finished sequences' caches for prompts that start with them (None: no reuse). Only on
        # Promethean's kernels, where a prefill split in two gives the logits of a whole one bit
        # for bit; PyTorch's own matrix products may round a row differently with the row count.
        from promethean.inference.kernel_layers import runs_on_kernels

        self.prefix_cache_bytes = prefix_cache_bytes
        self.prefixes = (PrefixStore(prefix_cache_bytes)
                         if prefix_cache_bytes and runs_on_kernels(model) else None)
        self.prefilled_tokens = 0  # prompt tokens run through the model (reused ones are not)
        # LoRA adapters that rows of one batch may each name (None: the base model only).
        self.max_adapters = max_adapters
        self.adapters = (AdapterSlots(model, max_adapters)
                         if max_adapters and runs_on_kernels(model) else None)
        self._thread = threading.Thread(target=self._run, name="promethean-engine", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ caller side
    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return len(self._running)

    def submit(self, prompt: list[int], params: SamplingParams = GREEDY,
               adapter: SlotAdapter | None = None) -> RequestHandle:
        """Queue a prompt (token ids), for the base model or `adapter`. Raises PrometheanError for
        a bad prompt, QueueFullError when `max_queue` requests are already waiting, and
        AdapterSlotsFullError when every adapter slot is held by other requests in flight."""
        context = self.model.config.context_length
        prompt = fit_prompt(prompt, context, crop=False)
        if any(not 0 <= token < self.model.config.vocab_size for token in prompt):
            raise PrometheanError("the prompt holds token ids outside the model's vocabulary.")
        watcher = StopWatcher(self.tokenizer, params.stop_strings)
        handle = RequestHandle(len(prompt))
        request = _Request(
            prompt=prompt,
            params=params,
            handle=handle,
            budget=min(params.max_new_tokens, context - len(prompt)),
            watcher=watcher,
        )
        if adapter is not None:
            if self.adapters is None:
                raise PrometheanError("this engine serves no adapters (it needs max_adapters and "
                                      "a model prepared onto the CPU kernels).")
            request.slot, request.namespace = self.adapters.acquire(adapter), adapter.key
            slots = self.adapters
            handle._on_done.append(lambda: slots.release(request.slot))
        try:
            with self._condition:
                if self._stopped:
                    raise EngineStoppedError("the engine has been shut down.")
                if len(self._waiting) >= self.max_queue:
                    raise QueueFullError(
                        f"the server is busy: {len(self._waiting)} requests are already waiting."
                    )
                self._waiting.append(request)
                self._condition.notify()
        except PrometheanError:
            if request.slot >= 0:
                self.adapters.release(request.slot)
            raise
        return handle

    def generate(self, prompt: list[int], params: SamplingParams = GREEDY) -> Completion:
        return self.submit(prompt, params).result()

    def shutdown(self, timeout: float | None = 10.0) -> None:
        with self._condition:
            self._stopped = True
            self._condition.notify()
        self._thread.join(timeout)

    def counters(self) -> dict[str, int]:
        """Prompt tokens prefilled and reused, prefix lookups and hits, the bytes and sequences
        the prefix store holds, the adapter slots (how many, held by requests now, the bytes of
        their matrices), and the batch cache's bytes and tokens held, now and at their peak
        (zeros for what this engine does not have)."""
        counters = {"prefilled_tokens": self.prefilled_tokens, "reused_tokens": 0, "lookups": 0,
                    "hits": 0, "bytes": 0, "sequences": 0, "adapter_slots": 0,
                    "adapter_slots_in_use": 0, "adapter_bytes": 0,
                    "kv_bytes": self.kv_bytes if self._running else 0,
                    "kv_tokens": self.kv_tokens if self._running else 0,
                    "peak_kv_bytes": self.peak_kv_bytes, "peak_kv_tokens": self.peak_kv_tokens}
        if self.prefixes is not None:
            stats = self.prefixes.stats
            counters.update(reused_tokens=stats.reused_tokens, lookups=stats.lookups,
                            hits=stats.hits, bytes=self.prefixes.nbytes,
                            sequences=len(self.prefixes))
        if self.adapters is not None:
            counters.update(adapter_slots=self.adapters.capacity,
                            adapter_slots_in_use=sum(1 for users in self.adapters.users if users),
                            adapter_bytes=self.adapters.nbytes)
        return counters

    @property
    def alive(self) -> bool:
        """Whether the engine thread is running and taking requests."""
        return self._thread.is_alive() and not self._stopped

    # ------------------------------------------------------------------ engine thread
    def _run(self) -> None:
        try:
            with torch.inference_mode():
                while True:
                    with self._condition:
                        while not self._stopped and not self._waiting and not self._running:
                            self._condition.wait()
                        if self._stopped:
                            break
                        admitted = []
                        while self._waiting and len(self._running) + len(admitted) < self.max_batch_size:
                            admitted.append(self._waiting.popleft())
                        self._admitting = admitted
                    try:
                        if admitted:
                            self._admit(admitted)
                        if self._running:
                            self._step()
                    except Exception as error:  # noqa: BLE001 - the batch's work failed
                        # Not one request's fault that can be singled out (those are caught in
                        # _admit and _pick): the rows in flight end with the error, and the
                        # engine carries on with an empty batch for everyone after them.
                        self._fail_batch(_failure(error))
                    finally:
                        self._admitting = []
        except BaseException as error:  # the thread itself is going: fail everyone, never hang
            self._fail_all(_failure(error))
            raise
        self._fail_all(EngineStoppedError("the engine has been shut down."))

    def _fail_batch(self, error: BaseException) -> None:
        with self._condition:
            failing = list(self._running) + list(self._admitting)
            self._running = []
        self._cache = self._last_tokens = None
        for request in failing:
            if not request.handle.done:
                request.handle._push(error)

    def _fail_all(self, error: BaseException) -> None:
        with self._condition:
            self._stopped = True
            pending = list(self._running) + list(self._admitting) + list(self._waiting)
            self._running, self._waiting, self._admitting = [], deque(), []
        self._cache = None
        for request in pending:
            if not request.handle.done:
                request.handle._push(error)

    def _admit(self, requests: list[_Request]) -> None:
        """Prefill the newcomers and merge those still going into the running batch: a prompt
        that starts with a held sequence alone, after the reused slots; the others together
        (left-padded, as `generate` batches uneven prompts)."""
        if self.adapters is not None:
            self.adapters.install_pending()
        starting = []
        for request in requests:
            if request.handle.cancelled or request.budget == 0:
                self._finish(request, "length" if request.budget == 0 else "cancelled")
            else:
                starting.append(request)
        fresh, groups = [], []
        for request in starting:
            reused = None
            if self.prefixes is not None:
                try:
                    reused = self.prefixes.lookup(request.prompt,
                                                  len(request.prompt) + request.budget,
                                                  request.namespace)
                except Exception:  # noqa: BLE001 - reuse is an optimisation: a miss, then
                    reused = None
            if reused is None:
                fresh.append(request)
            else:
                groups.append(([request], *reused))
        if fresh:
            groups.insert(0, (fresh, 0, None))
        for group, reused_tokens, cache in groups:
            self._prefill(group, reused_tokens, cache)

    def _prefill(self, starting: list[_Request], reused: int, cache: KVCache | None) -> None:
        """Prefill `starting` (one request after `reused` slots already in `cache`, or several
        together from nothing), pick each one's first token, and merge those still going into
        the running batch."""
        prompts = [request.prompt[reused:] for request in starting]
        longest = max(len(prompt) for prompt in prompts)
        padding = [longest - len(prompt) for prompt in prompts]
        ids = torch.tensor([[0] * pad + prompt for pad, prompt in zip(padding, prompts)],
                           device=self.device)
        left_padding = torch.tensor(padding, device=self.device) if any(padding) else None
        capacity = reused + longest + max(request.budget for request in starting)
        try:
            if cache is None:
                cache = self.model.new_cache(len(starting), capacity=capacity,
                                             left_padding=left_padding)
            logits = self._forward(starting, ids, cache, last_logits_only=True)
        except Exception as error:  # noqa: BLE001 - the newcomers' prefill: theirs alone
            for request in starting:
                self._fail(request, error)
            return
        self.prefilled_tokens += sum(len(prompt) for prompt in prompts)
        keep, tokens = [], []
        for row, request in enumerate(starting):
            request.cached = len(request.prompt)
            try:
                params = request.params
                request.generator = sampling_generator(params, self.device)
                if params.repetition_penalty != 1.0:
                    request.seen = torch.zeros(self.model.config.vocab_size, dtype=torch.bool,
                                               device=self.device)
                    request.seen[torch.tensor(request.prompt, device=self.device)] = True
                token = self._pick(request, logits[row : row + 1], filed_from=(cache, row))
            except Exception as error:  # noqa: BLE001 - this request's own values failed it
                self._fail(request, error)
                continue
            if request.finish_reason is None:
                keep.append(row)
                tokens.append(token)
        if not keep:
            return
        if len(keep) < len(starting):
            cache.select_rows(torch.tensor(keep, device=self.device))
            cache.trim_common_padding()
        last = torch.tensor(tokens, device=self.device)
        if self._cache is None:
            self._cache, self._last_tokens = cache, last
        else:
            self._cache.concat_rows(cache)
            self._last_tokens = torch.cat((self._last_tokens, last))
        with self._condition:
            self._running.extend(starting[row] for row in keep)

    def _file_for_reuse(self, request: _Request, filed_from: tuple[KVCache, int] | None) -> None:
        """Give a finishing row's cache (row `filed_from[1]` of `filed_from[0]`) to the prefix
        store, before its last event is sent: the client's next turn then finds the engine done
        with it."""
        if self.prefixes is not None and filed_from is not None:
            cache, row = filed_from
            try:
                self.prefixes.put(request.cached_tokens(), cache.row_copy(row), request.namespace)
            except Exception:  # noqa: BLE001 - reuse is an optimisation: never fail a reply for it
                pass

    def _step(self) -> None:
        self.peak_batch_size = max(self.peak_batch_size, len(self._running))
        logits = self._forward(self._running, self._last_tokens[:, None], self._cache)
        for request in self._running:
            request.cached += 1
        self._measure_cache()
        # Plain greedy rows share one argmax (the same choice as row by row, in one kernel).
        plain = [_is_plain_greedy(request.params) for request in self._running]
        argmax = greedy_tokens(logits).tolist() if any(plain) else None
        keep, tokens = [], []
        for row, request in enumerate(self._running):
            chosen = argmax[row] if plain[row] else None
            try:
                token = self._pick(request, logits[row : row + 1], chosen,
                                   filed_from=(self._cache, row))
            except Exception as error:  # noqa: BLE001 - this request's own values failed it
                self._fail(request, error)
                continue
            if request.finish_reason is None:
                keep.append(row)
                tokens.append(token)
        if len(keep) == len(self._running):
            self._last_tokens = torch.tensor(tokens, device=self.device)
            return
        with self._condition:
            self._running = [self._running[row] for row in keep]
        if not keep:
            self._cache = self._last_tokens = None
            return
        self._cache.select_rows(torch.tensor(keep, device=self.device))
        self._cache.trim_common_padding()
        self._last_tokens = torch.tensor(tokens, device=self.device)

    def _measure_cache(self) -> None:
        self.kv_bytes = self._cache.nbytes()
        self.kv_tokens = sum(request.cached for request in self._running)
        self.peak_kv_bytes = max(self.peak_kv_bytes, self.kv_bytes)
        self.peak_kv_tokens = max(self.peak_kv_tokens, self.kv_tokens)

    def _forward(self, requests: list[_Request], ids: torch.Tensor, cache: KVCache,
                 **options) -> torch.Tensor:
        """The last logits (fp32) of the rows of `requests`, each with its own adapter (the
        model's layers are told which, and forget it after: the model may serve others)."""
        if self.adapters is None:
            return self.model(ids, cache=cache, **options).logits[:, -1].float()
        self.adapters.set_rows([request.slot for request in requests])
        try:
            return self.model(ids, cache=cache, **options).logits[:, -1].float()
        finally:
            self.adapters.set_rows(None)

    def _pick(self, request: _Request, logits: torch.Tensor, chosen: int | None = None,
              filed_from: tuple[KVCache, int] | None = None) -> int:
        """Choose a request's next token (or take the `chosen` one), stream it, and finish the
        request if it is done (its cache filed for reuse from `filed_from`, its cache and row)."""
        handle = request.handle
        if handle.cancelled:
            self._finish(request, "cancelled", filed_from=filed_from)
            return -1
        params = request.params
        if chosen is not None:
            token = chosen
        else:
            seen = request.seen[None] if request.seen is not None else None
            token = int(pick_tokens(process_logits(logits, params, seen), params, request.generator)[0])
        if handle.first_token_at is None:
            handle.first_token_at = time.monotonic()
        if token in params.stop_token_ids:
            self._finish(request, "stop", filed_from=filed_from)
            return token
        request.token_ids.append(token)
        if params.logprobs is not None:
            request.logprobs.append(token_logprobs(logits[0], token, params.logprobs))
        if request.seen is not None:
            request.seen[token] = True
        text = None
        if request.watcher.stop_strings:
            text = self.tokenizer.decode(request.token_ids)
            at = request.watcher.find(text)
            if at is not None:
                request.stop_at = at
                self._finish(request, "stop", text, filed_from=filed_from)
                return token
        if len(request.token_ids) >= request.budget:
            self._finish(request, "length", text, filed_from=filed_from)
            return token
        self._emit(request, [token], text)
        return token

    def _fail(self, request: _Request, error: BaseException) -> None:
        """End one request with `error` (its row leaves the batch with the others that finish)."""
        request.finish_reason = "error"
        request.handle._push(_failure(error))

    def _visible_text(self, request: _Request, text: str | None, final: bool) -> str:
        if self.tokenizer is None:
            return ""
        if text is None:
            text = self.tokenizer.decode(request.token_ids)
        if request.stop_at is not None:
            end = request.stop_at
        elif final:
            end = len(text)
        else:
            end = request.watcher.safe_length(text)
        if end <= request.shown:
            return ""
        piece = text[request.shown : end]
        request.shown = end
        return piece

    def _emit(self, request: _Request, token_ids: list[int], text: str | None) -> None:
        piece = self._visible_text(request, text, final=False)
        request.handle._push(StreamEvent(token_ids=token_ids, text=piece))

    def _finish(self, request: _Request, reason: str, text: str | None = None,
                filed_from: tuple[KVCache, int] | None = None) -> None:
        request.finish_reason = reason
        self._file_for_reuse(request, filed_from)
        piece = self._visible_text(request, text, final=True)
        full = None
        if self.tokenizer is not None:
            full = self.tokenizer.decode(request.token_ids)
            if request.stop_at is not None:
                full = full[: request.stop_at]
        completion = Completion(token_ids=list(request.token_ids), text=full, finish_reason=reason,
                                logprobs=list(request.logprobs)
                                if request.params.logprobs is not None else None)
        new_ids = request.token_ids[-1:] if reason != "stop" or request.stop_at is not None else []
        if reason == "cancelled":
            new_ids = []
        request.handle._push(StreamEvent(token_ids=new_ids, text=piece, completion=completion))
