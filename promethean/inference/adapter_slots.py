"""Many LoRA adapters on one prepared model, in one batch (as S-LoRA and punica serve them).

A batch's rows may each name a different adapter, or none: every projection multiplies all rows
by the base weight once and adds, for each row that has one, its adapter's low-rank update
`scaling * B A x`, computed in the same call (csrc/api.h's LoraArgs) and added in the product's
epilogue after the bias, before the activation, so a gated MLP's gate and up get theirs before
act(gate) * up. No copy of the model is made: an adapter costs its own matrices only.

`AdapterSlots(model, slots)` holds up to `slots` adapters side by side in every `KernelLinear`
they touch (`lora_down` (slots, in, R) = A^T, `lora_up` (slots, R, weight rows) = (scaling B)^T
placed at the rows of its part: q/k/v of the fused qkv projection, gate/up of a gated MLP), in
fp32 for an fp32 model and in bf16 for a bf16 or int8 one (whose activations are bf16 already: it
halves what a decode step reads for its adapters; the sums stay fp32).
Requests `acquire` a slot for their adapter (one already held is shared; otherwise the least
recently used slot no request holds is given to it) and `release` it when they end; the weights
are written into a slot between forward passes, on the engine's thread (`install_pending`), so a
forward never sees a slot change under it. When every slot is held by requests in flight, a new
adapter is refused (`AdapterSlotsFullError`: the server answers 503 with Retry-After).

A row's update depends only on its own values and its adapter (each is summed in a fixed order
over the inputs, then the ranks), so a row gives the same logits, bit for bit, whatever it is
batched with: with the base, with other adapters, or alone (tests/test_adapter_slots.py).
"""

from __future__ import annotations

import threading
from collections.abc import Hashable, Mapping
from dataclasses import dataclass

import torch

from promethean.errors import PrometheanError
from promethean.inference.kernel_layers import (
    AdapterRows,
    KernelAttention,
    KernelLinear,
    KernelMLP,
    KernelSSM,
)
from promethean.model import Transformer


class AdapterSlotsFullError(PrometheanError):
    """Every adapter slot is held by requests in flight (HTTP 503: retry when one finishes)."""


@dataclass(frozen=True)
class LoraTarget:
    """Where a LoRA module of the unprepared model lands in the prepared one: rows
    [first_row, first_row + rows) of the weight of kernel layer `layer`."""

    layer: str
    first_row: int
    rows: int
    in_features: int


def lora_targets(model: Transformer) -> dict[str, LoraTarget]:
    """The name of each `nn.Linear` an adapter may target in the unprepared model (as
    `Adapters` names them: "blocks.0.attn.q_proj", "lm_head") -> its `LoraTarget` in `model`,
    prepared onto the kernels' layers."""
    targets: dict[str, LoraTarget] = {}

    def add(name: str, layer_name: str, layer: KernelLinear, first_row: int, rows: int) -> None:
        targets[name] = LoraTarget(layer_name, first_row, rows, layer.in_features)

    for index, block in enumerate(model.blocks):
        prefix = f"blocks.{index}"
        attention = block.attn
        if isinstance(attention, KernelAttention):
            inner = attention.n_head * attention.head_size
            kv_inner = attention.n_kv_head * attention.head_size
            qkv = f"{prefix}.attn.qkv_proj"
            add(f"{prefix}.attn.q_proj", qkv, attention.qkv_proj, 0, inner)
            add(f"{prefix}.attn.k_proj", qkv, attention.qkv_proj, inner, kv_inner)
            add(f"{prefix}.attn.v_proj", qkv, attention.qkv_proj, inner + kv_inner, kv_inner)
            add(f"{prefix}.attn.o_proj", f"{prefix}.attn.o_proj", attention.o_proj, 0,
                attention.o_proj.out_features)
        if isinstance(block.ssm, KernelSSM):
            for part in ("in_proj", "x_proj", "dt_proj", "out_proj"):
                layer = getattr(block.ssm, part)
                add(f"{prefix}.ssm.{part}", f"{prefix}.ssm.{part}", layer, 0, layer.out_features)
        mlp = block.mlp
        if isinstance(mlp, KernelMLP):
            up, hidden = mlp.up_proj, mlp.up_proj.out_features
            if up.weight_rows == 2 * hidden:  # gate rows, then up rows
                add(f"{prefix}.mlp.gate_proj", f"{prefix}.mlp.up_proj", up, 0, hidden)
                add(f"{prefix}.mlp.up_proj", f"{prefix}.mlp.up_proj", up, hidden, hidden)
            else:
                add(f"{prefix}.mlp.up_proj", f"{prefix}.mlp.up_proj", up, 0, hidden)
            add(f"{prefix}.mlp.down_proj", f"{prefix}.mlp.down_proj", mlp.down_proj, 0,
                mlp.down_proj.out_features)
    if isinstance(model.lm_head, KernelLinear):
        add("lm_head", "lm_head", model.lm_head, 0, model.lm_head.out_features)
    return targets


@dataclass
class LayerUpdate:
    """One kernel layer's share of an adapter: down (in, R) = the parts' A^T side by side, up
    (R, weight rows) = their scaling * B^T at their parts' rows (zeros elsewhere)."""

    down: torch.Tensor
    up: torch.Tensor

    @property
    def rank(self) -> int:
        return self.down.shape[1]


@dataclass
class SlotAdapter:
    """An adapter laid out for `AdapterSlots`: `key` tells versions apart (a name and what was
    read from disk), `layers` maps kernel layer names to their updates."""

    key: Hashable
    name: str
    layers: dict[str, LayerUpdate]

    @property
    def nbytes(self) -> int:
        return sum(u.down.nbytes + u.up.nbytes for u in self.layers.values())


def slot_adapter(model: Transformer, name: str, key: Hashable,
                 matrices: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
                 scaling: float, dtype: torch.dtype = torch.float32) -> SlotAdapter:
    """Lay out an adapter's matrices ({module name: (A (rank, in), B (out, rank))}, the names
    `Adapters` saves) for the kernel layers of `model`, kept in `dtype` (an `AdapterSlots`'
    own, so that what is held for it costs no more than its slot). A module `model` has no
    kernel layer for, or matrices of the wrong shape, are refused with a sentence."""
    targets = lora_targets(model)
    layers = dict(model.named_modules())
    parts: dict[str, list[tuple[LoraTarget, torch.Tensor, torch.Tensor]]] = {}
    for module_name, (a, b) in matrices.items():
        target = targets.get(module_name)
        if target is None:
            raise PrometheanError(
                f"the adapter '{name}' changes '{module_name}', which this model cannot take an "
                "adapter on when served (its layers: q/k/v/o, gate/up/down, the SSM's "
                "projections and the head)."
            )
        rank = a.shape[0]
        if a.dim() != 2 or b.dim() != 2 or tuple(a.shape) != (rank, target.in_features) or \
                tuple(b.shape) != (target.rows, rank):
            raise PrometheanError(
                f"the adapter '{name}' has matrices of shapes {tuple(a.shape)} and "
                f"{tuple(b.shape)} for '{module_name}', which needs ({rank}, "
                f"{target.in_features}) and ({target.rows}, {rank})."
            )
        parts.setdefault(target.layer, []).append((target, a, b))
    updates = {}
    for layer_name, layer_parts in parts.items():
        layer = layers[layer_name]
        total = sum(a.shape[0] for _, a, _ in layer_parts)
        down = torch.zeros(layer.in_features, total)
        up = torch.zeros(total, layer.weight_rows)
        column = 0
        for target, a, b in sorted(layer_parts, key=lambda part: part[0].first_row):
            rank = a.shape[0]
            down[:, column : column + rank] = a.detach().float().t()
            rows = slice(target.first_row, target.first_row + target.rows)
            up[column : column + rank, rows] = b.detach().float().t() * scaling
            column += rank
        updates[layer_name] = LayerUpdate(down.to(dtype).contiguous(), up.to(dtype).contiguous())
    return SlotAdapter(key, name, updates)


class AdapterSlots:
    """Up to `slots` adapters held in `model`'s kernel layers at once (module docstring)."""

    def __init__(self, model: Transformer, slots: int) -> None:
        if slots < 1:
            raise PrometheanError("an adapter pool needs at least one slot.")
        self.model, self.capacity = model, slots
        self.layers = {name: module for name, module in model.named_modules()
                       if isinstance(module, KernelLinear)}
        # The matrices' dtype: bf16 where the model computes in bf16 (module docstring).
        formats = {layer.weight_format for layer in self.layers.values()}
        self.dtype = torch.float32 if formats == {"fp32"} else torch.bfloat16
        self.rows = AdapterRows()
        for layer in self.layers.values():
            layer.adapter_rows = self.rows
        self.held: list[SlotAdapter | None] = [None] * slots  # what each slot holds, or will
        self.users = [0] * slots  # requests queued or running on each slot
        self._last_used = [0] * slots
        self._clock = 0
        self._pending: dict[int, SlotAdapter] = {}  # slots to write before the next forward
        self._lock = threading.Lock()

    def acquire(self, adapter: SlotAdapter) -> int:
        """A slot holding `adapter` for one more request (any thread)."""
        with self._lock:
            self._clock += 1
            for slot, held in enumerate(self.held):
                if held is not None and held.key == adapter.key:
                    self.users[slot] += 1
                    self._last_used[slot] = self._clock
                    return slot
            free = [slot for slot in range(self.capacity) if self.users[slot] == 0]
            if not free:
                raise AdapterSlotsFullError(
                    f"all {self.capacity} adapter slots are in use by requests in flight; "
                    "retry when one of them finishes."
                )
            slot = min(free, key=lambda s: (self.held[s] is not None, self._last_used[s]))
            self.held[slot] = adapter
            self._pending[slot] = adapter
            self.users[slot] = 1
            self._last_used[slot] = self._clock
            return slot

    def release(self, slot: int) -> None:
        with self._lock:
            self.users[slot] -= 1

    def install_pending(self) -> None:
        """Write the adapters given to slots since the last call (the engine's thread, between
        forward passes: no running row reads those slots, which no request held)."""
        with self._lock:
            pending, self._pending = self._pending, {}
        for slot, adapter in pending.items():
            self._write(slot, adapter)

    def set_rows(self, slots: list[int] | None) -> None:
        """The slot of each sequence in the next forward passes (-1: the base; None: all)."""
        self.rows.set(slots)

    @torch.no_grad()
    def _write(self, slot: int, adapter: SlotAdapter) -> None:
        for name, layer in self.layers.items():
            update = adapter.layers.get(name)
            if layer.lora_down is None:
                if update is None:
                    continue
                layer.lora_down = torch.zeros(self.capacity, layer.in_features, update.rank,
                                              dtype=self.dtype)
                layer.lora_up = torch.zeros(self.capacity, update.rank, layer.weight_rows,
                                            dtype=self.dtype)
            held_rank = layer.lora_down.shape[2]
            if update is not None and update.rank > held_rank:
                # A higher rank than any before: every slot's matrices get zero columns (which
                # add nothing to a row's update).
                down = torch.zeros(self.capacity, layer.in_features, update.rank,
                                   dtype=self.dtype)
                up = torch.zeros(self.capacity, update.rank, layer.weight_rows, dtype=self.dtype)
                down[:, :, :held_rank] = layer.lora_down
                up[:, :held_rank] = layer.lora_up
                layer.lora_down, layer.lora_up = down, up
            layer.lora_down[slot].zero_()
            layer.lora_up[slot].zero_()
            if update is not None:
                layer.lora_down[slot, :, : update.rank] = update.down
                layer.lora_up[slot, : update.rank] = update.up

    @property
    def nbytes(self) -> int:
        """Bytes of the slots' matrices in every layer (the model's own weights not counted)."""
        return sum(layer.lora_down.nbytes + layer.lora_up.nbytes
                   for layer in self.layers.values() if layer.lora_down is not None)
