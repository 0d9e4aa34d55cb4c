"""Embedders: text -> unit vectors for the memory tree. Pluggable: anything with a `dim` and an
`embed(texts) -> (n, dim) float32 array` will do.

* `ModelEmbedder` (the default when a checkpoint is given): the mean over tokens of the loaded
  model's final hidden states (after the final norm), read with a forward hook, so the model's
  code is untouched. It also gives the model's loss per token on a text (the intake's surprise).
* `HashedNgramEmbedder`: a cheap deterministic fallback that needs no model: character 3- to
  5-grams and words hashed (crc32) into `dim` signed buckets. Texts that share spelling land
  close; it knows nothing of meaning. Use it for tests, benchmarks and memories kept without a
  model, and never mix vectors of two embedders in one tree (the tree records which one).
"""

from __future__ import annotations

import re
import zlib
from typing import Protocol

import numpy as np

from promethean.errors import PrometheanError

_WORD = re.compile(r"\w+", re.UNICODE)
HASHED_PREFIX = "hashed-ngrams-"  # + the dimension: the name a memory records


class Embedder(Protocol):
    name: str
    dim: int

    def embed(self, texts: list[str]) -> np.ndarray: ...


class HashedNgramEmbedder:
    """Signed feature hashing of character n-grams and words (see the module docstring)."""

    def __init__(self, dim: int = 256, ngram_range: tuple[int, int] = (3, 5)) -> None:
        if dim < 2:
            raise PrometheanError(f"an embedding needs at least 2 dimensions, got {dim}.")
        self.dim, self.ngram_range = dim, ngram_range
        self.name = f"{HASHED_PREFIX}{dim}"

    @classmethod
    def named(cls, name: object) -> HashedNgramEmbedder | None:
        """The hashed embedder a memory records by `name` ("hashed-ngrams-256"), or None when
        the name is not one (a model's embedder, or nothing)."""
        if isinstance(name, str) and name.startswith(HASHED_PREFIX):
            dim = name[len(HASHED_PREFIX):]
            if dim.isascii() and dim.isdigit() and int(dim) >= 2:
                return cls(int(dim))
        return None

    def _features(self, text: str) -> list[bytes]:
        text = " ".join(text.lower().split())
        padded = f" {text} "
        grams = [padded[i : i + n].encode() for n in range(self.ngram_range[0], self.ngram_range[1] + 1)
                 for i in range(max(len(padded) - n + 1, 0))]
        return grams + [b"w:" + word.encode() for word in _WORD.findall(text)]

    def embed(self, texts: list[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for row, text in enumerate(texts):
            hashes = np.fromiter((zlib.crc32(f) for f in self._features(text)), dtype=np.uint64)
            if len(hashes) == 0:
                continue
            signs = np.where((hashes >> np.uint64(31)) & np.uint64(1), 1.0, -1.0).astype(np.float32)
            np.add.at(out[row], (hashes % np.uint64(self.dim)).astype(np.int64), signs)
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return out / np.maximum(norms, 1e-12)


def weights_fingerprint(model) -> str:
    """The model's weights fingerprint (Transformer.weights_fingerprint: that of the fp32 weights,
    also for a model converted to bf16 or int8 for inference)."""
    return model.weights_fingerprint()


class ModelEmbedder:
    """Mean-pooled final hidden states of a Transformer (see the module docstring)."""

    def __init__(self, model, tokenizer, name: str | None = None) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.dim = model.config.n_embd
        # Named after the weights, not the path: vectors of other weights are not comparable.
        self.name = name or f"model-{weights_fingerprint(model)}-mean-hidden-{self.dim}"

    def _tokens(self, text: str) -> list[int]:
        ids = self.tokenizer.encode_ordinary(text)[: self.model.config.context_length]
        return ids or [self.tokenizer.eot_id]

    def _padded(self, token_lists: list[list[int]]):
        """A right-padded (B, T) batch and its mask. Right padding is safe for every mixer we
        have: they are causal, so a real token never sees the padding after it."""
        import torch

        longest = max(len(ids) for ids in token_lists)
        device = next(self.model.parameters()).device
        idx = torch.full((len(token_lists), longest), self.tokenizer.eot_id, dtype=torch.long)
        mask = torch.zeros((len(token_lists), longest), dtype=torch.bool)
        for row, ids in enumerate(token_lists):
            idx[row, : len(ids)] = torch.tensor(ids)
            mask[row, : len(ids)] = True
        return idx.to(device), mask.to(device)

    def embed(self, texts: list[str]) -> np.ndarray:
        """One forward pass for the batch (the intake's batcher bounds its size)."""
        import torch

        if not texts:
            return np.zeros((0, self.dim), np.float32)
        captured: list[torch.Tensor] = []
        hook = self.model.final_norm.register_forward_hook(lambda _m, _i, out: captured.append(out))
        idx, mask = self._padded([self._tokens(text) for text in texts])
        try:
            with torch.inference_mode():
                self.model(idx, last_logits_only=True)
        finally:
            hook.remove()
        hidden = captured[-1].float() * mask[..., None]
        out = (hidden.sum(1) / mask.sum(1, keepdim=True)).cpu().numpy().astype(np.float32)
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)

    def loss_per_token(self, texts: list[str]) -> np.ndarray:
        """The model's mean next-token cross-entropy (nats) on each text: its surprise."""
        import torch
        import torch.nn.functional as F

        if not texts:
            return np.zeros(0)
        token_lists = []
        for text in texts:
            ids = self._tokens(text)
            token_lists.append(ids if len(ids) >= 2 else [self.tokenizer.eot_id, *ids])
        idx, mask = self._padded(token_lists)
        with torch.inference_mode():
            logits = self.model(idx[:, :-1]).logits.float()
        losses = F.cross_entropy(logits.transpose(1, 2), idx[:, 1:], reduction="none")
        valid = mask[:, 1:]
        per_text = (losses * valid).sum(1) / valid.sum(1)
        return per_text.cpu().numpy().astype(np.float64)


def embedder_for(checkpoint: str | None, dim: int = 256, device: str = "cpu"):
    """(embedder, tokenizer or None, model or None): the checkpoint's mean-pooled hidden states
    when a checkpoint directory is given, else the hashed n-gram fallback of `dim` dimensions."""
    if checkpoint is None:
        return HashedNgramEmbedder(dim), None, None
    from pathlib import Path

    from promethean.checkpoint import load_checkpoint

    if not Path(checkpoint).is_dir():
        raise PrometheanError(f"{checkpoint} is not a checkpoint directory.")
    loaded = load_checkpoint(checkpoint, device=device)
    model = loaded.model.eval()
    return ModelEmbedder(model, loaded.tokenizer), loaded.tokenizer, model
