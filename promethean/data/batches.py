"""Batches from prepared token files, exact evaluation, and chat fine-tuning batches.

A prepared directory (written by `promethean.data.prepare`) holds `train.bin` and `val.bin`, flat
token arrays in which every document is followed by the end-of-text token, and `meta.json`
describing them. `TokenDataset` opens such a directory, checks it, and serves:

- random training windows (`sample_batch`, or a `WindowSampler` whose state is a few integers, so a
  resumed run draws exactly the batches an uninterrupted one would have drawn);
- one ordered pass over a whole split (`iter_eval_batches`) in which every token is a target
  exactly once, so `evaluate` gives the exact mean loss, perplexity and bits per byte.

Memory maps are opened afresh for every batch and dropped after it, as nanoGPT does: a map held
for a whole run keeps every page it ever touched mapped into the process, and its resident size
then grows towards the size of the file. Opening a map costs microseconds; a batch costs far more.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from promethean.data.chat import Turn, encode_conversation
from promethean.data.prepare import DTYPES, read_meta
from promethean.errors import PrometheanError
from promethean.tokenizer import Tokenizer

IGNORE_INDEX = -100  # what the model's loss skips (promethean.model.transformer.IGNORE_INDEX)

Batch = tuple[torch.Tensor, torch.Tensor]


# ---------------------------------------------------------------------------------- the dataset


def _check_sizes(batch_size: int, block_size: int) -> None:
    if batch_size < 1 or block_size < 1:
        raise PrometheanError(
            f"batch size and block size must be at least 1 (got {batch_size} and {block_size})."
        )


def _to_device(inputs: np.ndarray, targets: np.ndarray, device) -> Batch:
    inputs, targets = torch.from_numpy(inputs), torch.from_numpy(targets)
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda":
        # Pinned host memory lets the copy run asynchronously with the previous step's compute.
        return (inputs.pin_memory().to(device, non_blocking=True),
                targets.pin_memory().to(device, non_blocking=True))
    return inputs.to(device), targets.to(device)


class TokenDataset:
    """A prepared token directory: checked `meta.json`, memory-mapped splits, batches.

    `prepare.read_meta` checks the directory (format, version, fields, each file's size against
    its token count) and, given a tokenizer, refuses one whose fingerprint or vocabulary differs
    from the one the data was prepared with; each problem is one sentence.
    """

    def __init__(self, directory: str | Path, tokenizer: Tokenizer | None = None) -> None:
        self.directory = Path(directory)
        self.meta = read_meta(self.directory, tokenizer)
        self.dtype = DTYPES[self.meta["dtype"]]
        self.eot_id: int = self.meta["tokenizer"]["eot_id"]
        self.vocab_size: int = self.meta["tokenizer"]["vocab_size"]

    def split_meta(self, split: str) -> dict:
        """The split's entry in meta.json: file, tokens, bytes, documents."""
        if split not in self.meta["splits"]:
            raise PrometheanError(
                f"{self.directory} has no split '{split}'; it has "
                f"{', '.join(self.meta['splits'])}."
            )
        return self.meta["splits"][split]

    def num_tokens(self, split: str) -> int:
        return self.split_meta(split)["tokens"]

    def tokens(self, split: str) -> np.ndarray:
        """A fresh read-only memory map of the split (see the module docstring for why fresh)."""
        meta = self.split_meta(split)
        if meta["tokens"] == 0:
            return np.empty(0, dtype=self.dtype)  # an empty file cannot be mapped
        return np.memmap(self.directory / meta["file"], dtype=self.dtype, mode="r",
                         shape=(meta["tokens"],))

    def sample_batch(
        self,
        split: str,
        batch_size: int,
        block_size: int,
        generator: torch.Generator | np.random.Generator,
        device: str | torch.device | None = None,
    ) -> Batch:
        """`batch_size` random windows: (inputs, targets) int64 of shape (B, T), targets = inputs
        shifted by one. The window starts come from `generator` alone, so a seeded generator
        gives the same batches whatever `device` they are sent to."""
        _check_sizes(batch_size, block_size)
        count = self.num_tokens(split)
        if count < block_size + 1:
            raise PrometheanError(
                f"the '{split}' split of {self.directory} has {count} tokens, fewer than "
                f"block size + 1 = {block_size + 1}; use a smaller block size or more data."
            )
        high = count - block_size  # starts 0 .. count - block_size - 1 leave room for the target
        if isinstance(generator, np.random.Generator):
            starts = generator.integers(0, high, size=batch_size)
        else:
            starts = torch.randint(high, (batch_size,), generator=generator,
                                   device=generator.device).cpu().numpy()
        offsets = np.asarray(starts, dtype=np.int64)[:, None] + np.arange(block_size + 1)
        windows = self.tokens(split)[offsets].astype(np.int64)
        return _to_device(np.ascontiguousarray(windows[:, :-1]),
                          np.ascontiguousarray(windows[:, 1:]), device)

    def iter_eval_batches(
        self,
        split: str = "val",
        batch_size: int = 8,
        block_size: int = 256,
        device: str | torch.device | None = None,
    ) -> Iterator[Batch]:
        """Contiguous, non-overlapping windows over the whole split, in order.

        The split is read as if an end-of-text token preceded it: that is the context every other
        document already has in the file, and it makes all `tokens` of the split targets, each
        exactly once, so a mean over targets is the split's exact loss and bits per byte needs no
        off-by-one. The last window is padded (inputs with end-of-text, targets with -100, which
        the loss ignores) and the last batch may have fewer rows.
        """
        _check_sizes(batch_size, block_size)
        count = self.num_tokens(split)
        if count == 0:
            raise PrometheanError(f"the '{split}' split of {self.directory} has no tokens.")
        windows = math.ceil(count / block_size)
        for first in range(0, windows, batch_size):
            rows = min(batch_size, windows - first)
            start = first * block_size  # index into [eot] + tokens
            stop = min(start + rows * block_size + 1, count + 1)
            tokens = self.tokens(split)
            if start == 0:
                chunk = np.concatenate([[self.eot_id], tokens[: stop - 1]])
            else:
                chunk = tokens[start - 1 : stop - 1]
            flat = np.full(rows * block_size + 1, IGNORE_INDEX, dtype=np.int64)
            flat[: len(chunk)] = chunk
            inputs = flat[:-1].reshape(rows, block_size).copy()
            targets = flat[1:].reshape(rows, block_size).copy()
            inputs[inputs == IGNORE_INDEX] = self.eot_id
            yield _to_device(inputs, targets, device)

    def bits_per_byte(self, mean_loss: float, split: str = "val") -> float:
        return bits_per_byte(mean_loss, self.split_meta(split))


class WindowSampler:
    """Random training windows whose whole state is (seed, step).

    Batch number `step` is drawn from a generator seeded with (seed, rank, step), so restoring a
    saved state reproduces the following batches exactly, with nothing but integers to save, and
    ranks of a distributed run draw independent streams from one seed.
    """

    def __init__(
        self,
        dataset: TokenDataset,
        batch_size: int,
        block_size: int,
        split: str = "train",
        seed: int = 0,
        rank: int = 0,
        device: str | torch.device | None = None,
    ) -> None:
        if seed < 0 or rank < 0:
            raise PrometheanError(f"seed and rank must be non-negative (got {seed} and {rank}).")
        self.dataset, self.split, self.device = dataset, split, device
        self.batch_size, self.block_size = batch_size, block_size
        self.seed, self.rank, self.step = seed, rank, 0

    def next_batch(self) -> Batch:
        generator = np.random.default_rng([self.seed, self.rank, self.step])
        batch = self.dataset.sample_batch(
            self.split, self.batch_size, self.block_size, generator, self.device
        )
        self.step += 1
        return batch

    def __iter__(self) -> Iterator[Batch]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict:
        return {"split": self.split, "batch_size": self.batch_size, "block_size": self.block_size,
                "seed": self.seed, "rank": self.rank, "step": self.step}

    def load_state_dict(self, state: dict) -> None:
        saved = (state["split"], state["batch_size"], state["block_size"])
        if saved != (self.split, self.batch_size, self.block_size):
            raise PrometheanError(
                f"the saved data position is for split '{saved[0]}', batch size {saved[1]}, block "
                f"size {saved[2]}, but this run uses '{self.split}', {self.batch_size} and "
                f"{self.block_size}; an exact resume needs the same three."
            )
        self.seed, self.rank, self.step = state["seed"], state["rank"], state["step"]


# ---------------------------------------------------------------------------- exact evaluation


@dataclass(frozen=True)
class LossTotal:
    """Summed loss (nats) and how many targets it covers."""

    nats: float
    targets: int

    @property
    def mean(self) -> float:
        return self.nats / self.targets if self.targets else float("nan")


@dataclass(frozen=True)
class Evaluation:
    loss: float  # mean nats per token
    perplexity: float
    bits_per_byte: float
    targets: int


def exact_loss(model: Callable, batches: Iterable[Batch]) -> LossTotal:
    """Sum of per-token cross-entropies over every non-ignored target in `batches`.

    `model(inputs, targets)` returns `(logits, loss)`; the loss is a mean over a batch's own
    targets, and batches hold different numbers of them, so averaging those means would be wrong.
    The per-token losses are recomputed from the logits and summed in float64 instead.
    """
    was_training = getattr(model, "training", False)
    if was_training:
        model.eval()
    nats, targets_seen = 0.0, 0
    try:
        with torch.no_grad():
            for inputs, targets in batches:
                logits = model(inputs, targets)[0]
                losses = F.cross_entropy(
                    logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1),
                    ignore_index=IGNORE_INDEX, reduction="none",
                )
                nats += losses.double().sum().item()
                targets_seen += int((targets != IGNORE_INDEX).sum())
    finally:
        if was_training:
            model.train()
    return LossTotal(nats, targets_seen)


def evaluate(
    model: Callable,
    dataset: TokenDataset,
    split: str = "val",
    batch_size: int = 8,
    block_size: int = 256,
    device: str | torch.device | None = None,
) -> Evaluation:
    """Exact loss, perplexity and bits per byte of `model` over the whole split."""
    total = exact_loss(model, dataset.iter_eval_batches(split, batch_size, block_size, device))
    return Evaluation(total.mean, perplexity(total.mean),
                      dataset.bits_per_byte(total.mean, split), total.targets)


def bits_per_byte(mean_loss: float, split_meta: dict) -> float:
    """Nats per token -> bits per byte of source text: loss * tokens / (bytes * ln 2).

    Unlike loss or perplexity this does not depend on the tokenizer, so models with different
    vocabularies can be compared on it.
    """
    if split_meta["bytes"] <= 0:
        raise PrometheanError("bits per byte needs a split with at least one byte of text.")
    return mean_loss * split_meta["tokens"] / (split_meta["bytes"] * math.log(2))


def perplexity(mean_loss: float) -> float:
    try:
        return math.exp(mean_loss)
    except OverflowError:
        return float("inf")


# ---------------------------------------------------------------------------------------- chat


def chat_batches(
    conversations: Iterable[list[Turn]],
    tokenizer: Tokenizer,
    batch_size: int,
    block_size: int,
    train_on: str = "assistant",
    pack: bool = True,
    device: str | torch.device | None = None,
) -> Iterator[Batch]:
    """(inputs, targets) batches of shape (rows <= B, T) for fine-tuning on conversations.

    Each conversation is encoded by `encode_conversation` (ending with end-of-text); targets are
    -100 where its loss mask is False and on padding. With `pack`, whole conversations are laid
    side by side in a row while they fit (they are separated by end-of-text, as documents are in
    pre-training); otherwise each row holds one. A conversation longer than `block_size + 1`
    tokens is cut into consecutive rows overlapping by one token, so each of its targets is still
    trained once (the later rows lack the beginning as context). Pieces with nothing to train on
    (no True mask among their targets) are dropped, so no batch has an empty loss. Conversations
    are taken in the order given; shuffle them beforehand.
    """
    _check_sizes(batch_size, block_size)
    row_length = block_size + 1
    rows: list[tuple[list[int], list[bool]]] = []
    current_ids: list[int] = []
    current_mask: list[bool] = []

    for turns in conversations:
        ids, mask = encode_conversation(turns, tokenizer, train_on)
        for start in range(0, len(ids) - 1, block_size):
            piece_ids = ids[start : start + row_length]
            piece_mask = mask[start : start + row_length]
            if not any(piece_mask[1:]):
                continue
            if pack and len(current_ids) + len(piece_ids) <= row_length:
                current_ids += piece_ids
                current_mask += piece_mask
                continue
            if current_ids:
                rows.append((current_ids, current_mask))
            current_ids, current_mask = list(piece_ids), list(piece_mask)
        while len(rows) >= batch_size:
            yield _chat_batch(rows[:batch_size], block_size, tokenizer.eot_id, device)
            del rows[:batch_size]
    if current_ids:
        rows.append((current_ids, current_mask))
    for first in range(0, len(rows), batch_size):
        yield _chat_batch(rows[first : first + batch_size], block_size, tokenizer.eot_id, device)


def _chat_batch(rows, block_size: int, pad_id: int, device) -> Batch:
    inputs = np.full((len(rows), block_size), pad_id, dtype=np.int64)
    targets = np.full((len(rows), block_size), IGNORE_INDEX, dtype=np.int64)
    for row, (ids, mask) in enumerate(rows):
        ids_array = np.asarray(ids, dtype=np.int64)
        length = len(ids) - 1
        inputs[row, :length] = ids_array[:-1]
        targets[row, :length] = np.where(np.asarray(mask[1:]), ids_array[1:], IGNORE_INDEX)
    return _to_device(inputs, targets, device)
