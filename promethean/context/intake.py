"""The monolith intake: what of the conversations and documents that arrive is worth remembering.

Texts arrive as typed records (`ChatRecord`, `DocumentRecord`; pydantic, strict). For a batch:

1. Exact duplicates are dropped: the SHA-256 of the whitespace-normalised, lower-cased text is
   compared with the batch so far and with every memory in the tree at that moment (the hashes
   are kept in the memories' metadata, which the tree indexes: a text that was pruned or deleted
   since is no longer a duplicate, and texts another intake added are).
2. Texts are embedded (the pluggable `Embedder`; mean-pooled hidden states of the loaded model by
   default, see `context.embed`) in batches packed by `ActivationBoundedBatcher`.
3. Each text gets a salience in [0, 1], a weighted mean of
   - surprise: the model's loss per token on the text, over ln(vocab size) (1 = as surprising
     as a uniform guess), when a model is at hand;
   - novelty: 1 - cosine similarity to the nearest memory (and to the earlier texts of the batch);
   - quality: min(1, tokens / `target_tokens`) x the fraction of distinct words (repetitive or
     tiny texts score low).
   Weights whose signal is missing (no model: no surprise) are left out and the rest renormalised.
   A text whose nearest neighbour is closer than `near_duplicate` (cosine) is a near duplicate and
   is dropped; one below `min_salience` is dropped too.
4. Accepted texts go to the memory tree (`add_many`, salience and the three signals in metadata)
   and, when a replay buffer and tokenizer are given, to the continual-learning replay buffer: each
   domain's accepted texts are tokenised, joined by end-of-text and cut into full windows of
   block_size + 1 tokens (a remainder shorter than a window is not offered).

`ActivationBoundedBatcher` packs texts into batches whose token count stays within
`token_budget` and whose padded activations (rows x longest x `bytes_per_token`) stay within
`activation_bytes` of RAM (256 MiB by default); texts are sorted by length first, so rows of a
batch are of similar length and padding is small. A text too long for a batch on its own is cut
to fit (and counted as truncated).
"""

from __future__ import annotations

import hashlib
import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from promethean.context.embed import Embedder
from promethean.context.tree import MemoryTree, normalise, rows_dot
from promethean.data.chat import Turn, render_conversation
from promethean.errors import PrometheanError

_WORD = re.compile(r"\w+", re.UNICODE)
EXACT_BELOW = 5000  # memories up to which novelty is measured by exact search
DEFAULT_ACTIVATION_BYTES = 256 * 2**20  # RAM a batch of model passes may hold in activations


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    source: str = ""
    domain: str | None = None  # the replay-buffer domain; default: the record's kind
    created: float | None = None


class ChatTurn(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    role: Literal["human", "assistant"]
    text: str = Field(min_length=1)


class ChatRecord(_Record):
    kind: Literal["chat"] = "chat"
    turns: list[ChatTurn] = Field(min_length=1)

    def text(self) -> str:
        return render_conversation([Turn(t.role, t.text) for t in self.turns]).strip()


class DocumentRecord(_Record):
    kind: Literal["document"] = "document"
    text_body: str = Field(min_length=1, alias="text")
    title: str = ""

    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)

    def text(self) -> str:
        return (f"{self.title}\n{self.text_body}" if self.title else self.text_body).strip()


IntakeRecord = Annotated[ChatRecord | DocumentRecord, Field(discriminator="kind")]
_RECORDS = TypeAdapter(list[IntakeRecord])


def parse_records(raw: list[dict[str, Any]]) -> list[ChatRecord | DocumentRecord]:
    """Typed records from plain dicts (e.g. JSON lines); a bad one is one clear error."""
    try:
        return _RECORDS.validate_python(raw)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise PrometheanError(f"intake record {where}: {first['msg']}.") from None


def text_hash(text: str) -> str:
    return hashlib.sha256(" ".join(text.lower().split()).encode()).hexdigest()


class SalienceWeights(BaseModel):
    model_config = ConfigDict(extra="forbid")

    surprise: float = Field(0.4, ge=0)
    novelty: float = Field(0.4, ge=0)
    quality: float = Field(0.2, ge=0)


def quality_score(text: str, tokens: int, target_tokens: int = 32) -> float:
    words = _WORD.findall(text.lower())
    distinct = len(set(words)) / len(words) if words else 0.0
    return min(1.0, tokens / target_tokens) * distinct


def combine_salience(weights: SalienceWeights, surprise: float | None, novelty: float,
                     quality: float) -> float:
    parts = [(weights.novelty, novelty), (weights.quality, quality)]
    if surprise is not None:
        parts.append((weights.surprise, surprise))
    total = sum(w for w, _ in parts)
    return float(sum(w * v for w, v in parts) / total) if total else 0.0


# -------------------------------------------------------------------------------- batching
@dataclass
class Batch:
    indices: list[int]  # positions in the input list
    token_ids: list[list[int]]
    padded_tokens: int  # rows x longest row
    truncated_rows: list[bool] = field(default_factory=list)

    @property
    def truncated(self) -> int:
        return sum(self.truncated_rows)


class ActivationBoundedBatcher:
    """Packs texts under a token budget and a budget of activation bytes in RAM (module
    docstring)."""

    def __init__(self, encode: Callable[[str], list[int]], token_budget: int = 4096,
                 activation_bytes: int = DEFAULT_ACTIVATION_BYTES, bytes_per_token: int = 4096,
                 max_row_tokens: int | None = None) -> None:
        if token_budget < 1 or activation_bytes < bytes_per_token or bytes_per_token < 1:
            raise PrometheanError(
                "the batcher needs a token budget of at least 1 and an activation budget of at "
                f"least one token's activations ({bytes_per_token} bytes)."
            )
        self.encode, self.token_budget = encode, token_budget
        self.activation_bytes, self.bytes_per_token = activation_bytes, bytes_per_token
        self.max_row_tokens = max_row_tokens  # e.g. the model's context length

    @classmethod
    def for_model(cls, tokenizer, config) -> ActivationBoundedBatcher:
        """The batcher of the model passes `promethean memory add` and the server's intake
        make: rows at most the model's context, activations estimated from its shape."""
        return cls(tokenizer.encode_ordinary, bytes_per_token=activation_bytes_per_token(config),
                   max_row_tokens=config.context_length)

    @property
    def longest_row(self) -> int:
        longest = min(self.token_budget, self.activation_bytes // self.bytes_per_token)
        return longest if self.max_row_tokens is None else min(longest, self.max_row_tokens)

    def fits(self, rows: int, longest: int, tokens: int) -> bool:
        return (tokens <= self.token_budget
                and rows * longest * self.bytes_per_token <= self.activation_bytes)

    def batches(self, texts: Sequence[str]) -> list[Batch]:
        encoded = [self.encode(text) for text in texts]
        truncated = [len(ids) > self.longest_row for ids in encoded]
        encoded = [ids[: self.longest_row] for ids in encoded]
        order = sorted(range(len(texts)), key=lambda i: -len(encoded[i]))
        out: list[Batch] = []
        current: list[int] = []
        tokens = longest = 0
        for index in order:
            length = len(encoded[index])
            if current and not self.fits(len(current) + 1, max(longest, length), tokens + length):
                out.append(self._batch(current, encoded, truncated, longest))
                current, tokens, longest = [], 0, 0
            current.append(index)
            tokens += length
            longest = max(longest, length)
        if current:
            out.append(self._batch(current, encoded, truncated, longest))
        return out

    @staticmethod
    def _batch(indices, encoded, truncated, longest) -> Batch:
        return Batch(list(indices), [encoded[i] for i in indices], len(indices) * longest,
                     [truncated[i] for i in indices])


def activation_bytes_per_token(config) -> int:
    """A rough fp32 inference footprint per token: the logits row and a few residual-width
    buffers per layer (what a forward pass holds at its peak)."""
    return 4 * (config.vocab_size + 4 * config.n_embd * max(config.n_layer, 1))


# ---------------------------------------------------------------------------------- intake
@dataclass
class IntakeReport:
    accepted: list[int] = field(default_factory=list)  # memory ids, in input order
    exact_duplicates: int = 0
    near_duplicates: int = 0
    low_salience: int = 0
    truncated: int = 0
    replay_windows: dict[str, int] = field(default_factory=dict)
    saliences: list[float] = field(default_factory=list)  # of every record that was scored

    def summary(self) -> dict[str, Any]:
        return {"accepted": len(self.accepted), "exact_duplicates": self.exact_duplicates,
                "near_duplicates": self.near_duplicates, "low_salience": self.low_salience,
                "truncated": self.truncated, "replay_windows": self.replay_windows}


class Intake:
    """Scores, filters and routes records into a memory tree (and a replay buffer)."""

    def __init__(self, tree: MemoryTree, embedder: Embedder, *, tokenizer=None,
                 surprise: Callable[[list[str]], np.ndarray] | None = None,
                 vocab_size: int | None = None, replay=None,
                 weights: SalienceWeights | None = None, near_duplicate: float = 0.95,
                 min_salience: float = 0.0, target_tokens: int = 32,
                 batcher: ActivationBoundedBatcher | None = None, beam: int = 16) -> None:
        if embedder.dim != tree.dim:
            raise PrometheanError(f"the embedder gives {embedder.dim}-dimensional vectors but the "
                                  f"memory tree holds {tree.dim}-dimensional ones.")
        if surprise is not None and not vocab_size:
            raise PrometheanError("a surprise signal needs the vocabulary size to scale it.")
        self.tree, self.embedder, self.tokenizer = tree, embedder, tokenizer
        self.surprise, self.vocab_size, self.replay = surprise, vocab_size, replay
        self.weights = weights or SalienceWeights()
        self.near_duplicate, self.min_salience = near_duplicate, min_salience
        self.target_tokens, self.beam = target_tokens, beam
        encode = tokenizer.encode_ordinary if tokenizer is not None else str.split
        self.batcher = batcher or ActivationBoundedBatcher(encode)
        self._decode = tokenizer.decode if tokenizer is not None else " ".join

    def process(self, records: Sequence[ChatRecord | DocumentRecord]) -> IntakeReport:
        report = IntakeReport()
        hashes_seen: set[str] = set()
        texts: list[str] = []
        kept: list[ChatRecord | DocumentRecord] = []
        hashes: list[str] = []
        for record in records:
            text = record.text()
            digest = text_hash(text)
            if digest in hashes_seen or self.tree.ids_with("sha256", digest):
                report.exact_duplicates += 1
                continue
            texts.append(text)
            kept.append(record)
            hashes.append(digest)
            hashes_seen.add(digest)
        accepted = np.zeros((len(texts), self.tree.dim), dtype=np.float32)  # this batch's, so far
        accepted_count = 0
        to_add: list[tuple[int, np.ndarray, float, dict[str, Any]]] = []
        for batch in self.batcher.batches(texts):
            report.truncated += batch.truncated
            # Model inputs are cut to the batcher's row limit; the memory keeps the whole text.
            batch_texts = [self._decode(ids) if cut else texts[i]
                           for i, ids, cut in zip(batch.indices, batch.token_ids, batch.truncated_rows)]
            vectors = self.embedder.embed(batch_texts)
            losses = self.surprise(batch_texts) if self.surprise is not None else None
            for row, index in enumerate(batch.indices):
                to_add.append((index, vectors[row],
                               float(losses[row]) if losses is not None else math.nan,
                               {"tokens": len(batch.token_ids[row])}))
        to_add.sort(key=lambda entry: entry[0])  # decide in input order: earlier texts win
        decided: list[tuple[int, np.ndarray, float, dict[str, Any]]] = []
        for index, vector, loss, info in to_add:
            vector = normalise(vector)  # a plugged-in embedder need not return unit vectors
            similarity = -1.0
            if len(self.tree):
                # Exact while the memory is small, the beam search beyond.
                _ids, scores = (self.tree.exact_search(vector, 1) if len(self.tree) <= EXACT_BELOW
                                else self.tree.search_ids(vector, 1, beam=self.beam))
                similarity = float(scores[0])
            if accepted_count:
                similarity = max(similarity, float(np.max(rows_dot(accepted[:accepted_count], vector))))
            if similarity >= self.near_duplicate:
                report.near_duplicates += 1
                continue
            novelty = float(np.clip(1 - similarity, 0, 1))
            surprise = None
            if not math.isnan(loss):
                surprise = float(np.clip(loss / math.log(self.vocab_size), 0, 1))
            quality = quality_score(texts[index], info["tokens"], self.target_tokens)
            salience = combine_salience(self.weights, surprise, novelty, quality)
            report.saliences.append(salience)
            if salience < self.min_salience:
                report.low_salience += 1
                continue
            accepted[accepted_count] = vector
            accepted_count += 1
            record = kept[index]
            info.update(kind=record.kind, source=record.source, sha256=hashes[index],
                        novelty=round(novelty, 4), quality=round(quality, 4),
                        surprise=None if surprise is None else round(surprise, 4))
            decided.append((index, vector, salience, info))
        if decided:
            ids = self.tree.add_many(
                np.stack([entry[1] for entry in decided]),
                texts=[texts[entry[0]] for entry in decided],
                salience=[entry[2] for entry in decided],
                metadata=[entry[3] for entry in decided],
                created=[kept[entry[0]].created if kept[entry[0]].created is not None
                         else time.time() for entry in decided],
            )
            report.accepted = ids.tolist()
            if self.replay is not None and self.tokenizer is not None:
                report.replay_windows = self._to_replay([kept[e[0]] for e in decided],
                                                        [texts[e[0]] for e in decided])
        return report

    def _to_replay(self, records, texts) -> dict[str, int]:
        streams: dict[str, list[int]] = {}
        for record, text in zip(records, texts):
            domain = record.domain or record.kind
            streams.setdefault(domain, []).extend(
                [*self.tokenizer.encode_ordinary(text), self.tokenizer.eot_id])
        offered: dict[str, int] = {}
        length = self.replay.block_size + 1
        for domain, stream in streams.items():
            count = len(stream) // length
            if count:
                windows = np.asarray(stream[: count * length], dtype=np.int32).reshape(count, length)
                self.replay.add(domain, list(windows))
            offered[domain] = count
        return offered

