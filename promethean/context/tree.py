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
between them). A larger set of items (a leaf that a batch overfilled, a subtree being rebuilt) is
first cut into k-means cells (k = the leaves it needs, at most MAX_CELLS), and the binary levels
above the cells split them into sides of whole cells, each node routing by the cells' centroids
(nearest wins), so no cell is cut by a hyperplane. Why: clustered data (as embeddings are) in
high dimension has no hyperplane that separates hundreds of clusters, and a 2-means split near
the root cut many clusters in two; the halves sat in distant subtrees whose centroids hardly
showed them, and the beam lost them (benchmarks/context.py at n = 1M: recall@10 at beam 16 went
from 0.913 with 2-means splits to 0.981 with cells). When no grouping of cells is even enough, a median cut
on the 2-means direction (equal halves) splits instead.

Balance. When a child's load exceeds `imbalance_ratio` (r) times its sibling's (a lopsided split,
or a region that keeps receiving inserts or deletes), the highest such node on the path is
rebuilt, at most (1 + r) / 2 lopsided. As in a scapegoat tree, a rebuilt subtree of n items
needs on the order of n more changes before it can be lopsided again, so rebuilding costs
O(log n) amortised per insert, and since no child holds more than r/(r+1) of its parent, the
depth is at most log base (r+1)/r of n/capacity (+1). A subtree that deletes shrink to half a
leaf is folded back into one leaf; an emptied leaf is removed.

Search. Approximate k-NN descends with a beam: the frontier of `beam` nodes closest to the
query (by centroid; each node's centroid is cached until its sum changes) is expanded level by
level until it holds only leaves, whose items are scored exactly, one product per leaf.
`exact_search` scores every item, for checks.

Threads. Every public method that reads or changes the tree runs under one re-entrant lock, so
a server's requests can share a tree. Metadata keys in INDEXED_METADATA (the intake's text
hash) are indexed: `ids_with(key, value)` answers from the live items in O(1).

Budget. With `max_items` and/or `max_bytes` set, an insert that goes over budget is followed by
pruning: items are evicted least salient first, the oldest first among equal salience, until
both budgets hold with 2% to spare (so the O(n) ranking is paid once per many inserts).

Persistence. `save(directory)` writes numpy arrays (`vectors.npy` in leaf order, `ids.npy`,
`salience.npy`, `created.npy`, and the routing centroids `routers.npy` + `router_sides.npy` +
`router_counts.npy`, per internal node in preorder) and JSON (`tree.json`: settings, the tree's shape in preorder, `info`; `payloads.json`: texts
and metadata) through `atomic_directory`, so a crash mid-save leaves the previous copy
loadable; `load` rebuilds exactly the same tree (and reads version 1, which kept one
hyperplane per node, as two routers). Nothing is pickled.
"""

from __future__ import annotations

import functools
import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from promethean.errors import PrometheanError
from promethean.files import atomic_directory

TREE_FORMAT = "promethean-memory-tree"
TREE_VERSION = 2  # version 1 (one hyperplane per internal node) is still read
TREE_FILE = "tree.json"
PAYLOAD_FILE = "payloads.json"
ARRAY_FILES = ("vectors", "ids", "salience", "created")
ROUTER_FILES = ("routers", "router_sides", "router_counts")
HYPERPLANE_FILES = ("directions", "thresholds")  # version 1
ITEM_OVERHEAD_BYTES = 8 + 4 + 8  # id, salience, created: what an item costs beside its vector
# Metadata keys whose values are indexed (value -> live ids): the intake's exact-duplicate check
# asks the tree, so that a pruned or deleted text is no longer a duplicate.
INDEXED_METADATA = ("sha256",)
PRUNE_SLACK = 0.02  # automatic pruning frees this share of the budget beyond what it must


class _Leaf:
    """Up to `capacity` unit vectors in one block (rows past `size` are spare room), the slots
    of their payloads, and their sum."""

    __slots__ = ("parent", "probe", "size", "slots", "sum", "vectors")

    def __init__(self, dim: int, reserve: int) -> None:
        self.parent: _Internal | None = None
        self.vectors = np.empty((max(reserve, 1), dim), dtype=np.float32)
        self.slots = np.empty(max(reserve, 1), dtype=np.int64)
        self.size = 0
        self.sum = np.zeros(dim, dtype=np.float64)
        self.probe: np.ndarray | None = None  # search's cached centroid (see `_probe`)

    is_leaf = True

    @property
    def count(self) -> int:
        return self.size


class _Internal:
    """Two children, their total sum and load, and the rule that routes a vector to one of them:
    a few routing centroids (`routers`), each belonging to one child; a vector goes to the child
    of its nearest router (the largest `router @ vector - |router|^2 / 2`). A 2-means split is
    two routers (the hyperplane between them); a k-means split keeps its k cell centroids, so a
    cell is never cut by the hyperplanes of its neighbours."""

    __slots__ = ("children", "count", "next_router", "parent", "plane", "probe", "router_bias",
                 "router_sides", "routers", "routers_t", "side_list", "stale", "sum")

    def __init__(self, dim: int, routers: np.ndarray, sides: np.ndarray) -> None:
        self.parent: _Internal | None = None
        self.children: list[_Leaf | _Internal] = []
        self.sum = np.zeros(dim, dtype=np.float64)
        self.stale = False  # `sum` is out of date (kept lazily: see `MemoryTree._sum`)
        self.count = 0
        self.probe: np.ndarray | None = None  # search's cached centroid (see `_probe`)
        self.routers = np.ascontiguousarray(routers, dtype=np.float32)
        self.routers_t = np.ascontiguousarray(self.routers.T)  # (see rows_matmul)
        wide = self.routers.astype(np.float64)
        self.router_bias = -0.5 * (wide * wide).sum(1)
        self.router_sides = np.asarray(sides, dtype=np.int8)
        self.side_list: list[int] = self.router_sides.tolist()  # (plain ints: a faster descent)
        # Two routers: the first wins when `x @ (r0 - r1) >= bias1 - bias0` (one product).
        self.plane = ((self.routers[0] - self.routers[1], float(self.router_bias[1] - self.router_bias[0]))
                      if len(self.routers) == 2 else None)
        # For each router, its index among the routers of the child it leads to, when that
        # child's routers are a subset of this node's (the binary levels above k-means cells),
        # else -1: the nearest router here is the nearest there, so an insert need not ask again.
        self.next_router: list[int] = [-1] * len(self.routers)

    is_leaf = False

    def side_of(self, unit: np.ndarray) -> int:
        return self.route(unit, -1)[0]

    def route(self, unit: np.ndarray, nearest: int) -> tuple[int, int]:
        """(the child `unit` goes to, the index of its nearest router there or -1). `nearest`:
        the index of its nearest router here, when the parent knew it (-1: not known)."""
        if nearest < 0:
            if self.plane is not None:  # two routers: which side of the hyperplane between them
                direction, offset = self.plane
                nearest = 0 if float(unit @ direction) >= offset else 1
            else:
                nearest = int((self.routers @ unit + self.router_bias).argmax())
        return self.side_list[nearest], self.next_router[nearest]

    def link(self, side: int) -> None:
        """Fill `next_router` for the routers that lead to child `side` (after it changed)."""
        mine = [index for index, value in enumerate(self.side_list) if value == side]
        for index in mine:
            self.next_router[index] = -1
        child = self.children[side]
        if child.is_leaf:
            return
        rows = {self.routers[index].tobytes(): index for index in mine}
        found = [rows.get(row.tobytes(), -1) for row in child.routers]
        if min(found) >= 0:  # every router there is one of these
            for position, index in enumerate(found):
                self.next_router[index] = position

    def sides_of(self, units: np.ndarray) -> np.ndarray:
        """The child (0 or 1) of each row."""
        if self.plane is not None:
            direction, offset = self.plane
            return np.where(rows_dot(units, direction) >= offset, self.router_sides[0],
                            self.router_sides[1])
        scores = rows_matmul(units, self.routers_t) + self.router_bias.astype(np.float32)
        return self.router_sides[np.argmax(scores, axis=1)]


def hyperplane_routers(direction: np.ndarray, threshold: float) -> np.ndarray:
    """Two routers whose boundary is `x @ direction = threshold`, the first on the `>=` side:
    c0, c1 = m +- direction / 2 with m = threshold * direction / |direction|^2."""
    direction = np.asarray(direction, dtype=np.float64)
    middle = threshold * direction / max(float(direction @ direction), 1e-30)
    return np.stack([middle + direction / 2, middle - direction / 2])


@dataclass(frozen=True)
class Memory:
    """One item as search returns it."""

    id: int
    score: float | None  # cosine similarity to the query (None outside a search)
    text: str
    salience: float
    created: float
    metadata: dict[str, Any] = field(default_factory=dict)


def normalise(vectors: np.ndarray) -> np.ndarray:
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


ROWS_PER_PRODUCT = 1024
MAX_CELLS = 64  # k of the k-means that splits a large node (see `_build`)
# k-means is fitted on this many rows per cell: a cell's centroid averages many clusters, and
# each cluster needs enough rows in it for its points to be told apart from the rest.
SAMPLE_PER_CELL = 512


def rows_dot(matrix: np.ndarray, vector: np.ndarray) -> np.ndarray:
    """`matrix @ vector` in blocks of ROWS_PER_PRODUCT rows. Above ~2,000 rows OpenBLAS hands a
    matrix-vector product to its threads, and waking them costs milliseconds on a busy machine
    (measured: 7.6 ms for 2,881 x 256 where 1,472 x 256 took 0.02 ms); in blocks the product
    stays on one core at memory speed."""
    if len(matrix) <= ROWS_PER_PRODUCT:
        return matrix @ vector
    return np.concatenate([matrix[start : start + ROWS_PER_PRODUCT] @ vector
                           for start in range(0, len(matrix), ROWS_PER_PRODUCT)])


PRODUCT_SIZE_PER_CALL = 2**19  # rows x inner x columns of one rows_matmul block


def rows_matmul(matrix: np.ndarray, other: np.ndarray) -> np.ndarray:
    """`matrix @ other` for a thin `other` (a few columns), in blocks of rows small enough
    (rows x inner x columns <= PRODUCT_SIZE_PER_CALL, at most 64 rows) that OpenBLAS keeps to
    one thread: waking its threads costs far more than these products on a busy machine
    (measured: 10,000 x 256 @ 256 x 16 took 26 ms in one call, 2.8 ms in blocks of 64 rows;
    @ 256 x 64 in blocks of 64 rows, 940 ms, in blocks of 32, 4.8 ms). `other` is made
    C-contiguous: a transposed view took the threaded path even in blocks."""
    other = np.ascontiguousarray(other)
    rows = int(min(64, max(1, PRODUCT_SIZE_PER_CALL // max(other.shape[0] * other.shape[1], 1))))
    if len(matrix) <= rows:
        return matrix @ other
    return np.concatenate([matrix[start : start + rows] @ other
                           for start in range(0, len(matrix), rows)])


def _two_means_centroids(vectors: np.ndarray, rng: np.random.Generator,
                         iterations: int = 6) -> np.ndarray:
    """The two 2-means centroids of `vectors` (fitted on a sample of at most 2048 rows, from a
    farthest-point start), as a (2, dim) array."""
    sample = vectors if len(vectors) <= 2048 else vectors[rng.choice(len(vectors), 2048, replace=False)]
    sample = sample.astype(np.float64)
    first = sample[rng.integers(len(sample))]
    # Farthest-point start: the point farthest from a random one, then the farthest from that.
    c0 = sample[np.argmax(((sample - first) ** 2).sum(1))]
    c1 = sample[np.argmax(((sample - c0) ** 2).sum(1))]
    for _ in range(iterations):
        side = rows_dot(sample, c0 - c1) >= (c0 @ c0 - c1 @ c1) / 2
        if side.all() or not side.any():
            break
        c0, c1 = sample[side].mean(0), sample[~side].mean(0)
    return np.stack([c0, c1])


def _two_means(vectors: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, float]:
    """The boundary between the two 2-means clusters of `vectors`: a row is on the first side
    when `row @ direction >= threshold`."""
    c0, c1 = _two_means_centroids(vectors, rng)
    return c0 - c1, float(c0 @ c0 - c1 @ c1) / 2


def _k_means(vectors: np.ndarray, groups: int, rng: np.random.Generator,
             iterations: int = 8) -> np.ndarray:
    """Up to `groups` k-means centroids of `vectors` (k-means++ start, Lloyd steps, fitted on a
    sample of at most max(2048, SAMPLE_PER_CELL x groups) rows); centroids that end up empty are dropped.
    Two groups: `_two_means_centroids` (cheaper, and what splits a full leaf)."""
    if groups <= 2:
        return _two_means_centroids(vectors, rng)
    limit = max(2048, SAMPLE_PER_CELL * groups)
    sample = vectors if len(vectors) <= limit else vectors[rng.choice(len(vectors), limit, replace=False)]
    sample = sample.astype(np.float32)
    norms = (sample * sample).sum(1)
    chosen = [int(rng.integers(len(sample)))]
    nearest = np.maximum(norms + norms[chosen[0]] - 2 * rows_dot(sample, sample[chosen[0]]), 0)
    for _ in range(1, groups):
        total = float(nearest.sum())
        if total <= 0:
            break
        pick = int(rng.choice(len(sample), p=nearest / total))
        chosen.append(pick)
        nearest = np.minimum(nearest, np.maximum(norms + norms[pick] - 2 * rows_dot(sample, sample[pick]), 0))
    centroids = sample[chosen].astype(np.float64)
    for _ in range(iterations):
        labels = _nearest(sample, centroids)
        counts = np.bincount(labels, minlength=len(centroids))
        filled = counts > 0
        order = np.argsort(labels, kind="stable")
        starts = np.concatenate([[0], np.cumsum(counts[filled])[:-1]])
        sums = np.add.reduceat(sample[order].astype(np.float64), starts, axis=0)
        centroids = sums / counts[filled, None]
    return centroids


def _nearest(vectors: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """The index of each row's nearest centroid."""
    bias = (-0.5 * (centroids * centroids).sum(1)).astype(np.float32)
    return np.argmax(rows_matmul(vectors, centroids.T.astype(np.float32)) + bias, axis=1)


def _locked(method):
    """Run a method under the tree's lock: one thread at a time changes or reads the tree (a
    server's requests can share one)."""
    @functools.wraps(method)
    def under_lock(self, *args, **kwargs):
        with self._lock:
            return method(self, *args, **kwargs)
    return under_lock



def _leaves_under(node) -> list:
    """Every leaf of the subtree at `node` (iteratively: a deep tree must not hit the recursion
    limit)."""
    out, stack = [], [node]
    while stack:
        current = stack.pop()
        if current.is_leaf:
            out.append(current)
        else:
            stack.extend(current.children)
    return out

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
        if max_items is not None and max_items < 1:
            raise PrometheanError(f"max_items must be at least 1, got {max_items}.")
        if max_bytes is not None and max_bytes < 1:
            raise PrometheanError(f"max_bytes must be at least 1, got {max_bytes}.")
        self.dim, self.capacity, self.imbalance_ratio = dim, capacity, imbalance_ratio
        # A rebuilt node is at most this lopsided, so that it takes on the order of its size in
        # further changes before it exceeds `imbalance_ratio` (what makes rebuilding amortised).
        self.balanced_ratio = (1 + imbalance_ratio) / 2
        self.max_items, self.max_bytes, self.seed = max_items, max_bytes, seed
        self._rng = np.random.default_rng(seed)
        self.root: _Leaf | _Internal = _Leaf(dim, capacity)
        # Payload columns, indexed by slot; slots of deleted items are reused.
        self._ids = np.zeros(0, dtype=np.int64)
        self._salience = np.zeros(0, dtype=np.float32)
        self._created = np.zeros(0, dtype=np.float64)
        self._bytes = np.zeros(0, dtype=np.int64)
        self._texts: list[str] = []
        self._metadata: list[dict[str, Any]] = []
        self._leaf_of: list[_Leaf | None] = []
        self._slot_of: dict[int, int] = {}
        self._free: list[int] = []  # slots of deleted items
        self._used = 0  # slots handed out so far (the high-water mark of the columns)
        self._next_id = 0
        self.total_bytes = 0
        self.rebuilds = 0  # subtrees rebuilt for balance (a statistic)
        self.info: dict[str, Any] = {}  # free-form, saved with the tree (e.g. which embedder)
        self._index: dict[str, dict[Any, set[int]]] = {key: {} for key in INDEXED_METADATA}
        self._lock = threading.RLock()

    # --------------------------------------------------------------------------- basics
    def __len__(self) -> int:
        return len(self._slot_of)

    def __contains__(self, item_id: int) -> bool:
        return int(item_id) in self._slot_of

    @_locked
    def ids(self) -> np.ndarray:
        return np.fromiter(self._slot_of, dtype=np.int64, count=len(self._slot_of))

    def item_bytes(self, text: str, metadata: dict[str, Any] | None) -> int:
        """What an item counts against `max_bytes`: vector, text, metadata (JSON) and fixed
        fields."""
        meta = len(json.dumps(metadata, ensure_ascii=False).encode()) if metadata else 0
        return self.dim * 4 + len(text.encode()) + meta + ITEM_OVERHEAD_BYTES

    def depth(self) -> int:
        def walk(node) -> int:
            return 1 if node.is_leaf else 1 + max(walk(c) for c in node.children)
        return walk(self.root)

    def leaves(self) -> list[_Leaf]:
        return _leaves_under(self.root)

    def ids_with(self, key: str, value: Any) -> set[int]:
        """The live ids whose `metadata[key] == value`, for a key in INDEXED_METADATA (O(1))."""
        if key not in self._index:
            raise PrometheanError(f"memory metadata '{key}' is not indexed; indexed keys: "
                                  f"{', '.join(INDEXED_METADATA)}.")
        with self._lock:
            return set(self._index[key].get(value, ()))

    def _index_item(self, slot: int, item_id: int, add: bool) -> None:
        for key, index in self._index.items():
            value = self._metadata[slot].get(key)
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

    @_locked
    def metadata_values(self, key: str) -> set:
        """The set of `metadata[key]` over the live memories (those that have the key)."""
        return {self._metadata[slot][key] for slot in self._slot_of.values()
                if key in self._metadata[slot]}

    @_locked
    def get(self, item_id: int) -> Memory:
        slot = self._slot_of.get(int(item_id))
        if slot is None:
            raise PrometheanError(f"no memory has id {item_id}.")
        return self._memory(slot, None)

    @_locked
    def vector(self, item_id: int) -> np.ndarray:
        slot = self._slot_of[int(item_id)]
        leaf = self._leaf_of[slot]
        return leaf.vectors[int(np.flatnonzero(leaf.slots[: leaf.size] == slot)[0])].copy()

    def _memory(self, slot: int, score: float | None) -> Memory:
        return Memory(int(self._ids[slot]), score, self._texts[slot], float(self._salience[slot]),
                      float(self._created[slot]), self._metadata[slot])

    # --------------------------------------------------------------------------- adding
    def _take_slots(self, count: int) -> np.ndarray:
        """`count` free slots: those of deleted items first, then never-used ones (the columns
        grow by doubling, so growth costs O(1) amortised per item)."""
        reused = [self._free.pop() for _ in range(min(count, len(self._free)))]
        fresh = count - len(reused)
        if self._used + fresh > len(self._ids):
            self._grow_columns(max(self._used + fresh, 2 * len(self._ids), 64))
        slots = reused + list(range(self._used, self._used + fresh))
        self._used += fresh
        return np.array(slots, dtype=np.int64)

    def _grow_columns(self, size: int) -> None:
        extra = size - len(self._ids)
        self._ids = np.concatenate([self._ids, np.zeros(extra, np.int64)])
        self._salience = np.concatenate([self._salience, np.zeros(extra, np.float32)])
        self._created = np.concatenate([self._created, np.zeros(extra, np.float64)])
        self._bytes = np.concatenate([self._bytes, np.zeros(extra, np.int64)])
        self._texts.extend([""] * extra)
        self._metadata.extend([{}] * extra)
        self._leaf_of.extend([None] * extra)

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
        item_id = self._register(slot, text, salience, metadata, created)
        unit = normalise(vector)
        node, nearest = self.root, -1
        while not node.is_leaf:  # `_Internal.route`, inlined: this loop is most of an insert
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
            vectors, slots = self._gather(lopsided)
            self._replace(lopsided, self._build(vectors, slots, balanced=True))
        elif node.size > self.capacity:  # splitting a leaf leaves the loads above as they were
            self._replace(node, self._build(node.vectors[: node.size], node.slots[: node.size],
                                            balanced=False))
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
        texts = texts if texts is not None else [""] * count
        salience = np.ones(count) if salience is None else np.asarray(salience, dtype=np.float64)
        metadata = metadata if metadata is not None else [None] * count
        now = time.time()
        created = np.full(count, now) if created is None else np.asarray(created, dtype=np.float64)
        if not (len(texts) == len(salience) == len(metadata) == len(created) == count):
            raise PrometheanError("add_many needs as many texts, saliences, metadata and times as vectors.")
        if not np.isfinite(salience).all():
            raise PrometheanError("every memory's salience must be a finite number.")
        if count == 0:
            return np.zeros(0, dtype=np.int64)
        slots = self._take_slots(count)
        ids = np.array([self._register(int(s), texts[i], float(salience[i]), metadata[i], float(created[i]))
                        for i, s in enumerate(slots)], dtype=np.int64)
        units = normalise(vectors)
        touched: list[_Leaf] = []
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

    def _register(self, slot: int, text: str, salience: float, metadata, created) -> int:
        if not np.isfinite(salience):
            raise PrometheanError(f"a memory's salience must be a finite number, got {salience}.")
        item_id = self._next_id
        self._next_id += 1
        self._ids[slot] = item_id
        self._salience[slot] = salience
        self._created[slot] = time.time() if created is None else created
        self._texts[slot] = text
        self._metadata[slot] = dict(metadata or {})
        self._index_item(slot, item_id, add=True)
        self._bytes[slot] = self.item_bytes(text, metadata)
        self.total_bytes += int(self._bytes[slot])
        self._slot_of[item_id] = slot
        return item_id

    def _append(self, leaf: _Leaf, units: np.ndarray, slots: np.ndarray) -> _Internal | None:
        """Put rows into a leaf (which may overflow its capacity until `_after_insert`); returns
        the highest ancestor that is now lopsided, if any."""
        need = leaf.size + len(units)
        if need > len(leaf.vectors):
            reserve = max(need, min(2 * len(leaf.vectors), self.capacity))
            vectors = np.empty((reserve, self.dim), dtype=np.float32)
            vectors[: leaf.size] = leaf.vectors[: leaf.size]
            held = np.empty(reserve, dtype=np.int64)
            held[: leaf.size] = leaf.slots[: leaf.size]
            leaf.vectors, leaf.slots = vectors, held
        leaf.vectors[leaf.size : need] = units
        leaf.slots[leaf.size : need] = slots
        leaf.size = need
        added = units.sum(0, dtype=np.float64)
        for slot in slots.tolist():
            self._leaf_of[slot] = leaf
        leaf.sum += added
        leaf.probe = None
        # Up the path: loads now; sums when next needed (`_sum`); and the highest node that is now
        # lopsided (a child heavier than `imbalance_ratio` x its sibling), if any.
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

    def _after_insert(self, leaf: _Leaf) -> None:
        """Split an overfull leaf, then rebuild the highest lopsided ancestor, if any."""
        node: Any = leaf
        if leaf.size > self.capacity:
            node = self._build(leaf.vectors[: leaf.size], leaf.slots[: leaf.size], balanced=False)
            self._replace(leaf, node)
        self._rebalance_from(node)

    def _sum(self, node) -> np.ndarray:
        """The node's vector sum, brought up to date: inserts and deletes only mark the sums
        above them stale (a numpy add per level was most of an insert's cost at 1M items), and
        a stale sum is redone from its children's, each stale node once."""
        if node.is_leaf or not node.stale:
            return node.sum
        first, second = node.children
        np.add(self._sum(first), self._sum(second), out=node.sum)
        node.stale = False
        return node.sum

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
        vectors, slots = self._gather(node)
        self.rebuilds += 1
        self._replace(node, self._build(vectors, slots, balanced=True))

    def _gather(self, node) -> tuple[np.ndarray, np.ndarray]:
        if node.is_leaf:
            return node.vectors[: node.size], node.slots[: node.size]
        leaves = _leaves_under(node)
        vectors = np.concatenate([leaf.vectors[: leaf.size] for leaf in leaves])
        slots = np.concatenate([leaf.slots[: leaf.size] for leaf in leaves])
        return vectors, slots

    def _build(self, vectors: np.ndarray, slots: np.ndarray, balanced: bool):
        """A subtree over these rows: one leaf if they fit; else k-means cells (k = the leaves
        needed, at most MAX_CELLS) split into two sides of whole cells (`_split_cells`), or, when
        no grouping of cells is even enough, a 2-means bisection (`_bisect`)."""
        count = len(vectors)
        if count <= self.capacity:
            return self._leaf(vectors, slots)
        cells = min(MAX_CELLS, -(-count // self.capacity))
        centroids = _k_means(vectors, cells, self._rng)
        return self._split_cells(vectors, slots, centroids, _nearest(vectors, centroids), balanced)

    def _leaf(self, vectors: np.ndarray, slots: np.ndarray) -> _Leaf:
        count = len(vectors)
        leaf = _Leaf(self.dim, max(count, min(self.capacity, 2 * count)))
        leaf.vectors[:count] = vectors
        leaf.slots[:count] = slots
        leaf.size = count
        leaf.sum = vectors.sum(0, dtype=np.float64)
        for slot in slots.tolist():
            self._leaf_of[slot] = leaf
        return leaf

    def _split_cells(self, vectors: np.ndarray, slots: np.ndarray, centroids: np.ndarray,
                     labels: np.ndarray, balanced: bool):
        """Two sides of whole k-means cells: the cells ordered along the 2-means direction of
        their centroids, cut where the item counts come nearest to even. A side of one cell is
        built afresh (`_build`: new cells inside it); a side of several is split again by the same
        cells, so a cell is never cut. When the most even cut is still lopsided (more than
        `balanced_ratio` when `balanced`, more than `imbalance_ratio` otherwise), `_bisect`."""
        count = len(vectors)
        if count <= self.capacity:
            return self._leaf(vectors, slots)
        sizes = np.bincount(labels, minlength=len(centroids))
        present = np.flatnonzero(sizes)
        if len(present) < 2:
            return self._bisect(vectors, slots, balanced)
        if len(present) < len(centroids):
            remap = np.full(len(centroids), -1, dtype=np.int64)
            remap[present] = np.arange(len(present))
            centroids, labels, sizes = centroids[present], remap[labels], sizes[present]
        if len(centroids) == 2:
            order = np.arange(2)
        else:
            direction, _ = _two_means(centroids, self._rng)
            order = np.argsort(centroids @ direction, kind="stable")
        before = np.cumsum(sizes[order])[:-1]  # items on the first side for each cut
        cut = int(np.argmin(np.abs(2 * before - count))) + 1
        small = int(min(before[cut - 1], count - before[cut - 1]))
        limit = self.balanced_ratio if balanced else self.imbalance_ratio
        if count - small > limit * small:
            return self._bisect(vectors, slots, balanced)
        sides = np.zeros(len(centroids), dtype=np.int8)
        sides[order[cut:]] = 1
        node = _Internal(self.dim, centroids, sides)
        for side in (0, 1):
            rows = sides[labels] == side
            cells = np.flatnonzero(sides == side)
            if len(cells) == 1:
                child = self._build(vectors[rows], slots[rows], balanced)
            else:
                remap = np.full(len(centroids), -1, dtype=np.int64)
                remap[cells] = np.arange(len(cells))
                child = self._split_cells(vectors[rows], slots[rows], centroids[cells],
                                          remap[labels[rows]], balanced)
            self._adopt(node, child)
        return node

    def _bisect(self, vectors: np.ndarray, slots: np.ndarray, balanced: bool):
        """Two sides by the 2-means hyperplane, or by the median of the projections on its
        direction (equal halves) when `balanced` or when 2-means is lopsided."""
        count = len(vectors)
        direction, threshold = _two_means(vectors, self._rng)
        projection = rows_dot(vectors, direction.astype(np.float32))
        side = None
        if not balanced:
            side = projection >= threshold
            small = int(min(side.sum(), count - side.sum()))
            if count - small > self.imbalance_ratio * small:  # lopsided (or degenerate)
                side = None
        if side is None:  # median cut: equal halves (ties broken by order)
            order = np.argsort(projection, kind="stable")
            side = np.zeros(count, dtype=bool)
            side[order[count // 2 :]] = True
            threshold = float(projection[order[count // 2]])
        node = _Internal(self.dim, hyperplane_routers(direction, threshold), np.array([0, 1]))
        for part in (side, ~side):
            self._adopt(node, self._build(vectors[part], slots[part], balanced))
        return node

    @staticmethod
    def _adopt(node: _Internal, child) -> None:
        child.parent = node
        node.children.append(child)
        node.sum += child.sum
        node.count += child.count
        node.probe = None
        node.link(len(node.children) - 1)

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
        slot = self._slot_of.pop(int(item_id), None)
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
        self.total_bytes -= int(self._bytes[slot])
        self._index_item(slot, int(item_id), add=False)
        self._texts[slot], self._metadata[slot] = "", {}
        self._free.append(slot)
        self._shrink_from(leaf)
        return True

    def _shrink_from(self, leaf: _Leaf) -> None:
        """After deletes: fold the highest ancestor that fits in half a leaf into one leaf, drop
        an empty leaf, and rebuild a lopsided ancestor."""
        highest, node = None, leaf.parent
        while node is not None:
            if node.count <= self.capacity // 2:
                highest = node
            node = node.parent
        if highest is not None:
            vectors, slots = self._gather(highest)
            new = self._build(vectors.copy(), slots.copy(), balanced=True)
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
        if max_items is not None and max_items < 1:
            raise PrometheanError(f"max_items must be at least 1, got {max_items}.")
        if max_bytes is not None and max_bytes < 1:
            raise PrometheanError(f"max_bytes must be at least 1, got {max_bytes}.")
        self.max_items = self.max_items if max_items is None else max_items
        self.max_bytes = self.max_bytes if max_bytes is None else max_bytes

    def over_budget(self) -> bool:
        return self.over_budget_for(self.max_items, self.max_bytes)

    def _live_slots(self) -> np.ndarray:
        return np.fromiter(self._slot_of.values(), dtype=np.int64, count=len(self._slot_of))

    @_locked
    def eviction_order(self) -> np.ndarray:
        """Live ids, the first to evict first: lowest salience, then oldest, then lowest id."""
        slots = self._live_slots()
        order = np.lexsort((self._ids[slots], self._created[slots], self._salience[slots]))
        return self._ids[slots[order]]

    @_locked
    def prune(self, max_items: int | None = None, max_bytes: int | None = None) -> list[int]:
        """Evict least salient (then oldest) items until within the budgets given (default: the
        tree's own); returns the evicted ids, in eviction order."""
        max_items = self.max_items if max_items is None else max_items
        max_bytes = self.max_bytes if max_bytes is None else max_bytes
        if not self.over_budget_for(max_items, max_bytes):
            return []
        slots = self._live_slots()
        order = slots[np.lexsort((self._ids[slots], self._created[slots], self._salience[slots]))]
        evict_count = 0
        if max_items is not None:
            evict_count = max(evict_count, len(order) - max_items)
        if max_bytes is not None and self.total_bytes > max_bytes:
            freed = np.cumsum(self._bytes[order])
            needed = self.total_bytes - max_bytes
            evict_count = max(evict_count, int(np.searchsorted(freed, needed)) + 1)
        evicted = self._ids[order[:evict_count]].tolist()
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
        return [self._memory(self._slot_of[int(i)], float(s)) for i, s in zip(ids, scores)]

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
            leaves = self._beam_leaves(query, beam)
            # Leaves can be small: widen the beam until it holds k items (or the whole tree).
            if sum(leaf.size for leaf in leaves) >= min(k, len(self)):
                break
            beam *= 2
        # One small product per leaf (at most `capacity` rows each): no copy of the vectors, and
        # small enough that BLAS does not wake its threads (for a few thousand rows, waking them
        # costs more than the product).
        scores = np.concatenate([leaf.vectors[: leaf.size] @ query for leaf in leaves])
        slots = np.concatenate([leaf.slots[: leaf.size] for leaf in leaves])
        return self._top(scores, slots, k)

    def _beam_leaves(self, query: np.ndarray, beam: int) -> list[_Leaf]:
        """The leaves a beam of `beam` nodes ends on: level by level, every internal node of the
        frontier is replaced by its children, and the `beam` nodes whose centroids are nearest
        the query are kept (a leaf keeps its distance, computed once, while it stays)."""
        extended = np.append(query, np.float32(1))  # probe @ extended = |c|^2 - 2 c.q
        frontier: list[Any] = [self.root]
        distances = np.zeros(1, dtype=np.float32)
        while True:
            opened = [i for i, node in enumerate(frontier) if not node.is_leaf]
            if not opened:
                return frontier
            children = [child for i in opened for child in frontier[i].children]
            probes = np.stack([child.probe if child.probe is not None else self._probe(child)
                               for child in children])
            child_distances = probes @ extended
            if len(opened) < len(frontier):
                staying = [i for i, node in enumerate(frontier) if node.is_leaf]
                frontier = [frontier[i] for i in staying] + children
                distances = np.concatenate([distances[staying], child_distances])
            else:
                frontier, distances = children, child_distances
            if len(frontier) > beam:
                keep = np.argpartition(distances, beam - 1)[:beam]
                frontier = [frontier[i] for i in keep.tolist()]
                distances = distances[keep]

    def _probe(self, node) -> np.ndarray:
        """[-2 c, |c|^2] for the node's centroid c, cached until its sum changes: against
        [q, 1] it gives the squared distance from q to c, less |q|^2 (the same for every node)."""
        centroid = self._sum(node) / max(node.count, 1)
        probe = np.empty(self.dim + 1, dtype=np.float32)
        probe[: self.dim] = -2 * centroid
        probe[self.dim] = centroid @ centroid
        node.probe = probe
        return probe

    @_locked
    def exact_search(self, query: np.ndarray, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """Every item scored (a check on `search`): ids and cosine similarities, best first."""
        query = self._query(query)
        if len(self) == 0 or k < 1:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        leaves = self.leaves()
        scores = np.concatenate([leaf.vectors[: leaf.size] @ query for leaf in leaves])
        slots = np.concatenate([leaf.slots[: leaf.size] for leaf in leaves])
        return self._top(scores, slots, k)

    def _query(self, query: np.ndarray) -> np.ndarray:
        query = np.asarray(query, dtype=np.float32).reshape(-1)
        if query.shape != (self.dim,):
            raise PrometheanError(f"a query vector must have {self.dim} numbers, got {query.size}.")
        return normalise(query)

    def _top(self, scores: np.ndarray, slots: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        k = min(k, len(scores))
        best = np.argpartition(-scores, k - 1)[:k]
        best = best[np.argsort(-scores[best], kind="stable")]
        return self._ids[slots[best]], scores[best]

    # -------------------------------------------------------------------------- checking
    @_locked
    def check(self) -> None:
        """Assert the structure's invariants (tests call this): sums, counts, parents, leaves."""
        seen = 0
        stack = [self.root]
        assert self.root.parent is None
        while stack:
            node = stack.pop()
            if node.is_leaf:
                assert node.size <= self.capacity
                for slot in node.slots[: node.size].tolist():
                    assert self._leaf_of[slot] is node
                np.testing.assert_allclose(node.sum, node.vectors[: node.size].sum(0, dtype=np.float64),
                                           atol=1e-3)
                seen += node.size
            else:
                assert len(node.children) == 2
                assert node.count == sum(c.count for c in node.children)
                np.testing.assert_allclose(self._sum(node), self._sum(node.children[0])
                                           + self._sum(node.children[1]), atol=1e-3)
                assert node.count > 0
                a, b = sorted(c.count for c in node.children)
                assert b <= self.imbalance_ratio * max(a, 1), "a lopsided node was not rebuilt"
                for child in node.children:
                    assert child.parent is node
                for router, following in enumerate(node.next_router):
                    if following >= 0:  # the same router leads on in that child
                        child = node.children[int(node.router_sides[router])]
                        assert not child.is_leaf
                        assert np.array_equal(child.routers[following], node.routers[router])
                stack.extend(node.children)
        assert seen == len(self)

    # ------------------------------------------------------------------------- persistence
    def settings(self) -> dict[str, Any]:
        return {"dim": self.dim, "capacity": self.capacity, "imbalance_ratio": self.imbalance_ratio,
                "max_items": self.max_items, "max_bytes": self.max_bytes, "seed": self.seed}

    @_locked
    def save(self, directory: str | Path) -> Path:
        """Write the tree atomically (see the module docstring); returns the directory."""
        directory = Path(directory)
        shape: list[int] = []  # preorder: -1 for an internal node, the item count for a leaf
        leaves: list[_Leaf] = []
        internals: list[_Internal] = []
        stack = [self.root]
        while stack:
            node = stack.pop()
            if node.is_leaf:
                shape.append(node.size)
                leaves.append(node)
            else:
                shape.append(-1)
                internals.append(node)
                stack.extend(reversed(node.children))
        routers = (np.concatenate([n.routers for n in internals]) if internals
                   else np.zeros((0, self.dim), np.float32))
        router_sides = (np.concatenate([n.router_sides for n in internals]) if internals
                        else np.zeros(0, np.int8))
        router_counts = np.array([len(n.routers) for n in internals], dtype=np.int64)
        slots = (np.concatenate([leaf.slots[: leaf.size] for leaf in leaves]) if leaves
                 else np.zeros(0, np.int64))
        vectors = (np.concatenate([leaf.vectors[: leaf.size] for leaf in leaves]) if leaves
                   else np.zeros((0, self.dim), np.float32))
        record = {"format": TREE_FORMAT, "version": TREE_VERSION, "settings": self.settings(),
                  "next_id": self._next_id, "items": len(slots), "shape": shape, "info": self.info}
        payloads = {"texts": [self._texts[s] for s in slots.tolist()],
                    "metadata": [self._metadata[s] for s in slots.tolist()]}
        with atomic_directory(directory) as scratch:
            np.save(scratch / "vectors.npy", vectors)
            np.save(scratch / "ids.npy", self._ids[slots])
            np.save(scratch / "salience.npy", self._salience[slots])
            np.save(scratch / "created.npy", self._created[slots])
            np.save(scratch / "routers.npy", routers)
            np.save(scratch / "router_sides.npy", router_sides)
            np.save(scratch / "router_counts.npy", router_counts)
            (scratch / PAYLOAD_FILE).write_text(json.dumps(payloads, ensure_ascii=False))
            (scratch / TREE_FILE).write_text(json.dumps(record, indent=1) + "\n")
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> MemoryTree:
        directory = Path(directory)
        path = directory / TREE_FILE
        if not path.is_file():
            raise PrometheanError(f"{directory} holds no memory tree ({TREE_FILE} is missing).")
        try:
            record = json.loads(path.read_text())
            payloads = json.loads((directory / PAYLOAD_FILE).read_text())
            version = record.get("version") if record.get("format") == TREE_FORMAT else None
            splits = ROUTER_FILES if version == TREE_VERSION else HYPERPLANE_FILES
            if version in (1, TREE_VERSION):
                arrays = {name: np.load(directory / f"{name}.npy", allow_pickle=False)
                          for name in (*ARRAY_FILES, *splits)}
        except (OSError, ValueError) as error:
            raise PrometheanError(f"the memory tree in {directory} cannot be read ({error}).") from None
        if version not in (1, TREE_VERSION):
            raise PrometheanError(f"{path} is not a version-{TREE_VERSION} Promethean memory tree.")
        count = record["items"]
        if any(len(arrays[name]) != count for name in ARRAY_FILES) or len(payloads["texts"]) != count:
            raise PrometheanError(f"the memory tree in {directory} is damaged: its files disagree "
                                  "on how many items it holds.")
        tree = cls(**record["settings"])
        tree._next_id = record["next_id"]
        tree.info = dict(record.get("info", {}))
        tree._take_slots(count)  # slots 0..count-1, in file order
        tree._ids[:count] = arrays["ids"]
        tree._salience[:count] = arrays["salience"]
        tree._created[:count] = arrays["created"]
        tree._texts[:count] = list(payloads["texts"])
        tree._metadata[:count] = [dict(m) for m in payloads["metadata"]]
        for slot in range(count):
            tree._bytes[slot] = tree.item_bytes(tree._texts[slot], tree._metadata[slot])
            tree._slot_of[int(tree._ids[slot])] = slot
            tree._index_item(slot, int(tree._ids[slot]), add=True)
        tree.total_bytes = int(tree._bytes.sum())
        vectors = arrays["vectors"].astype(np.float32)
        shape = iter(record["shape"])
        if version == 1:  # version 1 kept one hyperplane per node: two routers each
            splits = iter([(hyperplane_routers(direction, threshold), np.array([0, 1]))
                           for direction, threshold in zip(arrays["directions"], arrays["thresholds"])])
        else:
            bounds = np.concatenate([[0], np.cumsum(arrays["router_counts"])])
            if bounds[-1] != len(arrays["routers"]) or bounds[-1] != len(arrays["router_sides"]):
                raise PrometheanError(f"the memory tree in {directory} is damaged: its routing "
                                      "files disagree.")
            splits = iter([(arrays["routers"][a:b], arrays["router_sides"][a:b])
                           for a, b in zip(bounds[:-1], bounds[1:])])
        offset = 0

        def build():
            nonlocal offset
            size = next(shape)
            if size >= 0:
                if size > tree.capacity:
                    raise PrometheanError(f"the memory tree in {directory} is damaged (a leaf "
                                          f"holds {size} items, more than its capacity).")
                rows = np.arange(offset, offset + size)
                offset += size
                return tree._leaf(vectors[rows], rows)
            routers, sides = next(splits)
            node = _Internal(tree.dim, routers, sides)
            for _ in range(2):
                tree._adopt(node, build())
            return node

        try:
            tree.root = build()
        except StopIteration:
            raise PrometheanError(f"the memory tree in {directory} is damaged (its shape is cut short).") from None
        if offset != count:
            raise PrometheanError(f"the memory tree in {directory} is damaged (its shape does not cover its items).")
        return tree

    @_locked
    def stats(self) -> dict[str, Any]:
        leaves = self.leaves()
        sizes = np.array([leaf.size for leaf in leaves])
        salience = self._salience[[self._slot_of[int(i)] for i in self.ids()]] if len(self) else np.zeros(0)
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
