"""The memory tree on disk: one directory per tree, written whole or not at all.

Files. Numpy arrays: `vectors.npy` (in leaf order), `ids.npy`, `salience.npy`, `created.npy`, and
the routing centroids `routers.npy` + `router_sides.npy` + `router_counts.npy` (per internal node,
in preorder). JSON: `tree.json` (the format and version, the tree's settings, the next id, the
item count, the tree's shape in preorder, and `info`, e.g. which embedder made the vectors) and
`payloads.json` (texts and metadata). Nothing is pickled.

`save_tree` writes them through `atomic_directory`, so a crash mid-save leaves the previous copy
loadable; `load_tree` rebuilds exactly the same tree, and reads version 1, which kept one
hyperplane per internal node (`directions.npy`, `thresholds.npy`), as two routers per node.
`read_tree_record` is the one reader of `tree.json`: whatever is wrong with it is one sentence
that names the file. (Saving and loading read and fill the tree's own rooms, its payload store
and its subtree builder: this module is the tree's, not a client of it.)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from promethean.context.tree_nodes import Internal, hyperplane_routers
from promethean.errors import PrometheanError
from promethean.files import atomic_directory

if TYPE_CHECKING:
    from promethean.context.tree import MemoryTree

TREE_FORMAT = "promethean-memory-tree"
TREE_VERSION = 2  # version 1 (one hyperplane per internal node) is still read
TREE_FILE = "tree.json"
PAYLOAD_FILE = "payloads.json"
ARRAY_FILES = ("vectors", "ids", "salience", "created")
ROUTER_FILES = ("routers", "router_sides", "router_counts")
HYPERPLANE_FILES = ("directions", "thresholds")  # version 1
# What tree.json must hold beside its format and version: (key, type, the type in words).
RECORD_FIELDS = (("settings", dict, "an object"), ("next_id", int, "a whole number"),
                 ("items", int, "a whole number"), ("shape", list, "a list"),
                 ("info", dict, "an object"))


def read_tree_record(directory: str | Path) -> dict[str, Any]:
    """The checked contents of a memory directory's `tree.json`: a version-1 or version-2 record
    with every field of RECORD_FIELDS (`info` may be absent: it reads as {}). Raises one sentence
    naming the file when it is missing, unreadable, not JSON, or not such a record."""
    directory = Path(directory)
    path = directory / TREE_FILE
    if not path.is_file():
        raise PrometheanError(f"{directory} holds no memory tree ({TREE_FILE} is missing).")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise PrometheanError(f"{path} cannot be read ({error.strerror or error}).") from None
    except ValueError as error:  # not JSON, or not UTF-8
        raise PrometheanError(f"{path} is damaged: it is not JSON ({error}).") from None
    if not isinstance(record, dict) or record.get("format") != TREE_FORMAT \
            or record.get("version") not in (1, TREE_VERSION):
        raise PrometheanError(f"{path} is not a version-{TREE_VERSION} Promethean memory tree.")
    record = {"info": {}, **record}
    for key, kind, words in RECORD_FIELDS:
        value = record.get(key)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise PrometheanError(f"{path} is damaged: its '{key}' is missing or not {words}.")
    return record


def save_tree(tree: MemoryTree, directory: str | Path) -> Path:
    """Write `tree` to `directory` atomically (the caller holds the tree's lock)."""
    directory = Path(directory)
    shape: list[int] = []  # preorder: -1 for an internal node, the item count for a leaf
    leaves, internals = [], []
    stack = [tree.root]
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
               else np.zeros((0, tree.dim), np.float32))
    router_sides = (np.concatenate([n.router_sides for n in internals]) if internals
                    else np.zeros(0, np.int8))
    router_counts = np.array([len(n.routers) for n in internals], dtype=np.int64)
    slots = (np.concatenate([leaf.slots[: leaf.size] for leaf in leaves]) if leaves
             else np.zeros(0, np.int64))
    vectors = (np.concatenate([leaf.vectors[: leaf.size] for leaf in leaves]) if leaves
               else np.zeros((0, tree.dim), np.float32))
    payloads = tree._payloads
    record = {"format": TREE_FORMAT, "version": TREE_VERSION, "settings": tree.settings(),
              "next_id": payloads.next_id, "items": len(slots), "shape": shape, "info": tree.info}
    texts_and_metadata = {"texts": [payloads.texts[s] for s in slots.tolist()],
                          "metadata": [payloads.metadata[s] for s in slots.tolist()]}
    with atomic_directory(directory) as scratch:
        np.save(scratch / "vectors.npy", vectors)
        np.save(scratch / "ids.npy", payloads.ids[slots])
        np.save(scratch / "salience.npy", payloads.salience[slots])
        np.save(scratch / "created.npy", payloads.created[slots])
        np.save(scratch / "routers.npy", routers)
        np.save(scratch / "router_sides.npy", router_sides)
        np.save(scratch / "router_counts.npy", router_counts)
        (scratch / PAYLOAD_FILE).write_text(json.dumps(texts_and_metadata, ensure_ascii=False))
        (scratch / TREE_FILE).write_text(json.dumps(record, indent=1) + "\n")
    return directory


def load_tree(tree_class: type[MemoryTree], directory: str | Path) -> MemoryTree:
    """The tree saved in `directory`, exactly as it was saved (see the module docstring)."""
    directory = Path(directory)
    record = read_tree_record(directory)
    path, version = directory / TREE_FILE, record["version"]
    try:
        payloads = json.loads((directory / PAYLOAD_FILE).read_text())
        splits = ROUTER_FILES if version == TREE_VERSION else HYPERPLANE_FILES
        arrays = {name: np.load(directory / f"{name}.npy", allow_pickle=False)
                  for name in (*ARRAY_FILES, *splits)}
    except (OSError, ValueError) as error:
        raise PrometheanError(f"the memory tree in {directory} cannot be read ({error}).") from None
    count = record["items"]
    if any(len(arrays[name]) != count for name in ARRAY_FILES) or len(payloads["texts"]) != count:
        raise PrometheanError(f"the memory tree in {directory} is damaged: its files disagree "
                              "on how many items it holds.")
    try:
        tree = tree_class(**record["settings"])
    except TypeError:
        raise PrometheanError(f"{path} is damaged: its 'settings' are not a memory tree's.") from None
    tree.info = dict(record["info"])
    tree._payloads.restore(arrays["ids"], arrays["salience"], arrays["created"], payloads["texts"],
                           payloads["metadata"], record["next_id"])
    tree._cover_slots()
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
            return tree._builder.leaf(vectors[rows], rows)
        routers, sides = next(splits)
        node = Internal(tree.dim, routers, sides)
        for _ in range(2):
            node.adopt(build())
        return node

    try:
        tree.root = build()
    except StopIteration:
        raise PrometheanError(f"the memory tree in {directory} is damaged (its shape is cut short).") from None
    if offset != count:
        raise PrometheanError(f"the memory tree in {directory} is damaged (its shape does not cover its items).")
    return tree
