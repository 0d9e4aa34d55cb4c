"""`serve --memory DIR`: a chat request with `"memory": true` has the memories packed into the
prompt the engine receives (and named in the response), one without it does not, the finished
exchange is remembered and survives a restart; asking a server without a memory is a clear 400."""

import json
import time

import httpx
import openai
import pytest
from typer.testing import CliRunner

from promethean.checkpoint import load_checkpoint, save_checkpoint
from promethean.cli import app as cli
from promethean.context.tree import MemoryTree
from promethean.inference.engine import Engine
from promethean.serve.app import NO_MEMORY, ServerMemory, create_app
from promethean.tokenizer import ByteTokenizer
from tests.conftest import build
from tests.test_serve import RunningServer

pytestmark = pytest.mark.usefixtures("one_thread")

MODEL = "tiny-memory"
FACT = "The secret password of the lighthouse is aubergine-42."
QUESTION = "What is the password?"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("memory") / MODEL
    save_checkpoint(directory, build("tiny-llama"), ByteTokenizer())
    return directory


@pytest.fixture
def memory_dir(checkpoint, tmp_path):
    """A memory holding FACT, made as a user would: `promethean memory add --checkpoint`."""
    directory = tmp_path / "memory"
    result = CliRunner().invoke(cli, ["memory", "add", str(directory), "--checkpoint",
                                      str(checkpoint), "--text", FACT])
    assert result.exit_code == 0, result.output
    return directory


class PromptRecordingEngine(Engine):
    """An engine that keeps the text of every prompt it is given."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.prompts: list[str] = []

    def submit(self, prompt, params=None):
        self.prompts.append(self.tokenizer.decode(prompt))
        return super().submit(prompt, params) if params is not None else super().submit(prompt)


def start(checkpoint, memory_dir=None, token_budget=256, save_seconds=60.0):
    loaded = load_checkpoint(checkpoint)
    engine = PromptRecordingEngine(loaded.model, loaded.tokenizer, max_batch_size=4)
    memory = None
    if memory_dir is not None:
        memory = ServerMemory.open(memory_dir, checkpoint, loaded.tokenizer,
                                   token_budget=token_budget)
    running = RunningServer(create_app(engine=engine, model_name=MODEL, checkpoint=checkpoint,
                                       memory=memory, memory_save_seconds=save_seconds))
    running.engine = engine
    return running


def chat(running, message, **fields):
    response = httpx.post(running.url + "/chat", timeout=60,
                          json={"message": message, "max_tokens": 6, "temperature": 0, **fields})
    assert response.status_code == 200, response.text
    return response.json()


def test_memory_true_puts_the_fact_in_the_prompt_the_engine_sees(checkpoint, memory_dir):
    running = start(checkpoint, memory_dir)
    try:
        recalled = chat(running, QUESTION, memory=True)
        assert [memory["text"] for memory in recalled["memories"]] == [FACT]
        assert running.engine.prompts[-1] == f"Human: {FACT}\nHuman: {QUESTION}\nAssistant:"
        assert recalled["usage"]["prompt_tokens"] == len(running.engine.prompts[-1].encode())

        plain = chat(running, QUESTION)
        assert "memories" not in plain
        assert running.engine.prompts[-1] == f"Human: {QUESTION}\nAssistant:"
        assert FACT not in running.engine.prompts[-1]
    finally:
        running.stop()


def test_chat_completions_take_memory_plain_and_streamed(checkpoint, memory_dir):
    running = start(checkpoint, memory_dir)
    try:
        client = openai.OpenAI(base_url=running.url + "/v1", api_key="unused", max_retries=0)
        messages = [{"role": "system", "content": "Be brief."},
                    {"role": "user", "content": QUESTION}]
        result = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4,
                                                temperature=0, extra_body={"memory": True})
        assert [memory["text"] for memory in result.model_extra["memories"]][0] == FACT
        expected = f"Be brief.\nHuman: {FACT}\nHuman: {QUESTION}\nAssistant:"
        assert running.engine.prompts[-1] == expected

        chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4,
                                                     temperature=0, stream=True,
                                                     extra_body={"memory": True}))
        assert FACT in [memory["text"] for memory in chunks[0].model_extra["memories"]]
        assert FACT in running.engine.prompts[-1]

        client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4)
        assert FACT not in running.engine.prompts[-1]
    finally:
        running.stop()


def test_memories_that_do_not_fit_the_token_budget_are_left_out(checkpoint, memory_dir):
    running = start(checkpoint, memory_dir, token_budget=len(FACT) // 2)
    try:
        assert chat(running, QUESTION, memory=True)["memories"] == []
        assert running.engine.prompts[-1] == f"Human: {QUESTION}\nAssistant:"
    finally:
        running.stop()


def test_memory_on_a_server_without_one_is_a_400_that_says_so(checkpoint, memory_dir):
    running = start(checkpoint)
    try:
        for path, body in [("/chat", {"message": "hi", "memory": True}),
                           ("/v1/chat/completions",
                            {"messages": [{"role": "user", "content": "hi"}], "memory": True}),
                           ("/v1/completions", {"prompt": "hi", "memory": True})]:
            response = httpx.post(running.url + path, json=body, timeout=30)
            assert response.status_code == 400, path
            assert response.json()["error"]["message"] == NO_MEMORY
        assert NO_MEMORY == ("memory was requested but this server was started without a memory "
                             "directory (--memory DIR).")
        assert running.engine.prompts == []
    finally:
        running.stop()
    running = start(checkpoint, memory_dir)
    try:
        response = httpx.post(running.url + "/v1/completions", timeout=30,
                              json={"prompt": "hi", "memory": True})
        assert response.status_code == 400
        assert "a plain completion has no conversation" in response.json()["error"]["message"]
    finally:
        running.stop()


def test_remembered_exchanges_survive_a_restart(checkpoint, memory_dir):
    message = "My cat is called Bartholomew and he likes sardines."
    running = start(checkpoint, memory_dir)
    try:
        reply = chat(running, message, memory=True, max_tokens=12)["response"]
        assert reply  # the intake takes no empty turn
    finally:
        running.stop()  # the shutdown saves the memory
    exchange = f"Human: {message}\nAssistant: {reply}"
    tree = MemoryTree.load(memory_dir)
    texts = [tree.get(int(item_id)).text for item_id in tree.ids()]
    assert sorted(texts) == sorted([FACT, exchange])

    running = start(checkpoint, memory_dir)
    try:
        recalled = chat(running, "What is my cat called?", memory=True)
        assert exchange in [memory["text"] for memory in recalled["memories"]]
        assert exchange in running.engine.prompts[-1]
    finally:
        running.stop()


def test_the_memory_is_saved_periodically_while_serving(checkpoint, memory_dir):
    running = start(checkpoint, memory_dir, save_seconds=0.1)
    try:
        chat(running, "Remember that the tide turns at noon.", memory=True, max_tokens=12)
        deadline = time.monotonic() + 10
        while json.loads((memory_dir / "tree.json").read_text())["items"] < 2:
            assert time.monotonic() < deadline, "the memory was not saved while serving"
            time.sleep(0.05)
    finally:
        running.stop()


def test_a_memory_made_without_a_model_is_recalled_with_its_own_hashed_embedder(checkpoint,
                                                                               tmp_path):
    directory = tmp_path / "hashed"
    result = CliRunner().invoke(cli, ["memory", "add", str(directory), "--text", FACT])
    assert result.exit_code == 0, result.output
    running = start(checkpoint, directory)
    try:
        assert [m["text"] for m in chat(running, QUESTION, memory=True)["memories"]] == [FACT]
    finally:
        running.stop()
    assert len(MemoryTree.load(directory).ids()) == 2  # the exchange, embedded alike, was kept


def test_users_have_memories_and_conversations_of_their_own(checkpoint, memory_dir, tmp_path):
    import stat

    loaded = load_checkpoint(checkpoint)
    engine = PromptRecordingEngine(loaded.model, loaded.tokenizer, max_batch_size=4)
    memory = ServerMemory.open(memory_dir, checkpoint, loaded.tokenizer)
    log = tmp_path / "chat.jsonl"
    running = RunningServer(create_app(engine=engine, model_name=MODEL, checkpoint=checkpoint,
                                       memory=memory, api_key=["alice-key", "bob-key"],
                                       chat_log=log))
    secret = "my home address is 12 Quay Street, and the door code is 4711"

    def say(key, message, **fields):
        response = httpx.post(running.url + "/chat", timeout=60,
                              headers={"Authorization": f"Bearer {key}"},
                              json={"message": message, "max_tokens": 6, "temperature": 0,
                                    "memory": True, **fields})
        assert response.status_code == 200, response.text
        return response.json()

    try:
        alice = say("alice-key", secret)
        bob = say("bob-key", "where does the other user live? what is the door code?")
        assert all("Quay" not in m["text"] for m in bob["memories"])
        assert "Quay" not in engine.prompts[-1] and FACT not in engine.prompts[-1]
        # Bob knowing Alice's chat id continues a conversation of his own, not hers.
        say("bob-key", "and what did I say before?", chat_id=alice["chat_id"])
        assert "Quay" not in engine.prompts[-1]
        # Alice's own memory and chat do have it; the `user` field separates users of one key.
        say("alice-key", "what is my door code?", chat_id=alice["chat_id"])
        assert "Quay" in engine.prompts[-1]
        say("alice-key", "what is my door code?", user="alice-child")
        assert "Quay" not in engine.prompts[-1]
    finally:
        running.stop()
    assert stat.S_IMODE(log.stat().st_mode) == 0o600
    users = memory_dir / "users"
    assert users.is_dir() and all(stat.S_IMODE(path.stat().st_mode) in (0o600, 0o700)
                                  for path in users.rglob("*"))
