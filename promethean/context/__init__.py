"""The context engine: what the model remembers, and how it comes back into the prompt.

`tree` (the hierarchical memory tree over embedding vectors), `embed` (embedders: the model's
mean-pooled hidden states, or hashed n-grams without a model), `intake` (typed records -> salience,
deduplication, memory-aware batching -> the tree and the replay buffer) and `retrieval` (top-k
memories packed into the chat prompt within a token budget).
"""

from promethean.context.embed import HashedNgramEmbedder, ModelEmbedder
from promethean.context.intake import ChatRecord, DocumentRecord, Intake, MemoryAwareBatcher
from promethean.context.retrieval import (
    SessionMemory,
    chat_prompt_with_memory,
    open_memory,
    open_memory_with_embedder,
    remember_exchange,
)
from promethean.context.tree import Memory, MemoryTree

__all__ = [
    "ChatRecord", "DocumentRecord", "HashedNgramEmbedder", "Intake", "Memory", "MemoryAwareBatcher",
    "MemoryTree", "ModelEmbedder", "SessionMemory", "chat_prompt_with_memory", "open_memory",
    "open_memory_with_embedder", "remember_exchange",
]
