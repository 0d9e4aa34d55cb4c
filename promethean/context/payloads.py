"""What the memory tree keeps beside each vector: an item's id, salience, creation time, text and
metadata, in columns indexed by slot (the tree's leaves hold slots; the slots of deleted items are
reused), what each item counts against the byte budget, an index of the INDEXED_METADATA values,
and the order in which items are evicted."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from promethean.errors import PrometheanError

ITEM_OVERHEAD_BYTES = 8 + 4 + 8  # id, salience, created: what an item costs beside its vector
# Metadata keys whose values are indexed (value -> live ids): the intake's exact-duplicate check
# asks the tree, so that a pruned or deleted text is no longer a duplicate.
INDEXED_METADATA = ("sha256",)


@dataclass(frozen=True)
class Memory:
    """One item as search returns it."""

    id: int
    score: float | None  # cosine similarity to the query (None outside a search)
    text: str
    salience: float
    created: float
    metadata: dict[str, Any] = field(default_factory=dict)


class PayloadStore:
    """The payload columns of a tree of `dim`-dimensional vectors (see the module docstring).
    Not locked: the tree that owns it holds the lock."""

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self.ids = np.zeros(0, dtype=np.int64)
        self.salience = np.zeros(0, dtype=np.float32)
        self.created = np.zeros(0, dtype=np.float64)
        self.bytes = np.zeros(0, dtype=np.int64)
        self.texts: list[str] = []
        self.metadata: list[dict[str, Any]] = []
        self.slot_of: dict[int, int] = {}  # live id -> slot
        self.free: list[int] = []  # slots of deleted items
        self.used = 0  # slots handed out so far (the high-water mark of the columns)
        self.next_id = 0
        self.total_bytes = 0
        self.index: dict[str, dict[Any, set[int]]] = {key: {} for key in INDEXED_METADATA}

    def __len__(self) -> int:
        return len(self.slot_of)

    def item_bytes(self, text: str, metadata: dict[str, Any] | None) -> int:
        """What an item counts against `max_bytes`: vector, text, metadata (JSON) and fixed
        fields."""
        meta = len(json.dumps(metadata, ensure_ascii=False).encode()) if metadata else 0
        return self.dim * 4 + len(text.encode()) + meta + ITEM_OVERHEAD_BYTES

    def take_slots(self, count: int) -> np.ndarray:
        """`count` free slots: those of deleted items first, then never-used ones (the columns
        grow by doubling, so growth costs O(1) amortised per item)."""
        reused = [self.free.pop() for _ in range(min(count, len(self.free)))]
        fresh = count - len(reused)
        if self.used + fresh > len(self.ids):
            self._grow(max(self.used + fresh, 2 * len(self.ids), 64))
        slots = reused + list(range(self.used, self.used + fresh))
        self.used += fresh
        return np.array(slots, dtype=np.int64)

    def _grow(self, size: int) -> None:
        extra = size - len(self.ids)
        self.ids = np.concatenate([self.ids, np.zeros(extra, np.int64)])
        self.salience = np.concatenate([self.salience, np.zeros(extra, np.float32)])
        self.created = np.concatenate([self.created, np.zeros(extra, np.float64)])
        self.bytes = np.concatenate([self.bytes, np.zeros(extra, np.int64)])
        self.texts.extend([""] * extra)
        self.metadata.extend([{}] * extra)

    @staticmethod
    def batch_fields(count: int, texts, salience, metadata, created) -> tuple:
        """(texts, saliences, metadata, creation times) of a batch of `count` new items, checked,
        with the defaults ("", 1.0, {}, now) for those not given."""
        texts = texts if texts is not None else [""] * count
        salience = np.ones(count) if salience is None else np.asarray(salience, dtype=np.float64)
        metadata = metadata if metadata is not None else [None] * count
        now = time.time()
        created = np.full(count, now) if created is None else np.asarray(created, dtype=np.float64)
        if not (len(texts) == len(salience) == len(metadata) == len(created) == count):
            raise PrometheanError("add_many needs as many texts, saliences, metadata and times "
                                  "as vectors.")
        if not np.isfinite(salience).all():
            raise PrometheanError("every memory's salience must be a finite number.")
        return texts, salience, metadata, created

    def register(self, slot: int, text: str, salience: float, metadata, created) -> int:
        """Fill a slot with a new item; returns its id (ids are never reused)."""
        if not np.isfinite(salience):
            raise PrometheanError(f"a memory's salience must be a finite number, got {salience}.")
        item_id = self.next_id
        self.next_id += 1
        self.ids[slot] = item_id
        self.salience[slot] = salience
        self.created[slot] = time.time() if created is None else created
        self.texts[slot] = text
        self.metadata[slot] = dict(metadata or {})
        self.index_item(slot, item_id, add=True)
        self.bytes[slot] = self.item_bytes(text, metadata)
        self.total_bytes += int(self.bytes[slot])
        self.slot_of[item_id] = slot
        return item_id

    def release(self, item_id: int) -> int | None:
        """Forget an item; returns the slot it held (now free), or None when no item has the id."""
        slot = self.slot_of.pop(int(item_id), None)
        if slot is None:
            return None
        self.total_bytes -= int(self.bytes[slot])
        self.index_item(slot, int(item_id), add=False)
        self.texts[slot], self.metadata[slot] = "", {}
        self.free.append(slot)
        return slot

    def restore(self, ids, salience, created, texts, metadata, next_id: int) -> None:
        """Fill an empty store from saved columns (slots 0..n-1, in the order given)."""
        count = len(ids)
        self.take_slots(count)
        self.next_id = next_id
        self.ids[:count] = ids
        self.salience[:count] = salience
        self.created[:count] = created
        self.texts[:count] = list(texts)
        self.metadata[:count] = [dict(m) for m in metadata]
        for slot in range(count):
            self.bytes[slot] = self.item_bytes(self.texts[slot], self.metadata[slot])
            self.slot_of[int(self.ids[slot])] = slot
            self.index_item(slot, int(self.ids[slot]), add=True)
        self.total_bytes = int(self.bytes.sum())

    def memory(self, slot: int, score: float | None) -> Memory:
        return Memory(int(self.ids[slot]), score, self.texts[slot], float(self.salience[slot]),
                      float(self.created[slot]), self.metadata[slot])

    def live_slots(self) -> np.ndarray:
        return np.fromiter(self.slot_of.values(), dtype=np.int64, count=len(self.slot_of))

    def eviction_slots(self) -> np.ndarray:
        """The live slots, the first to evict first: lowest salience, then oldest, then lowest
        id."""
        slots = self.live_slots()
        return slots[np.lexsort((self.ids[slots], self.created[slots], self.salience[slots]))]

    def first_to_evict(self, max_items: int | None, max_bytes: int | None) -> list[int]:
        """The ids to evict, in eviction order, for the live items to fit in `max_items` items
        and `max_bytes` bytes (None: no limit): the fewest first ones of `eviction_slots`."""
        order = self.eviction_slots()
        evict_count = 0
        if max_items is not None:
            evict_count = max(evict_count, len(order) - max_items)
        if max_bytes is not None and self.total_bytes > max_bytes:
            freed = np.cumsum(self.bytes[order])
            needed = self.total_bytes - max_bytes
            evict_count = max(evict_count, int(np.searchsorted(freed, needed)) + 1)
        return self.ids[order[:evict_count]].tolist()

    # --------------------------------------------------------------------- metadata index
    def index_item(self, slot: int, item_id: int, add: bool) -> None:
        for key, index in self.index.items():
            value = self.metadata[slot].get(key)
            if not isinstance(value, (str, int, float, bool)):
                continue
            if add:
                index.setdefault(value, set()).add(item_id)
            else:
                held = index.get(value)
                if held is not None:
                    held.discard(item_id)
                    if not held:
                        del index[value]

    def ids_with(self, key: str, value: Any) -> set[int]:
        """The live ids whose `metadata[key] == value`, for a key in INDEXED_METADATA (O(1))."""
        if key not in self.index:
            raise PrometheanError(f"memory metadata '{key}' is not indexed; indexed keys: "
                                  f"{', '.join(INDEXED_METADATA)}.")
        return set(self.index[key].get(value, ()))

    def metadata_values(self, key: str) -> set:
        """The set of `metadata[key]` over the live memories (those that have the key)."""
        return {self.metadata[slot][key] for slot in self.slot_of.values()
                if key in self.metadata[slot]}
