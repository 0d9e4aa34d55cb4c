"""Model layer: knows nothing of training, serving or the CLI."""

from promethean.model.cache import KVCache
from promethean.model.transformer import Transformer, TransformerOutput

__all__ = ["KVCache", "Transformer", "TransformerOutput"]
