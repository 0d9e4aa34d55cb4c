import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from promethean.errors import PrometheanError
from promethean.tokenizer import ByteTokenizer, GPT2Tokenizer, find_gpt2_ranks, get_tokenizer, load_tokenizer


@given(st.text())
@settings(max_examples=200, deadline=None)
def test_bytes_round_trip_any_unicode(text):
    tokenizer = ByteTokenizer()
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_bytes_end_of_text_is_one_special_id():
    tokenizer = ByteTokenizer()
    assert tokenizer.encode("a<|endoftext|>b") == [97, 256, 98]
    assert tokenizer.decode([97, 256, 98]) == "a<|endoftext|>b"


@pytest.fixture(scope="module")
def gpt2():
    return GPT2Tokenizer()


def test_gpt2_matches_the_reference_ids(gpt2):
    assert gpt2.encode("Hello, world!") == [15496, 11, 995, 0]
    assert gpt2.encode("<|endoftext|>") == [50256]
    assert gpt2.decode([15496, 11, 995, 0]) == "Hello, world!"


@given(st.text())
@settings(max_examples=100, deadline=None)
def test_gpt2_round_trip_any_unicode(text):
    tokenizer = GPT2Tokenizer()
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_tokenizer_saves_and_loads_by_kind(tmp_path, gpt2):
    gpt2.save(tmp_path)
    assert load_tokenizer(tmp_path).encode("Hello") == gpt2.encode("Hello")


def test_wrong_ranks_file_is_refused(tmp_path):
    fake = tmp_path / "gpt2.tiktoken"
    fake.write_text("not ranks")
    with pytest.raises(PrometheanError, match="is not the GPT-2 ranks file"):
        find_gpt2_ranks(fake)


def test_unknown_tokenizer_kind():
    with pytest.raises(PrometheanError, match="unknown tokenizer 'sentencepiece'; available tokenizers: bytes, gpt2."):
        get_tokenizer("sentencepiece")
