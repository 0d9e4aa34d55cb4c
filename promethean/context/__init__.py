"""The context engine: what the model remembers, and how it comes back into the prompt.

`tree` (the hierarchical memory tree over embedding vectors), `embed` (embedders: the model's
mean-pooled hidden states, or hashed n-grams without a model), `intake` (typed records -> salience,
deduplication, memory-aware batching -> the tree and the replay buffer) and `retrieval` (top-k
memories packed into the chat prompt within a token budget).
"""

# Imported when first named, so that a light module of this package (`defaults`, which the
# command line reads for its option defaults) does not pull in torch through the others.
_EXPORTS = {
    "HashedNgramEmbedder": "embed", "ModelEmbedder": "embed",
    "ChatRecord": "intake", "DocumentRecord": "intake", "Intake": "intake",
    "ActivationBoundedBatcher": "intake",
    "SessionMemory": "retrieval", "chat_prompt_with_memory": "retrieval",
    "open_memory": "retrieval", "open_memory_with_embedder": "retrieval",
    "remember_exchange": "retrieval",
    "Memory": "tree", "MemoryTree": "tree",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f"promethean.context.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'promethean.context' has no attribute {name!r}")
