"""Turning logits into text: sampling, stopping, streaming, batches of uneven prompts.

The model computes logits; this module decides what to do with them (as nanochat's engine does).
Prompts of different lengths are left-padded into one batch; the KV cache records each row's
padding so positions and masks stay exact, and rows leave the batch as soon as they finish.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from promethean.errors import PrometheanError
from promethean.inference import kernels
from promethean.model import Transformer
from promethean.tokenizer import Tokenizer


# Below this temperature sampling is greedy: the choice is the argmax anyway, and dividing the
# logits by a smaller one overflows (logits / 1e-300 is inf in fp32, and softmax of inf is NaN).
GREEDY_BELOW_TEMPERATURE = 1e-5
MAX_LOGPROBS = 20  # alternatives reported per token, at most (OpenAI's top_logprobs limit)
# What torch.Generator.manual_seed takes.
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token. A temperature of 0 (below GREEDY_BELOW_TEMPERATURE) means
    greedy (argmax)."""

    max_new_tokens: int = 128
    temperature: float = 0.8
    top_k: int | None = 200
    top_p: float | None = None
    repetition_penalty: float = 1.0
    stop_token_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()
    seed: int | None = None
    # Report each chosen token's log-probability under the model (its raw logits' log-softmax)
    # and that of the `logprobs` most likely tokens (0: the chosen one's alone); None: nothing.
    logprobs: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise PrometheanError(f"max_new_tokens must be 0 or more, got {self.max_new_tokens}.")
        if not 0 <= self.temperature < math.inf:  # NaN fails this too
            raise PrometheanError(
                f"temperature must be a finite number, 0 or more, got {self.temperature}."
            )
        if self.top_k is not None and self.top_k < 1:
            raise PrometheanError(f"top_k must be at least 1, got {self.top_k}.")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise PrometheanError(f"top_p must be in (0, 1], got {self.top_p}.")
        if not 0 < self.repetition_penalty < math.inf:
            raise PrometheanError(
                f"repetition_penalty must be a finite positive number, got "
                f"{self.repetition_penalty}."
            )
        if any(not stop for stop in self.stop_strings):
            raise PrometheanError("stop strings must not be empty.")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise PrometheanError(f"logprobs must be from 0 to {MAX_LOGPROBS}, got {self.logprobs}.")
        if self.seed is not None and not SEED_MIN <= self.seed <= SEED_MAX:
            raise PrometheanError(f"seed must be an integer from -2**63 to 2**64 - 1, got "
                                  f"{self.seed}.")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW_TEMPERATURE


GREEDY = SamplingParams(temperature=0.0, top_k=None)


@dataclass
class Completion:
    """One prompt's result. `text` excludes stop tokens and stop strings; `token_ids` keep every
    token generated except a final stop token."""

    token_ids: list[int]
    text: str | None
    finish_reason: str  # "stop" (a stop token or string) or "length" (budget or context full)
    # With SamplingParams.logprobs: per token of token_ids, (its log-probability, [(id, log-prob)
    # of the most likely tokens, most likely first]).
    logprobs: list[tuple[float, list[tuple[int, float]]]] | None = None


def fit_prompt(prompt: list[int], context_length: int, crop: bool) -> list[int]:
    """The prompt as it will be fed: it must leave room for at least one new token."""
    if not prompt:
        raise PrometheanError("the prompt is empty; give at least one token.")
    if len(prompt) < context_length:
        return list(prompt)
    if not crop:
        raise PrometheanError(
            f"the prompt is {len(prompt)} tokens but the model's context is {context_length}; "
            "shorten it, or ask to crop it to the most recent tokens (--crop)."
        )
    return list(prompt[-(context_length - 1) :])


def process_logits(
    logits: torch.Tensor,
    params: SamplingParams,
    seen: torch.Tensor | None,
) -> torch.Tensor:
    """Apply repetition penalty, temperature, top-k and top-p to (B, V) logits of any float
    dtype, in fp32 wherever they change (plain greedy returns them as they are). Whatever the
    accepted values, the result stays finite (an overflow is held at fp32's largest magnitude)
    except where top-k or top-p drop a token (-inf); the best token always stays."""
    if seen is not None and params.repetition_penalty != 1.0:
        logits = logits.float()
        penalised = torch.where(
            logits > 0, logits / params.repetition_penalty, logits * params.repetition_penalty
        )
        logits = _finite(torch.where(seen, penalised, logits))
    if params.greedy:
        return logits
    logits = _finite(logits.float() / params.temperature)
    if params.top_k is not None and params.top_k < logits.size(-1):
        kth = torch.topk(logits, params.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p is not None and params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token once the tokens before it already cover top_p; the first always stays,
        # even where top_p is below fp32's smallest number (so 0 here).
        drop_sorted = probs.cumsum(dim=-1) - probs >= params.top_p
        drop_sorted[..., 0] = False
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def _finite(logits: torch.Tensor) -> torch.Tensor:
    """Overflowed logits held at fp32's largest magnitude (their order kept), NaN as the least."""
    largest = torch.finfo(torch.float32).max
    return torch.nan_to_num(logits, nan=-largest, posinf=largest, neginf=-largest)


def sampling_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    """The random stream for sampling: seeded when asked, fresh otherwise; none for greedy."""
    if params.greedy:
        return None
    generator = torch.Generator(device=device)
    if params.seed is not None:
        generator.manual_seed(params.seed)
    else:
        generator.seed()
    return generator


def greedy_tokens(logits: torch.Tensor) -> torch.Tensor:
    """`logits.float().argmax(dim=-1)`: on CPU by the kernels where they are loaded (a prepared
    model's), ~10x faster on a 50k vocabulary and without the fp32 copy of bf16 logits."""
    if logits.device.type == "cpu" and logits.dtype in (torch.float32, torch.bfloat16) \
            and kernels.loaded():
        return kernels.argmax_rows(logits)
    return logits.float().argmax(dim=-1)


def pick_tokens(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None
) -> torch.Tensor:
    if params.greedy:
        return greedy_tokens(logits)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


class _Row:
    """Bookkeeping for one prompt while it is being decoded."""

    def __init__(self, prompt_length: int, budget: int) -> None:
        self.prompt_length = prompt_length
        self.budget = budget
        self.token_ids: list[int] = []
        self.finish_reason: str | None = None
        self.stop_at: int | None = None  # character offset where a stop string begins


class StopWatcher:
    """Watches one completion's decoded text for stop strings: `find` says where the first one
    begins (the completion ends there), `safe_length` how much of the text can be shown while
    streaming without showing an incomplete UTF-8 character or the start of what may become a
    stop string. Used by `generate`'s decode loop and the serving engine alike. Stop strings
    need a tokenizer (to decode the tokens): without one they are refused in one sentence."""

    def __init__(self, tokenizer: Tokenizer | None, stop_strings: tuple[str, ...]) -> None:
        if stop_strings and tokenizer is None:
            raise PrometheanError("stop strings need a tokenizer to decode the generated text.")
        self.tokenizer = tokenizer
        self.stop_strings = stop_strings

    def find(self, text: str) -> int | None:
        hits = [text.find(stop) for stop in self.stop_strings]
        hits = [hit for hit in hits if hit >= 0]
        return min(hits) if hits else None

    def safe_length(self, text: str) -> int:
        """Characters of `text` that cannot change or turn out to be part of a stop string."""
        end = len(text)
        while end and text[end - 1] == "\ufffd":  # an incomplete UTF-8 sequence may complete
            end -= 1
        held = 0
        for stop in self.stop_strings:
            for size in range(min(len(stop) - 1, end), 0, -1):
                if text[end - size : end] == stop[:size]:
                    held = max(held, size)
                    break
        return end - held


def _decode_loop(
    model: Transformer,
    prompts: list[list[int]],
    params: SamplingParams,
    tokenizer: Tokenizer | None,
    crop: bool,
) -> Iterator[list[_Row]]:
    """Run decoding for a batch, yielding the rows after each step (the caller reads them)."""
    config = model.config
    watcher = StopWatcher(tokenizer, params.stop_strings)
    prompts = [fit_prompt(prompt, config.context_length, crop) for prompt in prompts]
    rows = [
        _Row(len(p), min(params.max_new_tokens, config.context_length - len(p))) for p in prompts
    ]
    if all(row.budget == 0 for row in rows):
        for row in rows:
            row.finish_reason = "length"
        yield rows
        return
    device = next(model.parameters()).device
    generator = sampling_generator(params, device)
    stop_ids = torch.tensor(params.stop_token_ids, dtype=torch.long, device=device)

    longest = max(len(p) for p in prompts)
    padding = [longest - len(p) for p in prompts]
    ids = torch.tensor([[0] * pad + p for pad, p in zip(padding, prompts)], device=device)
    left_padding = torch.tensor(padding, device=device) if any(padding) else None
    cache = model.new_cache(
        len(prompts), capacity=longest + max(row.budget for row in rows), left_padding=left_padding
    )
    seen = None
    if params.repetition_penalty != 1.0:
        seen = torch.zeros(len(prompts), config.vocab_size, dtype=torch.bool, device=device)
        seen.scatter_(1, ids, True)
        if left_padding is not None:  # the pad id 0 is not part of any prompt
            for index, (pad, prompt) in enumerate(zip(padding, prompts)):
                if pad and 0 not in prompt:
                    seen[index, 0] = False

    active = list(range(len(prompts)))  # which rows are still in the batch, in batch order
    # The last position's logits in the model's dtype: plain greedy picks from them as they are.
    logits = model(ids, cache=cache, last_logits_only=True).logits[:, -1]
    while active:
        next_tokens = pick_tokens(process_logits(logits, params, seen), params, generator)
        is_stop = torch.isin(next_tokens, stop_ids) if stop_ids.numel() else None
        tokens = next_tokens.tolist()
        stops = is_stop.tolist() if is_stop is not None else [False] * len(tokens)
        keep = []
        for position, (index, token, stop) in enumerate(zip(active, tokens, stops)):
            row = rows[index]
            if stop:
                row.finish_reason = "stop"
                continue
            row.token_ids.append(token)
            if watcher.stop_strings:
                at = watcher.find(tokenizer.decode(row.token_ids))
                if at is not None:
                    row.stop_at, row.finish_reason = at, "stop"
                    continue
            if len(row.token_ids) >= row.budget:
                row.finish_reason = "length"
                continue
            keep.append(position)
        yield rows
        if len(keep) < len(active):
            if not keep:
                break
            keep_tensor = torch.tensor(keep, device=device)
            cache.select_rows(keep_tensor)
            next_tokens = next_tokens[keep_tensor]
            if seen is not None:
                seen = seen[keep_tensor]
            active = [active[position] for position in keep]
        if seen is not None:
            seen.scatter_(1, next_tokens[:, None], True)
        logits = model(next_tokens[:, None], cache=cache).logits[:, -1]


def _finish(row: _Row, tokenizer: Tokenizer | None) -> Completion:
    text = None
    if tokenizer is not None:
        text = tokenizer.decode(row.token_ids)
        if row.stop_at is not None:
            text = text[: row.stop_at]
    return Completion(token_ids=row.token_ids, text=text, finish_reason=row.finish_reason or "length")


@torch.inference_mode()
def generate(
    model: Transformer,
    prompts: list[list[int]],
    params: SamplingParams = GREEDY,
    tokenizer: Tokenizer | None = None,
    crop: bool = False,
    use_cache: bool = True,
) -> list[Completion]:
    """Complete a batch of token-id prompts (any lengths). Without the cache every step re-runs
    the whole sequence, one prompt at a time: slow, and kept as the reference the cache must match."""
    if not use_cache:
        return [_generate_without_cache(model, p, params, tokenizer, crop) for p in prompts]
    rows: list[_Row] = []
    for rows in _decode_loop(model, prompts, params, tokenizer, crop):
        pass
    return [_finish(row, tokenizer) for row in rows]


def _generate_without_cache(model, prompt, params, tokenizer, crop) -> Completion:
    config = model.config
    prompt = fit_prompt(prompt, config.context_length, crop)
    watcher = StopWatcher(tokenizer, params.stop_strings)
    row = _Row(len(prompt), min(params.max_new_tokens, config.context_length - len(prompt)))
    device = next(model.parameters()).device
    generator = sampling_generator(params, device)
    sequence = list(prompt)
    while len(row.token_ids) < row.budget:
        ids = torch.tensor([sequence], device=device)
        logits = model(ids).logits[:, -1].float()
        seen = None
        if params.repetition_penalty != 1.0:
            seen = torch.zeros_like(logits, dtype=torch.bool)
            seen[0, ids[0]] = True
        token = int(pick_tokens(process_logits(logits, params, seen), params, generator))
        if token in params.stop_token_ids:
            row.finish_reason = "stop"
            break
        row.token_ids.append(token)
        sequence.append(token)
        if watcher.stop_strings:
            at = watcher.find(tokenizer.decode(row.token_ids))
            if at is not None:
                row.stop_at, row.finish_reason = at, "stop"
                break
    return _finish(row, tokenizer)


@torch.inference_mode()
def stream_tokens(
    model: Transformer,
    prompt: list[int],
    params: SamplingParams = GREEDY,
    tokenizer: Tokenizer | None = None,
    crop: bool = False,
) -> Iterator[int]:
    """Yield the ids of one prompt's completion as they are chosen (a stop token is not yielded;
    stop strings need `tokenizer`, and the token that completes one is the last yielded)."""
    yielded = 0
    for rows in _decode_loop(model, [prompt], params, tokenizer, crop):
        new_ids = rows[0].token_ids[yielded:]
        yield from new_ids
        yielded += len(new_ids)


@torch.inference_mode()
def stream(
    model: Transformer,
    tokenizer: Tokenizer,
    prompt: str | list[int],
    params: SamplingParams = GREEDY,
    crop: bool = False,
) -> Iterator[str]:
    """Yield the completion of one prompt as text pieces, as soon as each piece is certain: a
    piece never ends inside a UTF-8 character or in what may become a stop string."""
    prompt_ids = tokenizer.encode(prompt) if isinstance(prompt, str) else prompt
    watcher = StopWatcher(tokenizer, params.stop_strings)
    shown = 0
    for rows in _decode_loop(model, [prompt_ids], params, tokenizer, crop):
        row = rows[0]
        text = tokenizer.decode(row.token_ids)
        if row.stop_at is not None:
            end = row.stop_at
        elif row.finish_reason is not None:
            end = len(text)
        else:
            end = watcher.safe_length(text)
        if end > shown:
            yield text[shown:end]
            shown = end


def generate_text(
    model: Transformer,
    tokenizer: Tokenizer,
    prompts: list[str],
    params: SamplingParams = GREEDY,
    crop: bool = False,
) -> list[Completion]:
    """`generate` for text prompts."""
    return generate(model, [tokenizer.encode(p) for p in prompts], params, tokenizer, crop)
