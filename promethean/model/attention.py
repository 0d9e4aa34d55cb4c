"""Causal self-attention for every architecture, over the KV cache that decoding keeps
(`promethean.model.cache`).

One module covers multi-head and grouped-query attention, learned or rotary positions (with a
per-layer base), QK-norm, and sliding-window layers. Masks are built from *slots*: the column a
token occupies in the batch. Rows of a batch may be left-padded; a row's position is its slot
minus its padding, so the causal and window conditions, which compare differences, can be
written on slots directly and only the padding needs a per-row term.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from promethean.config import ModelConfig
# The caches live in promethean.model.cache; they are named here too, where attention uses them.
from promethean.model.cache import KVCache, LayerKVCache
from promethean.model.layers import Linear, RMSNorm, apply_rotary

__all__ = ["Attention", "KVCache", "LayerKVCache", "SlotMask", "attention_mask"]


class SlotMask(NamedTuple):
    """What an attention layer that builds its own mask needs (promethean.inference's kernel
    attention): the slot of the first query, and each row's left padding (None: no padding).
    `Transformer` passes it instead of a mask tensor to models whose `attention_reads_slots` is
    set."""

    first_slot: int
    left_padding: torch.Tensor | None


def attention_mask(
    query_slots: torch.Tensor,
    key_slots: torch.Tensor,
    window: int | None,
    left_padding: torch.Tensor | None,
) -> torch.Tensor:
    """Boolean mask (B or 1, 1, Tq, Tk): True where a query may attend to a key."""
    allowed = key_slots[None, :] <= query_slots[:, None]
    if window is not None:
        allowed = allowed & (query_slots[:, None] - key_slots[None, :] < window)
    if left_padding is None:
        return allowed[None, None]
    allowed = allowed[None] & (key_slots[None, None, :] >= left_padding[:, None, None])
    # A padding query would otherwise see no key at all and SDPA would return NaN for it; let it
    # see itself. Its output is never used and no real token attends to it.
    allowed = allowed | (key_slots[None, None, :] == query_slots[None, :, None])
    return allowed[:, None]


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.n_kv_head = config.kv_heads
        self.head_size = config.head_size
        self.window = config.layer_window(layer)
        self.rope_theta = config.layer_rope_theta(layer) if config.position == "rope" else None
        self.scale = (config.query_pre_attn_scalar or config.head_size) ** -0.5
        self.dropout = config.dropout
        inner = self.n_head * self.head_size
        kv_inner = self.n_kv_head * self.head_size
        self.q_proj = Linear(config.n_embd, inner, bias=config.bias)
        self.k_proj = Linear(config.n_embd, kv_inner, bias=config.bias)
        self.v_proj = Linear(config.n_embd, kv_inner, bias=config.bias)
        self.o_proj = Linear(inner, config.n_embd, bias=config.bias)
        self.o_proj.is_residual_projection = True
        # Set by promethean.inference.quantize for inference: q, k and v in one product (one
        # pass over x, one kernel call) in place of the three projections.
        self.qkv_proj: nn.Module | None = None
        if config.qk_norm:
            self.q_norm = RMSNorm(self.head_size, config.norm_eps, config.norm_unit_offset)
            self.k_norm = RMSNorm(self.head_size, config.norm_eps, config.norm_unit_offset)
        else:
            self.q_norm = self.k_norm = None

    def forward(
        self,
        x: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor] | None,
        mask: torch.Tensor | None,
        is_causal: bool,
        layer_cache: LayerKVCache | None,
    ) -> torch.Tensor:
        batch, length, _ = x.shape
        if self.qkv_proj is not None:
            kv_inner = self.n_kv_head * self.head_size
            q, k, v = self.qkv_proj(x).split(
                (self.n_head * self.head_size, kv_inner, kv_inner), dim=-1
            )
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(batch, length, self.n_head, self.head_size).transpose(1, 2)
        k = k.view(batch, length, self.n_kv_head, self.head_size).transpose(1, 2)
        v = v.view(batch, length, self.n_kv_head, self.head_size).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rotary is not None:
            cos, sin = rotary
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if layer_cache is not None:
            k, v = layer_cache.append(k, v)
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            is_causal=is_causal,
            dropout_p=self.dropout if self.training else 0.0,
            scale=self.scale,
            enable_gqa=self.n_kv_head != self.n_head,
        )
        y = y.transpose(1, 2).reshape(batch, length, self.n_head * self.head_size)
        return self.o_proj(y)
