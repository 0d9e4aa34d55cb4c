"""Retrieval: bring the memories that matter back into the prompt, within a token budget.

`memory_context` fetches the top-k memories for a query (the memory tree's beam search) and packs
them into at most `token_budget` tokens: when they do not all fit, the least relevant are dropped
first (a memory is never cut in half). The block is written in the chat format
(`promethean.data.chat`): a memory that is a conversation keeps its `Human:`/`Assistant:` lines, a
document becomes a `Human:` line; the most relevant memory comes last, nearest to the question.

`chat_prompt_with_memory` is what a chat loop calls: memory block + the conversation's
`assistant_prompt`. `remember_exchange` stores a finished exchange back through the intake, so a
later session can recall it. `SessionMemory` is the two of them over a memory directory, in the
shape of `promethean.inference.chat.ChatMemory`: `promethean chat CKPT --memory DIR` gives one to
its `ChatSession` (its prompts are exactly `chat_prompt_with_memory`'s) and saves the tree when
the chat ends.

`open_memory` opens (or creates) a memory directory and checks that the embedder it was built with
is the one in use: vectors of two embedders are not comparable. `memory_tree_embedder` chooses
that embedder for a chat or a server: the hashed n-gram embedder when the memory was built with
one (it needs no model), else the model's; `open_memory_with_embedder` is the two together, what
`SessionMemory.open` (and the server's memory) call. Only the tree reads its files: the
embedder's name comes from `MemoryTree.read_record`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from promethean.context.defaults import MEMORY_PROMPT_TOKENS
from promethean.context.embed import Embedder, HashedNgramEmbedder, ModelEmbedder
from promethean.context.tree import TREE_FILE, Memory, MemoryTree
from promethean.data.chat import ROLE_PREFIXES, Turn, assistant_prompt, render_turn
from promethean.errors import PrometheanError


def open_memory(directory: str | Path, embedder: Embedder, create: bool = True,
                **settings) -> MemoryTree:
    """The memory tree in `directory`, built with `embedder` (refused when it was built with
    another); without one there, a new empty tree with `settings` (unless `create` is False).
    Nothing is written until the tree is saved."""
    directory = Path(directory)
    if directory.is_dir() and (directory / TREE_FILE).is_file():
        tree = MemoryTree.load(directory)
        recorded = tree.info.get("embedder")
        if recorded is not None and recorded != embedder.name:
            raise PrometheanError(
                f"the memory in {directory} was built with the '{recorded}' embedder but "
                f"'{embedder.name}' is in use; embed with the same model (or the same hashed "
                "embedder) as when it was made."
            )
        return tree
    if not create:
        raise PrometheanError(f"{directory} holds no memory tree.")
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise PrometheanError(f"{directory} exists and is not a memory directory; choose another.")
    tree = MemoryTree(embedder.dim, **settings)
    tree.info["embedder"] = embedder.name
    return tree


def memory_tree_embedder(directory: str | Path,
                         model_embedder: Callable[[], Embedder]) -> Embedder:
    """The embedder to read and grow the memory in `directory` with: the hashed n-gram embedder
    that built it, when one did; else `model_embedder()` (called only then: it may load a model),
    which `open_memory` then checks against the one the memory records. A damaged tree.json is
    one sentence naming it."""
    directory = Path(directory)
    if directory.is_dir() and (directory / TREE_FILE).is_file():
        hashed = HashedNgramEmbedder.named(MemoryTree.read_record(directory)["info"].get("embedder"))
        if hashed is not None:
            return hashed
    return model_embedder()


def open_memory_with_embedder(directory: str | Path, model_embedder: Callable[[], Embedder],
                              create: bool = True, **settings) -> tuple[MemoryTree, Embedder]:
    """(the memory tree in `directory`, the embedder to use with it): `memory_tree_embedder`,
    then `open_memory`."""
    embedder = memory_tree_embedder(directory, model_embedder)
    return open_memory(directory, embedder, create, **settings), embedder


def retrieve(tree: MemoryTree, embedder: Embedder, query: str, k: int = 5,
             beam: int = 32) -> list[Memory]:
    """The top-k memories for `query`, most relevant first."""
    if not query.strip() or len(tree) == 0:
        return []
    return tree.search(embedder.embed([query])[0], k=k, beam=beam)


def render_memory(memory: Memory) -> str:
    text = memory.text.strip()
    if text.startswith(tuple(ROLE_PREFIXES.values())):
        return text + "\n"
    return render_turn(Turn("human", text))


def pack_memories(memories: list[Memory], count_tokens, token_budget: int) -> tuple[str, list[Memory]]:
    """The memory block and the memories in it. `memories` arrive most relevant first; while
    they do not fit in `token_budget` tokens, the least relevant is dropped (so a memory is never
    kept while a more relevant one is left out)."""
    rendered = [render_memory(memory) for memory in memories]
    costs = [count_tokens(text) for text in rendered]
    keep = len(memories)
    total = sum(costs)
    while keep and total > token_budget:
        keep -= 1
        total -= costs[keep]
    # Most relevant last: nearest to the conversation it informs.
    return "".join(reversed(rendered[:keep])), list(reversed(memories[:keep]))


def memory_context(tree: MemoryTree, embedder: Embedder, query: str, count_tokens,
                   token_budget: int = MEMORY_PROMPT_TOKENS, k: int = 5, beam: int = 32) -> tuple[str, list[Memory]]:
    return pack_memories(retrieve(tree, embedder, query, k, beam), count_tokens, token_budget)


def chat_prompt_with_memory(turns: list[Turn], tree: MemoryTree, embedder: Embedder, tokenizer,
                            token_budget: int = MEMORY_PROMPT_TOKENS, k: int = 5, beam: int = 32) -> str:
    """The prompt for the next assistant turn, preceded by the memories most relevant to the last
    human turn (within `token_budget` tokens)."""
    humans = [turn.text for turn in turns if turn.role == "human"]
    query = humans[-1] if humans else ""
    block, _ = memory_context(tree, embedder, query, lambda s: len(tokenizer.encode_ordinary(s)),
                              token_budget, k, beam)
    return block + assistant_prompt(turns)


def remember_exchange(intake, turns: list[Turn], source: str = "chat") -> list[int]:
    """Offer a finished exchange to the intake (it may be dropped as a duplicate or as not
    salient enough); returns the ids of what was kept."""
    from promethean.context.intake import ChatRecord, ChatTurn

    if not turns:
        return []
    record = ChatRecord(turns=[ChatTurn(role=t.role, text=t.text) for t in turns], source=source)
    return intake.process([record]).accepted


class SessionMemory:
    """A chat's memory over a directory (see `promethean.inference.chat.ChatMemory`): each
    message's prompt starts with the memories most relevant to it, within `token_budget` tokens;
    each finished exchange goes through the intake into the tree; `save()` writes the tree
    (atomically) when anything was remembered."""

    def __init__(self, directory: str | Path, tree: MemoryTree, embedder: Embedder, tokenizer,
                 intake, token_budget: int = MEMORY_PROMPT_TOKENS, k: int = 5, beam: int = 32) -> None:
        self.directory, self.tree, self.embedder, self.tokenizer = Path(directory), tree, embedder, tokenizer
        self.intake, self.token_budget, self.k, self.beam = intake, token_budget, k, beam
        self.remembered: list[int] = []  # ids stored during this session
        self._last: tuple[str, str] | None = None  # (message, its memory block): one retrieval each

    @classmethod
    def open(cls, directory: str | Path, model, tokenizer, token_budget: int = MEMORY_PROMPT_TOKENS, k: int = 5,
             beam: int = 32, **intake_options) -> SessionMemory:
        """Open (or create) a chat memory for this model. A memory made by the hashed n-gram
        embedder (`promethean memory add` without a checkpoint) keeps that embedder; otherwise
        texts are embedded by the chat model's mean-pooled hidden states, and the model's loss
        on them is the intake's surprise signal."""
        from promethean.context.intake import Intake

        directory = Path(directory)
        tree, embedder = open_memory_with_embedder(directory, lambda: ModelEmbedder(model, tokenizer))
        surprise = embedder.loss_per_token if isinstance(embedder, ModelEmbedder) else None
        intake = Intake(tree, embedder, tokenizer=tokenizer, surprise=surprise,
                        vocab_size=model.config.vocab_size if surprise is not None else None,
                        **intake_options)
        return cls(directory, tree, embedder, tokenizer, intake, token_budget, k, beam)

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer.encode_ordinary(text))

    def context(self, message: str) -> str:
        if self._last is None or self._last[0] != message:
            block, _ = memory_context(self.tree, self.embedder, message, self.count_tokens,
                                      self.token_budget, self.k, self.beam)
            self._last = (message, block)
        return self._last[1]

    def remember(self, exchange: list[Turn]) -> None:
        turns = [turn for turn in exchange if turn.text.strip()]  # a reply can be empty
        if any(turn.role == "human" for turn in turns):
            self.remembered += remember_exchange(self.intake, turns)

    def save(self) -> Path | None:
        """Write the tree when this session added to it (and the directory when it is new)."""
        if self.remembered or not (self.directory / TREE_FILE).is_file():
            self.tree.prune()
            return self.tree.save(self.directory)
        return None
