import json
import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from promethean.data import batches
from promethean.data.batches import (
    TokenDataset,
    WindowSampler,
    bits_per_byte,
    chat_batches,
    evaluate,
    exact_loss,
    perplexity,
)
from promethean.data.chat import Turn, encode_conversation, render_conversation
from promethean.errors import PrometheanError
from promethean.model.transformer import IGNORE_INDEX
from promethean.tokenizer import END_OF_TEXT, ByteTokenizer, GPT2Tokenizer
from tests.conftest import build

BYTES = ByteTokenizer()
BYTES_FINGERPRINT = BYTES.fingerprint


def write_prepared(directory, train, val, dtype="uint16", tokenizer=None, meta_overrides=None):
    """A prepared directory as `promethean.data.prepare` writes it, built directly."""
    tokenizer = tokenizer or {"kind": "bytes", "fingerprint": BYTES_FINGERPRINT,
                              "vocab_size": 257, "eot_id": 256}
    directory.mkdir(parents=True, exist_ok=True)
    splits = {}
    for name, tokens in (("train", train), ("val", val)):
        array = np.asarray(tokens, dtype=dtype)
        array.tofile(directory / f"{name}.bin")
        splits[name] = {"file": f"{name}.bin", "tokens": int(array.size),
                        "bytes": int(array.size) * 3, "documents": 1}
    meta = {"format": "promethean-tokens", "version": 1, "tokenizer": tokenizer, "dtype": dtype,
            "source": {"name": "test", "sha256": "0" * 64}, "settings": {}, "splits": splits,
            "replaced_bytes": 0}
    meta.update(meta_overrides or {})
    (directory / "meta.json").write_text(json.dumps(meta))
    return directory


@pytest.fixture
def counting(tmp_path):
    """train holds 0, 1, 2, ... so every window shows where it came from."""
    return TokenDataset(write_prepared(tmp_path / "data", np.arange(5000) % 60000,
                                       np.arange(1000) % 256))


@pytest.fixture
def text_data(tmp_path):
    rng = np.random.default_rng(0)
    return TokenDataset(write_prepared(tmp_path / "text", rng.integers(0, 257, 3000),
                                       rng.integers(0, 257, 613)), BYTES)


def test_ignore_index_is_the_models():
    assert batches.IGNORE_INDEX == IGNORE_INDEX


# ------------------------------------------------------------------------------- random windows


@pytest.mark.parametrize("dtype", ["uint16", "uint32"])
def test_windows_are_file_slices_and_targets_are_shifted_inputs(tmp_path, dtype):
    data = np.arange(5000, dtype=np.int64) + (70000 if dtype == "uint32" else 0)
    vocab_size = 80000 if dtype == "uint32" else 60000
    tokenizer = {"kind": "x", "fingerprint": "f", "vocab_size": vocab_size, "eot_id": 0}
    dataset = TokenDataset(write_prepared(tmp_path, data, data[:100], dtype, tokenizer))
    inputs, targets = dataset.sample_batch("train", 6, 33, torch.Generator().manual_seed(1))
    assert inputs.shape == targets.shape == (6, 33)
    assert inputs.dtype == targets.dtype == torch.int64
    assert torch.equal(inputs[:, 1:], targets[:, :-1])
    for row_inputs, row_targets in zip(inputs.numpy(), targets.numpy()):
        start = row_inputs[0] - data[0]
        assert np.array_equal(row_inputs, data[start : start + 33])
        assert np.array_equal(row_targets, data[start + 1 : start + 34])


def test_windows_reach_both_ends_of_the_split(tmp_path):
    dataset = TokenDataset(write_prepared(tmp_path, np.arange(12), np.arange(12)))
    inputs, targets = dataset.sample_batch("train", 400, 10, np.random.default_rng(0))
    assert set(inputs[:, 0].tolist()) == {0, 1}  # the only starts leaving room for a target
    assert targets.max().item() == 11


def test_seeded_generators_give_the_same_batches(counting):
    for make in (lambda: torch.Generator().manual_seed(7), lambda: np.random.default_rng(7)):
        first = counting.sample_batch("train", 4, 16, make())
        second = counting.sample_batch("train", 4, 16, make())
        assert all(torch.equal(a, b) for a, b in zip(first, second))
    other = counting.sample_batch("train", 4, 16, torch.Generator().manual_seed(8))
    assert not torch.equal(first[0], other[0])


def test_sampler_state_restores_the_following_batches_exactly(counting):
    sampler = WindowSampler(counting, batch_size=4, block_size=16, seed=3)
    for _ in range(3):
        sampler.next_batch()
    saved = json.loads(json.dumps(sampler.state_dict()))  # it survives a JSON file
    expected = [sampler.next_batch() for _ in range(2)]

    resumed = WindowSampler(counting, batch_size=4, block_size=16, seed=0)
    resumed.load_state_dict(saved)
    for (inputs, targets), (want_inputs, want_targets) in zip(
        [resumed.next_batch() for _ in range(2)], expected
    ):
        assert torch.equal(inputs, want_inputs) and torch.equal(targets, want_targets)
    assert resumed.state_dict() == sampler.state_dict()


def test_ranks_draw_different_windows(counting):
    one = WindowSampler(counting, 4, 16, seed=3, rank=0).next_batch()[0]
    two = WindowSampler(counting, 4, 16, seed=3, rank=1).next_batch()[0]
    assert not torch.equal(one, two)


def test_sampler_refuses_a_state_for_other_shapes(counting):
    state = WindowSampler(counting, 4, 16).state_dict()
    with pytest.raises(PrometheanError) as error:
        WindowSampler(counting, 8, 16).load_state_dict(state)
    assert str(error.value) == (
        "the saved data position is for split 'train', batch size 4, block size 16, but this run "
        "uses 'train', 8 and 16; an exact resume needs the same three."
    )


def test_a_split_shorter_than_a_window_is_one_sentence(tmp_path):
    directory = write_prepared(tmp_path, np.arange(16), np.arange(4))
    with pytest.raises(PrometheanError) as error:
        TokenDataset(directory).sample_batch("train", 2, 16, np.random.default_rng(0))
    assert str(error.value) == (
        f"the 'train' split of {directory} has 16 tokens, fewer than block size + 1 = 17; "
        "use a smaller block size or more data."
    )


def test_an_unknown_split_is_one_sentence(counting):
    with pytest.raises(PrometheanError, match="has no split 'test'; it has train, val.$"):
        counting.sample_batch("test", 2, 4, np.random.default_rng(0))


# ------------------------------------------------------------------------------ exact evaluation


@pytest.mark.parametrize("count,batch_size,block_size", [
    (613, 4, 32), (640, 4, 32), (5, 3, 32), (97, 1, 8), (1, 2, 4),
])
def test_eval_pass_makes_every_token_a_target_exactly_once(tmp_path, count, batch_size, block_size):
    data = np.random.default_rng(count).integers(0, 256, count)
    dataset = TokenDataset(write_prepared(tmp_path, data, data))
    collected, rows = [], 0
    for inputs, targets in dataset.iter_eval_batches("val", batch_size, block_size):
        assert inputs.shape == targets.shape and inputs.shape[1] == block_size
        assert inputs.shape[0] <= batch_size
        real = targets[:, :-1] != -100
        assert torch.equal(inputs[:, 1:][real], targets[:, :-1][real])
        assert ((inputs >= 0) & (inputs < 257)).all()
        if rows == 0:
            assert inputs[0, 0].item() == 256  # the split is read after an end-of-text
        rows += inputs.shape[0]
        collected.append(targets[targets != -100])
    assert rows == math.ceil(count / block_size)
    assert np.array_equal(torch.cat(collected).numpy(), data)


def test_exact_loss_equals_a_brute_force_mean_over_every_position(text_data):
    model = build("tiny-gpt2", seed=1)
    block = 64
    stream = torch.tensor(np.concatenate([[256], text_data.tokens("val")]), dtype=torch.long)
    nats = 0.0
    with torch.no_grad():
        for start in range(0, len(stream) - 1, block):
            window = stream[start : start + block + 1]
            loss = model(window[None, :-1], window[None, 1:]).loss
            nats += loss.item() * (len(window) - 1)
    brute_force = nats / (len(stream) - 1)

    total = exact_loss(model, text_data.iter_eval_batches("val", 4, block))
    assert total.targets == 613
    assert total.mean == pytest.approx(brute_force, rel=1e-5)
    # A plain mean of per-batch means weights the short last batch wrongly.
    means = [model(x, y).loss.item() for x, y in text_data.iter_eval_batches("val", 4, block)]
    assert abs(sum(means) / len(means) - brute_force) > 1e-4

    result = evaluate(model, text_data, "val", 4, block)
    assert result.loss == pytest.approx(total.mean)
    assert result.perplexity == pytest.approx(math.exp(total.mean))
    assert result.bits_per_byte == pytest.approx(total.mean * 613 / (3 * 613 * math.log(2)))
    assert result.targets == 613


def test_exact_loss_restores_training_mode(text_data):
    model = build("tiny-gpt2").train()
    exact_loss(model, text_data.iter_eval_batches("val", 8, 128))
    assert model.training


def test_bits_per_byte_and_perplexity_on_known_numbers():
    # 2 bits per token, 4 bytes per token -> half a bit per byte.
    assert bits_per_byte(2 * math.log(2), {"tokens": 100, "bytes": 400}) == pytest.approx(0.5)
    assert bits_per_byte(math.log(2), {"tokens": 10, "bytes": 10}) == pytest.approx(1.0)
    assert perplexity(math.log(5)) == pytest.approx(5.0)
    assert perplexity(1e6) == float("inf")
    with pytest.raises(PrometheanError, match="at least one byte"):
        bits_per_byte(1.0, {"tokens": 1, "bytes": 0})


# ---------------------------------------------------------------------------- meta.json checks


def test_a_file_size_that_disagrees_with_meta_names_the_file(tmp_path):
    directory = write_prepared(tmp_path, np.arange(100), np.arange(10))
    with open(directory / "val.bin", "ab") as handle:
        handle.write(b"\0")
    with pytest.raises(PrometheanError) as error:
        TokenDataset(directory)
    assert str(error.value) == (
        f"{directory / 'meta.json'} says 10 uint16 tokens (20 bytes) for val.bin, which holds 21 "
        "bytes: it is truncated or belongs to another preparation."
    )


def test_a_missing_split_file_is_named(tmp_path):
    directory = write_prepared(tmp_path, np.arange(100), np.arange(10))
    (directory / "train.bin").unlink()
    with pytest.raises(PrometheanError) as error:
        TokenDataset(directory)
    assert str(error.value) == (
        f"{directory / 'meta.json'} lists train.bin for the 'train' split, and it is missing."
    )


@pytest.mark.parametrize("overrides,message", [
    ({"format": "npy"},
     "is not a prepared token directory (format 'npy', expected 'promethean-tokens')."),
    ({"version": 2}, "has version 2, but this Promethean reads version 1; prepare the data again."),
    ({"dtype": "int8"}, "names dtype 'int8'; expected one of uint16, uint32."),
    ({"tokenizer": {"kind": "gpt2"}},
     "lacks the tokenizer's kind, fingerprint, vocab_size or eot_id."),
    ({"tokenizer": {"kind": "x", "fingerprint": "f", "vocab_size": 70000, "eot_id": 0}},
     "stores ids as uint16, too narrow for a vocabulary of 70000."),
])
def test_bad_meta_is_one_sentence(tmp_path, overrides, message):
    directory = write_prepared(tmp_path, np.arange(100), np.arange(10), meta_overrides=overrides)
    with pytest.raises(PrometheanError) as error:
        TokenDataset(directory)
    assert str(error.value) == f"{directory / 'meta.json'} {message}"


def test_a_directory_without_meta_is_one_sentence(tmp_path):
    with pytest.raises(PrometheanError) as error:
        TokenDataset(tmp_path)
    assert str(error.value) == (
        f"{tmp_path} has no meta.json; prepare it first with `promethean data prepare`."
    )


@dataclass
class FakeTokenizer:
    kind: str = "bpe"
    fingerprint: str = "abc123"
    vocab_size: int = 8000
    eot_id: int = 0


def test_a_different_tokenizer_is_refused_naming_both(tmp_path):
    directory = write_prepared(tmp_path, np.arange(100), np.arange(10))
    for tokenizer in (FakeTokenizer(), FakeTokenizer(fingerprint=BYTES_FINGERPRINT, kind="bytes")):
        with pytest.raises(PrometheanError) as error:
            TokenDataset(directory, tokenizer)
        assert str(error.value) == (
            f"{directory} was prepared with tokenizer 'bytes' (fingerprint "
            f"{BYTES_FINGERPRINT[:12]}, vocab 257) but the tokenizer given is '{tokenizer.kind}' "
            f"(fingerprint {tokenizer.fingerprint[:12]}, vocab {tokenizer.vocab_size}); prepare "
            "the data again with this tokenizer or use the one it was prepared with."
        )
    TokenDataset(directory, BYTES)  # the tokenizer it was prepared with is accepted
    TokenDataset(directory, FakeTokenizer(fingerprint=BYTES_FINGERPRINT, vocab_size=257))


# ---------------------------------------------------------------------------------------- chat

CONVERSATION = [Turn("human", "Hello"), Turn("assistant", "Hi there!"),
                Turn("human", " How are you? "), Turn("assistant", "Fine.")]


def test_chat_mask_covers_exactly_the_assistant_replies():
    ids, mask = encode_conversation(CONVERSATION[:2], BYTES)
    assert BYTES.decode(ids) == "Human: Hello\nAssistant: Hi there!\n" + END_OF_TEXT
    assert BYTES.decode([i for i, m in zip(ids, mask) if m]) == " Hi there!\n" + END_OF_TEXT

    ids, mask = encode_conversation(CONVERSATION, BYTES)
    assert ids == BYTES.encode(render_conversation(CONVERSATION)) + [BYTES.eot_id]
    assert len(mask) == len(ids)
    assert BYTES.decode([i for i, m in zip(ids, mask) if m]) == " Hi there!\n Fine.\n" + END_OF_TEXT
    assert BYTES.decode([i for i, m in zip(ids, mask) if not m]) == (
        "Human: Hello\nAssistant:Human: How are you?\nAssistant:"
    )

    _, all_mask = encode_conversation(CONVERSATION, BYTES, train_on="all")
    assert all(all_mask)


def test_a_conversation_ending_with_the_human_does_not_train_the_end_of_text():
    ids, mask = encode_conversation(CONVERSATION[:3], BYTES)
    assert ids[-1] == BYTES.eot_id and not mask[-1]
    with pytest.raises(PrometheanError) as error:
        encode_conversation(CONVERSATION, BYTES, train_on="bots")
    assert str(error.value) == "train_on must be one of assistant, all, not 'bots'."


def test_gpt2_segments_decode_to_the_rendered_text_and_match_whole_text_ids():
    gpt2 = GPT2Tokenizer()
    ids, mask = encode_conversation(CONVERSATION, gpt2)
    text = render_conversation(CONVERSATION) + END_OF_TEXT
    assert gpt2.decode(ids) == text
    assert ids == gpt2.encode(text)  # the cuts fall where GPT-2's pre-tokeniser cuts anyway
    assert gpt2.decode([i for i, m in zip(ids, mask) if m]) == " Hi there!\n Fine.\n" + END_OF_TEXT


def _trained(batches_):
    return [t for _, targets in batches_ for t in targets[targets != -100].tolist()]


@pytest.mark.parametrize("pack", [True, False])
@pytest.mark.parametrize("block_size", [8, 40, 200])
def test_chat_batches_train_every_masked_token_once(pack, block_size):
    conversations = [CONVERSATION, CONVERSATION[:2], [Turn("human", "Only me")], CONVERSATION[:3]]
    out = list(chat_batches(conversations, BYTES, 3, block_size, pack=pack))
    expected = []
    for turns in conversations:
        ids, mask = encode_conversation(turns, BYTES)
        expected += [i for i, m in zip(ids, mask) if m]
    assert _trained(out) == expected
    for inputs, targets in out:
        assert inputs.shape == targets.shape
        assert inputs.shape[0] <= 3 and inputs.shape[1] == block_size
        trained = targets != -100
        assert trained.any(dim=1).all()  # no row without a loss
        # a trained target is the next input: rows are the conversations' own text
        assert torch.equal(targets[:, :-1][trained[:, :-1]], inputs[:, 1:][trained[:, :-1]])


def test_chat_batches_pack_conversations_into_rows():
    short = [Turn("human", "a"), Turn("assistant", "b")]  # 23 tokens with the end-of-text
    assert len(encode_conversation(short, BYTES)[0]) == 23
    packed = list(chat_batches([short] * 4, BYTES, 8, 91))  # rows of 92 = 4 x 23 tokens
    assert [tuple(x.shape) for x, _ in packed] == [(1, 91)]
    inputs, targets = packed[0]
    assert BYTES.decode(inputs[0].tolist()) == (
        "Human: a\nAssistant: b\n" + END_OF_TEXT) * 3 + "Human: a\nAssistant: b\n"
    assert BYTES.decode([t for t in targets[0].tolist() if t != -100]) == (
        " b\n" + END_OF_TEXT) * 4
    unpacked = list(chat_batches([short] * 4, BYTES, 8, 91, pack=False))
    assert [tuple(x.shape) for x, _ in unpacked] == [(4, 91)]
    assert (unpacked[0][0][:, 22:] == BYTES.eot_id).all()
    assert (unpacked[0][1][:, 22:] == -100).all()  # padding is never trained
