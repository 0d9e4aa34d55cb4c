"""A terminal chat: the `Human: ...\nAssistant:` format (promethean.data.chat), one reply streamed
per line read, the history kept within the model's context by forgetting the oldest exchanges."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from typing import TextIO

from promethean.data.chat import Turn, assistant_prompt
from promethean.inference.generate import SamplingParams, stream
from promethean.model import Transformer
from promethean.tokenizer import Tokenizer

EXIT_COMMAND = "/exit"


class ChatSession:
    """A conversation with a model: `reply(message)` streams the assistant's answer and records
    both turns."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer, params: SamplingParams) -> None:
        self.model, self.tokenizer = model, tokenizer
        # A reply is one line: it ends at a newline (or end-of-text), like the server's /chat.
        self.params = replace(params, stop_token_ids=(tokenizer.eot_id,),
                              stop_strings=tuple(dict.fromkeys((*params.stop_strings, "\n"))))
        self.history: list[Turn] = []

    def prompt_ids(self, message: str) -> list[int]:
        """The prompt for the next reply: as much recent history as leaves room for the reply's
        `max_new_tokens` (oldest exchanges dropped first; a lone long message is cropped later)."""
        context = self.model.config.context_length
        room = max(1, context - self.params.max_new_tokens)
        turns = self.history + [Turn("human", message)]
        prompt = self.tokenizer.encode_ordinary(assistant_prompt(turns))
        while len(prompt) > room and len(turns) > 1:
            turns = turns[2:] if len(turns) > 2 else turns[1:]  # forget the oldest exchange
            prompt = self.tokenizer.encode_ordinary(assistant_prompt(turns))
        return prompt

    def reply(self, message: str) -> Iterator[str]:
        """The reply's text pieces as they are generated (the leading space included)."""
        pieces = []
        for piece in stream(self.model, self.tokenizer, self.prompt_ids(message), self.params,
                            crop=True):
            pieces.append(piece)
            yield piece
        self.history += [Turn("human", message), Turn("assistant", "".join(pieces).strip())]


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
