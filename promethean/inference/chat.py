"""A terminal chat: the `Human: ...\nAssistant:` format (promethean.data.chat), one reply streamed
per line read, the history kept within the model's context by forgetting the oldest exchanges.

A session can be given a `ChatMemory`: it writes the text that goes before the conversation in
each prompt (remembered exchanges relevant to the message) and is told of each finished exchange.
The memory engine itself lives in `promethean.context` (a layer above this one, which this module
does not import); `promethean chat --memory DIR` wires `context.retrieval.SessionMemory` in.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from typing import Protocol, TextIO

from promethean.data.chat import Turn, assistant_prompt
from promethean.inference.generate import SamplingParams, stream
from promethean.model import Transformer
from promethean.tokenizer import Tokenizer

EXIT_COMMAND = "/exit"


class ChatMemory(Protocol):
    """What a session remembers with."""

    def context(self, message: str) -> str:
        """Text to put before the conversation in the prompt that answers `message` (in the chat
        format; "" for nothing)."""
        ...

    def remember(self, exchange: list[Turn]) -> None:
        """A finished exchange: the human turn and the assistant's reply."""
        ...


class ChatSession:
    """A conversation with a model: `reply(message)` streams the assistant's answer and records
    both turns (and hands them to `memory`, when there is one)."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer, params: SamplingParams,
                 memory: ChatMemory | None = None) -> None:
        self.model, self.tokenizer, self.memory = model, tokenizer, memory
        # A reply is one line: it ends at a newline (or end-of-text), like the server's /chat.
        self.params = replace(params, stop_token_ids=(tokenizer.eot_id,),
                              stop_strings=tuple(dict.fromkeys((*params.stop_strings, "\n"))))
        self.history: list[Turn] = []

    def prompt_ids(self, message: str) -> list[int]:
        """The prompt for the next reply: the memory's context for `message` (if any), then as
        much recent history as leaves room for the reply's `max_new_tokens` (oldest exchanges
        dropped first). When the message alone does not fit beside the memory's context, the
        context goes (the message matters more); a lone long message is cropped later."""
        context = self.model.config.context_length
        room = max(1, context - self.params.max_new_tokens)
        remembered = self.memory.context(message) if self.memory is not None else ""
        turns = self.history + [Turn("human", message)]
        prompt = self.tokenizer.encode_ordinary(remembered + assistant_prompt(turns))
        while len(prompt) > room and len(turns) > 1:
            turns = turns[2:] if len(turns) > 2 else turns[1:]  # forget the oldest exchange
            prompt = self.tokenizer.encode_ordinary(remembered + assistant_prompt(turns))
        if len(prompt) > room and remembered:
            prompt = self.tokenizer.encode_ordinary(assistant_prompt(turns))
        return prompt

    def reply(self, message: str) -> Iterator[str]:
        """The reply's text pieces as they are generated (the leading space included)."""
        pieces = []
        for piece in stream(self.model, self.tokenizer, self.prompt_ids(message), self.params,
                            crop=True):
            pieces.append(piece)
            yield piece
        exchange = [Turn("human", message), Turn("assistant", "".join(pieces).strip())]
        self.history += exchange
        if self.memory is not None:
            self.memory.remember(exchange)


def run_chat(session: ChatSession, input_stream: TextIO, output: TextIO) -> None:
    """Read a message per line until `/exit` or end of input; stream each reply."""
    interactive = input_stream.isatty()
    while True:
        if interactive:
            output.write("Human: ")
            output.flush()
        line = input_stream.readline()
        if not line:
            break
        message = line.strip()
        if message == EXIT_COMMAND:
            break
        if not message:
            continue
        output.write("Assistant:")
        for piece in session.reply(message):
            output.write(piece)
            output.flush()
        output.write("\n")
        output.flush()
