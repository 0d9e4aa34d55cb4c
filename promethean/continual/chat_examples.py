"""What `promethean finetune-chat` trains on: the chat log read into conversations, the
deterministic validation split, and the examples with the loss on the replies only (steps 1-3
of `continual.chat_tuning`'s docstring say how and why), batched for training and validation.
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from promethean.data.chat import Turn, encode_conversation, foreign_chat_exchanges
from promethean.errors import PrometheanError

IGNORE_INDEX = -100  # what the model's loss skips
PROMETHEAN_LOG_FORMAT = "Promethean chat log"  # serve --chat-log: one turn per line


class ChatLogWarning(UserWarning):
    """The chat log is usable but worth a word: skipped lines, very few conversations."""


# ------------------------------------------------------------------------------------ the log


@dataclass(frozen=True)
class Conversation:
    chat_id: str
    exchanges: tuple[tuple[str, str], ...]  # (human, assistant) in time order
    log_format: str = PROMETHEAN_LOG_FORMAT  # which kind of log line it came from

    @property
    def turns(self) -> list[Turn]:
        turns: list[Turn] = []
        for human, assistant in self.exchanges:
            turns += [Turn("human", human), Turn("assistant", assistant)]
        return turns

    @property
    def has_reply(self) -> bool:
        return any(assistant.strip() for _, assistant in self.exchanges)


def _logged_turn(line: bytes) -> tuple[str, float, str, str] | None:
    """(chat_id, time, human, assistant) of one log line, or None if it is not a logged turn."""
    try:
        record = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    if not isinstance(record, dict):
        return None
    chat_id, when = record.get("chat_id"), record.get("time")
    human, assistant = record.get("human"), record.get("assistant")
    if not (isinstance(chat_id, str) and chat_id and isinstance(human, str)
            and isinstance(assistant, str)):
        return None
    # bool is an int to Python, and json.loads accepts NaN: neither is a time.
    if isinstance(when, bool) or not isinstance(when, (int, float)) or not math.isfinite(when):
        return None
    return chat_id, float(when), human, assistant


def _foreign_line(line: bytes) -> tuple[str, list[tuple[str, str]]] | None:
    try:
        return foreign_chat_exchanges(json.loads(line.decode("utf-8")))
    except (UnicodeDecodeError, ValueError):
        return None


def chat_log_formats(conversations: list[Conversation]) -> str:
    """The kinds of log line the conversations came from, for a command's output."""
    return ", ".join(sorted({c.log_format for c in conversations}))


def read_chat_log(path: str | Path) -> list[Conversation]:
    """The conversations of a chat log, ordered by their first turn (see the module docstring).
    Malformed lines are skipped with one warning; a log with no usable turn is an error."""
    path = Path(path)
    if not path.exists():
        raise PrometheanError(f"chat log {path} does not exist.")
    if not path.is_file():
        raise PrometheanError(f"chat log {path} is not a file.")
    lines: dict[str, list[tuple[float, int, str, str]]] = {}
    whole: list[tuple[int, Conversation]] = []
    malformed, first_malformed, nonblank = 0, None, 0
    with open(path, "rb") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue  # a blank line (a trailing newline, an editor's) is not a turn
            nonblank += 1
            turn = _logged_turn(line)
            if turn is not None:
                chat_id, when, human, assistant = turn
                lines.setdefault(chat_id, []).append((when, number, human, assistant))
                continue
            foreign = _foreign_line(line)
            if foreign is None:
                malformed += 1
                first_malformed = first_malformed or number
                continue
            # Another system's line is a whole conversation, in the file's order.
            log_format, exchanges = foreign
            whole.append((number, Conversation(f"line-{number}", tuple(exchanges), log_format)))
    if malformed:
        warnings.warn(
            f"skipped {malformed} malformed line{'s' if malformed != 1 else ''} of chat log "
            f"{path} (the first is line {first_malformed}); a usable line is a JSON object with "
            "string fields chat_id, human and assistant and a numeric time, string fields user "
            "and assistant, or a messages list of role/content objects.",
            ChatLogWarning, stacklevel=2,
        )
    if not lines and not whole:
        what = "it is empty" if nonblank == 0 else f"none of its {nonblank} lines is a chat turn"
        raise PrometheanError(f"chat log {path} holds no usable conversation ({what}).")
    conversations = []
    for chat_id, turns in lines.items():
        turns.sort()  # by time; equal times keep the order of the file
        conversations.append((turns[0][:2], Conversation(
            chat_id, tuple((human, assistant) for _, _, human, assistant in turns))))
    conversations += [((float("inf"), number), conversation) for number, conversation in whole]
    conversations.sort(key=lambda item: item[0])
    return [conversation for _, conversation in conversations]


def split_conversations(conversations: list[Conversation], val_fraction: float
                        ) -> tuple[list[Conversation], list[Conversation]]:
    """(train, validation): `val_fraction` of the conversations (at least one, never all) held
    out, those whose chat_id has the smallest sha256, so the choice does not depend on the
    log's order and a held-out conversation stays held out as the log grows."""
    if len(conversations) < 2:
        raise PrometheanError(
            f"fine-tuning on a chat log needs at least 2 conversations with a reply (one to train "
            f"on, one to validate on); this log has {len(conversations)}."
        )
    count = min(len(conversations) - 1, max(1, round(len(conversations) * val_fraction)))
    ranked = sorted(conversations, key=lambda c: hashlib.sha256(c.chat_id.encode()).hexdigest())
    held_out = {c.chat_id for c in ranked[:count]}
    return ([c for c in conversations if c.chat_id not in held_out],
            [c for c in conversations if c.chat_id in held_out])


# ------------------------------------------------------------------------------- the examples


@dataclass(frozen=True)
class ChatExample:
    """One training row: input ids and same-length targets (-100 where there is no loss)."""

    inputs: tuple[int, ...]
    targets: tuple[int, ...]


def _exchange_tokens(human: str, assistant: str, tokenizer) -> tuple[list[int], list[bool]]:
    """Ids of one rendered exchange and its loss mask (True on the reply and its newline)."""
    ids, mask = encode_conversation([Turn("human", human), Turn("assistant", assistant)],
                                    tokenizer)
    ids, mask = ids[:-1], mask[:-1]  # no end-of-text: see the module docstring
    if not assistant.strip():
        mask = [False] * len(mask)
    return ids, mask


def _example(pieces: list[tuple[list[int], list[bool]]], row_length: int) -> ChatExample | None:
    ids = [token for piece_ids, _ in pieces for token in piece_ids][-row_length:]
    mask = [flag for _, piece_mask in pieces for flag in piece_mask][-row_length:]
    targets = tuple(token if flag else IGNORE_INDEX for token, flag in zip(ids[1:], mask[1:]))
    if all(target == IGNORE_INDEX for target in targets):
        return None
    return ChatExample(tuple(ids[:-1]), targets)


def conversation_examples(conversation: Conversation, tokenizer, block_size: int
                          ) -> list[ChatExample]:
    """The training rows of one conversation, at most `block_size` tokens each (see step 3 of
    the module docstring)."""
    row_length = block_size + 1  # inputs are the row but its last token, targets but its first
    exchanges = [_exchange_tokens(human, assistant, tokenizer)
                 for human, assistant in conversation.exchanges]
    examples = []
    opening, used = 0, 0
    while opening < len(exchanges) and used + len(exchanges[opening][0]) <= row_length:
        used += len(exchanges[opening][0])
        opening += 1
    if opening:
        examples.append(_example(exchanges[:opening], row_length))
    for last in range(opening, len(exchanges)):
        first, used = last, len(exchanges[last][0])
        while first > 0 and used + len(exchanges[first - 1][0]) <= row_length:
            first -= 1
            used += len(exchanges[first][0])
        context = [(ids, [False] * len(ids)) for ids, _ in exchanges[first:last]]
        examples.append(_example([*context, exchanges[last]], row_length))
    return [example for example in examples if example is not None]


def _collate(examples: list[ChatExample], pad_id: int, device
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch padded to its longest row (padding is never a target)."""
    length = max(len(example.inputs) for example in examples)
    inputs = torch.full((len(examples), length), pad_id, dtype=torch.long)
    targets = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
    for row, example in enumerate(examples):
        inputs[row, :len(example.inputs)] = torch.tensor(example.inputs)
        targets[row, :len(example.targets)] = torch.tensor(example.targets)
    return inputs.to(device), targets.to(device)


def _epochs(examples: list[ChatExample], batch_size: int, seed: int, pad_id: int, device,
            skip: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches of the examples, reshuffled every epoch (seeded), forever; the first `skip`
    batches are passed over without being built (a resumed run's position)."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(examples), generator=generator).tolist()
        for start in range(0, len(order), batch_size):
            if skip:
                skip -= 1
                continue
            yield _collate([examples[i] for i in order[start:start + batch_size]], pad_id, device)


def validation_loss(model, examples: list[ChatExample], batch_size: int, pad_id: int,
                    device) -> float:
    """Exact mean loss per reply token over every validation example."""
    from promethean.data.batches import exact_loss

    batches = (_collate(examples[start:start + batch_size], pad_id, device)
               for start in range(0, len(examples), batch_size))
    return exact_loss(model, batches).mean
