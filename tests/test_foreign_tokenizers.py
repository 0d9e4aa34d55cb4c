"""Tokenizers made elsewhere: Hugging Face tokenizer.json directories, byte-level BPE vocab.json +
merges (GPT-2's merges.txt, MiniMacLLM's merges.json), and our own record under its new name with
the old one still read. Ids are checked against independent encoders: tiktoken for GPT-2, a
plain-Python BPE written from GPT-2's published algorithm, and transformers loading the file."""

import itertools
import json
import math
import subprocess
import sys

import pytest
import regex
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from promethean.checkpoint import load_checkpoint, save_checkpoint
from promethean.errors import PrometheanError
from promethean.files import write_checksums
from promethean.interop.export import byte_level_vocabulary, export_checkpoint
from promethean.tokenizer import (
    END_OF_TEXT,
    GPT2Tokenizer,
    load_tokenizer,
    resolve_tokenizer,
    train_bpe,
    train_char,
)
from tests.conftest import GPT2_BYTE_SYMBOLS, build
from tests.test_tokenizer import refused

TEXTS = [
    "First Citizen:\nBefore we proceed any further, hear me speak.\n",
    "Once upon a time there was a little girl named Lily.  She loved   to play outside.\n\n",
    "def main():\n    print('hello, world')  # 42 + 17 = 59 they're we'll I'd\n",
    "Ça va? Größe, naïve café — 日本語のテキスト 🎉\t\r\n",
]
MINIMAC_SPECIALS = ["<|pad|>", "<|unk|>", "<|bos|>", "<|eos|>"]

# GPT-2's encoder.py, as published: the split pattern (the byte table is in conftest).
GPT2_SPLIT = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")


BYTE_SYMBOLS = GPT2_BYTE_SYMBOLS


def reference_bpe(text, vocab, merges):
    """GPT-2's algorithm in plain Python: split, map bytes to symbols, merge the lowest-ranked
    adjacent pair until none is left, look the pieces up."""
    ranks = {pair: rank for rank, pair in enumerate(merges)}
    ids = []
    for word in GPT2_SPLIT.findall(text):
        parts = [BYTE_SYMBOLS[byte] for byte in word.encode("utf-8")]
        while len(parts) > 1:
            rank, index = min((ranks.get(pair, math.inf), i)
                              for i, pair in enumerate(itertools.pairwise(parts)))
            if rank == math.inf:
                break
            parts[index:index + 2] = [parts[index] + parts[index + 1]]
        ids.extend(vocab[part] for part in parts)
    return ids


# ------------------------------------------------------------------ GPT-2's vocab.json + merges.txt
@pytest.fixture(scope="module")
def gpt2():
    return GPT2Tokenizer()


@pytest.fixture(scope="module")
def gpt2_directory(gpt2, tmp_path_factory):
    """A hub GPT-2 directory's tokenizer files: vocab.json, merges.txt and the model's config."""
    directory = tmp_path_factory.mktemp("gpt2-files")
    tokens, merges = byte_level_vocabulary(gpt2)
    (directory / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    (directory / "config.json").write_text(json.dumps(
        {"model_type": "gpt2", "vocab_size": 50257, "bos_token_id": 50256, "eos_token_id": 50256}))
    return directory


def test_gpt2_vocab_and_merges_encode_as_tiktoken(gpt2, gpt2_directory):
    loaded = load_tokenizer(gpt2_directory)
    assert (loaded.kind, loaded.vocab_size, loaded.eot_id) == ("hf", 50257, 50256)
    for text in TEXTS:
        assert loaded.encode_ordinary(text) == gpt2.encode_ordinary(text)
        assert loaded.decode(loaded.encode(text)) == text
    joined = f"{TEXTS[0]}{END_OF_TEXT}{TEXTS[1]}"
    assert loaded.encode(joined) == gpt2.encode(joined)
    assert loaded.encode(joined).count(50256) == 1
    assert 50256 not in loaded.encode_ordinary(joined)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=60))
def test_gpt2_vocab_and_merges_agree_with_tiktoken_on_any_text(gpt2, gpt2_directory, text):
    loaded = load_tokenizer(gpt2_directory)
    assert loaded.encode_ordinary(text) == gpt2.encode_ordinary(text)
    assert loaded.decode(loaded.encode_ordinary(text)) == text


# ----------------------------------------------------------- MiniMacLLM's vocab.json + merges.json
@pytest.fixture(scope="module")
def minimac_vocabulary():
    """A byte-level BPE laid out as MiniMacLLM's tokenizer directory: its special tokens first,
    then the 256 byte symbols, then one token per merge."""
    tokens, merges = byte_level_vocabulary(train_bpe(TEXTS * 3, vocab_size=420))
    ordinary = [token for token in tokens if token != END_OF_TEXT]
    vocab = {token: index for index, token in enumerate([*MINIMAC_SPECIALS, *ordinary])}
    return vocab, [tuple(merge.split(" ")) for merge in merges]


def write_minimac_directory(directory, vocab, merges, merges_layout):
    directory.mkdir()
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    if merges_layout == "pairs":
        (directory / "merges.json").write_text(json.dumps([list(pair) for pair in merges]))
    elif merges_layout == "strings":
        (directory / "merges.json").write_text(json.dumps([" ".join(pair) for pair in merges]))
    else:
        (directory / "merges.txt").write_text("\n".join(" ".join(pair) for pair in merges) + "\n")
    (directory / "config.json").write_text(json.dumps({
        "vocab_size": len(vocab), "min_frequency": 2,
        "special_tokens": {"pad_token": "<|pad|>", "unk_token": "<|unk|>",
                           "bos_token": "<|bos|>", "eos_token": "<|eos|>"},
    }))
    return directory


@pytest.mark.parametrize("merges_layout", ["pairs", "strings", "txt"])
def test_minimac_directory_encodes_as_the_reference_bpe(minimac_vocabulary, merges_layout, tmp_path):
    vocab, merges = minimac_vocabulary
    loaded = load_tokenizer(write_minimac_directory(tmp_path / "tok", vocab, merges, merges_layout))
    assert (loaded.kind, loaded.vocab_size) == ("hf", len(vocab))
    assert loaded.eot_id == vocab["<|eos|>"] == 3
    for text in TEXTS:
        assert loaded.encode_ordinary(text) == reference_bpe(text, vocab, merges)
        assert loaded.decode(loaded.encode(text)) == text
    # <|endoftext|>, the toolkit's document boundary, and the tokenizer's own <|eos|> are both
    # the end-of-text id in `encode`, and plain text in `encode_ordinary`.
    for boundary in (END_OF_TEXT, "<|eos|>"):
        text = f"{TEXTS[0]}{boundary}{TEXTS[1]}"
        assert loaded.encode(text) == [*reference_bpe(TEXTS[0], vocab, merges), 3,
                                       *reference_bpe(TEXTS[1], vocab, merges)]
        assert loaded.encode_ordinary(text) == reference_bpe(text, vocab, merges)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=60))
def test_minimac_directory_agrees_with_the_reference_on_any_text(minimac_vocabulary, tmp_path_factory,
                                                                 text):
    vocab, merges = minimac_vocabulary
    directory = tmp_path_factory.mktemp("minimac-fuzz") / "tok"
    loaded = load_tokenizer(write_minimac_directory(directory, vocab, merges, "pairs"))
    assert loaded.encode_ordinary(text) == reference_bpe(text, vocab, merges)
    assert loaded.decode(loaded.encode_ordinary(text)) == text


def test_imported_tokenizer_keeps_its_ids_inside_a_checkpoint(minimac_vocabulary, tmp_path):
    from tokenizers import Tokenizer as LibraryTokenizer

    vocab, merges = minimac_vocabulary
    tokenizer = load_tokenizer(write_minimac_directory(tmp_path / "tok", vocab, merges, "pairs"))
    model = build("tiny-llama")
    checkpoint = save_checkpoint(tmp_path / "ckpt", model, tokenizer)
    names = {path.name for path in checkpoint.iterdir()}
    assert {"promethean-tokenizer.json", "tokenizer.json"} <= names
    loaded = load_checkpoint(checkpoint).tokenizer
    assert (loaded.kind, loaded.fingerprint, loaded.eot_id) == ("hf", tokenizer.fingerprint, 3)
    assert loaded.encode(TEXTS[2]) == reference_bpe(TEXTS[2], vocab, merges)
    # The checkpoint's tokenizer.json now is what its name says: Hugging Face's own file.
    library = LibraryTokenizer.from_file(str(checkpoint / "tokenizer.json"))
    assert library.encode(TEXTS[3], add_special_tokens=False).ids == loaded.encode(TEXTS[3])


# ------------------------------------------------------------- a Hugging Face tokenizer.json
@pytest.fixture(scope="module")
def sentencepiece_style_directory(tmp_path_factory):
    """A LLaMA-like tokenizer (BPE over Metaspace pieces, <s> </s> <unk>), as transformers saves."""
    from tokenizers import Tokenizer as LibraryTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    library = LibraryTokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    library.pre_tokenizer = pre_tokenizers.Metaspace()
    library.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace()])
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=[f"<0x{b:02X}>" for b in range(256)],
                                  show_progress=False)
    library.train_from_iterator(TEXTS * 3, trainer)
    directory = tmp_path_factory.mktemp("hf-tokenizer")
    library.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "LlamaTokenizerFast", "bos_token": "<s>",
         "eos_token": {"content": "</s>", "special": True}, "unk_token": "<unk>"}))
    return directory


def test_hf_tokenizer_directory_encodes_as_transformers_does(sentencepiece_style_directory):
    from transformers import PreTrainedTokenizerFast

    reference = PreTrainedTokenizerFast(
        tokenizer_file=str(sentencepiece_style_directory / "tokenizer.json"))
    loaded = resolve_tokenizer(str(sentencepiece_style_directory))
    assert loaded.kind == "hf" and loaded.eot_id == reference.convert_tokens_to_ids("</s>")
    for text in TEXTS:
        assert loaded.encode_ordinary(text) == reference.encode(text, add_special_tokens=False)
    assert loaded.encode(f"one{END_OF_TEXT}two") == [
        *reference.encode("one", add_special_tokens=False), loaded.eot_id,
        *reference.encode("two", add_special_tokens=False)]
    assert loaded.eot_id in loaded.encode("one</s>two")
    assert loaded.eot_id not in loaded.encode_ordinary("one</s>two")


def test_hf_tokenizer_directory_without_an_end_of_text_token_is_refused(tmp_path):
    from tokenizers import Tokenizer as LibraryTokenizer
    from tokenizers import models

    LibraryTokenizer(models.WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]")).save(
        str(tmp_path / "tokenizer.json"))
    assert refused(load_tokenizer, tmp_path) == (
        f"the tokenizer in {tmp_path} has no end-of-text token: no eos_token is named in its "
        "tokenizer_config.json, special_tokens_map.json, config.json and none of <|endoftext|>, "
        "</s>, <eos>, <|end_of_text|>, <|eos|>, <|im_end|>, [SEP] is in its vocabulary."
    )


# ------------------------------------------------------------------------------ bad directories
def _bad(directory, files):
    directory.mkdir()
    for name, text in files.items():
        (directory / name).write_text(text)
    return directory


BYTE_VOCAB = {symbol: index for index, symbol in enumerate(BYTE_SYMBOLS.values())}


@pytest.mark.parametrize(("files", "sentence"), [
    ({"vocab.json": json.dumps(BYTE_VOCAB)},
     "{d} has vocab.json but no merges.txt or merges.json beside it."),
    ({"vocab.json": "[1, 2]", "merges.txt": ""},
     "{d}/vocab.json is not a BPE vocabulary (a JSON object of token: id)."),
    ({"vocab.json": "{not json", "merges.txt": ""},
     "{d}/vocab.json is not valid JSON (Expecting property name enclosed in double quotes: "
     "line 1 column 2 (char 1))."),
    ({"vocab.json": json.dumps({"a": 0, "b": 0}), "merges.txt": ""},
     "{d}/vocab.json gives two tokens the same id."),
    ({"vocab.json": json.dumps(BYTE_VOCAB), "merges.json": json.dumps({"merges": "a b"})},
     "{d}/merges.json is not a merges list (\"a b\" strings or [a, b] pairs, in merge order)."),
    ({"vocab.json": json.dumps(BYTE_VOCAB), "merges.json": json.dumps(["a b", "a b c"])},
     "merge 2 of {d}/merges.json is not a pair of tokens: 'a b c'."),
    ({"vocab.json": json.dumps(BYTE_VOCAB), "merges.txt": "#version: 0.2\na b\n"},
     "merge 1 of {d}/merges.txt (a b) uses 'ab', which vocab.json does not hold."),
    ({"vocab.json": json.dumps({**BYTE_VOCAB, "▁the": 256}), "merges.txt": ""},
     "{d}/vocab.json is not a byte-level BPE vocabulary: its token '▁the' is not written in "
     "GPT-2's byte symbols. Only byte-level vocab.json + merges directories are read; give a "
     "Hugging Face tokenizer.json instead."),
    ({"vocab.json": json.dumps(BYTE_VOCAB), "merges.txt": ""},
     "the tokenizer in {d} has no end-of-text token: no eos_token is named in its "
     "tokenizer_config.json, special_tokens_map.json, config.json and none of <|endoftext|>, "
     "</s>, <eos>, <|end_of_text|>, <|eos|>, <|im_end|>, [SEP] is in its vocabulary."),
    ({"tokenizer.json": json.dumps({"model": {"type": "Nonsense"}})},
     "{d}/tokenizer.json is not a Hugging Face tokenizers file "),
    ({"tokenizer.json": "\xff"}, "{d}/tokenizer.json is not a valid tokenizer file."),
])
def test_broken_tokenizer_directories_get_one_sentence(files, sentence, tmp_path):
    directory = _bad(tmp_path / "tok", files)
    message = refused(load_tokenizer, directory)
    expected = sentence.format(d=directory)
    assert message == expected or (expected.endswith(" ") and message.startswith(expected))
    assert "\n" not in message


def test_cli_names_a_broken_tokenizer_directory_in_one_line(tmp_path):
    directory = _bad(tmp_path / "tok", {"vocab.json": json.dumps(BYTE_VOCAB)})
    (tmp_path / "corpus.txt").write_text("some text\n")
    result = subprocess.run(
        [sys.executable, "-m", "promethean", "data", "prepare", str(tmp_path / "corpus.txt"),
         "--tokenizer", str(directory), "--out", str(tmp_path / "data")],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert result.stderr == f"error: {directory} has vocab.json but no merges.txt or merges.json beside it.\n"
    assert not (tmp_path / "data").exists()


# ---------------------------------------------------------- directories written before the rename
def to_old_layout(directory):
    """What a checkpoint or tokenizer directory looked like before the record was renamed: the
    record called tokenizer.json, without a format field, and checksums naming that file."""
    record = json.loads((directory / "promethean-tokenizer.json").read_text())
    del record["format"]
    (directory / "tokenizer.json").write_text(json.dumps(record, indent=2) + "\n")
    (directory / "promethean-tokenizer.json").unlink()
    if (directory / "checksums.json").is_file():
        write_checksums(directory)


def test_checkpoint_written_before_the_rename_loads_as_before(tmp_path):
    bpe = train_bpe(TEXTS, vocab_size=300)
    model = build("tiny-gpt2")
    checkpoint = save_checkpoint(tmp_path / "ckpt", model, bpe)
    to_old_layout(checkpoint)
    loaded = load_checkpoint(checkpoint)
    assert (loaded.tokenizer.kind, loaded.tokenizer.fingerprint) == ("bpe", bpe.fingerprint)
    ids = torch.tensor([bpe.encode(TEXTS[0])[:16]])
    assert torch.equal(loaded.model(ids).logits, model(ids).logits)
    # Its checksum still guards the old record.
    (checkpoint / "tokenizer.json").write_text((checkpoint / "tokenizer.json").read_text() + " ")
    with pytest.raises(PrometheanError, match="tokenizer.json is corrupt"):
        load_checkpoint(checkpoint)


def test_resaving_an_old_checkpoint_leaves_the_new_layout_only(tmp_path):
    char = train_char(TEXTS, max_chars=40)
    checkpoint = save_checkpoint(tmp_path / "ckpt", build("tiny-gpt2"), char)
    to_old_layout(checkpoint)
    save_checkpoint(checkpoint, build("tiny-gpt2"), char)
    names = sorted(path.name for path in checkpoint.iterdir())
    assert names == ["char.json", "checksums.json", "config.json", "model.safetensors",
                     "promethean-tokenizer.json"]
    assert load_checkpoint(checkpoint).tokenizer.fingerprint == char.fingerprint


def test_tokenizer_directory_written_before_the_rename_loads(tmp_path):
    char = train_char(TEXTS, max_chars=40)
    char.save(tmp_path)
    to_old_layout(tmp_path)
    assert load_tokenizer(tmp_path).fingerprint == char.fingerprint


# ------------------------------------------------- export --format hf, then convert from-hf
def run(*args):
    result = subprocess.run([sys.executable, "-m", "promethean", *args], capture_output=True,
                            text=True, timeout=300)
    assert "Traceback" not in result.stderr, result.stderr
    return result


def test_hf_export_comes_back_through_convert_from_hf_with_its_tokenizer(tmp_path):
    bpe = train_bpe(TEXTS * 3, vocab_size=320)
    model = build("tiny-llama", vocab_size=320)
    checkpoint = save_checkpoint(tmp_path / "ckpt", model, bpe)
    exported = export_checkpoint(checkpoint, "hf", tmp_path / "hf")
    ids = torch.tensor([bpe.encode(TEXTS[1])[:24]])
    expected = model(ids).logits

    # By default the export's own tokenizer; named with --tokenizer, the same.
    for extra, out in (((), "back"), (("--tokenizer", str(exported)), "named")):
        result = run("convert", "from-hf", str(exported), "--out", str(tmp_path / out), *extra)
        assert result.returncode == 0, result.stderr
        assert result.stdout.endswith("parameters, bpe tokenizer)\n")
        back = load_checkpoint(tmp_path / out)
        assert (back.tokenizer.kind, back.tokenizer.fingerprint) == ("bpe", bpe.fingerprint)
        assert torch.allclose(back.model(ids).logits, expected, atol=1e-5)

    # A plain Hugging Face directory (our record removed, as another tool would write it): the
    # tokenizer.json itself, with the same ids and fingerprint, so data prepared before still fits.
    (exported / "promethean-tokenizer.json").unlink()
    result = run("convert", "from-hf", str(exported), "--out", str(tmp_path / "plain"))
    assert result.returncode == 0, result.stderr
    plain = load_checkpoint(tmp_path / "plain").tokenizer
    assert (plain.kind, plain.fingerprint, plain.eot_id) == ("hf", bpe.fingerprint, bpe.eot_id)
    assert all(plain.encode(text) == bpe.encode(text) for text in TEXTS)


def test_convert_from_hf_without_a_tokenizer_for_a_small_vocabulary_is_refused(tmp_path):
    checkpoint = save_checkpoint(tmp_path / "ckpt", build("tiny-llama"), train_char(TEXTS))
    exported = export_checkpoint(checkpoint, "hf", tmp_path / "hf")
    for name in ("promethean-tokenizer.json", "char.json"):
        (exported / name).unlink()
    result = run("convert", "from-hf", str(exported), "--out", str(tmp_path / "back"))
    assert result.returncode == 1
    assert result.stderr == (
        f"error: the model's vocabulary has 512 ids, fewer than GPT-2's 50257, and {exported} "
        "holds no tokenizer; name its tokenizer with --tokenizer (bytes or a tokenizer "
        "directory).\n")
    assert not (tmp_path / "back").exists()
