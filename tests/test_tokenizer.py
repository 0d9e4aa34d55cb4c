import json
import pickle
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from promethean.checkpoint import load_checkpoint, save_checkpoint
from promethean.config import load_preset
from promethean.errors import PrometheanError
from promethean.model import Transformer
from promethean.tokenizer import (
    END_OF_TEXT,
    ByteTokenizer,
    GPT2Tokenizer,
    find_gpt2_ranks,
    load_tokenizer,
    resolve_tokenizer,
    train_bpe,
    train_char,
    train_tokenizer,
    write_tokenizer_directory,
)

# Small enough to train on in milliseconds, varied enough for a few hundred merges, and with a
# document boundary and non-ASCII text in it.
CORPUS = [
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n",
    "Once upon a time there was a little girl named Lily. She loved to play outside.\n"
    f"{END_OF_TEXT}One day, she found a shiny red ball under the old oak tree.\n",
    "def main():\n    print('hello, world')  # 42 + 17 = 59\n",
    "Ça va? Größe, naïve café — 日本語のテキスト 🎉\n",
]
OTHER_CORPUS = ["In the beginning God created the heaven and the earth.\n" * 3]
KINDS = ["bytes", "gpt2", "bpe", "char"]


def refused(call, *args) -> str:
    """The sentence of the PrometheanError that `call(*args)` raises."""
    with pytest.raises(PrometheanError) as raised:
        call(*args)
    return str(raised.value)


@pytest.fixture(scope="module")
def gpt2():
    return GPT2Tokenizer()


@pytest.fixture(scope="module")
def bpe():
    return train_bpe(CORPUS, vocab_size=300)


@pytest.fixture(scope="module")
def char():
    return train_char(CORPUS, max_chars=40)


@pytest.fixture(scope="module", params=KINDS)
def tokenizer(request):
    if request.param == "bytes":
        return ByteTokenizer()
    return request.getfixturevalue(request.param)


# ---------------------------------------------------------------------------- every kind


@given(text=st.text())
@settings(max_examples=150, deadline=None)
def test_round_trip_any_unicode(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text)) == text


@given(pieces=st.lists(st.text(), min_size=1, max_size=4))
@settings(max_examples=50, deadline=None)
def test_end_of_text_in_any_text_is_one_id(tokenizer, pieces):
    text = END_OF_TEXT.join(pieces)
    ids = tokenizer.encode(text)
    assert ids.count(tokenizer.eot_id) == text.count(END_OF_TEXT)
    assert tokenizer.decode(ids) == text


@given(pieces=st.lists(st.text(), min_size=1, max_size=4))
@settings(max_examples=50, deadline=None)
def test_encode_ordinary_treats_end_of_text_as_plain_characters(tokenizer, pieces):
    text = END_OF_TEXT.join(pieces)
    ids = tokenizer.encode_ordinary(text)
    assert tokenizer.eot_id not in ids
    assert tokenizer.decode(ids) == text
    if len(pieces) == 1 and END_OF_TEXT not in text:
        assert ids == tokenizer.encode(text)


def test_end_of_text_alone_is_the_eot_id(tokenizer):
    assert tokenizer.encode(END_OF_TEXT) == [tokenizer.eot_id]
    assert tokenizer.decode([tokenizer.eot_id]) == END_OF_TEXT
    assert 0 <= tokenizer.eot_id < tokenizer.vocab_size


def test_ids_stay_inside_the_vocabulary(tokenizer):
    ids = tokenizer.encode("".join(CORPUS) + "unseen: ξ ∮ 🦜")
    assert 0 <= min(ids) and max(ids) < tokenizer.vocab_size


def test_save_and_load_keep_ids_and_fingerprint(tokenizer, tmp_path):
    tokenizer.save(tmp_path)
    loaded = load_tokenizer(tmp_path)
    text = "".join(CORPUS)
    assert (loaded.kind, loaded.vocab_size, loaded.eot_id, loaded.fingerprint) == (
        tokenizer.kind, tokenizer.vocab_size, tokenizer.eot_id, tokenizer.fingerprint,
    )
    assert loaded.encode(text) == tokenizer.encode(text)
    record = json.loads((tmp_path / "promethean-tokenizer.json").read_text())
    assert record["format"] == "promethean-tokenizer"
    assert record["kind"] == tokenizer.kind and record["fingerprint"] == tokenizer.fingerprint
    assert resolve_tokenizer(str(tmp_path)).fingerprint == tokenizer.fingerprint


def test_pickled_copies_encode_alike(tokenizer):
    # Data preparation hands the tokenizer to its worker processes by pickling it.
    copy = pickle.loads(pickle.dumps(tokenizer))
    text = "".join(CORPUS)
    assert copy.fingerprint == tokenizer.fingerprint
    assert copy.encode(text) == tokenizer.encode(text)
    assert copy.encode_ordinary(text) == tokenizer.encode_ordinary(text)


def test_fingerprints_tell_every_kind_apart(gpt2, bpe, char):
    fingerprints = {t.fingerprint for t in (ByteTokenizer(), gpt2, bpe, char)}
    assert len(fingerprints) == 4
    assert all(len(f) == 64 for f in fingerprints)


# ---------------------------------------------------------------------------- gpt2


def test_gpt2_matches_the_reference_ids(gpt2):
    assert gpt2.encode("Hello, world!") == [15496, 11, 995, 0]
    assert gpt2.encode("<|endoftext|>") == [50256]
    assert gpt2.decode([15496, 11, 995, 0]) == "Hello, world!"
    assert gpt2.fingerprint == "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"


def test_wrong_ranks_file_is_refused(tmp_path):
    fake = tmp_path / "gpt2.tiktoken"
    fake.write_text("not ranks")
    with pytest.raises(PrometheanError, match="is not the GPT-2 ranks file"):
        find_gpt2_ranks(fake)


# ---------------------------------------------------------------------------- bytes and char


def test_bytes_end_of_text_is_one_special_id():
    tokenizer = ByteTokenizer()
    assert tokenizer.encode("a<|endoftext|>b") == [97, 256, 98]
    assert tokenizer.decode([97, 256, 98]) == "a<|endoftext|>b"


def test_char_layout_bytes_then_end_of_text_then_characters_by_frequency():
    # 'a' is the most frequent; 'b' and 'c' tie and the lower code point comes first.
    tokenizer = train_char(["caab", "ab"])
    assert tokenizer.vocab_size == 257 + 3 and tokenizer.eot_id == 256
    assert tokenizer.encode("abc") == [257, 258, 259]
    assert tokenizer.encode("é") == list("é".encode("utf-8"))  # unseen: its UTF-8 bytes
    assert tokenizer.decode([257, 256, 195, 169]) == "a<|endoftext|>é"


def test_char_keeps_only_the_most_frequent_characters():
    tokenizer = train_char(["aaabbc"], max_chars=2)
    assert tokenizer.vocab_size == 259
    assert tokenizer.encode("abc") == [257, 258, ord("c")]


def test_char_vocab_size_counts_every_id():
    assert train_tokenizer("char", ["abcdef"], vocab_size=260).vocab_size == 260


# ---------------------------------------------------------------------------- bpe


def test_bpe_reaches_the_vocab_size_asked_for(bpe):
    assert bpe.vocab_size == 300
    assert len(bpe.encode(CORPUS[0])) < len(CORPUS[0])  # fewer ids than characters: it merged


def test_bpe_stops_early_on_a_corpus_with_nothing_more_to_merge():
    assert train_bpe(["ab ab ab"], vocab_size=8000).vocab_size < 300


def test_bpe_round_trips_inside_a_checkpoint(bpe, tmp_path):
    model = Transformer(load_preset("tiny-gpt2").model)
    save_checkpoint(tmp_path / "run", model, bpe)
    assert {"promethean-tokenizer.json", "bpe.json"} <= {p.name for p in (tmp_path / "run").iterdir()}
    loaded = load_checkpoint(tmp_path / "run").tokenizer
    assert loaded.fingerprint == bpe.fingerprint
    assert loaded.encode(CORPUS[1]) == bpe.encode(CORPUS[1])


# ---------------------------------------------------------------------------- training


@pytest.mark.parametrize("kind", ["bpe", "char"])
def test_training_is_deterministic(kind):
    first = train_tokenizer(kind, CORPUS, 300)
    second = train_tokenizer(kind, iter(CORPUS), 300)
    assert first.fingerprint == second.fingerprint
    assert first.encode("".join(CORPUS)) == second.encode("".join(CORPUS))


@pytest.mark.parametrize("kind", ["bpe", "char"])
def test_fingerprint_differs_between_different_trainings(kind):
    trained = train_tokenizer(kind, CORPUS, 280)
    assert trained.fingerprint != train_tokenizer(kind, OTHER_CORPUS, 280).fingerprint
    assert trained.fingerprint != train_tokenizer(kind, CORPUS, 270).fingerprint


def test_end_of_text_in_training_text_is_not_learned_from():
    tokenizer = train_char([f"ab{END_OF_TEXT}ab"])
    assert tokenizer.vocab_size == 259


# ---------------------------------------------------------------------------- refusals


def test_bad_vocab_sizes_are_refused_with_a_sentence():
    assert refused(train_bpe, CORPUS, 256) == (
        "a bpe vocabulary needs at least 257 ids (256 bytes and <|endoftext|>); got 256."
    )
    assert refused(train_char, CORPUS, 0) == (
        "a char tokenizer must learn at least one character; got max_chars 0."
    )
    assert refused(train_tokenizer, "char", CORPUS, 257) == (
        "a char vocabulary needs at least 258 ids (256 bytes, <|endoftext|> and one character); "
        "got 257."
    )
    assert refused(train_tokenizer, "gpt2", CORPUS) == (
        "cannot train a 'gpt2' tokenizer; the kinds trained on a corpus are bpe and char."
    )


@pytest.mark.parametrize("train", [train_bpe, train_char])
def test_empty_corpus_is_refused(train):
    assert refused(train, ["", END_OF_TEXT]) == "the corpus holds no text to train a tokenizer on."


def test_unknown_and_untrained_specs_are_refused():
    assert refused(resolve_tokenizer, "sentencepiece") == (
        "unknown tokenizer 'sentencepiece'; use bytes, gpt2 or a tokenizer directory (a trained "
        "bpe or char one, a Hugging Face tokenizer.json, or vocab.json with merges)."
    )
    assert refused(resolve_tokenizer, "bpe") == (
        "a bpe tokenizer is trained on a corpus first: run `promethean tokenizer train CORPUS "
        "--kind bpe --out DIR` and pass DIR instead of 'bpe'."
    )


def test_directory_without_a_tokenizer_is_refused(tmp_path):
    assert refused(load_tokenizer, tmp_path) == (
        f"{tmp_path} has no tokenizer: neither promethean-tokenizer.json (Promethean's), "
        "tokenizer.json (Hugging Face's) nor vocab.json with merges.txt or merges.json."
    )
    assert refused(load_tokenizer, tmp_path / "absent") == f"{tmp_path / 'absent'} does not exist."


def test_edited_tokenizer_files_are_refused(char, tmp_path):
    char.save(tmp_path)
    (tmp_path / "char.json").write_text(json.dumps({"characters": ["x", "y"]}))
    assert refused(load_tokenizer, tmp_path) == (
        f"the char tokenizer in {tmp_path} does not match the fingerprint in its "
        "promethean-tokenizer.json; "
        "its files were edited or mixed up."
    )


def test_missing_definition_file_is_refused(bpe, tmp_path):
    bpe.save(tmp_path)
    (tmp_path / "bpe.json").unlink()
    assert refused(load_tokenizer, tmp_path) == (
        f"{tmp_path / 'bpe.json'} is missing; the tokenizer record beside it refers to it."
    )


def test_writing_never_replaces_a_directory_of_other_files(char, tmp_path):
    (tmp_path / "model.safetensors").write_text("weights")
    assert refused(write_tokenizer_directory, char, tmp_path) == (
        f"{tmp_path} holds files that are not a tokenizer's (model.safetensors); choose a new "
        "or empty directory."
    )
    assert (tmp_path / "model.safetensors").read_text() == "weights"


# ---------------------------------------------------------------------------- command line


def run_cli(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "promethean", *args]
    return subprocess.run(command, capture_output=True, text=True)


def test_cli_trains_and_writes_a_tokenizer_directory(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(CORPUS))
    fingerprints = []
    for out in (tmp_path / "first", tmp_path / "second"):
        result = run_cli(
            "tokenizer", "train", str(corpus), "--vocab-size", "300", "--out", str(out)
        )
        assert result.returncode == 0, result.stderr
        assert f"wrote {out}: a bpe tokenizer of 300 ids" in result.stdout
        assert "sample: 'First Citizen:" in result.stdout
        assert {p.name for p in out.iterdir()} == {"promethean-tokenizer.json", "bpe.json"}
        fingerprints.append(load_tokenizer(out).fingerprint)
    # Two processes (each with its own hash seeds) train the same tokenizer.
    assert fingerprints[0] == fingerprints[1]


def test_cli_refuses_a_bad_vocab_size_without_a_traceback(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(CORPUS))
    out = tmp_path / "tokenizer"
    result = run_cli("tokenizer", "train", str(corpus), "--vocab-size", "100", "--out", str(out))
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "error: a bpe vocabulary needs at least 257 ids (256 bytes and <|endoftext|>); got 100."
    )
    assert not out.exists()
