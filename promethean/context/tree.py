"""The hierarchical memory tree: embedding vectors with payloads, searched in O(log n).

Geometry. Vectors are L2-normalised on the way in and an item's score for a query is their
**cosine similarity** (a dot product of unit vectors). The search beam ranks nodes by squared
Euclidean distance from the query to their centroids, which for unit vectors orders points as
cosine does.

Shape. A binary tree. A leaf holds up to `capacity` items in one contiguous float32 block, so a
leaf is scored with one matrix-vector product. An internal node keeps each child's vector sum and
count (its centroid and load), updated along the path of every insert and delete, and the rule
that routes an insert: a few routing centroids, each belonging to one child; a vector goes to
the child of its nearest router. A full leaf splits by 2-means (two routers: the hyperplane
between them); a larger set of items (a leaf that a batch overfilled, a subtree being rebuilt) is
cut into k-means cells, and the levels above them route by the cells' centroids, so that no cell
is cut by a hyperplane (`tree_build` says how, and why).

Balance. When a child's load exceeds `imbalance_ratio` (r) times its sibling's (a lopsided split,
or a region that keeps receiving inserts or deletes), the highest such node on the path is
rebuilt, at most (1 + r) / 2 lopsided. As in a scapegoat tree, a rebuilt subtree of n items
needs on the order of n more changes before it can be lopsided again, so rebuilding costs
O(log n) amortised per insert, and since no child holds more than r/(r+1) of its parent, the
depth is at most log base (r+1)/r of n/capacity (+1). A subtree that deletes shrink to half a
leaf is folded back into one leaf; an emptied leaf is removed.

Search. Approximate k-NN descends with a beam of the `beam` nodes nearest the query (by
centroid) to leaves scored exactly (`tree_search`). `exact_search` scores every item, for checks.

Threads. Every public method that reads or changes the tree runs under one re-entrant lock, so
a server's requests can share a tree. Metadata keys in INDEXED_METADATA (the intake's text
hash) are indexed: `ids_with(key, value)` answers from the live items in O(1).

Budget. With `max_items` and/or `max_bytes` set, an insert that goes over budget is followed by
pruning: items are evicted least salient first, the oldest first among equal salience, until
both budgets hold with 2% to spare (so the O(n) ranking is paid once per many inserts).

Rooms. This module is the tree: insert, delete, rebalance, budget, search. Beside it:
`tree_nodes` (leaves and internal nodes), `tree_build` (how rows become a subtree), `kmeans` (the
clustering and the single-threaded products), `tree_search` (the beam), `payloads` (texts,
metadata, salience, the metadata index, the eviction order), `tree_store` (the files: `save`,
`load`, `read_record`, version 1) and `tree_check` (the invariants). The names this module held
before the split are still importable from it.
"""

from __future__ import annotations

import functools
import threading
from pathlib import Path
from typing import Any

import numpy as np

from promethean.context.kmeans import (
    PRODUCT_SIZE_PER_CALL,
    ROWS_PER_PRODUCT,
    SAMPLE_PER_CELL,
    normalise,
    rows_dot,
    rows_matmul,
)
from promethean.context.payloads import INDEXED_METADATA, ITEM_OVERHEAD_BYTES, Memory, PayloadStore
from promethean.context.tree_build import MAX_CELLS, SubtreeBuilder
from promethean.context.tree_check import check_tree
from promethean.context.tree_nodes import (
    Internal,
    Leaf,
    hyperplane_routers,
    leaves_under,
    rows_under,
)
from promethean.context.tree_search import beam_leaves, best_in_leaves
from promethean.context.tree_store import (
    ARRAY_FILES,
    HYPERPLANE_FILES,
    PAYLOAD_FILE,
    ROUTER_FILES,
    TREE_FILE,
    TREE_FORMAT,
    TREE_VERSION,
    load_tree,
    read_tree_record,
    save_tree,
)
from promethean.errors import PrometheanError

PRUNE_SLACK = 0.02  # automatic pruning frees this share of the budget beyond what it must

# What callers import from here (the names that lived in this module before it was split).
__all__ = [
    "ARRAY_FILES", "HYPERPLANE_FILES", "INDEXED_METADATA", "ITEM_OVERHEAD_BYTES", "MAX_CELLS",
    "PAYLOAD_FILE", "PRODUCT_SIZE_PER_CALL", "PRUNE_SLACK", "ROUTER_FILES", "ROWS_PER_PRODUCT",
    "SAMPLE_PER_CELL", "TREE_FILE", "TREE_FORMAT", "TREE_VERSION", "Memory", "MemoryTree",
    "hyperplane_routers", "normalise", "read_tree_record", "rows_dot", "rows_matmul",
]


def _locked(method):
    """Run a method under the tree's lock: one thread at a time changes or reads the tree (a
    server's requests can share one)."""
    @functools.wraps(method)
    def under_lock(self, *args, **kwargs):
        with self._lock:
            return method(self, *args, **kwargs)
    return under_lock


def _check_budget(max_items: int | None, max_bytes: int | None) -> None:
    if max_items is not None and max_items < 1:
        raise PrometheanError(f"max_items must be at least 1, got {max_items}.")
    if max_bytes is not None and max_bytes < 1:
        raise PrometheanError(f"max_bytes must be at least 1, got {max_bytes}.")


class MemoryTree:
    """See the module docstring. Items are added with `add`/`add_many`, found with `search`."""

    def __init__(self, dim: int, capacity: int = 128, imbalance_ratio: float = 3.0,
                 max_items: int | None = None, max_bytes: int | None = None, seed: int = 0) -> None:
        if dim < 1:
            raise PrometheanError(f"the memory tree's dimension must be at least 1, got {dim}.")
        if capacity < 2:
            raise PrometheanError(f"a memory leaf must hold at least 2 items, got {capacity}.")
        if imbalance_ratio <= 1:
            raise PrometheanError(f"the imbalance ratio must exceed 1, got {imbalance_ratio}.")
        _check_budget(max_items, max_bytes)
        self.dim, self.capacity, self.imbalance_ratio = dim, capacity, imbalance_ratio
        self.max_items, self.max_bytes, self.seed = max_items, max_bytes, seed
        self.root: Leaf | Internal = Leaf(dim, capacity)
        self._payloads = PayloadStore(dim)  # by slot; a leaf holds its items' slots
        # slot -> the leaf holding it, grown with the payload columns (`_cover_slots`)
        self._leaf_of: list[Leaf | None] = []
        self._builder = SubtreeBuilder(dim, capacity, imbalance_ratio, seed, self._leaf_of)
        self.rebuilds = 0  # subtrees rebuilt for balance (a statistic)
        self.info: dict[str, Any] = {}  # free-form, saved with the tree (e.g. which embedder)
        self._lock = threading.RLock()

    # --------------------------------------------------------------------------- basics
    def __len__(self) -> int:
        return len(self._payloads.slot_of)

    def __contains__(self, item_id: int) -> bool:
        return int(item_id) in self._payloads.slot_of

    @property
    def total_bytes(self) -> int:
        """What the live items count against `max_bytes` (see `item_bytes`)."""
        return self._payloads.total_bytes

    @_locked
    def ids(self) -> np.ndarray:
        slot_of = self._payloads.slot_of
        return np.fromiter(slot_of, dtype=np.int64, count=len(slot_of))

    def item_bytes(self, text: str, metadata: dict[str, Any] | None) -> int:
        """What an item counts against `max_bytes`: vector, text, metadata (JSON) and fixed
        fields."""
        return self._payloads.item_bytes(text, metadata)

    def depth(self) -> int:
        def walk(node) -> int:
            return 1 if node.is_leaf else 1 + max(walk(c) for c in node.children)
        return walk(self.root)

    def leaves(self) -> list[Leaf]:
        return leaves_under(self.root)

    def ids_with(self, key: str, value: Any) -> set[int]:
        """The live ids whose `metadata[key] == value`, for a key in INDEXED_METADATA (O(1))."""
        with self._lock:
            return self._payloads.ids_with(key, value)

    @_locked
    def metadata_values(self, key: str) -> set:
        """The set of `metadata[key]` over the live memories (those that have the key)."""
        return self._payloads.metadata_values(key)

    @_locked
    def get(self, item_id: int) -> Memory:
        slot = self._payloads.slot_of.get(int(item_id))
        if slot is None:
            raise PrometheanError(f"no memory has id {item_id}.")
        return self._payloads.memory(slot, None)

    @_locked
    def vector(self, item_id: int) -> np.ndarray:
        slot = self._payloads.slot_of[int(item_id)]
        leaf = self._leaf_of[slot]
        return leaf.vectors[int(np.flatnonzero(leaf.slots[: leaf.size] == slot)[0])].copy()

    # --------------------------------------------------------------------------- adding
    def _take_slots(self, count: int) -> np.ndarray:
        slots = self._payloads.take_slots(count)
        self._cover_slots()
        return slots

    def _cover_slots(self) -> None:
        """Grow the slot -> leaf map to the payload columns (in place: the builder shares it)."""
        missing = len(self._payloads.ids) - len(self._leaf_of)
        if missing > 0:
            self._leaf_of.extend([None] * missing)

    @_locked
    def add(self, vector: np.ndarray, text: str = "", salience: float = 1.0,
            metadata: dict[str, Any] | None = None, created: float | None = None) -> int:
        """Insert one item; returns its id. Descends to the nearest leaf (O(depth)). With a
        budget, pruning follows, and may evict the new item itself if it is the least salient."""
        vector = np.asarray(vector, dtype=np.float32).reshape(-1)
        if vector.shape != (self.dim,):
            raise PrometheanError(f"a memory vector must have {self.dim} numbers, got {vector.size}.")
        if not np.isfinite(vector).all():
            raise PrometheanError("a memory vector must hold finite numbers.")
        if not np.isfinite(salience):
            raise PrometheanError(f"a memory's salience must be a finite number, got {salience}.")
        slot = int(self._take_slots(1)[0])
        item_id = self._payloads.register(slot, text, salience, metadata, created)
        unit = normalise(vector)
        node, nearest = self.root, -1
        while not node.is_leaf:  # `Internal`'s routing, inlined: this loop is most of an insert
            if nearest < 0:
                if node.plane is not None:
                    nearest = 0 if float(unit @ node.plane[0]) >= node.plane[1] else 1
                else:
                    nearest = int((node.routers @ unit + node.router_bias).argmax())
            side, nearest = node.side_list[nearest], node.next_router[nearest]
            node = node.children[side]
        lopsided = self._append(node, unit[None], np.array([slot]))
        if lopsided is not None:  # its rebuild takes in the new item (and splits a full leaf)
            self.rebuilds += 1
            vectors, slots = rows_under(lopsided)
            self._replace(lopsided, self._builder.build(vectors, slots, balanced=True))
        elif node.size > self.capacity:  # splitting a leaf leaves the loads above as they were
            self._replace(node, self._builder.build(node.vectors[: node.size],
                                                    node.slots[: node.size], balanced=False))
        self._enforce_budget()
        return item_id

    @_locked
    def add_many(self, vectors: np.ndarray, texts: list[str] | None = None,
                 salience: np.ndarray | list[float] | None = None,
                 metadata: list[dict[str, Any]] | None = None,
                 created: np.ndarray | list[float] | None = None) -> np.ndarray:
        """Insert a batch; returns the ids. Routes the whole batch down the tree at once (one
        vectorised split per node visited), then splits overfull leaves."""
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise PrometheanError(f"memory vectors must be an (n, {self.dim}) array, got shape {vectors.shape}.")
        if not np.isfinite(vectors).all():
            raise PrometheanError("memory vectors must hold finite numbers.")
        count = len(vectors)
        texts, salience, metadata, created = PayloadStore.batch_fields(count, texts, salience,
                                                                       metadata, created)
        if count == 0:
            return np.zeros(0, dtype=np.int64)
        slots = self._take_slots(count)
        ids = np.array([self._payloads.register(int(s), texts[i], float(salience[i]), metadata[i],
                                               float(created[i]))
                        for i, s in enumerate(slots)], dtype=np.int64)
        units = normalise(vectors)
        touched: list[Leaf] = []
        stack: list[tuple[Any, np.ndarray]] = [(self.root, np.arange(count))]
        while stack:
            node, rows = stack.pop()
            if node.is_leaf:
                self._append(node, units[rows], slots[rows])
                touched.append(node)
                continue
            side = node.sides_of(units[rows]) == 0
            if side.any():
                stack.append((node.children[0], rows[side]))
            if not side.all():
                stack.append((node.children[1], rows[~side]))
        for leaf in touched:
            # A leaf that an earlier rebuild in this loop replaced no longer owns its slots.
            if self._leaf_of[int(leaf.slots[0])] is leaf:
                self._after_insert(leaf)
        self._enforce_budget()
        return ids

    def _append(self, leaf: Leaf, units: np.ndarray, slots: np.ndarray) -> Internal | None:
        """Put rows into a leaf (which may overflow its capacity until `_after_insert`); returns
        the highest ancestor that is now lopsided, if any."""
        leaf.append(units, slots, self.capacity)
        for slot in slots.tolist():
            self._leaf_of[slot] = leaf
        # Up the path: loads now; sums when next needed (`current_sum`); and the highest node
        # that is now lopsided (a child heavier than `imbalance_ratio` x its sibling), if any.
        highest, ratio, count = None, self.imbalance_ratio, len(units)
        node = leaf.parent
        while node is not None:
            node.count += count
            node.probe, node.stale = None, True
            a, b = node.children[0].count, node.children[1].count
            if (a if a > b else b) > ratio * max(a if a < b else b, 1):
                highest = node
            node = node.parent
        return highest

    def _after_insert(self, leaf: Leaf) -> None:
        """Split an overfull leaf, then rebuild the highest lopsided ancestor, if any."""
        node: Any = leaf
        if leaf.size > self.capacity:
            node = self._builder.build(leaf.vectors[: leaf.size], leaf.slots[: leaf.size],
                                       balanced=False)
            self._replace(leaf, node)
        self._rebalance_from(node)

    # ------------------------------------------------------------------------ structure
    def _rebalance_from(self, node) -> None:
        highest, ratio = None, self.imbalance_ratio
        if node is not None and node.is_leaf:
            node = node.parent
        while node is not None:  # a child heavier than `ratio` x its sibling: lopsided
            a, b = node.children[0].count, node.children[1].count
            if max(a, b) > ratio * max(min(a, b), 1):
                highest = node
            node = node.parent
        if highest is not None:
            self.rebalance(highest)

    @_locked
    def rebalance(self, node=None) -> None:
        """Rebuild `node`'s subtree (default: the whole tree) by balanced bisection."""
        node = self.root if node is None else node
        vectors, slots = rows_under(node)
        self.rebuilds += 1
        self._replace(node, self._builder.build(vectors, slots, balanced=True))

    def _replace(self, old, new) -> None:
        parent = old.parent
        new.parent = parent
        if parent is None:
            self.root = new
            return
        side = parent.children.index(old)
        parent.children[side] = new
        parent.link(side)
        # Sums and counts above are unchanged: the same items live below.

    # ---------------------------------------------------------------------------- delete
    @_locked
    def delete(self, item_id: int) -> bool:
        """Remove one item by id; returns whether it was there."""
        slot = self._payloads.release(item_id)
        if slot is None:
            return False
        leaf = self._leaf_of[slot]
        position = int(np.flatnonzero(leaf.slots[: leaf.size] == slot)[0])
        vector = leaf.vectors[position].astype(np.float64)
        last = leaf.size - 1
        leaf.vectors[position] = leaf.vectors[last]
        leaf.slots[position] = leaf.slots[last]
        leaf.size = last
        leaf.sum -= vector
        leaf.probe = None
        node = leaf.parent
        while node is not None:
            node.count -= 1
            node.probe, node.stale = None, True
            node = node.parent
        self._leaf_of[slot] = None
        self._shrink_from(leaf)
        return True

    def _shrink_from(self, leaf: Leaf) -> None:
        """After deletes: fold the highest ancestor that fits in half a leaf into one leaf, drop
        an empty leaf, and rebuild a lopsided ancestor."""
        highest, node = None, leaf.parent
        while node is not None:
            if node.count <= self.capacity // 2:
                highest = node
            node = node.parent
        if highest is not None:
            vectors, slots = rows_under(highest)
            new = self._builder.build(vectors.copy(), slots.copy(), balanced=True)
            self._replace(highest, new)
            self._rebalance_from(new.parent)
            return
        if leaf.size == 0 and leaf.parent is not None:
            parent = leaf.parent
            sibling = parent.children[0] if parent.children[1] is leaf else parent.children[1]
            self._replace(parent, sibling)
            self._rebalance_from(sibling.parent)
            return
        self._rebalance_from(leaf.parent)

    # ----------------------------------------------------------------------------- budget
    @_locked
    def set_budget(self, max_items: int | None = None, max_bytes: int | None = None) -> None:
        """Change the budget (None keeps a value as it is); takes effect at the next prune or add."""
        _check_budget(max_items, max_bytes)
        self.max_items = self.max_items if max_items is None else max_items
        self.max_bytes = self.max_bytes if max_bytes is None else max_bytes

    def over_budget(self) -> bool:
        return self.over_budget_for(self.max_items, self.max_bytes)

    @_locked
    def eviction_order(self) -> np.ndarray:
        """Live ids, the first to evict first: lowest salience, then oldest, then lowest id."""
        return self._payloads.ids[self._payloads.eviction_slots()]

    @_locked
    def prune(self, max_items: int | None = None, max_bytes: int | None = None) -> list[int]:
        """Evict least salient (then oldest) items until within the budgets given (default: the
        tree's own); returns the evicted ids, in eviction order."""
        max_items = self.max_items if max_items is None else max_items
        max_bytes = self.max_bytes if max_bytes is None else max_bytes
        if not self.over_budget_for(max_items, max_bytes):
            return []
        evicted = self._payloads.first_to_evict(max_items, max_bytes)  # by `eviction_order`
        for item_id in evicted:
            self.delete(item_id)
        return evicted

    def over_budget_for(self, max_items: int | None, max_bytes: int | None) -> bool:
        return ((max_items is not None and len(self) > max_items)
                or (max_bytes is not None and self.total_bytes > max_bytes))

    def _enforce_budget(self) -> None:
        """After an insert: when over budget, prune to `PRUNE_SLACK` below it, so that the O(n)
        ranking is paid once per many inserts rather than on every one."""
        if self.over_budget():
            self.prune(None if self.max_items is None else self.max_items - int(self.max_items * PRUNE_SLACK),
                       None if self.max_bytes is None else self.max_bytes - int(self.max_bytes * PRUNE_SLACK))

    # ----------------------------------------------------------------------------- search
    @_locked
    def search(self, query: np.ndarray, k: int = 10, beam: int = 32) -> list[Memory]:
        """Approximate top-k by cosine similarity: a beam of `beam` nodes descends the tree,
        then the leaves it ends on are scored exactly."""
        ids, scores = self.search_ids(query, k, beam)
        slot_of = self._payloads.slot_of
        return [self._payloads.memory(slot_of[int(i)], float(s)) for i, s in zip(ids, scores)]

    @_locked
    def search_ids(self, query: np.ndarray, k: int = 10, beam: int = 32) -> tuple[np.ndarray, np.ndarray]:
        """`search` as arrays: (ids, cosine similarities), best first; min(k, len) of them. Cost:
        depth x (2 x beam centroids) + beam leaves of at most `capacity` rows, vectorised."""
        query = self._query(query)
        if beam < 1:
            raise PrometheanError(f"the search beam must be at least 1, got {beam}.")
        if len(self) == 0 or k < 1:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        while True:
            leaves = beam_leaves(self.root, query, beam)
            # Leaves can be small: widen the beam until it holds k items (or the whole tree).
            if sum(leaf.size for leaf in leaves) >= min(k, len(self)):
                break
            beam *= 2
        slots, scores = best_in_leaves(leaves, query, k)
        return self._payloads.ids[slots], scores

    @_locked
    def exact_search(self, query: np.ndarray, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """Every item scored (a check on `search`): ids and cosine similarities, best first."""
        query = self._query(query)
        if len(self) == 0 or k < 1:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        slots, scores = best_in_leaves(self.leaves(), query, k)
        return self._payloads.ids[slots], scores

    def _query(self, query: np.ndarray) -> np.ndarray:
        query = np.asarray(query, dtype=np.float32).reshape(-1)
        if query.shape != (self.dim,):
            raise PrometheanError(f"a query vector must have {self.dim} numbers, got {query.size}.")
        return normalise(query)

    # --------------------------------------------------------- checking and persistence
    @_locked
    def check(self) -> None:
        """Assert the structure's invariants (tests call this): sums, counts, parents, leaves."""
        check_tree(self)

    def settings(self) -> dict[str, Any]:
        return {"dim": self.dim, "capacity": self.capacity, "imbalance_ratio": self.imbalance_ratio,
                "max_items": self.max_items, "max_bytes": self.max_bytes, "seed": self.seed}

    @_locked
    def save(self, directory: str | Path) -> Path:
        """Write the tree atomically (see `tree_store`); returns the directory."""
        return save_tree(self, directory)

    @classmethod
    def load(cls, directory: str | Path) -> MemoryTree:
        """The tree saved in `directory`, exactly as it was."""
        return load_tree(cls, directory)

    @staticmethod
    def read_record(directory: str | Path) -> dict[str, Any]:
        """The checked contents of `directory`'s tree.json (settings, `info`, shape, ...) without
        loading the tree: one sentence naming the file when it is missing or damaged."""
        return read_tree_record(directory)

    @_locked
    def stats(self) -> dict[str, Any]:
        leaves = self.leaves()
        sizes = np.array([leaf.size for leaf in leaves])
        payloads = self._payloads
        salience = payloads.salience[payloads.live_slots()] if len(self) else np.zeros(0)
        return {
            "items": len(self),
            "dim": self.dim,
            "bytes": self.total_bytes,
            "leaves": len(leaves),
            "depth": self.depth(),
            "mean_leaf_fill": float(sizes.mean() / self.capacity) if len(sizes) else 0.0,
            "capacity": self.capacity,
            "max_items": self.max_items,
            "max_bytes": self.max_bytes,
            "salience_min": float(salience.min()) if len(salience) else None,
            "salience_mean": float(salience.mean()) if len(salience) else None,
            "rebuilds": self.rebuilds,
        }
