"""The chat format every part of Promethean shares (corpora, batches, the chat CLI, the server).

A conversation is a list of turns; it is rendered as lines `Human: ...` / `Assistant: ...`, the
format the nanoGPT chat card trained on, and a conversation ends with the end-of-text token when
tokenised. Keeping the format in one module means a model fine-tuned on logged chats sees exactly
the text the server will later prompt it with.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from promethean.errors import PrometheanError
from promethean.tokenizer import END_OF_TEXT, Tokenizer

HUMAN_PREFIX = "Human: "
ASSISTANT_PREFIX = "Assistant: "
ROLE_PREFIXES = {"human": HUMAN_PREFIX, "assistant": ASSISTANT_PREFIX}


@dataclass(frozen=True)
class Turn:
    role: Literal["human", "assistant"]
    text: str


def render_turn(turn: Turn) -> str:
    return f"{ROLE_PREFIXES[turn.role]}{turn.text.strip()}\n"


def render_conversation(turns: list[Turn]) -> str:
    """The text of a whole conversation: one `Role: text` line per turn."""
    return "".join(render_turn(turn) for turn in turns)


def assistant_prompt(turns: list[Turn]) -> str:
    """The prompt that asks the model for the next assistant turn."""
    return render_conversation(turns) + ASSISTANT_PREFIX.rstrip(" ")


# ------------------------------------------------------------------------------ tokenisation

TRAIN_ON = ("assistant", "all")


def conversation_segments(turns: list[Turn]) -> list[tuple[str, bool]]:
    """The rendered conversation cut into `(text, is_assistant_reply)` pieces, end-of-text last.

    Joined, the pieces are exactly `render_conversation(turns) + "<|endoftext|>"`. An assistant
    turn is cut after `Assistant:`, not after `Assistant: `: `assistant_prompt` ends at the colon,
    so the space is the first thing the model must produce, and with GPT-2's BPE it belongs to the
    first word's token (" Hi"), which also makes the cut fall where BPE would split anyway.
    The final end-of-text counts as the reply's when the conversation ends with the assistant:
    it is how the model learns to stop.
    """
    prompt_end = ASSISTANT_PREFIX.rstrip(" ")
    segments: list[tuple[str, bool]] = []
    for turn in turns:
        line = render_turn(turn)
        if turn.role == "assistant":
            segments.append((prompt_end, False))
            segments.append((line[len(prompt_end):], True))
        else:
            segments.append((line, False))
    ends_with_reply = bool(turns) and turns[-1].role == "assistant"
    segments.append((END_OF_TEXT, ends_with_reply))
    return segments


def encode_conversation(
    turns: list[Turn], tokenizer: Tokenizer, train_on: str = "assistant"
) -> tuple[list[int], list[bool]]:
    """Token ids of a conversation (ending with end-of-text) and a same-length loss mask.

    With `train_on="assistant"` the mask is True exactly on the assistant replies' tokens: the
    text after `Assistant:` (its leading space included, see `conversation_segments`), the newline
    ending the turn, and the final end-of-text when the assistant speaks last. Human turns and the
    `Assistant:` prompts are False. With `train_on="all"` every token is True.

    Each segment is tokenised on its own so the mask boundaries are exact. For the bytes tokenizer
    the ids are identical to tokenising the whole text; for a BPE they can differ in rare places
    (a merge across a cut, e.g. an empty reply), which is harmless for training: the ids still
    decode to exactly the rendered conversation.
    """
    if train_on not in TRAIN_ON:
        raise PrometheanError(f"train_on must be one of {', '.join(TRAIN_ON)}, not '{train_on}'.")
    ids: list[int] = []
    mask: list[bool] = []
    for text, is_reply in conversation_segments(turns):
        # The end-of-text is added by id: a tokenizer need not parse special tokens in text.
        piece = [tokenizer.eot_id] if text == END_OF_TEXT else tokenizer.encode(text)
        ids.extend(piece)
        mask.extend([is_reply or train_on == "all"] * len(piece))
    return ids, mask


# Chat logs written by other systems, accepted wherever a chat log is read (`finetune-chat`,
# `memory add`): one conversation per line.
PAIRS_FORMAT = "user/assistant pairs"  # the GPT-2 chat card's chat_history.jsonl
OPENAI_FORMAT = "OpenAI messages"  # {"messages": [{"role", "content"}, ...]}


def foreign_chat_exchanges(record: object) -> tuple[str, list[tuple[str, str]]] | None:
    """(format, [(human, assistant), ...]) of one line of another system's chat log, or None when
    the line is in neither form. OpenAI `system` messages set no turn (our chat format has none);
    consecutive user messages join into one human turn; a last user message without a reply is an
    exchange with an empty reply."""
    if not isinstance(record, dict):
        return None
    user, assistant = record.get("user"), record.get("assistant")
    if isinstance(user, str) and isinstance(assistant, str):
        return PAIRS_FORMAT, [(user, assistant)]
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        return None
    exchanges: list[tuple[str, str]] = []
    pending: list[str] = []
    for message in messages:
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            return None
        role, content = message.get("role"), message["content"]
        if role == "user":
            pending.append(content)
        elif role == "assistant":
            exchanges.append(("\n".join(pending), content))
            pending = []
        elif role not in ("system", "developer"):
            return None
    if pending:
        exchanges.append(("\n".join(pending), ""))
    return (OPENAI_FORMAT, exchanges) if exchanges else None
