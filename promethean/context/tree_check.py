"""The memory tree's invariants, asserted (tests call `MemoryTree.check`, which runs this): sums,
counts, parents, leaf capacity, balance, the slot -> leaf map and the router links."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from promethean.context.tree_nodes import current_sum

if TYPE_CHECKING:
    from promethean.context.tree import MemoryTree


def check_tree(tree: MemoryTree) -> None:
    """Assert the structure's invariants (the caller holds the tree's lock)."""
    seen = 0
    stack = [tree.root]
    assert tree.root.parent is None
    while stack:
        node = stack.pop()
        if node.is_leaf:
            assert node.size <= tree.capacity
            for slot in node.slots[: node.size].tolist():
                assert tree._leaf_of[slot] is node
            np.testing.assert_allclose(node.sum, node.vectors[: node.size].sum(0, dtype=np.float64),
                                       atol=1e-3)
            seen += node.size
        else:
            assert len(node.children) == 2
            assert node.count == sum(c.count for c in node.children)
            np.testing.assert_allclose(current_sum(node), current_sum(node.children[0])
                                       + current_sum(node.children[1]), atol=1e-3)
            assert node.count > 0
            a, b = sorted(c.count for c in node.children)
            assert b <= tree.imbalance_ratio * max(a, 1), "a lopsided node was not rebuilt"
            for child in node.children:
                assert child.parent is node
            for router, following in enumerate(node.next_router):
                if following >= 0:  # the same router leads on in that child
                    child = node.children[int(node.router_sides[router])]
                    assert not child.is_leaf
                    assert np.array_equal(child.routers[following], node.routers[router])
            stack.extend(node.children)
    assert seen == len(tree)
