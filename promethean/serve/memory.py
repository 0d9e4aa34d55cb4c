"""The server's memory (`serve --memory DIR`): a chat request that says `"memory": true` gets the
memories most relevant to its last human message packed into its prompt (within a token budget
that also leaves room for the reply), and the finished exchange is offered to the memory through
the intake; each user has a memory of their own under `users/` unless the server shares one. The
tree has no locking of its own, so every read and write of it holds one lock, taken only in worker
threads (never on the event loop nor on an engine thread); the server saves it atomically every
`memory_save_seconds` when it changed, and at shutdown.
"""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

from promethean.context.defaults import MEMORY_PROMPT_TOKENS
from promethean.context.intake import Intake
from promethean.context.tree import Memory, MemoryTree
from promethean.data.chat import Turn
from promethean.errors import PrometheanError
from promethean.tokenizer import Tokenizer


class ServerMemory:
    """A memory directory the server recalls from and remembers into (module docstring). Every
    method takes the lock and may block: call them from worker threads."""

    def __init__(self, directory: str | Path, tree: MemoryTree, embedder, intake: Intake,
                 token_budget: int = MEMORY_PROMPT_TOKENS, k: int = 5) -> None:
        self.directory, self.tree = Path(directory), tree
        self.embedder, self.intake = embedder, intake
        self.token_budget, self.k = token_budget, k
        self.lock = threading.Lock()
        self.changed = False
        self._intake_for = None  # tree -> Intake, set by open(): how for_user() builds one

    @classmethod
    def open(cls, directory: str | Path, checkpoint: str | Path | None, tokenizer: Tokenizer,
             device: str = "cpu", token_budget: int = MEMORY_PROMPT_TOKENS, k: int = 5) -> ServerMemory:
        """Open (or start) the memory in `directory`, with the intake `promethean memory add`
        uses: the model's surprise is a salience signal when the embedder is the model."""
        from promethean.context.embed import ModelEmbedder, embedder_for
        from promethean.context.intake import ActivationBoundedBatcher
        from promethean.context.retrieval import open_memory_with_embedder

        if token_budget < 1 or k < 1:
            raise PrometheanError("the memory token budget and k must be at least 1.")

        def model_embedder():
            # The checkpoint's own mean-pooled hidden states, from a copy of the weights of its
            # own (the engine's model must not run a forward hook on another thread).
            if checkpoint is None:
                raise PrometheanError("a memory embedded with a model needs the checkpoint it "
                                      "was made with.")
            return embedder_for(str(checkpoint), device=device)[0]

        directory = Path(directory)
        tree, embedder = open_memory_with_embedder(directory, model_embedder)
        model = embedder.model if isinstance(embedder, ModelEmbedder) else None
        if model is None:
            intake = Intake(tree, embedder, tokenizer=tokenizer)
        else:
            batcher = ActivationBoundedBatcher.for_model(tokenizer, model.config)
            intake = Intake(tree, embedder, tokenizer=tokenizer, batcher=batcher,
                            surprise=embedder.loss_per_token, vocab_size=model.config.vocab_size)
        memory = cls(directory, tree, embedder, intake, token_budget, k)
        memory._intake_for = lambda user_tree: (
            Intake(user_tree, embedder, tokenizer=tokenizer) if model is None else
            Intake(user_tree, embedder, tokenizer=tokenizer, batcher=batcher,
                   surprise=embedder.loss_per_token, vocab_size=model.config.vocab_size))
        return memory

    def for_user(self, user: str) -> ServerMemory:
        """The memory of one user: a directory of its own under `users/` (named by a hash of the
        user, never the user's words), with this memory's embedder and intake settings."""
        from promethean.context.retrieval import open_memory

        name = hashlib.sha256(user.encode("utf-8", "surrogatepass")).hexdigest()[:32]
        directory = self.directory / "users" / name
        tree = open_memory(directory, self.embedder)
        intake = self._intake_for(tree) if self._intake_for else Intake(tree, self.embedder)
        memory = ServerMemory(directory, tree, self.embedder, intake, self.token_budget, self.k)
        memory._intake_for = self._intake_for
        return memory

    def recall(self, query: str, count_tokens, room: int) -> tuple[str, list[Memory]]:
        """The memory block for `query` within min(room, token_budget) tokens, and its memories."""
        from promethean.context.retrieval import memory_context

        budget = min(room, self.token_budget)
        if budget <= 0:
            return "", []
        with self.lock:
            return memory_context(self.tree, self.embedder, query, count_tokens, budget, self.k)

    def remember(self, human: str, assistant: str, source: str) -> list[int]:
        from promethean.context.retrieval import remember_exchange

        if not human.strip() or not assistant.strip():
            return []  # the intake takes no empty turn
        with self.lock:
            accepted = remember_exchange(self.intake, [Turn("human", human),
                                                       Turn("assistant", assistant)], source)
            self.changed = self.changed or bool(accepted)
            return accepted

    def save(self) -> bool:
        """Write the tree (atomically) if it changed since the last save; True if it did."""
        with self.lock:
            if not self.changed:
                return False
            self.tree.prune()
            self.tree.save(self.directory)
            _owner_only(self.directory)
            self.changed = False
            return True


def _owner_only(directory: Path) -> None:
    """Memories are one user's words: the directory and its files readable by the owner only."""
    for path in [directory, *directory.iterdir()]:
        try:
            path.chmod(0o700 if path.is_dir() else 0o600)
        except OSError:  # a file another process just replaced: the next save sets it
            pass
