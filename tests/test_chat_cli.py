"""`promethean chat`: stdin piped through a real subprocess, and the history kept in context."""

import subprocess
import sys

import pytest
import torch

from promethean.checkpoint import load_checkpoint, save_checkpoint
from promethean.continual.adapters import Adapters, adapter_directory, checkpoint_sha256
from promethean.data.chat import Turn
from promethean.inference.chat import ChatSession
from promethean.inference.generate import SamplingParams
from promethean.tokenizer import ByteTokenizer
from tests.conftest import build


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("chat") / "tiny"
    save_checkpoint(directory, build("tiny-llama"), ByteTokenizer())
    model = load_checkpoint(directory).model
    adapters = Adapters(model, base_sha256=checkpoint_sha256(directory))
    adapters.add("noisy", rank=4)
    with torch.no_grad():
        for key, tensor in adapters.trainable_parameters("noisy").items():
            if key.endswith("lora_B"):
                tensor.copy_(torch.randn(tensor.shape, generator=torch.Generator().manual_seed(0)))
    adapters.save("noisy", adapter_directory(directory, "noisy"))
    return directory


def chat(checkpoint, stdin: str, *options: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "promethean", "chat", str(checkpoint),
                           "--max-new-tokens", "8", "--temperature", "0", *options],
                          input=stdin, capture_output=True, text=True, timeout=120)


def test_piped_chat_answers_each_line_and_stops_at_exit(checkpoint):
    result = chat(checkpoint, "hello\n\nhow are you?\n/exit\nnever read\n")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 2 and all(line.startswith("Assistant:") for line in lines)
    again = chat(checkpoint, "hello\n")  # end of input ends it too; greedy is repeatable
    assert again.returncode == 0 and again.stdout.splitlines() == lines[:1]


def test_an_adapter_changes_the_replies_and_an_unknown_one_is_refused(checkpoint):
    base = chat(checkpoint, "hello\n")
    noisy = chat(checkpoint, "hello\n", "--adapter", "noisy")
    assert noisy.returncode == 0, noisy.stderr
    assert noisy.stdout != base.stdout
    missing = chat(checkpoint, "hello\n", "--adapter", "missing")
    assert missing.returncode == 1 and "no adapter named 'missing'" in missing.stderr


def test_the_history_drops_the_oldest_exchanges_to_fit_the_context(checkpoint):
    loaded = load_checkpoint(checkpoint)
    params = SamplingParams(max_new_tokens=16, temperature=0)
    session = ChatSession(loaded.model, loaded.tokenizer, params)
    context = loaded.model.config.context_length
    for index in range(context):  # far more history than fits
        session.history += [Turn("human", f"message {index}"), Turn("assistant", "ok")]
    prompt = session.prompt_ids("the newest")
    assert len(prompt) <= context - 16
    text = loaded.tokenizer.decode(prompt)
    assert text.endswith("Human: the newest\nAssistant:")
    assert f"message {context - 1}\n" in text and "message 0\n" not in text
    assert text.startswith("Human: ")  # whole exchanges are dropped, never half a turn


def test_a_reply_is_one_line_and_is_remembered(checkpoint):
    loaded = load_checkpoint(checkpoint)
    session = ChatSession(loaded.model, loaded.tokenizer,
                          SamplingParams(max_new_tokens=12, temperature=0))
    reply = "".join(session.reply("hi"))
    assert "\n" not in reply
    assert session.history == [Turn("human", "hi"), Turn("assistant", reply.strip())]


def test_chat_memory_remembers_across_sessions(checkpoint, tmp_path, monkeypatch):
    from promethean.context.retrieval import SessionMemory, chat_prompt_with_memory
    from promethean.context.tree import MemoryTree
    from promethean.inference import chat as chat_module

    memory = tmp_path / "memory"
    fact = "my secret word is pomegranate"
    first = chat(checkpoint, f"{fact}\n/exit\n", "--memory", str(memory))
    assert first.returncode == 0, first.stderr
    stored = MemoryTree.load(memory)
    assert len(stored) == 1
    (remembered,) = [stored.get(i) for i in stored.ids().tolist()]
    assert remembered.text.startswith(f"Human: {fact}\nAssistant:")
    assert remembered.metadata["kind"] == "chat"

    # A second session over the reopened directory: the fact is in the prompt the model is given.
    loaded = load_checkpoint(checkpoint)
    given = []

    def spy(model, tokenizer, prompt_ids, params, crop=False):
        given.append(list(prompt_ids))
        return iter([" ok"])

    monkeypatch.setattr(chat_module, "stream", spy)
    # (A random tiny model embeds every exchange alike: only an identical one is a near duplicate.)
    session_memory = SessionMemory.open(memory, loaded.model, loaded.tokenizer, token_budget=64,
                                        near_duplicate=0.9999)
    session = ChatSession(loaded.model, loaded.tokenizer,
                          SamplingParams(max_new_tokens=8, temperature=0), memory=session_memory)
    question = "what is my secret word?"
    assert "".join(session.reply(question)) == " ok"
    text = loaded.tokenizer.decode(given[0])
    assert text.startswith(f"Human: {fact}\n")
    assert text.endswith(f"Human: {question}\nAssistant:")
    expected = chat_prompt_with_memory([Turn("human", question)], session_memory.tree,
                                       session_memory.embedder, loaded.tokenizer, token_budget=64)
    assert given[0] == loaded.tokenizer.encode_ordinary(expected)
    # The new exchange went through the intake; saving keeps both for the next session.
    assert len(session_memory.remembered) == 1
    session_memory.save()
    assert len(MemoryTree.load(memory)) == 2


def test_chat_memory_is_saved_at_end_of_input_and_keeps_a_hashed_memory(checkpoint, tmp_path):
    from promethean.context.tree import MemoryTree

    memory = tmp_path / "notes"
    added = subprocess.run([sys.executable, "-m", "promethean", "memory", "add", str(memory),
                            "--text", "The lighthouse keeper's cat is called Biscuit."],
                           capture_output=True, text=True, timeout=120)
    assert added.returncode == 0, added.stderr
    # No /exit: end of input (Ctrl-D) ends the session, and the exchange is still saved.
    result = chat(checkpoint, "tell me about the lighthouse keeper\n", "--memory", str(memory))
    assert result.returncode == 0, result.stderr
    stored = MemoryTree.load(memory)
    assert stored.info["embedder"] == "hashed-ngrams-256"  # the memory's own embedder was kept
    texts = [stored.get(i).text for i in sorted(stored.ids().tolist())]
    assert texts[0] == "The lighthouse keeper's cat is called Biscuit."
    assert texts[1].startswith("Human: tell me about the lighthouse keeper\nAssistant:")
    bad = chat(checkpoint, "hi\n", "--memory", str(tmp_path / "notes" / "tree.json"))
    assert bad.returncode == 1 and "error:" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.parametrize("dtype", ["bf16", "int8"])
def test_a_memory_made_in_fp32_serves_a_converted_model(checkpoint, tmp_path, dtype):
    """`chat --dtype bf16|int8 --memory DIR` keeps using a memory the fp32 model embedded: the
    converted model is still named after its fp32 weights."""
    from promethean.context.embed import ModelEmbedder
    from promethean.context.tree import MemoryTree
    from promethean.inference.quantize import prepare_for_inference

    fp32 = load_checkpoint(checkpoint)
    converted = prepare_for_inference(load_checkpoint(checkpoint).model, dtype)
    assert converted.weights_fingerprint() == fp32.model.weights_fingerprint()
    vectors = ModelEmbedder(converted, fp32.tokenizer).embed(["the tide comes in twice a day"])
    assert vectors.shape == (1, fp32.model.config.n_embd) and vectors.dtype.name == "float32"

    memory = tmp_path / "memory"
    assert chat(checkpoint, "the tide comes in twice a day\n", "--memory", str(memory)).returncode == 0
    embedder = MemoryTree.load(memory).info["embedder"]
    later = chat(checkpoint, "when does the tide come in?\n", "--memory", str(memory),
                 "--dtype", dtype)
    assert later.returncode == 0, later.stderr
    assert MemoryTree.load(memory).info["embedder"] == embedder
