"""How rows (unit vectors and their payload slots) become a subtree of the memory tree
(`promethean.context.tree`).

One leaf when they fit. A larger set of items (a leaf that a batch overfilled, a subtree being
rebuilt) is first cut into k-means cells (k = the leaves it needs, at most MAX_CELLS), and the
binary levels above the cells split them into sides of whole cells, each node routing by the
cells' centroids (nearest wins), so no cell is cut by a hyperplane. Why: clustered data (as
embeddings are) in high dimension has no hyperplane that separates hundreds of clusters, and a
2-means split near the root cut many clusters in two; the halves sat in distant subtrees whose
centroids hardly showed them, and the beam lost them (benchmarks/context.py at n = 1M: recall@10
at beam 16 went from 0.913 with 2-means splits to 0.981 with cells). When no grouping of cells
is even enough, a median cut on the 2-means direction (equal halves) splits instead
(`SubtreeBuilder._bisect`)."""

from __future__ import annotations

import numpy as np

from promethean.context.kmeans import k_means, nearest_centroids, rows_dot, two_means
from promethean.context.tree_nodes import Internal, Leaf, hyperplane_routers

MAX_CELLS = 64  # k of the k-means that splits a large node (see `SubtreeBuilder.build`)


class SubtreeBuilder:
    """Builds subtrees for one tree: its dimension, leaf capacity and imbalance ratio, the random
    generator its k-means draws from, and `leaf_of` (slot -> leaf, the tree's own list, which a
    new leaf updates for the slots it holds)."""

    def __init__(self, dim: int, capacity: int, imbalance_ratio: float, seed: int,
                 leaf_of: list) -> None:
        self.dim, self.capacity, self.imbalance_ratio = dim, capacity, imbalance_ratio
        # A rebuilt node is at most this lopsided, so that it takes on the order of its size in
        # further changes before it exceeds `imbalance_ratio` (what makes rebuilding amortised).
        self.balanced_ratio = (1 + imbalance_ratio) / 2
        self.rng = np.random.default_rng(seed)
        self.leaf_of = leaf_of

    def build(self, vectors: np.ndarray, slots: np.ndarray, balanced: bool):
        """A subtree over these rows: one leaf if they fit; else k-means cells (k = the leaves
        needed, at most MAX_CELLS) split into two sides of whole cells (`_split_cells`), or, when
        no grouping of cells is even enough, a 2-means bisection (`_bisect`)."""
        count = len(vectors)
        if count <= self.capacity:
            return self.leaf(vectors, slots)
        cells = min(MAX_CELLS, -(-count // self.capacity))
        centroids = k_means(vectors, cells, self.rng)
        return self._split_cells(vectors, slots, centroids, nearest_centroids(vectors, centroids), balanced)

    def leaf(self, vectors: np.ndarray, slots: np.ndarray) -> Leaf:
        count = len(vectors)
        leaf = Leaf(self.dim, max(count, min(self.capacity, 2 * count)))
        leaf.vectors[:count] = vectors
        leaf.slots[:count] = slots
        leaf.size = count
        leaf.sum = vectors.sum(0, dtype=np.float64)
        for slot in slots.tolist():
            self.leaf_of[slot] = leaf
        return leaf

    def _split_cells(self, vectors: np.ndarray, slots: np.ndarray, centroids: np.ndarray,
                     labels: np.ndarray, balanced: bool):
        """Two sides of whole k-means cells: the cells ordered along the 2-means direction of
        their centroids, cut where the item counts come nearest to even. A side of one cell is
        built afresh (`build`: new cells inside it); a side of several is split again by the same
        cells, so a cell is never cut. When the most even cut is still lopsided (more than
        `balanced_ratio` when `balanced`, more than `imbalance_ratio` otherwise), `_bisect`."""
        count = len(vectors)
        if count <= self.capacity:
            return self.leaf(vectors, slots)
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
            direction, _ = two_means(centroids, self.rng)
            order = np.argsort(centroids @ direction, kind="stable")
        before = np.cumsum(sizes[order])[:-1]  # items on the first side for each cut
        cut = int(np.argmin(np.abs(2 * before - count))) + 1
        small = int(min(before[cut - 1], count - before[cut - 1]))
        limit = self.balanced_ratio if balanced else self.imbalance_ratio
        if count - small > limit * small:
            return self._bisect(vectors, slots, balanced)
        sides = np.zeros(len(centroids), dtype=np.int8)
        sides[order[cut:]] = 1
        node = Internal(self.dim, centroids, sides)
        for side in (0, 1):
            rows = sides[labels] == side
            cells = np.flatnonzero(sides == side)
            if len(cells) == 1:
                child = self.build(vectors[rows], slots[rows], balanced)
            else:
                remap = np.full(len(centroids), -1, dtype=np.int64)
                remap[cells] = np.arange(len(cells))
                child = self._split_cells(vectors[rows], slots[rows], centroids[cells],
                                          remap[labels[rows]], balanced)
            node.adopt(child)
        return node

    def _bisect(self, vectors: np.ndarray, slots: np.ndarray, balanced: bool):
        """Two sides by the 2-means hyperplane, or by the median of the projections on its
        direction (equal halves) when `balanced` or when 2-means is lopsided."""
        count = len(vectors)
        direction, threshold = two_means(vectors, self.rng)
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
        node = Internal(self.dim, hyperplane_routers(direction, threshold), np.array([0, 1]))
        for part in (side, ~side):
            node.adopt(self.build(vectors[part], slots[part], balanced))
        return node
