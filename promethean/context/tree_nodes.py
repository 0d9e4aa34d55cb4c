"""The nodes of the memory tree (`promethean.context.tree`): a leaf holds up to `capacity` unit
vectors in one block; an internal node holds two children, their sum and load, and the routing
centroids that send a vector to one of them."""

from __future__ import annotations

import numpy as np

from promethean.context.kmeans import rows_dot, rows_matmul


class Leaf:
    """Up to `capacity` unit vectors in one block (rows past `size` are spare room), the slots
    of their payloads, and their sum."""

    __slots__ = ("parent", "probe", "size", "slots", "sum", "vectors")

    def __init__(self, dim: int, reserve: int) -> None:
        self.parent: Internal | None = None
        self.vectors = np.empty((max(reserve, 1), dim), dtype=np.float32)
        self.slots = np.empty(max(reserve, 1), dtype=np.int64)
        self.size = 0
        self.sum = np.zeros(dim, dtype=np.float64)
        self.probe: np.ndarray | None = None  # search's cached centroid (see `tree_search.probe_of`)

    is_leaf = True

    @property
    def count(self) -> int:
        return self.size

    def append(self, units: np.ndarray, slots: np.ndarray, capacity: int) -> None:
        """Add rows (the leaf may overflow `capacity` until its tree splits it); the block grows
        by doubling, up to `capacity` rows unless more are needed at once."""
        need = self.size + len(units)
        if need > len(self.vectors):
            reserve = max(need, min(2 * len(self.vectors), capacity))
            vectors = np.empty((reserve, self.vectors.shape[1]), dtype=np.float32)
            vectors[: self.size] = self.vectors[: self.size]
            held = np.empty(reserve, dtype=np.int64)
            held[: self.size] = self.slots[: self.size]
            self.vectors, self.slots = vectors, held
        self.vectors[self.size : need] = units
        self.slots[self.size : need] = slots
        self.size = need
        self.sum += units.sum(0, dtype=np.float64)
        self.probe = None


class Internal:
    """Two children, their total sum and load, and the rule that routes a vector to one of them:
    a few routing centroids (`routers`), each belonging to one child; a vector goes to the child
    of its nearest router (the largest `router @ vector - |router|^2 / 2`). A 2-means split is
    two routers (the hyperplane between them); a k-means split keeps its k cell centroids, so a
    cell is never cut by the hyperplanes of its neighbours."""

    __slots__ = ("children", "count", "next_router", "parent", "plane", "probe", "router_bias",
                 "router_sides", "routers", "routers_t", "side_list", "stale", "sum")

    def __init__(self, dim: int, routers: np.ndarray, sides: np.ndarray) -> None:
        self.parent: Internal | None = None
        self.children: list[Leaf | Internal] = []
        self.sum = np.zeros(dim, dtype=np.float64)
        self.stale = False  # `sum` is out of date (kept lazily: see `current_sum`)
        self.count = 0
        self.probe: np.ndarray | None = None  # search's cached centroid (see `tree_search.probe_of`)
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

    def adopt(self, child) -> None:
        """Take `child` as the next child (0, then 1): its sum and load join this node's."""
        child.parent = self
        self.children.append(child)
        self.sum += child.sum
        self.count += child.count
        self.probe = None
        self.link(len(self.children) - 1)

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


def leaves_under(node) -> list[Leaf]:
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


def rows_under(node) -> tuple[np.ndarray, np.ndarray]:
    """(vectors, slots) of every item under `node`, in leaf order."""
    if node.is_leaf:
        return node.vectors[: node.size], node.slots[: node.size]
    leaves = leaves_under(node)
    vectors = np.concatenate([leaf.vectors[: leaf.size] for leaf in leaves])
    slots = np.concatenate([leaf.slots[: leaf.size] for leaf in leaves])
    return vectors, slots


def current_sum(node) -> np.ndarray:
    """The node's vector sum, brought up to date: inserts and deletes only mark the sums above
    them stale (a numpy add per level was most of an insert's cost at 1M items), and a stale sum
    is redone from its children's, each stale node once."""
    if node.is_leaf or not node.stale:
        return node.sum
    first, second = node.children
    np.add(current_sum(first), current_sum(second), out=node.sum)
    node.stale = False
    return node.sum
