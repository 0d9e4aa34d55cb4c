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
