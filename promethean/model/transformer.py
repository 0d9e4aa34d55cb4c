"""The one Transformer: token embeddings -> blocks -> final norm -> head.

Every architecture (GPT-2, LLaMA, Gemma-3, the SSSM hybrid) is this class with a different
`ModelConfig`. The model computes logits and the loss; deciding what to do with logits belongs to
`promethean.inference`.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from promethean.config import ModelConfig
from promethean.model.attention import Attention, SlotMask, attention_mask
from promethean.model.cache import KVCache
from promethean.model.layers import MLP, Linear, make_norm, rotary_cos_sin, rotary_inverse_frequencies
from promethean.model.loss import linear_cross_entropy
from promethean.model.ssm import SelectiveSSM

IGNORE_INDEX = -100


class TransformerOutput(NamedTuple):
    logits: torch.Tensor
    loss: torch.Tensor | None


class Block(nn.Module):
    """Pre-norm residual block: a token mixer (attention, or a selective SSM), then the MLP.
    Gemma-3's sandwich norm also normalises each sublayer's output. With `config.dropout`, the
    mixer's output is dropped out before it joins the residual stream (GPT-2's resid_pdrop; the
    MLP drops out its own output), in training only."""

    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        if config.layer_mixer(layer) == "ssm":
            self.attn = None
            self.ssm_norm = make_norm(config)
            self.ssm = SelectiveSSM(config)
            self.ssm_post_norm = make_norm(config) if config.sandwich_norm else None
        else:
            self.ssm = None
            self.attn_norm = make_norm(config)
            self.attn = Attention(config, layer)
            self.attn_post_norm = make_norm(config) if config.sandwich_norm else None
        self.mixer_dropout = nn.Dropout(config.dropout)
        self.mlp_norm = make_norm(config)
        self.mlp = MLP(config)
        self.mlp_post_norm = make_norm(config) if config.sandwich_norm else None

    def forward(self, x, rotary, mask, is_causal, layer_cache):
        if self.ssm is not None:
            # For an SSM mixer, `mask` is (B, T), False at left padding (or None: no padding).
            h = self.ssm(self.ssm_norm(x), mask, layer_cache)
            post_norm = self.ssm_post_norm
        else:
            h = self.attn(self.attn_norm(x), rotary, mask, is_causal, layer_cache)
            post_norm = self.attn_post_norm
        if post_norm is not None:
            h = post_norm(h)
        if self.training:  # in eval, dropout is the identity: not even a call
            h = self.mixer_dropout(h)
        x = x + h
        h = self.mlp(self.mlp_norm(x))
        if self.mlp_post_norm is not None:
            h = self.mlp_post_norm(h)
        return x + h


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        # Set by the trainer: keep only each block's input during training and recompute the
        # block's activations in the backward pass (about one extra forward of compute).
        self.gradient_checkpointing = False
        self.token_embedding = nn.Embedding(config.vocab_size, config.n_embd)
        if config.position == "learned":
            self.position_embedding = nn.Embedding(config.context_length, config.n_embd)
        else:
            self.position_embedding = None
        self.dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, layer) for layer in range(config.n_layer))
        self.final_norm = make_norm(config)
        # A tied head is the embedding: build it on the meta device so that its vocab x width
        # matrix is never allocated (154 MB at GPT-2 size) only to be replaced by tie_weights().
        head_device = "meta" if config.tie_embeddings else None
        self.lm_head = Linear(config.n_embd, config.vocab_size, bias=False, device=head_device)
        self.tie_weights()
        self._rotary_frequencies: dict[tuple[float, torch.device], torch.Tensor] = {}
        # Set by promethean.inference on a model prepared for its CPU kernels, whose attention
        # layers build their own masks: they get a `SlotMask` (the first query's slot and the
        # rows' left padding) instead of a mask tensor.
        self.attention_reads_slots = False
        # Set by promethean.inference (fused_decode) on a model prepared for inference: runs every
        # block of a cached decode step (one new token per row) in one call, bit-identical to the
        # blocks. It has `rope_thetas`, `can_step(cache)`, `step(x, cache, rotaries)`,
        # `returns_logits` (the step ends with the final norm and the head, and returns logits)
        # and `rebuilt(model)` (the same step over the model's tensors after a conversion).
        self.fused_decode = None
        # Set by promethean.inference.quantize.prepare_for_inference: the dtype the model was
        # prepared in (None: a trainable model, never prepared), and the fingerprint of the fp32
        # weights it was converted from (see `weights_fingerprint`).
        self.inference_dtype: str | None = None
        self.fp32_weights_fingerprint: str | None = None
        self.reset_parameters()

    def set_dropout(self, probability: float) -> None:
        """Make every dropout of the model (embeddings, attention weights, each sublayer's output)
        `probability`, and record it in `config` so a saved checkpoint says what it trained with.
        Dropout acts in training mode only; `eval()` makes the model deterministic again."""
        if not 0 <= probability < 1:
            raise ValueError(f"dropout must lie in [0, 1), got {probability}")
        self.config = self.config.model_copy(update={"dropout": float(probability)})
        for module in self.modules():
            if isinstance(module, nn.Dropout):
                module.p = float(probability)
            elif isinstance(module, Attention):
                module.dropout = float(probability)

    # ----------------------------------------------------------------------------- parameters
    def reset_parameters(self) -> None:
        """GPT-2 initialisation; residual projections are scaled down by sqrt(2 * n_layer) so
        that the residual stream's variance does not grow with depth."""
        std = self.config.init_std
        for module in self.modules():
            if isinstance(module, nn.Linear):
                scale = 1 / math.sqrt(2 * self.config.n_layer)
                module_std = std * scale if getattr(module, "is_residual_projection", False) else std
                nn.init.normal_(module.weight, mean=0.0, std=module_std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif hasattr(module, "weight") and isinstance(module.weight, nn.Parameter):
                # Norms: a gain of one, which the unit-offset form stores as zero.
                if getattr(module, "unit_offset", False):
                    nn.init.zeros_(module.weight)
                else:
                    nn.init.ones_(module.weight)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
        for module in self.modules():
            if isinstance(module, SelectiveSSM):  # its conv, step size, A and D have their own init
                module.reset_ssm_parameters()

    def _apply(self, fn, recurse=True):
        # A fused decode step holds the tensors it gathered; a conversion (to(), float(), ...)
        # may replace them with new ones, so the step would read stale ones: it is gathered
        # again afterwards (and stays dropped if the conversion fails).
        fused, self.fused_decode = self.fused_decode, None
        module = super()._apply(fn, recurse)
        if fused is not None:
            self.fused_decode = fused.rebuilt(self)
        return module

    def tie_weights(self) -> None:
        """Share the embedding with the output head when the config says so (again after any
        load that assigned new tensors)."""
        if self.config.tie_embeddings:
            self.lm_head.weight = self.token_embedding.weight

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())  # tied tensors are counted once

    def weights_fingerprint(self) -> str:
        """12 hex digits of the SHA-256 of the fp32 token embedding table: a cheap name for these
        weights that changes whenever training touches them. A model converted for inference
        (`promethean.inference.quantize`) keeps the fingerprint of the fp32 weights it came from,
        so what was named after them (a memory's embedder) still matches."""
        if self.fp32_weights_fingerprint is not None:
            return self.fp32_weights_fingerprint
        import hashlib

        table = self.token_embedding.weight.detach().float().cpu().contiguous()
        # Hashed through a view of the tensor's own memory: no 154 MB copy at GPT-2 size.
        return hashlib.sha256(memoryview(table.numpy()).cast("B")).hexdigest()[:12]

    def num_embedding_parameters(self) -> int:
        """Vocabulary- and position-sized tables: token embeddings, learned positions, and the
        output head when it is not tied to the embeddings."""
        count = self.token_embedding.weight.numel()
        if self.position_embedding is not None:
            count += self.position_embedding.weight.numel()
        if not self.config.tie_embeddings:
            count += self.lm_head.weight.numel()
        return count

    def num_non_embedding_parameters(self) -> int:
        return self.num_parameters() - self.num_embedding_parameters()

    def spike_rates(self) -> dict[int, float]:
        """Per SSM layer, the fraction of state updates that fired in the last training forward."""
        return {
            layer: float(block.ssm.spike_rate)
            for layer, block in enumerate(self.blocks)
            if block.ssm is not None and block.ssm.spike_rate is not None
        }

    # ------------------------------------------------------------------------------- forward
    def _rotary(self, theta: float, positions: torch.Tensor, dtype: torch.dtype):
        key = (theta, positions.device)
        if key not in self._rotary_frequencies:
            frequencies = rotary_inverse_frequencies(self.config.head_size, theta)
            self._rotary_frequencies[key] = frequencies.to(positions.device)
        cos, sin = rotary_cos_sin(positions, self._rotary_frequencies[key])
        # (B or 1, T, D) -> broadcast over heads
        return cos.to(dtype)[:, None], sin.to(dtype)[:, None]

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        cache: KVCache | None = None,
        last_logits_only: bool = False,
        return_logits: bool = True,
    ) -> TransformerOutput:
        """Logits for token ids `idx` (B, T), and the mean cross-entropy when `targets` is given.

        With a `cache`, `idx` continues the sequences the cache holds, and the cache is advanced.
        `targets` entries equal to -100 are ignored by the loss. With `return_logits=False` (and
        targets) the loss is fused with the head and computed in chunks, so the (B, T, vocab)
        logits are never built (`logits` is None): the training path.
        """
        _batch, length = idx.shape
        start = cache.length if cache is not None else 0
        longest = start + length - (cache.min_left_padding if cache is not None else 0)
        if longest > self.config.context_length:
            raise ValueError(
                f"a sequence of {longest} tokens is longer than the model's context "
                f"({self.config.context_length})"
            )
        device = idx.device
        slots = torch.arange(start, start + length, device=device)
        left_padding = cache.left_padding if cache is not None else None
        if left_padding is not None:
            positions = (slots[None, :] - left_padding[:, None]).clamp(min=0)
        else:
            positions = slots[None, :]

        x = self.token_embedding(idx)
        if self.config.embedding_scale:
            x = x * torch.tensor(self.config.n_embd**0.5, dtype=x.dtype)
        if self.position_embedding is not None:
            x = x + self.position_embedding(positions)
        if self.training:  # in eval, dropout is the identity: not even a call
            x = self.dropout(x)

        fused = self.fused_decode
        if (fused is not None and length == 1 and cache is not None and targets is None
                and not self.training and fused.can_step(cache)):
            rotaries = {theta: self._rotary(theta, positions, x.dtype)
                        for theta in fused.rope_thetas}
            x = fused.step(x, cache, rotaries)
            if fused.returns_logits:  # the step ran the final norm and the head too
                cache.length += length
                return TransformerOutput(x, None)
        else:
            x = self._run_blocks(x, slots, positions, cache, left_padding)
        if cache is not None:
            cache.length += length

        x = self.final_norm(x)
        if last_logits_only and targets is None:
            x = x[:, -1:]
        if targets is not None and not return_logits:
            # Checkpointing trades compute for memory; so does recasting the head in slices.
            loss = linear_cross_entropy(
                x.reshape(-1, x.size(-1)), self.lm_head.weight, targets.reshape(-1), IGNORE_INDEX,
                recast_weight_slices=self.gradient_checkpointing,
            )
            return TransformerOutput(None, loss)
        logits = self.lm_head(x)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(
                logits.float().view(-1, logits.size(-1)),
                targets.reshape(-1),
                ignore_index=IGNORE_INDEX,
            )
        return TransformerOutput(logits, loss)

    def _run_blocks(self, x, slots, positions, cache, left_padding) -> torch.Tensor:
        """The blocks, module by module: every case the fused decode step does not take."""
        # Masks and rotary tables depend only on a layer's window and base: build each once.
        masks: dict[int | None, tuple[torch.Tensor | None, bool]] = {}
        rotaries: dict[float, tuple[torch.Tensor, torch.Tensor]] = {}
        # SSM mixers need no positions or attention mask, only which slots are real tokens.
        real_tokens = slots[None, :] >= left_padding[:, None] if left_padding is not None else None
        slot_mask = None
        if self.attention_reads_slots:  # the slots start where the cache ends (0 without one)
            slot_mask = SlotMask(cache.length if cache is not None else 0, left_padding)
        for layer, block in enumerate(self.blocks):
            if block.attn is None:
                rotary, mask, is_causal = None, real_tokens, False
            else:
                window = block.attn.window
                if slot_mask is not None:
                    masks[window] = slot_mask, False
                elif window not in masks:
                    masks[window] = self._mask(slots, window, cache, left_padding)
                rotary = None
                theta = block.attn.rope_theta
                if theta is not None:
                    if theta not in rotaries:
                        rotaries[theta] = self._rotary(theta, positions, x.dtype)
                    rotary = rotaries[theta]
                mask, is_causal = masks[window]
            if self.gradient_checkpointing and self.training and cache is None:
                x = checkpoint(block, x, rotary, mask, is_causal, None, use_reentrant=False)
            else:
                layer_cache = cache.layers[layer] if cache is not None else None
                x = block(x, rotary, mask, is_causal, layer_cache)
        return x

    def _mask(self, slots, window, cache, left_padding) -> tuple[torch.Tensor | None, bool]:
        """(mask, is_causal) for SDPA; the fast paths avoid materialising a mask at all."""
        length = slots.numel()
        if cache is None:
            if window is None or window >= length:
                return None, True
            key_slots = slots
        else:
            key_start = cache.first_key_slot(window)
            key_slots = torch.arange(key_start, int(slots[-1]) + 1, device=slots.device)
            fits_window = window is None or int(slots[-1]) - key_start < window
            if length == 1 and left_padding is None and fits_window:
                return None, False  # one new token sees everything held
        return attention_mask(slots, key_slots, window, left_padding), False

    def new_cache(
        self, batch_size: int, capacity: int | None = None, left_padding: torch.Tensor | None = None
    ) -> KVCache:
        return KVCache(
            self.config,
            batch_size,
            capacity=capacity or min(self.config.context_length, 256),
            left_padding=left_padding,
        )
