"""The monolith intake: typed records, salience, duplicates, routing to the tree and the replay
buffer, and the memory-aware batcher; the embedders it relies on."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from promethean.context.embed import HashedNgramEmbedder, ModelEmbedder
from promethean.context.intake import (
    ChatRecord,
    DocumentRecord,
    Intake,
    ActivationBoundedBatcher,
    SalienceWeights,
    combine_salience,
    parse_records,
    quality_score,
)
from promethean.context.tree import MemoryTree
from promethean.continual.replay import ReplayBuffer
from promethean.errors import PrometheanError
from promethean.tokenizer import ByteTokenizer
from tests.conftest import TINY_PRESETS, build

FACTS = [
    "The capital of France is Paris, which lies on the river Seine.",
    "Rust's borrow checker rejects data races when the program is compiled.",
    "Tomatoes are botanically fruits but are cooked as vegetables.",
    "The Pacific is the largest and deepest of the world's oceans.",
]


def _intake(**kwargs) -> Intake:
    embedder = HashedNgramEmbedder(64)
    return Intake(MemoryTree(64, capacity=4), embedder, **kwargs)


def test_records_are_typed_and_bad_ones_are_one_clear_error():
    records = parse_records([
        {"kind": "chat", "turns": [{"role": "human", "text": "hi"}, {"role": "assistant", "text": "hello"}]},
        {"kind": "document", "text": "A page.", "title": "T"},
    ])
    assert isinstance(records[0], ChatRecord) and records[0].text() == "Human: hi\nAssistant: hello"
    assert isinstance(records[1], DocumentRecord) and records[1].text() == "T\nA page."
    with pytest.raises(PrometheanError, match="intake record 0"):
        parse_records([{"kind": "chat", "turns": [{"role": "robot", "text": "x"}]}])
    with pytest.raises(PrometheanError, match="intake record 0"):
        parse_records([{"kind": "document", "text": ""}])
    with pytest.raises(PrometheanError):
        parse_records([{"kind": "document", "text": 3}])  # strict: no coercion


def test_exact_and_near_duplicates_are_dropped():
    intake = _intake(near_duplicate=0.9)
    report = intake.process([DocumentRecord(text=t) for t in FACTS])
    assert len(report.accepted) == 4 and len(intake.tree) == 4
    again = intake.process([
        DocumentRecord(text="  the CAPITAL of France is Paris,  which lies on the river Seine."),  # exact
        DocumentRecord(text="The capital of France is Paris, which lies on the river Seine!"),  # near
        DocumentRecord(text="Volcanoes form where tectonic plates diverge or converge."),
        DocumentRecord(text="Volcanoes form where tectonic plates diverge or converge."),  # in-batch
    ])
    assert (again.exact_duplicates, again.near_duplicates, len(again.accepted)) == (2, 1, 1)
    assert intake.tree.get(again.accepted[0]).text.startswith("Volcanoes")
    # A reopened tree still knows the hashes of what it holds.
    fresh = Intake(intake.tree, intake.embedder)
    assert fresh.process([DocumentRecord(text=FACTS[2])]).exact_duplicates == 1


def test_a_pruned_or_deleted_text_is_no_longer_a_duplicate(tmp_path):
    intake = _intake()
    first = intake.process([DocumentRecord(text=t) for t in FACTS]).accepted
    assert intake.process([DocumentRecord(text=FACTS[0])]).exact_duplicates == 1
    intake.tree.delete(first[0])
    report = intake.process([DocumentRecord(text=FACTS[0])])
    assert report.exact_duplicates == 0 and len(report.accepted) == 1
    # Pruning evicts the least salient: whatever it evicted may be remembered again; what it
    # kept is still a duplicate, for this intake and one over the reloaded tree alike.
    evicted = intake.tree.prune(max_items=2)
    kept_texts = [intake.tree.get(i).text for i in intake.tree.ids().tolist()]
    evicted_texts = [t for t in FACTS if t not in kept_texts]
    assert len(evicted) == 2 and len(evicted_texts) == 2
    intake.tree.save(tmp_path / "memory")
    for current in (intake, Intake(MemoryTree.load(tmp_path / "memory"), intake.embedder)):
        again = current.process([DocumentRecord(text=t) for t in kept_texts])
        assert again.exact_duplicates == 2
    back = intake.process([DocumentRecord(text=t) for t in evicted_texts])
    assert back.exact_duplicates == 0 and len(back.accepted) == 2
    # A text another intake added to the same tree is a duplicate here too.
    other = Intake(intake.tree, intake.embedder)
    other.process([DocumentRecord(text="Volcanoes form where tectonic plates diverge or converge.")])
    volcano = DocumentRecord(text="Volcanoes form where tectonic plates diverge or converge.")
    assert intake.process([volcano]).exact_duplicates == 1


def test_salience_combines_novelty_quality_and_surprise():
    weights = SalienceWeights(surprise=1, novelty=1, quality=2)
    assert combine_salience(weights, None, 0.9, 0.3) == pytest.approx((0.9 + 0.6) / 3)
    assert combine_salience(weights, 0.5, 0.9, 0.3) == pytest.approx((0.5 + 0.9 + 0.6) / 4)
    assert quality_score("spam spam spam spam", 4, target_tokens=4) == pytest.approx(0.25)
    assert quality_score("four distinct words here", 2, target_tokens=4) == pytest.approx(0.5)
    intake = _intake(min_salience=0.65)
    report = intake.process([DocumentRecord(text=FACTS[0]), DocumentRecord(text="ok ok ok ok")])
    assert report.low_salience == 1 and len(report.accepted) == 1
    memory = intake.tree.get(report.accepted[0])
    assert memory.salience >= 0.65
    assert memory.metadata["novelty"] == 1.0 and memory.metadata["surprise"] is None
    # A second, related text is less novel than an unrelated one.
    intake.min_salience = 0.0
    related = intake.process([DocumentRecord(text="Paris, capital of France, lies on the Seine river.")])
    unrelated = intake.process([DocumentRecord(text="Quantum dots emit light of tunable colours.")])
    assert (intake.tree.get(related.accepted[0]).metadata["novelty"]
            < intake.tree.get(unrelated.accepted[0]).metadata["novelty"])


def test_surprise_from_the_model_and_routing_to_replay(tmp_path):
    tokenizer = ByteTokenizer()
    model = build("tiny-llama")
    embedder = ModelEmbedder(model, tokenizer, name="tiny")
    replay = ReplayBuffer(tmp_path / "replay", block_size=15, quota=8)
    tree = MemoryTree(embedder.dim, capacity=4)
    intake = Intake(tree, embedder, tokenizer=tokenizer, surprise=embedder.loss_per_token,
                    vocab_size=model.config.vocab_size, replay=replay, near_duplicate=0.9999)
    records = [DocumentRecord(text=FACTS[0], domain="facts"),
               ChatRecord(turns=[{"role": "human", "text": "Where is Paris?"},
                                 {"role": "assistant", "text": "In France."}])]
    report = intake.process(records)
    assert len(report.accepted) == 2
    for item_id in report.accepted:
        surprise = tree.get(item_id).metadata["surprise"]
        assert 0 < surprise <= 1  # a random model is about as surprised as a uniform guess
    expected_facts = (len(tokenizer.encode_ordinary(FACTS[0])) + 1) // 16
    assert report.replay_windows == {"facts": expected_facts, "chat": (len(records[1].text()) + 1) // 16}
    assert ReplayBuffer(tmp_path / "replay", block_size=15).describe()["facts"]["windows"] == expected_facts


def test_model_embedder_is_mean_of_final_hidden_states():
    tokenizer = ByteTokenizer()
    model = build("tiny-gpt2")
    embedder = ModelEmbedder(model, tokenizer)
    vectors = embedder.embed(["hello world", "hello world", "something else entirely"])
    assert vectors.shape == (3, model.config.n_embd)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    np.testing.assert_allclose(vectors[0], vectors[1], atol=1e-6)
    # Against a direct computation of the same thing.
    captured = {}
    handle = model.final_norm.register_forward_hook(lambda _m, _i, out: captured.update(h=out))
    with torch.no_grad():
        model(torch.tensor([tokenizer.encode_ordinary("something else entirely")]))
    handle.remove()
    direct = captured["h"][0].mean(0).numpy()
    np.testing.assert_allclose(vectors[2], direct / np.linalg.norm(direct), atol=1e-5)
    assert not model.final_norm._forward_hooks  # the hook is removed again


@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_model_embedder_batches_equal_single_texts(preset):
    """Right padding never leaks into the real tokens (every mixer is causal)."""
    tokenizer = ByteTokenizer()
    model = build(preset)
    embedder = ModelEmbedder(model, tokenizer)
    texts = ["a short one", "a considerably longer text than the first one is", "mid length text"]
    batched = embedder.embed(texts)
    single = np.concatenate([embedder.embed([t]) for t in texts])
    np.testing.assert_allclose(batched, single, atol=2e-5)
    losses = embedder.loss_per_token(texts)
    for text, loss in zip(texts, losses):
        ids = torch.tensor([tokenizer.encode_ordinary(text)])
        with torch.no_grad():
            expected = model(ids[:, :-1], targets=ids[:, 1:]).loss.item()
        assert loss == pytest.approx(expected, abs=1e-4)


def test_hashed_embedder_is_deterministic_and_spelling_aware():
    embedder = HashedNgramEmbedder(128)
    a, b, c = embedder.embed(["The cat sat on the mat", "the cat sat on a mat", "Stock markets fell"])
    assert np.array_equal(embedder.embed(["The cat sat on the mat"])[0], a)
    assert a @ b > 0.7 > a @ c
    assert np.all(embedder.embed([""]) == 0)


def test_batcher_respects_token_and_activation_budgets():
    texts = ["x" * n for n in (50, 10, 30, 5, 40, 25, 60, 1)]
    batcher = ActivationBoundedBatcher(list, token_budget=80, activation_bytes=100 * 8,
                                       bytes_per_token=8)
    batches = batcher.batches(texts)
    assert sorted(i for b in batches for i in b.indices) == list(range(len(texts)))
    for batch in batches:
        lengths = [len(ids) for ids in batch.token_ids]
        assert sum(lengths) <= 80
        assert len(lengths) * max(lengths) * 8 <= 100 * 8
        assert batch.padded_tokens == len(lengths) * max(lengths)
    # Long texts are cut to the longest row the budgets allow, and counted.
    long_batches = batcher.batches(["y" * 500])
    assert long_batches[0].truncated == 1 and len(long_batches[0].token_ids[0]) == 80
    with pytest.raises(PrometheanError, match="budget"):
        ActivationBoundedBatcher(list, token_budget=0)


def test_intake_checks_dimensions():
    with pytest.raises(PrometheanError, match="64-dimensional"):
        Intake(MemoryTree(32), HashedNgramEmbedder(64))


def test_texts_too_long_for_a_batch_are_cut_for_the_model_not_the_memory():
    embedder = HashedNgramEmbedder(64)
    tree = MemoryTree(64)
    intake = Intake(tree, embedder, batcher=ActivationBoundedBatcher(str.split, token_budget=5))
    text = "one two three four five six seven eight"
    report = intake.process([DocumentRecord(text=text)])
    assert report.truncated == 1
    memory = tree.get(report.accepted[0])
    assert memory.text == text
    np.testing.assert_allclose(tree.vector(memory.id), embedder.embed(["one two three four five"])[0],
                               atol=1e-6)
