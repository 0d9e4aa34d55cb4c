"""Causal self-attention for every architecture, and the KV cache that decoding keeps.

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
from promethean.model.layers import Linear, RMSNorm, apply_rotary
from promethean.model.ssm import SSMLayerCache


class LayerKVCache:
    """Keys and values one attention layer has seen: `keys[:, :, :filled]` hold slots
    `first_slot .. first_slot + filled - 1` (buffers may have room after them).

    Global layers keep every slot in a buffer that grows by doubling, so a decode step writes in
    place instead of copying the whole history. Sliding-window layers keep only the slots later
    queries can still see: their memory is bounded however long the generation runs.
    """

    def __init__(self, window: int | None, capacity: int) -> None:
        self.window = window
        self.capacity = capacity
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None
        self.first_slot = 0  # slot of keys[:, :, 0]
        self.filled = 0  # valid slots held

    @property
    def room(self) -> int:
        """Slots that can be written before the buffers must grow (or, windowed, compact)."""
        return 0 if self.keys is None else self.keys.shape[2] - self.filled

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add the new slots and return every key/value the new queries may attend to (the
        slots held before, then the new ones: what `Transformer`'s masks describe)."""
        if self.window is None:
            self.write(keys, values)
            return self.keys.narrow(2, 0, self.filled), self.values.narrow(2, 0, self.filled)
        held_keys, held_values = self.held()
        if held_keys is not None:
            keys = torch.cat((held_keys, keys), dim=2)
            values = torch.cat((held_values, values), dim=2)
        visible = keys, values
        excess = keys.shape[2] - self.window
        if excess > 0:
            keys, values = keys[:, :, excess:], values[:, :, excess:]
            self.first_slot += excess
        self.keys, self.values = keys, values
        self.filled = keys.shape[2]
        return visible

    def write(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Store the new slots after those held, in place (growing the buffers by doubling; a
        windowed layer first forgets the slots no query from the new ones on can see)."""
        new = keys.shape[2]
        if self.room < new:
            self._make_room(new, keys)
        # narrow + copy_: the same writes as slice assignment, without Python's indexing
        # machinery (which costs more than the copy itself at one token per step).
        self.keys.narrow(2, self.filled, new).copy_(keys)
        self.values.narrow(2, self.filled, new).copy_(values)
        self.filled += new

    def _make_room(self, new: int, like: torch.Tensor) -> None:
        if self.window is not None and self.filled > self.window - 1:
            # The first new query sees back to window - 1 slots before it; older ones are done.
            keep = self.window - 1
            drop = self.filled - keep
            if keep:
                kept_keys = self.keys[:, :, drop : self.filled].clone()
                kept_values = self.values[:, :, drop : self.filled].clone()
                self.keys[:, :, :keep] = kept_keys
                self.values[:, :, :keep] = kept_values
            self.first_slot += drop
            self.filled = keep
            if self.room >= new:
                return
        size = 0 if self.keys is None else self.keys.shape[2]
        needed = self.filled + new
        floor = self.capacity if self.window is None else min(self.capacity, 2 * self.window)
        grown = max(needed, floor, 2 * size)
        shape = (*like.shape[:2], grown, like.shape[3])
        grown_keys, grown_values = like.new_empty(shape), like.new_empty(shape)
        if self.keys is not None and self.filled:
            grown_keys[:, :, : self.filled] = self.keys[:, :, : self.filled]
            grown_values[:, :, : self.filled] = self.values[:, :, : self.filled]
        self.keys, self.values = grown_keys, grown_values

    def held(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Views of the keys and values held (None before the first write)."""
        if self.keys is None:
            return None, None
        return self.keys.narrow(2, 0, self.filled), self.values.narrow(2, 0, self.filled)

    # The serving engine's surgery (promethean.inference.engine): rows of different lengths
    # share one slot count, a row's left padding saying where its real tokens begin.
    def pad_left(self, amount: int) -> None:
        """Put `amount` padding slots in front of every row."""
        if self.keys is None or amount <= 0:
            return
        if self.window is not None:  # the keys held are the same; only the slots they sit at move
            self.first_slot += amount
            return
        keys, values = self.held()
        size = self.filled + amount
        shape = (*keys.shape[:2], max(size + 1, 2 * size), keys.shape[3])
        self.keys, self.values = keys.new_zeros(shape), values.new_zeros(shape)
        self.keys[:, :, amount:size] = keys
        self.values[:, :, amount:size] = values
        self.filled = size

    def concat_rows(self, other: "LayerKVCache", length: int) -> None:
        """Append `other`'s rows (both caches at `length` slots, so their slots line up)."""
        mine_keys, mine_values = self.held()
        theirs_keys, theirs_values = other.held()
        if self.window is None:
            size = self.filled
            shape = (mine_keys.shape[0] + theirs_keys.shape[0], mine_keys.shape[1],
                     max(size + 1, 2 * size), mine_keys.shape[3])
            keys, values = mine_keys.new_empty(shape), mine_values.new_empty(shape)
            rows = mine_keys.shape[0]
            keys[:rows, :, :size], keys[rows:, :, :size] = mine_keys, theirs_keys
            values[:rows, :, :size], values[rows:, :, :size] = mine_values, theirs_values
            self.keys, self.values = keys, values
            return
        self.keys = _concat_right_aligned(mine_keys, theirs_keys)
        self.values = _concat_right_aligned(mine_values, theirs_values)
        self.filled = self.keys.shape[2]
        self.first_slot = length - self.filled

    def trim_front(self, amount: int) -> None:
        """Drop the first `amount` slots of every row (padding for all of them)."""
        if self.keys is None or amount <= 0:
            return
        if self.window is None:
            self.keys, self.values = self.keys[:, :, amount:], self.values[:, :, amount:]
            self.filled -= amount
            return
        drop = max(0, amount - self.first_slot)
        self.keys, self.values = self.keys[:, :, drop:], self.values[:, :, drop:]
        self.filled -= drop
        self.first_slot = max(0, self.first_slot - amount)

    def select_rows(self, rows: torch.Tensor) -> None:
        if self.keys is not None:
            self.keys = self.keys[rows]
            self.values = self.values[rows]

    def nbytes(self) -> int:
        if self.keys is None:
            return 0
        return self.keys.numel() * self.keys.element_size() * 2


def _concat_right_aligned(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """Stack two (B, H, T, D) key tensors along the batch, right-aligned along T (zeros in front
    of the shorter: slots that are padding or outside the window for its rows)."""
    size = max(first.shape[2], second.shape[2])

    def grow(tensor: torch.Tensor) -> torch.Tensor:
        missing = size - tensor.shape[2]
        if not missing:
            return tensor
        zeros = tensor.new_zeros((*tensor.shape[:2], missing, tensor.shape[3]))
        return torch.cat((zeros, tensor), dim=2)

    return torch.cat((grow(first), grow(second)), dim=0)


class SlotMask(NamedTuple):
    """What an attention layer that builds its own mask needs (promethean.inference's kernel
    attention): the slot of the first query, and each row's left padding (None: no padding).
    `Transformer` passes it instead of a mask tensor to models whose `attention_reads_slots` is
    set."""

    first_slot: int
    left_padding: torch.Tensor | None


class KVCache:
    """The decoding state of a whole model for a batch of sequences: keys and values for attention
    layers (`LayerKVCache`), a fixed-size recurrent state for SSM layers (`SSMLayerCache`).

    `left_padding[b]` is how many leading slots of row b are padding: those slots are never
    attended to, and row b's positions count from its first real token.
    """

    def __init__(
        self,
        config: ModelConfig,
        batch_size: int,
        capacity: int = 256,
        left_padding: torch.Tensor | None = None,
    ) -> None:
        self.batch_size = batch_size
        self.length = 0  # slots consumed so far, the same for every row
        self.left_padding = left_padding
        self.min_left_padding = 0 if left_padding is None else int(left_padding.min())
        self.layers: list[LayerKVCache | SSMLayerCache] = [
            SSMLayerCache()
            if config.layer_mixer(layer) == "ssm"
            else LayerKVCache(config.layer_window(layer), capacity)
            for layer in range(config.n_layer)
        ]

    def first_key_slot(self, window: int | None) -> int:
        """The slot of the oldest key still held by layers with this window."""
        if window is None:
            return 0
        for layer in self.layers:
            if isinstance(layer, LayerKVCache) and layer.window == window:
                return layer.first_slot
        return 0

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep only some sequences of the batch (e.g. drop finished ones)."""
        for layer in self.layers:
            layer.select_rows(rows)
        if self.left_padding is not None:
            self.left_padding = self.left_padding[rows]
            self.min_left_padding = int(self.left_padding.min())
        self.batch_size = int(rows.numel())

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)


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
