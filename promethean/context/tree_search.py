"""The memory tree's search (`MemoryTree.search_ids`): a beam descends the tree by centroid
distance, and the leaves it ends on are scored exactly, one product per leaf."""

from __future__ import annotations

from typing import Any

import numpy as np

from promethean.context.tree_nodes import Leaf, current_sum


def beam_leaves(root, query: np.ndarray, beam: int) -> list[Leaf]:
    """The leaves a beam of `beam` nodes ends on: level by level, every internal node of the
    frontier is replaced by its children, and the `beam` nodes whose centroids are nearest
    the query are kept (a leaf keeps its distance, computed once, while it stays)."""
    extended = np.append(query, np.float32(1))  # probe @ extended = |c|^2 - 2 c.q
    frontier: list[Any] = [root]
    distances = np.zeros(1, dtype=np.float32)
    while True:
        opened = [i for i, node in enumerate(frontier) if not node.is_leaf]
        if not opened:
            return frontier
        children = [child for i in opened for child in frontier[i].children]
        probes = np.stack([child.probe if child.probe is not None else probe_of(child)
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


def probe_of(node) -> np.ndarray:
    """[-2 c, |c|^2] for the node's centroid c, cached until its sum changes: against
    [q, 1] it gives the squared distance from q to c, less |q|^2 (the same for every node)."""
    total = current_sum(node)
    dim = len(total)
    centroid = total / max(node.count, 1)
    probe = np.empty(dim + 1, dtype=np.float32)
    probe[:dim] = -2 * centroid
    probe[dim] = centroid @ centroid
    node.probe = probe
    return probe


def best_in_leaves(leaves: list[Leaf], query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(slots, cosine similarities) of the min(k, rows) rows of `leaves` nearest `query`, best
    first. One small product per leaf (at most `capacity` rows each): no copy of the vectors,
    and small enough that BLAS does not wake its threads (for a few thousand rows, waking them
    costs more than the product)."""
    scores = np.concatenate([leaf.vectors[: leaf.size] @ query for leaf in leaves])
    slots = np.concatenate([leaf.slots[: leaf.size] for leaf in leaves])
    k = min(k, len(scores))
    best = np.argpartition(-scores, k - 1)[:k]
    best = best[np.argsort(-scores[best], kind="stable")]
    return slots[best], scores[best]
