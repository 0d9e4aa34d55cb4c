"""Data layer: corpora, tokenised memory-mapped shards, batches. Knows nothing of training."""
