"""The chat format every part of Promethean shares (corpora, batches, the chat CLI, the server).

A conversation is a list of turns; it is rendered as lines `Human: ...` / `Assistant: ...`, the
format the nanoGPT chat card trained on, and a conversation ends with the end-of-text token when
tokenised. Keeping the format in one module means a model fine-tuned on logged chats sees exactly
the text the server will later prompt it with.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

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
