"""The decoding state of a model: keys and values for attention layers, a recurrent state for SSM
layers, and the operations batching needs on them.

A `KVCache` holds one layer cache per block for a batch of sequences. Every row shares one slot
count (`length`), and a row's left padding says where its real tokens begin: positions and masks
(`promethean.model.attention`) handle that for uneven prompts. The serving engine
(`promethean.inference.engine`) keeps one running batch whose rows join and leave at every step;
it does so through the methods here (`pad_left`, `concat_rows`, `select_rows`,
`trim_common_padding`), never by editing the layers' buffers itself.

Keys are stored after rotary embedding at the row's own positions, so shifting a row's slots (left
padding added or trimmed) never changes them; an SSM layer's state has no slots at all and is
simply concatenated or selected by row.
"""

from __future__ import annotations

import torch

from promethean.config import ModelConfig


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

    @property
    def device(self) -> torch.device | None:
        return None if self.keys is None else self.keys.device

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

    # Batching: rows of different lengths share one slot count, a row's left padding saying
    # where its real tokens begin.
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

    # Reuse: a sequence's slots kept after it finished, for prompts that start with it.
    def row_copy(self, row: int, padding: int) -> LayerKVCache:
        """Row `row`'s own slots (a copy), its `padding` leading slots dropped: slot 0 is its
        first real token."""
        copy = LayerKVCache(self.window, self.capacity)
        if self.keys is None:
            return copy
        start = max(0, padding - self.first_slot)  # held slots that are this row's padding
        copy.keys = self.keys[row : row + 1, :, start : self.filled].clone()
        copy.values = self.values[row : row + 1, :, start : self.filled].clone()
        copy.filled = copy.keys.shape[2]
        copy.first_slot = self.first_slot + start - padding
        return copy

    def _prefix_start(self, tokens: int) -> int | None:
        """The first slot a prefill of `tokens` slots leaves held, when this cache still holds
        every slot from there to `tokens`; else None."""
        first = 0 if self.window is None else max(0, tokens - self.window)
        if self.keys is None or first < self.first_slot or tokens > self.first_slot + self.filled:
            return None
        return first

    def prefix(self, tokens: int, capacity: int) -> LayerKVCache | None:
        """This one-row, unpadded cache as a prefill of its first `tokens` slots would have left
        it (a global layer all of them, in buffers of `capacity`; a windowed one the last
        `window`), or None when the slots that needs are no longer held."""
        first = self._prefix_start(tokens)
        if first is None:
            return None
        start, count = first - self.first_slot, tokens - first
        copy = LayerKVCache(self.window, self.capacity)
        size = max(capacity, count + 1) if self.window is None else count
        shape = (*self.keys.shape[:2], size, self.keys.shape[3])
        copy.keys, copy.values = self.keys.new_empty(shape), self.values.new_empty(shape)
        copy.keys[:, :, :count] = self.keys[:, :, start : start + count]
        copy.values[:, :, :count] = self.values[:, :, start : start + count]
        copy.filled, copy.first_slot = count, first
        return copy

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


class SSMLayerCache:
    """What one SSM layer carries from token to token: the last (kernel - 1) inputs of its
    convolution and its state h. Both have a fixed size, so decoding memory does not grow with
    the context; they have no slots, so padding slots added or trimmed leave them as they are."""

    def __init__(self) -> None:
        self.conv_state: torch.Tensor | None = None  # (B, D, kernel - 1), the model's dtype
        self.ssm_state: torch.Tensor | None = None  # (B, D, N), float32

    @property
    def device(self) -> torch.device | None:
        return None if self.ssm_state is None else self.ssm_state.device

    def pad_left(self, amount: int) -> None:
        """Nothing to do: the state has no slots (padding does not move it)."""

    def trim_front(self, amount: int) -> None:
        """Nothing to do: the state has no slots."""

    def concat_rows(self, other: "SSMLayerCache", length: int) -> None:
        """Append `other`'s rows (`length`, the shared slot count, does not concern a state)."""
        self.conv_state = torch.cat((self.conv_state, other.conv_state), dim=0)
        self.ssm_state = torch.cat((self.ssm_state, other.ssm_state), dim=0)

    def select_rows(self, rows: torch.Tensor) -> None:
        if self.conv_state is not None:
            self.conv_state = self.conv_state[rows]
        if self.ssm_state is not None:
            self.ssm_state = self.ssm_state[rows]

    def row_copy(self, row: int, padding: int = 0) -> SSMLayerCache:
        """Row `row`'s state, a copy (`padding` does not concern a state)."""
        copy = SSMLayerCache()
        if self.ssm_state is not None:
            copy.conv_state = self.conv_state[row : row + 1].clone()
            copy.ssm_state = self.ssm_state[row : row + 1].clone()
        return copy

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.conv_state, self.ssm_state) if t is not None)


class KVCache:
    """The decoding state of a whole model for a batch of sequences: keys and values for attention
    layers (`LayerKVCache`), a fixed-size recurrent state for SSM layers (`SSMLayerCache`).

    `length` is the slots consumed so far, the same for every row (the model advances it).
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

    @property
    def device(self) -> torch.device:
        """Where the cache's tensors are (the CPU before anything is held)."""
        for layer in self.layers:
            if layer.device is not None:
                return layer.device
        return torch.device("cpu")

    def first_key_slot(self, window: int | None) -> int:
        """The slot of the oldest key still held by layers with this window."""
        if window is None:
            return 0
        for layer in self.layers:
            if isinstance(layer, LayerKVCache) and layer.window == window:
                return layer.first_slot
        return 0

    def padding_per_row(self) -> torch.Tensor:
        """Each row's left padding, zeros where the cache has none."""
        if self.left_padding is not None:
            return self.left_padding
        return torch.zeros(self.batch_size, dtype=torch.long, device=self.device)

    def _set_left_padding(self, padding: torch.Tensor | None) -> None:
        self.left_padding = padding
        self.min_left_padding = 0 if padding is None else int(padding.min())

    # ---------------------------------------------------------------------------- batching
    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep only some sequences of the batch (e.g. drop finished ones)."""
        for layer in self.layers:
            layer.select_rows(rows)
        if self.left_padding is not None:
            self._set_left_padding(self.left_padding[rows])
        self.batch_size = int(rows.numel())

    def pad_left(self, amount: int) -> None:
        """Add `amount` padding slots in front of every row (so that rows of a longer cache can
        join this one's)."""
        if amount <= 0:
            return
        for layer in self.layers:
            layer.pad_left(amount)
        self._set_left_padding(self.padding_per_row() + amount)
        self.length += amount

    def concat_rows(self, newcomer: KVCache) -> None:
        """Append the rows of `newcomer` (both may be left-padded, of any lengths: the shorter
        is left-padded to the other's length first, so `newcomer` changes too)."""
        self.pad_left(newcomer.length - self.length)
        newcomer.pad_left(self.length - newcomer.length)
        for mine, theirs in zip(self.layers, newcomer.layers):
            mine.concat_rows(theirs, self.length)
        self._set_left_padding(torch.cat((self.padding_per_row(), newcomer.padding_per_row())))
        self.batch_size += newcomer.batch_size

    def trim_common_padding(self) -> None:
        """Drop the leading slots that are padding for every row (after rows have left), so the
        slot count stays that of the longest row."""
        amount = self.min_left_padding
        if self.left_padding is None or amount <= 0:
            return
        for layer in self.layers:
            layer.trim_front(amount)
        self.left_padding = self.left_padding - amount
        self.min_left_padding = 0
        self.length -= amount

    # ------------------------------------------------------------- a step writing in place
    def has_room_for_one_more(self) -> bool:
        """Whether every layer holds keys and values up to `length` in buffers with room for one
        more slot (no SSM layer, none needing to grow or compact first)."""
        # Read inline, not through a method per layer: this runs before every fused decode step.
        for layer in self.layers:
            if not (isinstance(layer, LayerKVCache) and layer.keys is not None and layer.room
                    and layer.first_slot + layer.filled == self.length):
                return False
        return True

    def buffers(self) -> tuple[list[torch.Tensor], list[torch.Tensor], list[int], list[int]]:
        """Per layer: the key buffers, the value buffers, the slot of each buffer's first column
        and the slots held (for a kernel that writes the next slot into them itself, then calls
        `mark_written`)."""
        layers = self.layers
        return ([layer.keys for layer in layers], [layer.values for layer in layers],
                [layer.first_slot for layer in layers], [layer.filled for layer in layers])

    def mark_written(self, new: int) -> None:
        """Count `new` slots that a kernel wrote into every layer's buffers (see `buffers`); the
        model advances `length` itself, as after any forward."""
        for layer in self.layers:
            layer.filled += new

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)

    # ------------------------------------------------------------------------------ reuse
    def row_copy(self, row: int) -> KVCache:
        """Sequence `row` alone (a copy, its left padding dropped): the cache a prefill of that
        sequence by itself leaves, plus what decoding wrote after it."""
        padding = int(self.padding_per_row()[row])
        return KVCache._one_row(self.length - padding,
                                [layer.row_copy(row, padding) for layer in self.layers])

    @classmethod
    def _one_row(cls, length: int, layers: list[LayerKVCache | SSMLayerCache]) -> KVCache:
        """A one-row, unpadded cache of these layers, `length` slots consumed."""
        cache = object.__new__(cls)
        cache.batch_size, cache.length, cache.layers = 1, length, layers
        cache._set_left_padding(None)
        return cache

    def can_prefix(self, tokens: int) -> bool:
        """Whether `prefix(tokens, ...)` can be had (see there), without copying anything."""
        if self.batch_size != 1 or self.left_padding is not None or not 0 < tokens <= self.length:
            return False
        return all(tokens == self.length if isinstance(layer, SSMLayerCache)
                   else layer._prefix_start(tokens) is not None for layer in self.layers)

    def prefix(self, tokens: int, capacity: int) -> KVCache | None:
        """A new one-row cache equal to what prefilling this (one-row, unpadded) cache's first
        `tokens` slots leaves, with room for `capacity` slots; None when it cannot be had: an
        SSM layer's state exists only at the end of what it has read (`tokens` must be all of
        it), and a windowed layer may no longer hold the slots before `tokens`."""
        if not self.can_prefix(tokens):
            return None
        return KVCache._one_row(tokens, [
            layer.row_copy(0) if isinstance(layer, SSMLayerCache)
            else layer.prefix(tokens, capacity)
            for layer in self.layers])
