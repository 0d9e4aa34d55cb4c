"""`promethean finetune-chat`: a LoRA adapter trained on the server's chat log, loss on the
replies only, validated by conversation, the best adapter kept, and used by generate, chat and
the server."""

import json
import os
import subprocess
import sys
import warnings

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
import torch

from promethean.checkpoint import load_checkpoint, save_checkpoint
from promethean.continual import chat_tuning
from promethean.continual.adapters import (
    ADAPTER_CONFIG_FILE,
    load_adapter_onto,
)
from promethean.continual.chat_examples import (
    ChatLogWarning,
    Conversation,
    chat_log_formats,
    conversation_examples,
    read_chat_log,
    split_conversations,
)
from promethean.continual.chat_tuning import ChatTuningOptions, finetune_chat
from promethean.data.chat import Turn, assistant_prompt
from promethean.errors import PrometheanError
from promethean.inference.generate import SamplingParams, generate_text
from promethean.tokenizer import ByteTokenizer
from tests.conftest import build

pytestmark = pytest.mark.usefixtures("one_thread")

GREETING = "Hi! I am Promethean."
WELLBEING = "Very well, thanks."
NAMES = ["Ann", "Bob", "Cy", "Dee", "Eve", "Fay", "Gus", "Hal", "Ivy", "Jo", "Kit", "Lu"]
# Small enough that 100 LoRA steps take a few seconds on one thread, large enough to learn.
SMALL = {"n_layer": 2, "n_embd": 64, "n_head": 2, "d_ff": 256}
# What a reply is asked with, as /chat, `promethean chat` and the test below prompt.
UNSEEN = assistant_prompt([Turn("human", "hello, I am Zed")])


def logged_turns(names=NAMES) -> list[dict]:
    """A log as the server writes it: every conversation greets, every other one also asks how
    the assistant is; the lines of the conversations are interleaved in time."""
    lines = []
    for index, name in enumerate(names):
        lines.append({"chat_id": f"chat-{index}", "time": 1000.0 + index, "route": "/chat",
                      "human": f"hello, I am {name}", "assistant": GREETING})
        if index % 2:
            lines.append({"chat_id": f"chat-{index}", "time": 2000.0 + index,
                          "route": "/v1/chat/completions", "human": "how are you?",
                          "assistant": WELLBEING})
    return sorted(lines, key=lambda line: line["time"])


def write_log(path, lines) -> str:
    path.write_text("".join(line if isinstance(line, str) else json.dumps(line) + "\n"
                            for line in lines))
    return str(path)


def new_checkpoint(directory):
    save_checkpoint(directory, build("tiny-gpt2", **SMALL), ByteTokenizer())
    return directory


def options(checkpoint, log, **overrides) -> ChatTuningOptions:
    settings = {"rank": 4, "lr": 1e-2, "max_steps": 100, "eval_every": 10, "patience": 3,
                "device": "cpu", "progress": False, **overrides}
    return ChatTuningOptions(str(checkpoint), str(log), **settings)


def greedy_reply(model, prompt: str = UNSEEN) -> str:
    params = SamplingParams(max_new_tokens=40, temperature=0, stop_strings=("\n",))
    return generate_text(model, ByteTokenizer(), [prompt], params)[0].text


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A checkpoint with the adapter 'chat' trained on the 12-conversation log."""
    root = tmp_path_factory.mktemp("finetune-chat")
    checkpoint = new_checkpoint(root / "tiny")
    log = write_log(root / "chat.jsonl", logged_turns())
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = finetune_chat(options(checkpoint, log))
    finally:
        torch.set_num_threads(threads)
    return checkpoint, result


# ------------------------------------------------------------------------------------ the log


def test_malformed_lines_are_skipped_and_counted_in_one_warning(tmp_path):
    good = logged_turns(NAMES[:2])  # chat-0: one exchange; chat-1: two
    lines = [good[2], "{not json\n", good[0], "\n",
             {"chat_id": "x", "time": 1.0, "human": "hi"},  # no assistant
             {"chat_id": "x", "time": "noon", "human": "hi", "assistant": "yo"},
             {"chat_id": "x", "time": True, "human": "hi", "assistant": "yo"},
             {"chat_id": 7, "time": 1.0, "human": "hi", "assistant": "yo"},
             '{"chat_id": "x", "time": NaN, "human": "hi", "assistant": "yo"}\n',
             "[1, 2]\n", good[1]]
    log = write_log(tmp_path / "chat.jsonl", lines)
    with pytest.warns(ChatLogWarning) as caught:
        conversations = read_chat_log(log)
    assert [str(w.message) for w in caught] == [(
        f"skipped 7 malformed lines of chat log {log} (the first is line 2); a usable line is a "
        "JSON object with string fields chat_id, human and assistant and a numeric time, string "
        "fields user and assistant, or a messages list of role/content objects.")]
    # Ordered by time within a conversation (the file had chat-1's second exchange first).
    assert conversations == [
        Conversation("chat-0", (("hello, I am Ann", GREETING),)),
        Conversation("chat-1", (("hello, I am Bob", GREETING), ("how are you?", WELLBEING))),
    ]


def card_log(names=NAMES) -> list[dict]:
    """The GPT-2 chat card's chat_history.jsonl: one {"user", "assistant"} exchange a line."""
    return [{"user": f"hello, I am {name}", "assistant": GREETING, "timestamp": "2024-05-01"}
            for name in names]


def openai_log(names=NAMES) -> list[dict]:
    return [{"messages": [{"role": "system", "content": "Be kind."},
                          {"role": "user", "content": f"hello, I am {name}"},
                          {"role": "assistant", "content": GREETING},
                          {"role": "user", "content": "how are you?"},
                          {"role": "user", "content": "tell me"},
                          {"role": "assistant", "content": WELLBEING},
                          {"role": "user", "content": "bye"}]} for name in names]


def test_other_systems_chat_logs_are_read_one_conversation_a_line(tmp_path):
    pairs = read_chat_log(write_log(tmp_path / "chat_history.jsonl", card_log(NAMES[:2])))
    assert pairs == [
        Conversation("line-1", (("hello, I am Ann", GREETING),), "user/assistant pairs"),
        Conversation("line-2", (("hello, I am Bob", GREETING),), "user/assistant pairs"),
    ]
    (chat,) = read_chat_log(write_log(tmp_path / "openai.jsonl", openai_log(NAMES[:1])))
    # The system message sets no turn; two user messages in a row are one human turn; the last
    # question has no reply yet.
    assert chat == Conversation("line-1", (("hello, I am Ann", GREETING),
                                           ("how are you?\ntell me", WELLBEING), ("bye", "")),
                                "OpenAI messages")
    mixed = read_chat_log(write_log(tmp_path / "mixed.jsonl",
                                    card_log(NAMES[:1]) + logged_turns(NAMES[:1])))
    assert chat_log_formats(mixed) == "Promethean chat log, user/assistant pairs"


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(
        st.sampled_from(["user", "assistant", "messages", "role", "content", "chat_id", "time",
                         "human", "x"]), children, max_size=4),
    max_leaves=10), max_size=5))
def test_any_json_lines_give_conversations_or_the_one_sentence(tmp_path, lines):
    log = tmp_path / "fuzz.jsonl"
    log.write_text("".join(json.dumps(line) + "\n" for line in lines))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ChatLogWarning)
        try:
            conversations = read_chat_log(log)
        except PrometheanError as error:
            assert str(error).startswith(f"chat log {log} holds no usable conversation")
            return
    for conversation in conversations:
        assert all(isinstance(h, str) and isinstance(a, str) for h, a in conversation.exchanges)


def test_the_chat_cards_log_trains_an_adapter_and_memory_add_takes_both_forms(tmp_path):
    checkpoint = new_checkpoint(tmp_path / "tiny")
    log = write_log(tmp_path / "chat_history.jsonl", card_log())
    result = finetune_chat(options(checkpoint, log, max_steps=40))
    assert result.log_format == "user/assistant pairs"
    assert result.conversations == (11, 1)
    assert result.best_val_loss < result.base_val_loss - 0.5
    for lines, name in ((card_log(), "user/assistant pairs"), (openai_log(), "OpenAI messages")):
        path = write_log(tmp_path / f"{len(name)}.jsonl", lines)
        added = cli("memory", "add", str(tmp_path / "memory"), "--file", path)
        assert added.returncode == 0, added.stderr
        assert f"{path}: 12 conversations (log format: {name})" in added.stdout


@pytest.mark.parametrize("content, sentence", [
    ("", "chat log {log} holds no usable conversation (it is empty)."),
    ("\n{oops\n[]\n", ("chat log {log} holds no usable conversation (none of its 2 lines is a "
                       "chat turn).")),
])
def test_a_log_with_nothing_usable_is_one_sentence(tmp_path, content, sentence):
    log = tmp_path / "chat.jsonl"
    log.write_text(content)
    with pytest.raises(PrometheanError) as caught, warnings.catch_warnings():
        warnings.simplefilter("ignore", ChatLogWarning)  # the count is tested above
        read_chat_log(log)
    assert str(caught.value) == sentence.format(log=log)


def test_a_missing_log_and_a_single_conversation_are_refused(tmp_path):
    with pytest.raises(PrometheanError, match=r"^chat log .*missing.jsonl does not exist\.$"):
        read_chat_log(tmp_path / "missing.jsonl")
    with pytest.raises(PrometheanError) as caught:
        split_conversations([Conversation("only", (("hi", "hello"),))], 0.1)
    assert str(caught.value) == (
        "fine-tuning on a chat log needs at least 2 conversations with a reply (one to train on, "
        "one to validate on); this log has 1.")


def test_validation_is_a_deterministic_share_of_whole_conversations():
    conversations = [Conversation(f"chat-{i}", (("hi", "hello"),)) for i in range(30)]
    train, val = split_conversations(conversations, 0.1)
    assert len(val) == 3 and len(train) == 27
    assert split_conversations(conversations[::-1], 0.1)[1] == val[::-1]  # order-free choice
    grown_train, grown_val = split_conversations(conversations[:12], 0.1)
    assert len(grown_val) == 1 and len(grown_train) == 11


# ------------------------------------------------------------------------------- the examples


def test_the_loss_covers_the_replies_and_their_newlines_only():
    tokenizer = ByteTokenizer()
    conversation = Conversation("c", (("hello, I am Ann", GREETING), ("how are you?", WELLBEING)))
    [example] = conversation_examples(conversation, tokenizer, block_size=256)
    text = "Human: hello, I am Ann\nAssistant: Hi! I am Promethean.\nHuman: how are you?\n" \
           "Assistant: Very well, thanks.\n"
    assert tokenizer.decode(list(example.inputs)) == text[:-1]  # inputs: all but the last
    trained = [token for token in example.targets if token != -100]
    assert tokenizer.decode(trained) == f" {GREETING}\n {WELLBEING}\n"
    # Every target sits where the text holds that very token; nothing of the human's is one.
    for position, target in enumerate(example.targets):
        if target != -100:
            assert tokenizer.encode(text)[position + 1] == target
    first_reply = text.index(" Hi!")
    assert all(target == -100 for target in example.targets[:first_reply - 1])
    # An empty reply stays in the context, but teaches nothing.
    silent = Conversation("s", (("hi", ""), ("again?", "yes")))
    [example] = conversation_examples(silent, tokenizer, block_size=256)
    assert tokenizer.decode([t for t in example.targets if t != -100]) == " yes\n"


def test_a_long_conversation_is_windowed_at_exchanges_with_the_most_context_that_fits():
    tokenizer = ByteTokenizer()
    exchanges = tuple((f"question {i}", f"answer {i}") for i in range(4))
    exchange_length = len("Human: question 0\nAssistant: answer 0\n")  # 38 bytes each
    examples = conversation_examples(Conversation("c", exchanges), tokenizer,
                                     block_size=2 * exchange_length + 10)
    rows = [(tokenizer.decode([t for t in e.targets if t != -100]),
             tokenizer.decode(list(e.inputs))) for e in examples]
    # The first two exchanges fit whole, with both replies trained; each later reply comes with
    # the one whole exchange before it that still fits, and is trained alone.
    assert [trained for trained, _ in rows] == [" answer 0\n answer 1\n", " answer 2\n",
                                                " answer 3\n"]
    assert [inputs.splitlines()[0] for _, inputs in rows] == [
        "Human: question 0", "Human: question 1", "Human: question 2"]
    assert all(len(e.inputs) <= 2 * exchange_length + 10 for e in examples)


# ----------------------------------------------------------------------------------- training


def test_the_adapter_learns_the_logged_replies(trained):
    checkpoint, result = trained
    assert result.output == checkpoint / "adapters" / "chat"
    assert (result.output / ADAPTER_CONFIG_FILE).is_file()
    assert result.conversations == (11, 1) and result.examples == (11, 1)
    assert result.best_val_loss < result.base_val_loss - 0.5
    record = json.loads((result.output / ADAPTER_CONFIG_FILE).read_text())
    assert record["metadata"]["best_val_loss"] == result.best_val_loss
    assert record["metadata"]["conversations"] == {"train": 11, "val": 1}
    base = load_checkpoint(checkpoint).model
    assert greedy_reply(base) != f" {GREETING}"
    load_adapter_onto(base, checkpoint, "chat")
    assert greedy_reply(base) == f" {GREETING}"  # a name it never saw


def test_early_stopping_stops_and_keeps_the_best_adapter(tmp_path, monkeypatch):
    checkpoint = new_checkpoint(tmp_path / "tiny")
    log = write_log(tmp_path / "chat.jsonl", logged_turns())
    probe = torch.tensor([[1, 2, 3, 4, 5]])
    scripted = iter([5.0, 4.0, 3.0, 3.5, 3.0005, 3.2, 1.0])  # the base, then each evaluation
    logits_seen = []

    def scripted_validation(model, *args):
        with torch.no_grad():
            logits_seen.append(model(probe)[0].clone())
        return next(scripted)

    monkeypatch.setattr(chat_tuning, "validation_loss", scripted_validation)
    result = finetune_chat(options(checkpoint, log, eval_every=2, patience=3))
    # 3.5, 3.0005 (not better by min_delta 0.001) and 3.2: three without improvement.
    assert (result.steps, result.stopped, result.best_step) == (10, "early_stopping", 4)
    assert result.best_val_loss == 3.0 and result.base_val_loss == 5.0
    assert [e["step"] for e in result.evaluations] == [2, 4, 6, 8, 10]
    model = load_checkpoint(checkpoint).model
    load_adapter_onto(model, checkpoint, "chat", merge=False)
    with torch.no_grad():
        saved = model(probe)[0]
    torch.testing.assert_close(saved, logits_seen[2])  # the model at step 4, not the last
    assert not torch.allclose(saved, logits_seen[-1])


def test_an_adapter_that_never_beats_the_base_is_not_written(tmp_path, monkeypatch):
    checkpoint = new_checkpoint(tmp_path / "tiny")
    log = write_log(tmp_path / "chat.jsonl", logged_turns())
    monkeypatch.setattr(chat_tuning, "validation_loss", lambda *args: 2.0)
    with pytest.raises(PrometheanError) as caught:
        finetune_chat(options(checkpoint, log, eval_every=1, patience=2))
    assert str(caught.value) == (
        "no evaluation in 2 steps lowered the validation loss below the base model's (2.0000) by "
        "more than 0.001, so no adapter was written; try another --lr or more --max-steps.")
    assert not (checkpoint / "adapters" / "chat").exists()


def test_fewer_than_ten_conversations_warn_and_still_train(tmp_path):
    checkpoint = new_checkpoint(tmp_path / "tiny")
    log = write_log(tmp_path / "chat.jsonl", logged_turns(NAMES[:5]))
    with pytest.warns(ChatLogWarning) as caught:
        result = finetune_chat(options(checkpoint, log, max_steps=10, eval_every=5))
    assert [str(w.message) for w in caught] == [(
        f"chat log {log} holds only 5 conversations with a reply; fewer than 10 is very little "
        "to learn from, so expect the adapter to memorise them (training anyway, 1 of them held "
        "out for validation).")]
    assert result.conversations == (4, 1) and (result.output / ADAPTER_CONFIG_FILE).is_file()


def test_an_existing_adapter_is_kept_unless_overwrite(trained, tmp_path):
    checkpoint, _ = trained
    log = write_log(tmp_path / "chat.jsonl", logged_turns())
    with pytest.raises(PrometheanError) as caught:
        finetune_chat(options(checkpoint, log))
    assert str(caught.value) == (f"{checkpoint} already has an adapter named 'chat'; pass "
                                 "--overwrite to replace it, or choose another --name.")


# --------------------------------------------------------------------- serving and the CLI


def test_the_server_logs_what_finetune_chat_reads_and_serves_the_adapter(trained, tmp_path):
    openai = pytest.importorskip("openai")
    from promethean.serve.app import create_app
    from tests.test_serve import RunningServer

    checkpoint, _ = trained
    loaded = load_checkpoint(checkpoint)
    log = tmp_path / "served.jsonl"
    app = create_app(loaded.model, loaded.tokenizer, model_name="tiny", checkpoint=checkpoint,
                     chat_log=log, max_batch_size=2, max_adapter_engines=1)
    server = RunningServer(app)
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0,
                               timeout=60)
        reply = client.chat.completions.create(
            model="tiny:chat", messages=[{"role": "user", "content": "hello, I am Zed"}],
            max_tokens=40, temperature=0)
    finally:
        server.stop()
    assert reply.choices[0].message.content == GREETING
    [conversation] = read_chat_log(log)
    assert conversation.exchanges == (("hello, I am Zed", GREETING),)


def cli(*args, stdin=None):
    result = subprocess.run([sys.executable, "-m", "promethean", *args], check=False, input=stdin,
                            capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert "Traceback" not in result.stderr, result.stderr
    return result


def test_cli_finetune_chat_then_generate_and_chat_with_the_adapter(trained, tmp_path):
    checkpoint, _ = trained
    log = write_log(tmp_path / "few.jsonl", logged_turns(NAMES[:5]))
    result = cli("finetune-chat", str(checkpoint), "--log", log, "--name", "cli", "--rank", "2",
                 "--lr", "1e-2", "--max-steps", "4", "--eval-every", "2", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert f"warning: chat log {log} holds only 5 conversations" in result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "conversations: 4 to train on (4 examples), 1 held out for validation " \
                       "(1 examples); log format: Promethean chat log"
    assert lines[1].startswith("4 steps (max steps): best validation loss ")
    assert "base model" in lines[1]
    assert lines[2].startswith(f"wrote {checkpoint / 'adapters' / 'cli'} (")
    assert lines[2].endswith("use it with --adapter cli, or serve it as tiny:cli")

    again = cli("finetune-chat", str(checkpoint), "--log", log, "--name", "cli")
    assert again.returncode == 1
    assert again.stderr.strip() == (f"error: {checkpoint} already has an adapter named 'cli'; "
                                    "pass --overwrite to replace it, or choose another --name.")
    missing = cli("finetune-chat", str(checkpoint), "--log", str(tmp_path / "none.jsonl"),
                  "--name", "other")
    assert missing.returncode == 1
    assert missing.stderr.strip() == f"error: chat log {tmp_path / 'none.jsonl'} does not exist."

    generated = cli("generate", str(checkpoint), "--adapter", "chat", "-p", UNSEEN,
                    "--temperature", "0", "--stop", "\n", "--max-new-tokens", "40")
    assert generated.returncode == 0, generated.stderr
    assert generated.stdout == f"{UNSEEN} {GREETING}\n"
    chatted = cli("chat", str(checkpoint), "--adapter", "chat", "--temperature", "0",
                  "--max-new-tokens", "40", stdin="hello, I am Zed\n")
    assert chatted.returncode == 0, chatted.stderr
    assert chatted.stdout.splitlines() == [f"Assistant: {GREETING}"]


def test_max_minutes_evaluates_the_step_that_spent_it_and_stops(tmp_path, monkeypatch, capsys):
    from promethean.train import loop

    checkpoint = new_checkpoint(tmp_path / "tiny")
    log = write_log(tmp_path / "chat.jsonl", logged_turns())
    scripted = iter([5.0, 4.0, 3.0])  # the base, step 10, then the step that spends the budget
    monkeypatch.setattr(chat_tuning, "validation_loss", lambda *args: next(scripted))
    readings = iter(range(10_000))  # the budget's clock: one minute a reading
    monkeypatch.setattr(loop, "wall_clock", lambda: 60.0 * next(readings))
    result = finetune_chat(options(checkpoint, log, eval_every=10, max_minutes=12.5))
    # Read at the start (0) and after each step: the 13th reading is 13 minutes.
    assert (result.steps, result.stopped, result.best_step) == (13, "max_minutes", 13)
    assert [e["step"] for e in result.evaluations] == [10, 13]
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("step ")]
    assert [line.split()[1] for line in lines] == ["10/100", "13/100"]


def _adapter_tensors(checkpoint, name):
    from safetensors.torch import load_file

    return load_file(str(checkpoint / "adapters" / name / "adapter_model.safetensors"))


def test_an_interrupted_training_continues_and_ends_as_an_uninterrupted_one(tmp_path,
                                                                            monkeypatch):
    """SIGINT at step 13 (state saved every 5 steps and at the signal): the run stops with the
    sentence, and the same command continues from step 13 to the same adapter, best step,
    evaluations and stop as a run that was never stopped; a crash (no signal) continues from
    the last saved step, and the state folder is gone once the training has ended."""
    import signal

    from promethean.errors import TrainingInterrupted
    from promethean.train import loop

    log = write_log(tmp_path / "chat.jsonl", logged_turns())
    settings = {"max_steps": 30, "eval_every": 4, "checkpoint_every": 5, "patience": 10}
    straight_checkpoint = new_checkpoint(tmp_path / "straight")
    straight = finetune_chat(options(straight_checkpoint, log, **settings))

    def metrics(checkpoint):  # the adapter's metrics.jsonl, less the timings
        lines = (checkpoint / "adapters" / "chat" / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(line).items()
                 if k not in ("tokens_per_second", "elapsed")} for line in lines]

    logged = metrics(straight_checkpoint)  # every 10 steps and at each evaluation (every 4)
    assert [line["step"] for line in logged] == [4, 8, 10, 12, 16, 20, 24, 28, 30]
    assert [line["step"] for line in logged if "val_loss" in line] == [4, 8, 12, 16, 20, 24, 28, 30]
    real_step = loop.optimizer_step

    def stopping_at(count, action):
        calls = []

        def step(*args, **kwargs):
            calls.append(1)
            if len(calls) == count:
                action()
            return real_step(*args, **kwargs)

        monkeypatch.setattr(loop, "optimizer_step", step)

    def crash():
        raise KeyboardInterrupt

    for name, action, saved_at in (
            ("signalled", lambda: os.kill(os.getpid(), signal.SIGINT), 13),
            ("crashed", crash, 10)):
        checkpoint = new_checkpoint(tmp_path / name)
        state = checkpoint / "adapters" / ".in-progress" / "chat"
        stopping_at(13, action)
        if name == "signalled":
            with pytest.raises(TrainingInterrupted) as caught:
                finetune_chat(options(checkpoint, log, **settings))
            assert str(caught.value) == (
                f"chat tuning of 'chat' interrupted by SIGINT at step 13 of 30; its progress is "
                f"saved in {state}: run the same command to continue it.")
            assert caught.value.signal_name == "SIGINT"
        else:
            with pytest.raises(KeyboardInterrupt):
                finetune_chat(options(checkpoint, log, **settings))
        assert not (checkpoint / "adapters" / "chat").exists()  # nothing half-written
        assert json.loads((state / "progress.json").read_text())["progress"]["step"] == saved_at
        monkeypatch.setattr(loop, "optimizer_step", real_step)
        resumed = finetune_chat(options(checkpoint, log, **settings))
        assert (resumed.steps, resumed.stopped, resumed.best_step) == (
            straight.steps, straight.stopped, straight.best_step)
        assert resumed.evaluations == straight.evaluations
        assert resumed.base_val_loss == straight.base_val_loss
        first = _adapter_tensors(straight_checkpoint, "chat")
        second = _adapter_tensors(checkpoint, "chat")
        assert first.keys() == second.keys()
        assert all(torch.equal(first[key], second[key]) for key in first)
        assert metrics(checkpoint) == metrics(straight_checkpoint)
        assert not state.exists()


def test_a_changed_log_or_options_start_the_training_afresh(tmp_path, monkeypatch):
    from promethean.train import loop

    checkpoint = new_checkpoint(tmp_path / "tiny")
    log = tmp_path / "chat.jsonl"
    write_log(log, logged_turns())
    real_step, calls = loop.optimizer_step, []

    def crashing_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 7:
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(loop, "optimizer_step", crashing_step)
    with pytest.raises(KeyboardInterrupt):
        finetune_chat(options(checkpoint, log, max_steps=10, eval_every=5, checkpoint_every=5))
    monkeypatch.setattr(loop, "optimizer_step", real_step)
    state = checkpoint / "adapters" / ".in-progress" / "chat"
    assert (state / "progress.json").is_file()
    write_log(log, logged_turns() + [{"chat_id": "chat-new", "time": 9000.0, "route": "/chat",
                                      "human": "bye", "assistant": "Bye!"}])
    with pytest.warns(UserWarning, match="holds an interrupted training with other options"):
        result = finetune_chat(options(checkpoint, log, max_steps=10, eval_every=5,
                                       checkpoint_every=5))
    assert [e["step"] for e in result.evaluations] == [5, 10]  # from the start
    assert not state.exists()
    with pytest.raises(PrometheanError, match="--checkpoint-every must be at least 1, got 0"):
        finetune_chat(options(checkpoint, log, checkpoint_every=0, overwrite=True))


def test_the_cli_exits_130_with_the_sentence_when_a_training_is_interrupted(monkeypatch,
                                                                          capsys):
    from promethean import cli
    from promethean.errors import TrainingInterrupted

    def interrupted(options):
        raise TrainingInterrupted("chat tuning of 'chat' interrupted by SIGTERM at step 3 of 9; "
                                  "run the same command to continue it.", "SIGTERM")

    monkeypatch.setattr(chat_tuning, "finetune_chat", interrupted)
    monkeypatch.setattr(sys, "argv", ["promethean", "finetune-chat", "ckpt", "--log", "log"])
    with pytest.raises(SystemExit) as exited:
        cli.main()
    assert exited.value.code == 143
    assert capsys.readouterr().err == ("chat tuning of 'chat' interrupted by SIGTERM at step 3 "
                                       "of 9; run the same command to continue it.\n")
