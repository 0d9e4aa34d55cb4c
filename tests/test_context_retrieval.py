"""Retrieval into the chat prompt within a token budget, and `promethean memory ...` as a user
meets it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from promethean.context.embed import HashedNgramEmbedder
from promethean.context.intake import Intake
from promethean.context.retrieval import (
    chat_prompt_with_memory,
    open_memory,
    pack_memories,
    remember_exchange,
    retrieve,
)
from promethean.context.tree import Memory, MemoryTree
from promethean.data.chat import Turn
from promethean.errors import PrometheanError
from promethean.tokenizer import ByteTokenizer

FACTS = [
    "The capital of France is Paris, which lies on the river Seine.",
    "Rust's borrow checker rejects data races when the program is compiled.",
    "Tomatoes are botanically fruits but are cooked as vegetables.",
    "Human: what is my cat called?\nAssistant: Your cat is called Biscuit.",
]


def _memory(text: str, score: float) -> Memory:
    return Memory(id=0, score=score, text=text, salience=1.0, created=0.0)


def test_pack_drops_least_relevant_first_and_keeps_chat_format():
    memories = [_memory("A" * 10, 0.9), _memory("Human: hi\nAssistant: yo", 0.8), _memory("B" * 30, 0.7),
                _memory("C" * 5, 0.1)]
    # Rendered: "Human: AAAAAAAAAA\n" (18), "Human: hi\nAssistant: yo\n" (24), B (38), C (13).
    block, kept = pack_memories(memories, len, token_budget=79)
    assert [m.score for m in kept] == [0.8, 0.9]  # C went first, then B; most relevant last
    assert block == "Human: hi\nAssistant: yo\nHuman: AAAAAAAAAA\n"
    block, kept = pack_memories(memories, len, token_budget=93)
    assert [m.score for m in kept] == [0.1, 0.7, 0.8, 0.9] and len(block) == 93
    assert pack_memories(memories, len, token_budget=17) == ("", [])


def test_chat_prompt_with_memory_recalls_across_sessions(tmp_path):
    embedder = HashedNgramEmbedder(128)
    tree = open_memory(tmp_path / "memory", embedder)
    intake = Intake(tree, embedder)
    for fact in FACTS[:3]:
        remember_exchange(intake, [Turn("human", fact)])
    remember_exchange(intake, [Turn("human", "what is my cat called?"),
                               Turn("assistant", "Your cat is called Biscuit.")])
    tree.save(tmp_path / "memory")
    # A later session: reopen and ask.
    later = open_memory(tmp_path / "memory", embedder)
    assert len(later) == 4
    top = retrieve(later, embedder, "what is my cat called", k=1)[0]
    assert "Biscuit" in top.text
    tokenizer = ByteTokenizer()
    turns = [Turn("human", "Remind me: what is my cat called?")]
    prompt = chat_prompt_with_memory(turns, later, embedder, tokenizer, token_budget=80, k=4)
    assert prompt.endswith("Human: Remind me: what is my cat called?\nAssistant:")
    memory_block = prompt[: -len("Human: Remind me: what is my cat called?\nAssistant:")]
    assert "Your cat is called Biscuit." in memory_block
    assert len(tokenizer.encode_ordinary(memory_block)) <= 80
    with pytest.raises(PrometheanError, match="built with the 'hashed-ngrams-128' embedder"):
        open_memory(tmp_path / "memory", HashedNgramEmbedder(64))


def run(*args):
    result = subprocess.run([sys.executable, "-m", "promethean", *args], capture_output=True,
                            text=True, timeout=300, check=False)
    assert "Traceback" not in result.stderr, result.stderr
    return result


def test_memory_cli_add_search_stats_prune(tmp_path):
    memory = tmp_path / "mem"
    records = tmp_path / "records.jsonl"
    records.write_text("\n".join(json.dumps(r) for r in [
        {"kind": "document", "text": FACTS[0]},
        {"kind": "chat", "turns": [{"role": "human", "text": "what is my cat called?"},
                                   {"role": "assistant", "text": "Your cat is called Biscuit."}]},
    ]) + "\n")
    result = run("memory", "add", str(memory), "--file", str(records), "-t", FACTS[1], "-t", FACTS[1])
    assert result.returncode == 0, result.stderr
    assert "remembered 3 of 4 texts" in result.stdout and "1 exact" in result.stdout
    assert "hashed character n-gram" in result.stderr
    result = run("memory", "search", str(memory), "my cat's name", "-k", "1")
    assert result.returncode == 0 and "Biscuit" in result.stdout
    result = run("memory", "search", str(memory), "my cat's name", "--prompt", "--token-budget", "70")
    assert result.stdout.rstrip("\n").endswith("Human: my cat's name\nAssistant:")
    assert "Biscuit" in result.stdout
    result = run("memory", "stats", str(memory))
    assert result.returncode == 0 and "hashed-ngrams-256" in result.stdout
    result = run("memory", "prune", str(memory), "--max-items", "1")
    assert result.returncode == 0 and "evicted 2 memories; 1 remain" in result.stdout
    assert len(MemoryTree.load(memory)) == 1
    assert MemoryTree.load(memory).max_items == 1  # the budget is kept


def test_memory_cli_errors_are_one_sentence(tmp_path):
    result = run("memory", "search", str(tmp_path / "none"), "x")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == f"error: {tmp_path / 'none'} holds no memory tree."
    result = run("memory", "add", str(tmp_path / "m"))
    assert result.returncode == 1 and result.stderr.strip().endswith("error: nothing to remember: give --text or --file.")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"kind": "chat", "turns": []}\n')
    result = run("memory", "add", str(tmp_path / "m"), "--file", str(bad))
    assert result.returncode == 1 and "error: intake record 0.chat.turns" in result.stderr
    result = run("memory", "prune", str(tmp_path / "m"))
    assert result.returncode == 1 and "--max-items" in result.stderr


def test_memory_cli_with_a_checkpoint_uses_the_model(tmp_path):
    checkpoint = tmp_path / "ckpt"
    assert run("model", "init", "tiny-llama", "--out", str(checkpoint)).returncode == 0
    memory = tmp_path / "mem"
    result = run("memory", "add", str(memory), "-c", str(checkpoint), "-t", FACTS[0], "-t", FACTS[1],
                 "--replay", str(tmp_path / "replay"), "--block-size", "16")
    assert result.returncode == 0, result.stderr
    assert "hashed" not in result.stderr
    tree = MemoryTree.load(memory)
    from promethean.checkpoint import load_checkpoint
    from promethean.context.embed import weights_fingerprint

    name = f"model-{weights_fingerprint(load_checkpoint(checkpoint).model)}-mean-hidden-128"
    assert tree.dim == 128 and tree.info["embedder"] == name
    assert all(tree.get(i).metadata["surprise"] is not None for i in tree.ids().tolist())
    assert "replay windows offered" in result.stdout
    result = run("memory", "search", str(memory), "x")  # without the model: a clear refusal
    assert result.returncode == 1
    assert f"built with the '{name}' embedder" in result.stderr.strip().splitlines()[-1]


def test_a_damaged_tree_json_is_the_same_sentence_for_cli_chat_and_server(tmp_path):
    """The CLI (`memory add`), a chat's memory (`SessionMemory.open`) and the server's memory
    (`open_memory_with_embedder`, as `ServerMemory.open` calls it) all open a memory through the
    tree's one tree.json reader: a damaged file is one sentence naming it, and no model is loaded
    for a memory that cannot be read."""
    from promethean.context.retrieval import SessionMemory, open_memory_with_embedder
    from tests.conftest import build

    memory = tmp_path / "memory"
    memory.mkdir()
    (memory / "tree.json").write_text("{not json")
    sentence = (f"{memory / 'tree.json'} is damaged: it is not JSON (Expecting property name "
                "enclosed in double quotes: line 1 column 2 (char 1)).")
    result = run("memory", "add", str(memory), "--text", FACTS[0])
    assert result.returncode == 1 and result.stderr.strip().splitlines()[-1] == f"error: {sentence}"
    with pytest.raises(PrometheanError) as caught:
        SessionMemory.open(memory, build("tiny-gpt2"), ByteTokenizer())
    assert str(caught.value) == sentence

    def no_model():
        raise AssertionError("the model was loaded for a memory that cannot be read")

    with pytest.raises(PrometheanError) as caught:
        open_memory_with_embedder(memory, no_model)
    assert str(caught.value) == sentence


def test_a_memory_keeps_the_hashed_embedder_it_was_built_with(tmp_path):
    """What a chat or the server opens: the hashed embedder a memory records (whatever its
    dimension), else the model's, asked for only then; a model's memory is checked against it."""
    from promethean.context.retrieval import memory_tree_embedder, open_memory_with_embedder

    hashed = HashedNgramEmbedder(64)
    tree = open_memory(tmp_path / "hashed", hashed)
    tree.add(hashed.embed([FACTS[0]])[0], text=FACTS[0])
    tree.save(tmp_path / "hashed")
    asked = []

    def model_embedder():
        asked.append(True)
        return HashedNgramEmbedder(32)  # stands in for a model's embedder

    opened, embedder = open_memory_with_embedder(tmp_path / "hashed", model_embedder)
    assert embedder.name == "hashed-ngrams-64" and asked == [] and len(opened) == 1
    assert memory_tree_embedder(tmp_path / "new", model_embedder).name == "hashed-ngrams-32"
    assert asked == [True]
    modelled = MemoryTree(16)
    modelled.info["embedder"] = "model-abc-mean-hidden-16"
    modelled.save(tmp_path / "modelled")
    with pytest.raises(PrometheanError, match="built with the 'model-abc-mean-hidden-16' embedder "
                                              "but 'hashed-ngrams-32' is in use"):
        open_memory_with_embedder(tmp_path / "modelled", model_embedder)
