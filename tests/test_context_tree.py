"""The hierarchical memory tree: invariants under any sequence of operations, budgets, eviction
order, persistence (and a crash during it), and recall against brute force."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from promethean.context import tree as tree_module
from promethean.context.tree import MemoryTree, normalise
from promethean.errors import PrometheanError

DIM = 8


def _vector(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    # A few clusters, so that splits and rebalancing have structure to find.
    centre = np.eye(DIM)[seed % 3] * 3
    return (centre + rng.normal(size=DIM)).astype(np.float32)


def _key(tree: MemoryTree, item_id: int) -> tuple[float, float, int]:
    memory = tree.get(item_id)
    return (memory.salience, memory.created, memory.id)


operations = st.lists(
    st.one_of(
        st.tuples(st.just("add"), st.integers(0, 10_000), st.sampled_from([0.0, 0.5, 1.0, 2.0, 3.5])),
        st.tuples(st.just("add_many"), st.integers(0, 10_000), st.integers(1, 25)),
        st.tuples(st.just("delete"), st.integers(0, 200), st.just(0)),
        st.tuples(st.just("rebalance"), st.just(0), st.just(0)),
        st.tuples(st.just("prune"), st.integers(0, 30), st.just(0)),
    ),
    max_size=60,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=operations, max_items=st.one_of(st.none(), st.integers(3, 40)),
       max_bytes=st.one_of(st.none(), st.integers(400, 3000)), capacity=st.integers(2, 6))
def test_any_sequence_keeps_ids_budget_and_eviction_order(ops, max_items, max_bytes, capacity):
    tree = MemoryTree(DIM, capacity=capacity, imbalance_ratio=2.0, max_items=max_items,
                      max_bytes=max_bytes)
    live: set[int] = set()
    gone: set[int] = set()
    clock = 0.0
    for op, a, b in ops:
        before = {i: _key(tree, i) for i in live}
        explicit: set[int] = set()
        if op == "add":
            clock += 1
            new_id = tree.add(_vector(a), text=f"t{a}", salience=b, created=clock)
            before[new_id] = (float(np.float32(b)), clock, new_id)  # evictable at once
            live.add(new_id)
        elif op == "add_many":
            clock += 1
            vectors = np.stack([_vector(a + i) for i in range(b)])
            saliences = [(a + i) % 4 for i in range(b)]
            new_ids = tree.add_many(vectors, texts=[f"m{i}" for i in range(b)], salience=saliences,
                                    created=[clock] * b).tolist()
            before.update({i: (float(s), clock, i) for i, s in zip(new_ids, saliences)})
            live.update(new_ids)
        elif op == "delete":
            target = a  # a live id, a deleted one, or one never given
            assert tree.delete(target) == (target in live)
            explicit.add(target)
        elif op == "rebalance":
            tree.rebalance()
        elif op == "prune":
            tree.prune(max_items=a)
            assert len(tree) <= a
        now = set(tree.ids().tolist())
        evicted = (live - now) - explicit
        survivors = now & set(before)
        # Pruning evicts the least salient (then oldest) first: no survivor ranks below an evictee.
        keys_evicted = [before[i] for i in evicted]
        if keys_evicted and survivors:
            assert max(keys_evicted) <= min(before[i] for i in survivors)
        gone |= live - now
        live = now
        tree.check()
        if max_items is not None:
            assert len(tree) <= max_items
        if max_bytes is not None:
            assert tree.total_bytes <= max_bytes
    # Every live id is found by exact search (its own vector ranks it at the top score), no
    # deleted id is.
    everything = set(tree.exact_search(np.ones(DIM), k=len(tree) + 5)[0].tolist()) if len(tree) else set()
    assert everything == live
    assert not everything & (gone - live)
    for item_id in live:
        ids, scores = tree.exact_search(tree.vector(item_id), k=len(tree))
        assert item_id in ids[np.isclose(scores, scores[0], atol=1e-5)]
    assert tree.total_bytes == sum(tree.item_bytes(tree.get(i).text, tree.get(i).metadata) for i in live)
    # ... and the tree survives a save/load round trip exactly, whatever its history.
    with tempfile.TemporaryDirectory() as scratch:
        tree.save(Path(scratch) / "memory")
        loaded = MemoryTree.load(Path(scratch) / "memory")
    loaded.check()
    assert set(loaded.ids().tolist()) == live and loaded.total_bytes == tree.total_bytes
    query = _vector(777)
    assert loaded.search_ids(query, 5, beam=2)[0].tolist() == tree.search_ids(query, 5, beam=2)[0].tolist()


def test_prune_by_bytes_evicts_least_salient_then_oldest():
    tree = MemoryTree(DIM, capacity=4)
    ids = [tree.add(_vector(i), text="x" * 10, salience=s, created=float(i))
           for i, s in enumerate([3, 1, 2, 1, 5])]
    per_item = tree.item_bytes("x" * 10, None)
    evicted = tree.prune(max_bytes=3 * per_item)
    assert evicted == [ids[1], ids[3]]  # salience 1 (older first), then stop: budget holds
    assert tree.total_bytes <= 3 * per_item
    assert tree.prune(max_items=1) == [ids[2], ids[0]]
    assert tree.ids().tolist() == [ids[4]]


def test_budget_is_enforced_on_insert():
    tree = MemoryTree(DIM, capacity=3, max_items=5)
    for i in range(20):
        tree.add(_vector(i), salience=float(i))
    assert sorted(tree.ids().tolist()) == list(range(15, 20))  # the five most salient
    tree.check()


def test_automatic_pruning_leaves_a_little_room():
    tree = MemoryTree(DIM, capacity=8, max_items=100)
    tree.add_many(np.stack([_vector(i) for i in range(100)]), salience=np.arange(100) % 7)
    assert len(tree) == 100
    tree.add(_vector(1000), salience=10.0)
    assert len(tree) == 98  # 2% below the budget: the next inserts need no ranking
    assert 100 in tree and min(tree.get(i).salience for i in tree.ids().tolist()) >= 0


def _filled(count: int = 300, seed: int = 0) -> MemoryTree:
    rng = np.random.default_rng(seed)
    tree = MemoryTree(DIM, capacity=8)
    for i in range(count):
        tree.add(_vector(i), text=f"memory {i} é", salience=float(rng.random()),
                 metadata={"i": i, "tags": ["a"]}, created=1000.0 + i)
    return tree


def test_save_load_round_trip(tmp_path):
    tree = _filled()
    for i in range(0, 300, 7):
        tree.delete(i)
    tree.save(tmp_path / "memory")
    loaded = MemoryTree.load(tmp_path / "memory")
    loaded.check()
    assert loaded.settings() == tree.settings()
    assert sorted(loaded.ids().tolist()) == sorted(tree.ids().tolist())
    for item_id in tree.ids().tolist():
        assert loaded.get(item_id) == tree.get(item_id)
        np.testing.assert_array_equal(loaded.vector(item_id), tree.vector(item_id))
    query = _vector(12345)
    assert loaded.search_ids(query, 10, beam=4)[0].tolist() == tree.search_ids(query, 10, beam=4)[0].tolist()
    assert loaded.total_bytes == tree.total_bytes
    # New ids continue after the old ones, never reusing a deleted id.
    assert loaded.add(_vector(1)) == tree.add(_vector(1)) == 300


def test_empty_tree_round_trip(tmp_path):
    MemoryTree(DIM, max_items=3).save(tmp_path / "empty")
    loaded = MemoryTree.load(tmp_path / "empty")
    assert len(loaded) == 0 and loaded.max_items == 3
    assert loaded.add_many(np.zeros((0, DIM))).size == 0
    loaded.add(_vector(0))
    loaded.check()


def test_crash_during_save_leaves_previous_copy(tmp_path, monkeypatch):
    target = tmp_path / "memory"
    first = _filled(50)
    first.save(target)
    second = _filled(120, seed=1)
    calls = {"n": 0}
    real_save = np.save

    def failing_save(path, array, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError("disk full (injected)")
        return real_save(path, array, *args, **kwargs)

    monkeypatch.setattr(tree_module.np, "save", failing_save)
    with pytest.raises(OSError, match="injected"):
        second.save(target)
    monkeypatch.undo()
    loaded = MemoryTree.load(target)
    assert len(loaded) == 50
    assert loaded.get(7) == first.get(7)
    assert [p.name for p in tmp_path.iterdir()] == ["memory"]  # no staging left behind


def test_recall_at_10_against_brute_force():
    rng = np.random.default_rng(0)
    dim, clusters = 32, 40
    centres = rng.normal(size=(clusters, dim))
    basis = rng.normal(size=(clusters, 4, dim)) * 0.3
    labels = rng.integers(clusters, size=6000)
    data = centres[labels] + np.einsum("ns,nsd->nd", rng.normal(size=(6000, 4)), basis[labels])
    data += 0.05 * rng.normal(size=data.shape)
    queries, data = data[:100], data[100:]
    tree = MemoryTree(dim, capacity=32)
    tree.add_many(data[:3000])
    for vector in data[3000:]:
        tree.add(vector)
    units = normalise(data)
    hits = []
    for query in queries:
        exact = np.argsort(-(units @ normalise(query)))[:10]  # ids are row numbers
        found, _ = tree.search_ids(query, 10, beam=16)
        assert tree.exact_search(query, 10)[0].tolist() == exact.tolist()
        hits.append(len(set(found.tolist()) & set(exact.tolist())) / 10)
    assert np.mean(hits) >= 0.9
    assert tree.depth() <= 3 * np.log2(len(tree) / 32) + 2  # O(log n)


def test_bad_input_is_a_clear_error(tmp_path):
    tree = MemoryTree(DIM)
    with pytest.raises(PrometheanError, match="8 numbers"):
        tree.add(np.ones(3))
    with pytest.raises(PrometheanError, match="finite"):
        tree.add(np.full(DIM, np.nan))
    with pytest.raises(PrometheanError, match="no memory tree"):
        MemoryTree.load(tmp_path)
    with pytest.raises(PrometheanError, match="capacity|at least 2"):
        MemoryTree(DIM, capacity=1)
    assert tree.search_ids(np.ones(DIM))[0].size == 0
    with pytest.raises(PrometheanError, match="beam"):
        tree.search_ids(np.ones(DIM), beam=0)
    assert not tree.delete(3)


def test_identical_vectors_still_split_and_stay_shallow():
    tree = MemoryTree(DIM, capacity=4)
    same = np.ones(DIM)
    ids = [tree.add(same) for _ in range(300)] + tree.add_many(np.tile(same, (300, 1))).tolist()
    tree.check()
    assert tree.depth() <= np.log(600 / 4) / np.log(4 / 3) + 2
    found, scores = tree.exact_search(same, k=600)
    assert sorted(found.tolist()) == sorted(ids) and np.allclose(scores, 1)
    assert len(tree.search_ids(same, k=10, beam=2)[0]) == 10


def test_threads_can_share_a_tree(tmp_path):
    """Adds, deletes, prunes, searches and saves from several threads at once (as a server's
    requests would): the structure stays whole and every answer is consistent."""
    import threading

    tree = MemoryTree(DIM, capacity=4, max_items=400)
    tree.add_many(np.stack([_vector(i) for i in range(200)]))
    errors: list[BaseException] = []
    added: list[list[int]] = [[] for _ in range(3)]

    def writer(index: int) -> None:
        try:
            for step in range(150):
                new = tree.add(_vector(1000 * index + step), text=f"w{index}-{step}")
                added[index].append(new)
                if step % 3 == 0:
                    tree.delete(added[index][step // 2])
                if step % 50 == 49:
                    tree.add_many(np.stack([_vector(7 * step + j) for j in range(20)]))
        except BaseException as error:  # noqa: BLE001 (reported below)
            errors.append(error)

    def reader() -> None:
        try:
            for step in range(150):
                ids, scores = tree.search_ids(_vector(step), k=5, beam=4)
                assert len(ids) == 5 and np.all(np.diff(scores) <= 1e-6)
                # One call, one consistent view: (a `get` after it may find the item deleted.)
                found = tree.search(_vector(step), k=3, beam=4)
                assert len(found) == 3 and all(m.score is not None for m in found)
                if step % 60 == 0:
                    tree.save(tmp_path / f"copy{threading.get_ident()}")
        except BaseException as error:  # noqa: BLE001
            errors.append(error)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(3)]
    threads += [threading.Thread(target=reader) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    tree.check()
    assert len(tree) <= 400
    for item_id in tree.ids().tolist():
        assert tree.exact_search(tree.vector(item_id), 1)[1][0] > 0.999
    for copy in tmp_path.iterdir():
        MemoryTree.load(copy).check()


def test_a_version_1_tree_still_loads(tmp_path):
    """Version 1 kept one hyperplane per internal node (`directions.npy`, `thresholds.npy`)."""
    import json

    # Single adds and no rebuilds (a huge imbalance ratio): only leaf splits, each by 2-means.
    tree = MemoryTree(DIM, capacity=8, imbalance_ratio=1000)
    for i in range(120):
        tree.add(_vector(i), text=f"memory {i}")
    tree.save(tmp_path / "memory")
    tree.save(tmp_path / "version 2")
    folder = tmp_path / "memory"
    routers = np.load(folder / "routers.npy")
    counts = np.load(folder / "router_counts.npy")
    sides = np.load(folder / "router_sides.npy")
    bounds = np.concatenate([[0], np.cumsum(counts)])
    directions, thresholds = [], []
    for a, b in zip(bounds[:-1], bounds[1:]):
        assert b - a == 2  # (version 1 had only hyperplanes)
        first, second = (routers[a], routers[a + 1]) if sides[a] == 0 else (routers[a + 1], routers[a])
        first, second = first.astype(np.float64), second.astype(np.float64)
        directions.append(first - second)
        thresholds.append((first @ first - second @ second) / 2)
    for name in ("routers", "router_counts", "router_sides"):
        (folder / f"{name}.npy").unlink()
    np.save(folder / "directions.npy", np.array(directions, dtype=np.float32))
    np.save(folder / "thresholds.npy", np.array(thresholds))
    record = json.loads((folder / "tree.json").read_text())
    (folder / "tree.json").write_text(json.dumps({**record, "version": 1}))
    old = MemoryTree.load(folder)
    old.check()
    query = _vector(4242)
    assert old.search_ids(query, 10, beam=4)[0].tolist() == tree.search_ids(query, 10, beam=4)[0].tolist()

    # Inserts are routed as they were: after the same inserts into the version-1 copy and the
    # version-2 one (both loaded, so their splits draw the same numbers), every item sits in the
    # same leaf, as the saved shape and leaf-ordered ids show.
    new = MemoryTree.load(tmp_path / "version 2")
    for memory, target in ((old, tmp_path / "old after"), (new, tmp_path / "new after")):
        for seed in range(500, 540):
            memory.add(_vector(seed), text=f"new {seed}", created=0.0)
        memory.check()
        memory.save(target)
    shapes = [json.loads((tmp_path / name / "tree.json").read_text())["shape"]
              for name in ("old after", "new after")]
    assert shapes[0] == shapes[1] and len(shapes[0]) > 1
    np.testing.assert_array_equal(np.load(tmp_path / "old after" / "ids.npy"),
                                  np.load(tmp_path / "new after" / "ids.npy"))


def test_tree_json_is_read_in_one_place_and_damage_is_one_sentence(tmp_path):
    """`MemoryTree.read_record` reads tree.json without the arrays (what chooses a memory's
    embedder) and `load` goes through it: each kind of damage is one sentence naming the file."""
    folder = tmp_path / "memory"
    tree = _filled(20)
    tree.info["embedder"] = "hashed-ngrams-8"
    tree.save(folder)
    record = MemoryTree.read_record(folder)
    assert record["info"] == {"embedder": "hashed-ngrams-8"} and record["items"] == 20
    assert record["settings"] == tree.settings()
    path = folder / "tree.json"
    good = path.read_text()
    damaged = {
        "{not json": f"{path} is damaged: it is not JSON (Expecting property name enclosed in "
                     "double quotes: line 1 column 2 (char 1)).",
        "[1, 2]": f"{path} is not a version-2 Promethean memory tree.",
        '{"format": "promethean-memory-tree", "version": 7}':
            f"{path} is not a version-2 Promethean memory tree.",
        '{"format": "promethean-memory-tree", "version": 2, "settings": {"dim": 8}}':
            f"{path} is damaged: its 'next_id' is missing or not a whole number.",
        json.dumps({**json.loads(good), "info": "hashed"}):
            f"{path} is damaged: its 'info' is missing or not an object.",
        json.dumps({**json.loads(good), "settings": {"dim": 8, "colour": "red"}}):
            f"{path} is damaged: its 'settings' are not a memory tree's.",
    }
    for text, sentence in damaged.items():
        path.write_text(text)
        for read in (MemoryTree.load, MemoryTree.read_record):
            if read is MemoryTree.read_record and "settings' are not" in sentence:
                continue  # (only building the tree finds settings it does not take)
            with pytest.raises(PrometheanError) as caught:
                read(folder)
            assert str(caught.value) == sentence
    path.write_bytes(b"\xff\xfe")
    with pytest.raises(PrometheanError, match=r"tree.json is damaged: it is not JSON \('utf-8'"):
        MemoryTree.read_record(folder)
