"""Tokenizers behind one protocol.

- `bytes`: one id per UTF-8 byte plus `<|endoftext|>`; needs nothing, fits any vocab >= 257.
- `gpt2`: the GPT-2 BPE through tiktoken. The ranks file is found offline: an explicit path,
  `PROMETHEAN_GPT2_RANKS`, tiktoken's own cache (`TIKTOKEN_CACHE_DIR`), our user cache, or else
  extracted from the pinned `openai-whisper` sdist on PyPI (fetched with pip, checked by sha256).
- `bpe`: a byte-level BPE trained with Hugging Face `tokenizers` on any texts (`train_bpe`).
- `char`: one id per frequent character with a UTF-8 byte fallback, for tiny experiments
  (`train_char`).

Every kind encodes any unicode string and decodes it back unchanged, and encodes `<|endoftext|>`
in the text as its single `eot_id` (`encode_ordinary` keeps it as plain characters instead). Each
has a `fingerprint`, the sha256 of what defines its id mapping, so that token files prepared with
one tokenizer are never read with another.

- `hf`: a tokenizer made elsewhere: a Hugging Face `tokenizer.json` directory, or a byte-level
  BPE given as `vocab.json` + `merges.txt` (GPT-2's layout) or `merges.json` (MiniMacLLM's).

A tokenizer saves itself into a directory (a checkpoint's, or one of its own) as
`promethean-tokenizer.json`, our small record {"format", "kind", "vocab_size", "fingerprint"};
trained and imported kinds add the file that defines them (`bpe.json`, the Hugging Face tokenizer
we trained; `char.json`, the learned characters; `tokenizer.json`, an imported Hugging Face
tokenizer), named in the record. Until December 2026 the record itself was called
`tokenizer.json`, the name of Hugging Face's format, which it is not; such directories are read as
before. `load_tokenizer(directory)` reads a record, or else a Hugging Face or vocab + merges
directory; `resolve_tokenizer(spec)` takes a kind that needs no training or such a directory.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from promethean.archives import ArchiveReader, PinnedArchive, cache_dir, fetch_archive, sha256_of_file
from promethean.errors import PrometheanError
from promethean.files import atomic_directory, atomic_file

if TYPE_CHECKING:  # imported where used: only the bpe kind needs the library
    import tokenizers

END_OF_TEXT = "<|endoftext|>"
TOKENIZER_FILE = "promethean-tokenizer.json"
TOKENIZER_RECORD_FORMAT = "promethean-tokenizer"
# Hugging Face's file, and the name our record had before it was renamed (told apart by content).
HF_TOKENIZER_FILE = "tokenizer.json"
LEGACY_TOKENIZER_FILE = "tokenizer.json"
BPE_FILE = "bpe.json"
CHAR_FILE = "char.json"
# Every name a tokenizer's save may write: a checkpoint save owns them all.
TOKENIZER_FILES = frozenset({TOKENIZER_FILE, HF_TOKENIZER_FILE, BPE_FILE, CHAR_FILE})

# Both trained kinds start from the 256 byte values and add <|endoftext|>.
BYTE_IDS = 256
SMALLEST_TRAINED_VOCAB = BYTE_IDS + 1
DEFAULT_BPE_VOCAB_SIZE = 8000  # the MiniMacLLM card's BPE
# 255 learned characters make 512 ids in all: the vocabulary of the tiny-* presets.
DEFAULT_CHAR_MAX_CHARS = 255

GPT2_RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
GPT2_RANKS_ARCHIVE = PinnedArchive(
    requirement="openai-whisper==20250625",
    filename="openai_whisper-20250625.tar.gz",
    sha256="37a91a3921809d9f44748ffc73c0a55c9f366c85a3ef5c2ae0cc09540432eb96",
)
GPT2_RANKS_MEMBER = "whisper/assets/gpt2.tiktoken"
# tiktoken names its cache files by the sha1 of the download address.
TIKTOKEN_R50K_URL = "https://openaipublic.blob.core.windows.net/encodings/r50k_base.tiktoken"
GPT2_PATTERN = (
    r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
)
# The byte tokenizer's mapping is defined by this code alone, so a fixed description of it stands
# in for the content that the other kinds hash. Change it only together with the mapping.
BYTES_FINGERPRINT = hashlib.sha256(
    b"promethean bytes: UTF-8 bytes 0-255, <|endoftext|> 256"
).hexdigest()


class Tokenizer(Protocol):
    kind: str
    vocab_size: int
    eot_id: int
    fingerprint: str

    def encode(self, text: str) -> list[int]: ...

    def encode_ordinary(self, text: str) -> list[int]:
        """Like `encode`, but `<|endoftext|>` in the text is ordinary characters: data
        preparation encodes documents this way, so that its eot ids are document boundaries."""
        ...

    def decode(self, ids: list[int]) -> str: ...

    def save(self, directory: Path) -> None: ...


def _sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _write_record(
    directory: Path, tokenizer: Tokenizer, definition_file: str | None = None, **extra: str
) -> None:
    record = {
        "format": TOKENIZER_RECORD_FORMAT,
        "kind": tokenizer.kind,
        "vocab_size": tokenizer.vocab_size,
        "fingerprint": tokenizer.fingerprint,
    }
    if definition_file is not None:
        record["file"] = definition_file
    record.update(extra)
    text = json.dumps(record, indent=2) + "\n"
    (Path(directory) / TOKENIZER_FILE).write_text(text, encoding="utf-8")


def _encode_around_end_of_text(
    text: str, encode_ordinary: Callable[[str], list[int]], eot_id: int
) -> list[int]:
    ids: list[int] = []
    for index, piece in enumerate(text.split(END_OF_TEXT)):
        if index:
            ids.append(eot_id)
        ids.extend(encode_ordinary(piece))
    return ids


def _decode_bytes_and_symbols(ids: list[int], symbols: Mapping[int, str]) -> str:
    """Ids below 256 are raw UTF-8 bytes, decoded a run at a time so that a character split over
    several ids comes back whole; other ids are looked up in `symbols`. Ids in neither (a model's
    vocabulary is often padded beyond its tokenizer's) decode to nothing."""
    out, pending = [], bytearray()
    for token in ids:
        if 0 <= token < BYTE_IDS:
            pending.append(token)
            continue
        out.append(pending.decode("utf-8", errors="replace"))
        pending.clear()
        out.append(symbols.get(token, ""))
    out.append(pending.decode("utf-8", errors="replace"))
    return "".join(out)


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255 and `<|endoftext|>` as 256."""

    kind = "bytes"
    vocab_size = 257
    eot_id = 256
    fingerprint = BYTES_FINGERPRINT

    def encode(self, text: str) -> list[int]:
        return _encode_around_end_of_text(text, self.encode_ordinary, self.eot_id)

    def encode_ordinary(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return _decode_bytes_and_symbols(ids, {self.eot_id: END_OF_TEXT})

    def save(self, directory: Path) -> None:
        _write_record(directory, self)


class GPT2Tokenizer:
    """GPT-2's byte-level BPE (50,257 ids) through tiktoken, built from a local ranks file."""

    kind = "gpt2"
    vocab_size = 50257
    eot_id = 50256
    fingerprint = GPT2_RANKS_SHA256

    def __init__(self, ranks_path: str | Path | None = None) -> None:
        import tiktoken
        from tiktoken.load import load_tiktoken_bpe

        path = find_gpt2_ranks(ranks_path)
        self.encoding = tiktoken.Encoding(
            name="gpt2",
            pat_str=GPT2_PATTERN,
            mergeable_ranks=load_tiktoken_bpe(str(path)),
            special_tokens={END_OF_TEXT: self.eot_id},
        )

    def encode(self, text: str) -> list[int]:
        return self.encoding.encode(text, allowed_special={END_OF_TEXT})

    def encode_ordinary(self, text: str) -> list[int]:
        return self.encoding.encode_ordinary(text)

    def decode(self, ids: list[int]) -> str:
        return self.encoding.decode(ids, errors="replace")

    def save(self, directory: Path) -> None:
        _write_record(directory, self)


class HFTokenizer:
    """A tokenizer made elsewhere, through Hugging Face `tokenizers`: read from a `tokenizer.json`
    directory or built from a byte-level BPE's `vocab.json` and merges (`read_foreign_tokenizer`).

    Its end-of-text token is the directory's `eos_token` (or a usual name for one); `<|endoftext|>`
    in a text is also that token, as for every kind, since corpora use it as the document
    boundary. No BOS or other template is added: Promethean marks documents with end-of-text
    alone. It round-trips text when the tokenizer does (byte-level ones do); `tokenizer.json` is
    the library's own file, loadable by `tokenizers` and transformers as it is.
    """

    kind = "hf"
    definition_file = HF_TOKENIZER_FILE

    def __init__(self, hf_tokenizer: tokenizers.Tokenizer, end_of_text: str) -> None:
        self.hf_tokenizer = hf_tokenizer
        self.end_of_text = end_of_text
        self.eot_id = hf_tokenizer.token_to_id(end_of_text)
        if self.eot_id is None:
            raise PrometheanError(f"the tokenizer has no token {end_of_text!r} to end texts with.")
        ids = hf_tokenizer.get_vocab(with_added_tokens=True).values()
        self.vocab_size = max(ids) + 1  # ids need not be contiguous; the model needs them all
        # The library's own serialisation is canonical: loading it and serialising again gives
        # the same text, so a saved and reloaded tokenizer keeps its fingerprint.
        self.fingerprint = _sha256_text(hf_tokenizer.to_str())

    def encode(self, text: str) -> list[int]:
        def encode_with_specials(piece: str) -> list[int]:
            return self.hf_tokenizer.encode(piece, add_special_tokens=False).ids

        return _encode_around_end_of_text(text, encode_with_specials, self.eot_id)

    def encode_ordinary(self, text: str) -> list[int]:
        return self._ordinary_tokenizer.encode(text, add_special_tokens=False).ids

    @functools.cached_property
    def _ordinary_tokenizer(self) -> tokenizers.Tokenizer:
        """Without its special added tokens, so that no text is cut into one of them; ordinary
        added tokens (a user's own words) stay."""
        from tokenizers import Tokenizer as HFTokenizerLibrary

        definition = json.loads(self.hf_tokenizer.to_str())
        definition["added_tokens"] = [
            added for added in definition.get("added_tokens") or [] if not added.get("special")
        ]
        return HFTokenizerLibrary.from_str(json.dumps(definition))

    def decode(self, ids: list[int]) -> str:
        return self.hf_tokenizer.decode(ids, skip_special_tokens=False)

    def save(self, directory: Path) -> None:
        definition = self.hf_tokenizer.to_str()
        (Path(directory) / self.definition_file).write_text(definition, encoding="utf-8")
        _write_record(directory, self, self.definition_file, end_of_text=self.end_of_text)

    @classmethod
    def load(cls, path: Path, end_of_text: str) -> HFTokenizer:
        return cls(_hf_tokenizer_from_text(_read_definition(path), path), end_of_text)


def _hf_tokenizer_from_text(text: str, path: Path) -> tokenizers.Tokenizer:
    from tokenizers import Tokenizer as HFTokenizerLibrary

    try:
        return HFTokenizerLibrary.from_str(text)
    except Exception as error:  # the library raises a bare Exception for any malformed file
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise PrometheanError(f"{path} is not a Hugging Face tokenizers file ({reason}).") from None


class BPETokenizer(HFTokenizer):
    """A byte-level BPE, GPT-2's scheme, trained on your own corpus with Hugging Face `tokenizers`.

    Text is split by GPT-2's pattern, each piece's UTF-8 bytes are mapped to 256 printable byte
    symbols, and the learned merges join those; so every string encodes, with no unknown token.
    `<|endoftext|>` is id 0, then come the 256 byte symbols, then the merges in the order learned.
    `bpe.json` is the Hugging Face tokenizer itself, loadable by `tokenizers.Tokenizer.from_file`.
    It is an `hf` tokenizer whose end of text is `<|endoftext|>`, saved under a kind of its own.
    """

    kind = "bpe"
    definition_file = BPE_FILE

    def __init__(self, hf_tokenizer: tokenizers.Tokenizer) -> None:
        super().__init__(hf_tokenizer, END_OF_TEXT)

    def save(self, directory: Path) -> None:
        definition = self.hf_tokenizer.to_str()
        (Path(directory) / self.definition_file).write_text(definition, encoding="utf-8")
        _write_record(directory, self, self.definition_file)

    @classmethod
    def load(cls, path: Path) -> BPETokenizer:
        hf_tokenizer = _hf_tokenizer_from_text(_read_definition(path), path)
        if hf_tokenizer.token_to_id(END_OF_TEXT) is None:
            raise PrometheanError(f"{path} has no {END_OF_TEXT} token.")
        return cls(hf_tokenizer)


class CharTokenizer:
    """One id per character learned from a corpus, and raw UTF-8 bytes for every other character.

    Ids 0..255 are byte values: a character outside the learned set is encoded as its UTF-8 bytes,
    so any string round-trips however small the vocabulary. Id 256 is `<|endoftext|>`. Ids 257
    onwards are the learned characters, most frequent first. `char.json` holds just that list, as
    {"characters": [...]}.
    """

    kind = "char"
    definition_file = CHAR_FILE
    eot_id = BYTE_IDS

    def __init__(self, characters: Iterable[str]) -> None:
        self.characters = tuple(characters)
        self.id_of_character = {
            character: SMALLEST_TRAINED_VOCAB + index
            for index, character in enumerate(self.characters)
        }
        self.symbol_of_id = {token: character for character, token in self.id_of_character.items()}
        self.symbol_of_id[self.eot_id] = END_OF_TEXT
        self.vocab_size = SMALLEST_TRAINED_VOCAB + len(self.characters)
        self.fingerprint = _sha256_text(self._definition())

    def _definition(self) -> str:
        return json.dumps({"characters": list(self.characters)}, ensure_ascii=False) + "\n"

    def encode(self, text: str) -> list[int]:
        return _encode_around_end_of_text(text, self.encode_ordinary, self.eot_id)

    def encode_ordinary(self, text: str) -> list[int]:
        ids: list[int] = []
        for character in text:
            token = self.id_of_character.get(character)
            if token is None:
                ids.extend(character.encode("utf-8"))
            else:
                ids.append(token)
        return ids

    def decode(self, ids: list[int]) -> str:
        return _decode_bytes_and_symbols(ids, self.symbol_of_id)

    def save(self, directory: Path) -> None:
        (Path(directory) / self.definition_file).write_text(self._definition(), encoding="utf-8")
        _write_record(directory, self, self.definition_file)

    @classmethod
    def load(cls, path: Path) -> CharTokenizer:
        try:
            characters = json.loads(_read_definition(path))["characters"]
        except (json.JSONDecodeError, KeyError, TypeError):
            characters = None
        valid = (
            isinstance(characters, list)
            and all(isinstance(character, str) and len(character) == 1 for character in characters)
            and len(set(characters)) == len(characters)
        )
        if not valid:
            raise PrometheanError(
                f"{path} is not a char tokenizer file (a list of distinct characters)."
            )
        return cls(characters)


# Where a tokenizer directory names its special tokens: transformers' files, and the model or
# tokenizer config.json beside them (MiniMacLLM keeps its tokenizer settings there).
SPECIAL_TOKEN_FILES = ("tokenizer_config.json", "special_tokens_map.json", "config.json")
# Usual end-of-text names, tried in order when no file names one.
END_OF_TEXT_NAMES = (END_OF_TEXT, "</s>", "<eos>", "<|end_of_text|>", "<|eos|>", "<|im_end|>",
                     "[SEP]")
MERGES_FILES = ("merges.txt", "merges.json")


def _read_json_file(path: Path) -> object:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise PrometheanError(f"{path} is not valid JSON ({error}).") from None


def _token_text(value: object) -> str | None:
    """A special token as the files write it: a string, or transformers' {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _named_special_tokens(directory: Path, vocab: Mapping[str, int]) -> tuple[list[str], str | None]:
    """(special tokens named in the directory's settings files, its end-of-text token or None)."""
    id_to_token = {token_id: token for token, token_id in vocab.items()}
    specials: list[str] = []
    end_of_text: str | None = None
    for name in SPECIAL_TOKEN_FILES:
        path = directory / name
        if not path.is_file():
            continue
        settings = _read_json_file(path)
        if not isinstance(settings, dict):
            continue
        for key, value in settings.items():
            if key.endswith("_token_id") and isinstance(value, int) and value in id_to_token:
                value = id_to_token[value]
            elif not key.endswith("_token"):
                continue
            token = _token_text(value)
            if token is None:
                continue
            specials.append(token)
            if key.startswith("eos_token") and end_of_text is None:
                end_of_text = token
        listed = settings.get("special_tokens") or settings.get("additional_special_tokens")
        if isinstance(listed, dict):  # {"<|endoftext|>": 0, ...} or {"eos": "</s>", ...}
            names = [key if isinstance(value, int) else _token_text(value)
                     for key, value in listed.items()]
            for role in ("eos_token", "eos"):
                if end_of_text is None and _token_text(listed.get(role)) is not None:
                    end_of_text = _token_text(listed[role])
        elif isinstance(listed, list):
            names = [_token_text(value) for value in listed]
        else:
            names = []
        specials.extend(token for token in names if token)
    return [token for token in dict.fromkeys(specials) if token in vocab], end_of_text


def _choose_end_of_text(directory: Path, named: str | None, present: Callable[[str], bool]) -> str:
    if named is not None and present(named):
        return named
    for candidate in END_OF_TEXT_NAMES:
        if present(candidate):
            return candidate
    raise PrometheanError(
        f"the tokenizer in {directory} has no end-of-text token: no eos_token is named in its "
        f"{', '.join(SPECIAL_TOKEN_FILES)} and none of {', '.join(END_OF_TEXT_NAMES)} is in its "
        "vocabulary."
    )


def _read_hf_tokenizer_directory(directory: Path) -> HFTokenizer:
    path = directory / HF_TOKENIZER_FILE
    hf_tokenizer = _hf_tokenizer_from_text(_read_definition(path), path)
    vocab = hf_tokenizer.get_vocab(with_added_tokens=True)
    if not vocab:
        raise PrometheanError(f"{path} holds an empty vocabulary.")
    _specials, named = _named_special_tokens(directory, vocab)
    return HFTokenizer(hf_tokenizer, _choose_end_of_text(directory, named, vocab.__contains__))


def _read_vocab(path: Path) -> dict[str, int]:
    vocab = _read_json_file(path)
    valid = (
        isinstance(vocab, dict) and vocab
        and all(isinstance(token_id, int) and not isinstance(token_id, bool) and token_id >= 0
                for token_id in vocab.values())
    )
    if not valid:
        raise PrometheanError(f"{path} is not a BPE vocabulary (a JSON object of token: id).")
    if len(set(vocab.values())) != len(vocab):
        raise PrometheanError(f"{path} gives two tokens the same id.")
    return vocab


def _merge_pair(entry: object) -> tuple[str, str] | None:
    if isinstance(entry, str):
        parts = entry.split(" ")
    elif isinstance(entry, list):
        parts = entry
    else:
        return None
    if len(parts) != 2 or not all(isinstance(part, str) and part for part in parts):
        return None
    return parts[0], parts[1]


def _read_merges(path: Path) -> list[tuple[str, str]]:
    """GPT-2's merges.txt (a `#version` line, then "a b" per line) or a merges.json: a list of
    "a b" strings or [a, b] pairs, or an object of "a b": rank."""
    if path.suffix == ".txt":
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError:
            raise PrometheanError(f"{path} is not UTF-8 text.") from None
        entries = [(number, line) for number, line in enumerate(lines, 1)
                   if line and not (number == 1 and line.startswith("#version"))]
    else:
        data = _read_json_file(path)
        if isinstance(data, dict) and all(isinstance(rank, int) for rank in data.values()):
            data = sorted(data, key=data.__getitem__)
        if not isinstance(data, list):
            raise PrometheanError(
                f"{path} is not a merges list (\"a b\" strings or [a, b] pairs, in merge order)."
            )
        entries = list(enumerate(data, 1))
    merges = []
    for number, entry in entries:
        pair = _merge_pair(entry)
        if pair is None:
            raise PrometheanError(f"merge {number} of {path} is not a pair of tokens: {entry!r}.")
        merges.append(pair)
    return merges


@functools.cache
def _byte_symbols() -> frozenset[str]:
    from tokenizers import pre_tokenizers

    return frozenset(pre_tokenizers.ByteLevel.alphabet())


def _read_vocab_and_merges(directory: Path) -> HFTokenizer:
    """A byte-level BPE from `vocab.json` and `merges.txt` / `merges.json`, encoding as GPT-2's
    scheme does: GPT-2's split pattern, no prefix space, bytes as GPT-2's 256 symbols."""
    from tokenizers import AddedToken, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizerLibrary

    vocab = _read_vocab(directory / "vocab.json")
    merges_path = next((directory / name for name in MERGES_FILES if (directory / name).is_file()),
                       None)
    if merges_path is None:
        raise PrometheanError(
            f"{directory} has vocab.json but no merges.txt or merges.json beside it."
        )
    merges = _read_merges(merges_path)
    specials, named = _named_special_tokens(directory, vocab)
    # Tokens like <|endoftext|> are specials wherever they are not named as such.
    specials += [token for token in vocab
                 if token.startswith("<|") and token.endswith("|>") and token not in specials]
    symbols = _byte_symbols()
    for token in vocab:
        if token not in specials and not set(token) <= symbols:
            raise PrometheanError(
                f"{directory / 'vocab.json'} is not a byte-level BPE vocabulary: its token "
                f"{token!r} is not written in GPT-2's byte symbols. Only byte-level vocab.json + "
                "merges directories are read; give a Hugging Face tokenizer.json instead."
            )
    for number, (left, right) in enumerate(merges, 1):
        for part in (left, right, left + right):
            if part not in vocab:
                raise PrometheanError(
                    f"merge {number} of {merges_path} ({left} {right}) uses {part!r}, which "
                    "vocab.json does not hold."
                )
    hf_tokenizer = HFTokenizerLibrary(models.BPE(vocab=vocab, merges=merges))
    hf_tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf_tokenizer.decoder = decoders.ByteLevel()
    hf_tokenizer.add_special_tokens([AddedToken(token, special=True) for token in specials])
    end_of_text = _choose_end_of_text(directory, named, lambda token: token in specials)
    return HFTokenizer(hf_tokenizer, end_of_text)


def read_foreign_tokenizer(directory: str | Path) -> HFTokenizer:
    """The tokenizer of a Hugging Face directory (`tokenizer.json`) or of a byte-level BPE's
    `vocab.json` + `merges.txt` / `merges.json` (GPT-2's files; MiniMacLLM's)."""
    directory = Path(directory)
    if (directory / HF_TOKENIZER_FILE).is_file():
        return _read_hf_tokenizer_directory(directory)
    if (directory / "vocab.json").is_file():
        return _read_vocab_and_merges(directory)
    raise PrometheanError(
        f"{directory} has no tokenizer: neither {TOKENIZER_FILE} (Promethean's), "
        f"{HF_TOKENIZER_FILE} (Hugging Face's) nor vocab.json with merges.txt or merges.json."
    )


def _read_definition(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PrometheanError(
            f"{path} is missing; the tokenizer record beside it refers to it."
        ) from None
    except UnicodeDecodeError:
        raise PrometheanError(f"{path} is not UTF-8 text.") from None


def find_gpt2_ranks(explicit: str | Path | None = None) -> Path:
    """Return a verified GPT-2 ranks file, fetching it from the registry archive if needed."""
    if explicit is not None or os.environ.get("PROMETHEAN_GPT2_RANKS"):
        path = Path(explicit or os.environ["PROMETHEAN_GPT2_RANKS"])
        if not path.is_file():
            raise PrometheanError(f"GPT-2 ranks file {path} does not exist.")
        if sha256_of_file(path) != GPT2_RANKS_SHA256:
            raise PrometheanError(f"{path} is not the GPT-2 ranks file (sha256 mismatch).")
        return path
    candidates = [cache_dir() / "gpt2.tiktoken"]
    if os.environ.get("TIKTOKEN_CACHE_DIR"):
        url_key = hashlib.sha1(TIKTOKEN_R50K_URL.encode()).hexdigest()
        candidates.append(Path(os.environ["TIKTOKEN_CACHE_DIR"]) / url_key)
    for path in candidates:
        if path.is_file() and sha256_of_file(path) == GPT2_RANKS_SHA256:
            return path
    return _extract_gpt2_ranks(candidates[0])


def _extract_gpt2_ranks(destination: Path) -> Path:
    """Take the ranks out of the pinned sdist. The package itself is never installed: it would
    pull in triton and a CUDA stack for one 1.6 MB file."""
    try:
        archive_path = fetch_archive(GPT2_RANKS_ARCHIVE)
    except PrometheanError as error:
        raise PrometheanError(
            f"{str(error).rstrip('.')}; or set PROMETHEAN_GPT2_RANKS to a local gpt2.tiktoken file."
        ) from None
    with ArchiveReader(archive_path) as reader:
        member = next(name for name in reader.names() if name.endswith(GPT2_RANKS_MEMBER))
        with reader.open(member) as handle:
            ranks = handle.read()
    if hashlib.sha256(ranks).hexdigest() != GPT2_RANKS_SHA256:
        raise PrometheanError(f"the GPT-2 ranks in {archive_path.name} failed the sha256 check.")
    with atomic_file(destination) as partial:
        partial.write_bytes(ranks)
    return destination


class _TrainingTexts:
    """The training texts cut at `<|endoftext|>`, a document boundary and never text to learn
    from; counts what it yields so that an empty corpus is refused rather than trained on."""

    def __init__(self, texts: Iterable[str]) -> None:
        self.texts = texts
        self.characters_seen = 0

    def __iter__(self) -> Iterator[str]:
        for text in self.texts:
            for piece in text.split(END_OF_TEXT):
                self.characters_seen += len(piece)
                yield piece

    def require_some(self) -> None:
        if not self.characters_seen:
            raise PrometheanError("the corpus holds no text to train a tokenizer on.")


def train_bpe(texts: Iterable[str], vocab_size: int = DEFAULT_BPE_VOCAB_SIZE) -> BPETokenizer:
    """Learn a byte-level BPE of at most `vocab_size` ids, `<|endoftext|>` included.

    The same texts always give the same tokenizer. A corpus with too few distinct pairs to merge
    gives a smaller vocabulary: read the result's `vocab_size`.
    """
    if vocab_size < SMALLEST_TRAINED_VOCAB:
        raise PrometheanError(
            f"a bpe vocabulary needs at least {SMALLEST_TRAINED_VOCAB} ids (256 bytes and "
            f"{END_OF_TEXT}); got {vocab_size}."
        )
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    hf_tokenizer = HFTokenizer(models.BPE())
    # No prefix space: GPT-2 adds none, and adding one would break decode(encode(s)) == s.
    hf_tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf_tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[END_OF_TEXT],
        # All 256 bytes, seen in the corpus or not, so that any text encodes.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    texts = _TrainingTexts(texts)
    hf_tokenizer.train_from_iterator(texts, trainer)
    texts.require_some()
    return BPETokenizer(hf_tokenizer)


def train_char(texts: Iterable[str], max_chars: int = DEFAULT_CHAR_MAX_CHARS) -> CharTokenizer:
    """Learn the `max_chars` most frequent characters; ties go to the lower code point, so the
    same texts always give the same tokenizer."""
    if max_chars < 1:
        raise PrometheanError(
            f"a char tokenizer must learn at least one character; got max_chars {max_chars}."
        )
    counts: Counter[str] = Counter()
    texts = _TrainingTexts(texts)
    for piece in texts:
        counts.update(piece)
    texts.require_some()
    ranked = sorted(counts, key=lambda character: (-counts[character], character))
    return CharTokenizer(ranked[:max_chars])


DEFAULT_VOCAB_SIZES = {
    "bpe": DEFAULT_BPE_VOCAB_SIZE,
    "char": SMALLEST_TRAINED_VOCAB + DEFAULT_CHAR_MAX_CHARS,
}


def train_tokenizer(kind: str, texts: Iterable[str], vocab_size: int | None = None) -> Tokenizer:
    """Train a `bpe` or `char` tokenizer of at most `vocab_size` ids in all, `<|endoftext|>`
    included (by default `DEFAULT_VOCAB_SIZES[kind]`)."""
    if kind not in DEFAULT_VOCAB_SIZES:
        raise PrometheanError(
            f"cannot train a '{kind}' tokenizer; the kinds trained on a corpus are bpe and char."
        )
    if vocab_size is None:
        vocab_size = DEFAULT_VOCAB_SIZES[kind]
    if kind == "bpe":
        return train_bpe(texts, vocab_size)
    if vocab_size <= SMALLEST_TRAINED_VOCAB:
        raise PrometheanError(
            f"a char vocabulary needs at least {SMALLEST_TRAINED_VOCAB + 1} ids (256 bytes, "
            f"{END_OF_TEXT} and one character); got {vocab_size}."
        )
    return train_char(texts, vocab_size - SMALLEST_TRAINED_VOCAB)


_BUILTIN_TOKENIZERS = {"bytes": ByteTokenizer, "gpt2": GPT2Tokenizer}
_TRAINED_TOKENIZERS = {"bpe": BPETokenizer, "char": CharTokenizer}


def resolve_tokenizer(spec: str | Path) -> Tokenizer:
    """`bytes` or `gpt2` by name, or the tokenizer saved in a directory (a trained tokenizer's or
    a checkpoint's). A name wins over a directory of the same name: write ./gpt2 for the folder."""
    if isinstance(spec, str) and spec in _BUILTIN_TOKENIZERS:
        return _BUILTIN_TOKENIZERS[spec]()
    if Path(spec).is_dir():
        return load_tokenizer(spec)
    if spec in _TRAINED_TOKENIZERS:
        raise PrometheanError(
            f"a {spec} tokenizer is trained on a corpus first: run `promethean tokenizer train "
            f"CORPUS --kind {spec} --out DIR` and pass DIR instead of '{spec}'."
        )
    raise PrometheanError(
        f"unknown tokenizer '{spec}'; use bytes, gpt2 or a tokenizer directory (a trained bpe or "
        "char one, a Hugging Face tokenizer.json, or vocab.json with merges)."
    )


# The first name of resolve_tokenizer, which presets and several commands call it by.
get_tokenizer = resolve_tokenizer


def tokenizer_record_path(directory: str | Path) -> Path | None:
    """Where `directory` keeps a Promethean tokenizer record: `promethean-tokenizer.json`, or
    `tokenizer.json` as written before the rename (told from Hugging Face's file by its content);
    None when it has neither."""
    directory = Path(directory)
    path = directory / TOKENIZER_FILE
    if path.is_file():
        return path
    legacy = directory / LEGACY_TOKENIZER_FILE
    if legacy.is_file() and _is_promethean_record(legacy):
        return legacy
    return None


def _is_promethean_record(path: Path) -> bool:
    try:
        with path.open("rb") as handle:
            head = handle.read(4096)
    except OSError:
        return False
    # A record is a few short lines; Hugging Face's file is large and has a "model". Read the
    # head only, so that a 10 MB tokenizer.json is not parsed twice.
    if len(head) == 4096:
        return False
    try:
        record = json.loads(head.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return True  # a broken file of ours: load_tokenizer names it
    return isinstance(record, dict) and "model" not in record and "kind" in record


def has_tokenizer_files(directory: str | Path) -> bool:
    """Whether `directory` holds a tokenizer `load_tokenizer` would try to read: our record, a
    Hugging Face tokenizer.json, or a vocab.json."""
    directory = Path(directory)
    return any((directory / name).is_file()
               for name in (TOKENIZER_FILE, HF_TOKENIZER_FILE, "vocab.json"))


def load_tokenizer(directory: str | Path) -> Tokenizer:
    """The tokenizer that `save` wrote into `directory`, checked against its fingerprint; or, in
    a directory without our record, a Hugging Face or vocab + merges tokenizer."""
    directory = Path(directory)
    path = tokenizer_record_path(directory)
    if path is None:
        if not directory.exists():
            raise PrometheanError(f"{directory} does not exist.")
        if not directory.is_dir():
            raise PrometheanError(f"{directory} is a file, not a tokenizer directory.")
        return read_foreign_tokenizer(directory)
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        record = None
    if not isinstance(record, dict) or not isinstance(record.get("kind"), str):
        raise PrometheanError(f"{path} is not a valid tokenizer file.")
    kind = record["kind"]
    if kind in _BUILTIN_TOKENIZERS:
        tokenizer = _BUILTIN_TOKENIZERS[kind]()
    elif kind in _TRAINED_TOKENIZERS:
        trained = _TRAINED_TOKENIZERS[kind]
        tokenizer = trained.load(directory / str(record.get("file", trained.definition_file)))
    elif kind == HFTokenizer.kind and isinstance(record.get("end_of_text"), str):
        tokenizer = HFTokenizer.load(
            directory / str(record.get("file", HFTokenizer.definition_file)), record["end_of_text"]
        )
    else:
        raise PrometheanError(
            f"{path} names tokenizer kind '{kind}', which is none of bytes, gpt2, bpe, char or hf."
        )
    # Records written before fingerprints existed have none to check.
    recorded = record.get("fingerprint")
    if recorded is not None and recorded != tokenizer.fingerprint:
        raise PrometheanError(
            f"the {kind} tokenizer in {directory} does not match the fingerprint in its "
            f"{path.name}; its files were edited or mixed up."
        )
    return tokenizer


def save_beside_hf_file(tokenizer: Tokenizer, directory: str | Path) -> None:
    """Our record (and definition, where the Hugging Face file is not it) beside the
    `tokenizer.json` that an HF export has written: read back, the directory gives this same
    tokenizer, kind and fingerprint included, while transformers reads its own file."""
    directory = Path(directory)
    if isinstance(tokenizer, BPETokenizer):
        _write_record(directory, tokenizer, HF_TOKENIZER_FILE)
    elif isinstance(tokenizer, HFTokenizer):
        _write_record(directory, tokenizer, HF_TOKENIZER_FILE, end_of_text=tokenizer.end_of_text)
    else:  # bytes and gpt2 are their kind alone; char keeps its char.json
        tokenizer.save(directory)


def write_tokenizer_directory(tokenizer: Tokenizer, directory: str | Path) -> Path:
    """Save `tokenizer` as the whole of `directory`, atomically. A directory that holds anything
    else (a checkpoint, say) is refused rather than replaced."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise PrometheanError(f"{directory} is a file, not a directory.")
    if directory.is_dir():
        others = sorted(
            path.name for path in directory.iterdir() if path.name not in TOKENIZER_FILES
        )
        if others:
            raise PrometheanError(
                f"{directory} holds files that are not a tokenizer's ({', '.join(others[:3])}); "
                "choose a new or empty directory."
            )
    with atomic_directory(directory) as staging:
        tokenizer.save(staging)
    return directory
