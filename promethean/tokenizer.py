"""Tokenizers behind one protocol.

- `bytes`: one id per UTF-8 byte plus `<|endoftext|>`; needs nothing, fits any vocab >= 257.
- `gpt2`: the GPT-2 BPE through tiktoken. The ranks file is found offline: an explicit path,
  `PROMETHEAN_GPT2_RANKS`, tiktoken's own cache (`TIKTOKEN_CACHE_DIR`), our user cache, or else
  extracted from the pinned `openai-whisper` sdist on PyPI (fetched with pip, checked by sha256).

A tokenizer saves itself as `tokenizer.json` in a checkpoint directory and loads back from it.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Protocol

from promethean.errors import PrometheanError

END_OF_TEXT = "<|endoftext|>"
TOKENIZER_FILE = "tokenizer.json"

GPT2_RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
GPT2_RANKS_ARCHIVE = "openai-whisper==20250625"
GPT2_RANKS_MEMBER = "whisper/assets/gpt2.tiktoken"
# tiktoken names its cache files by the sha1 of the download address.
TIKTOKEN_R50K_URL = "https://openaipublic.blob.core.windows.net/encodings/r50k_base.tiktoken"
GPT2_PATTERN = (
    r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
)


class Tokenizer(Protocol):
    kind: str
    vocab_size: int
    eot_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def save(self, directory: Path) -> None: ...


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255 and `<|endoftext|>` as 256."""

    kind = "bytes"
    vocab_size = 257
    eot_id = 256

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for index, piece in enumerate(text.split(END_OF_TEXT)):
            if index:
                ids.append(self.eot_id)
            ids.extend(piece.encode("utf-8"))
        return ids

    def decode(self, ids: list[int]) -> str:
        out, pending = [], bytearray()
        for token in ids:
            if token < 256:
                pending.append(token)
                continue
            out.append(pending.decode("utf-8", errors="replace"))
            pending.clear()
            out.append(END_OF_TEXT if token == self.eot_id else "")
        out.append(pending.decode("utf-8", errors="replace"))
        return "".join(out)

    def save(self, directory: Path) -> None:
        (Path(directory) / TOKENIZER_FILE).write_text(json.dumps({"kind": self.kind}) + "\n")


class GPT2Tokenizer:
    """GPT-2's byte-level BPE (50,257 ids) through tiktoken, built from a local ranks file."""

    kind = "gpt2"
    vocab_size = 50257
    eot_id = 50256

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

    def decode(self, ids: list[int]) -> str:
        return self.encoding.decode(ids, errors="replace")

    def save(self, directory: Path) -> None:
        record = {"kind": self.kind, "ranks_sha256": GPT2_RANKS_SHA256}
        (Path(directory) / TOKENIZER_FILE).write_text(json.dumps(record) + "\n")


def cache_dir() -> Path:
    base = os.environ.get("PROMETHEAN_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "promethean"
    )
    return Path(base)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def find_gpt2_ranks(explicit: str | Path | None = None) -> Path:
    """Return a verified GPT-2 ranks file, fetching it from the registry archive if needed."""
    if explicit is not None or os.environ.get("PROMETHEAN_GPT2_RANKS"):
        path = Path(explicit or os.environ["PROMETHEAN_GPT2_RANKS"])
        if not path.is_file():
            raise PrometheanError(f"GPT-2 ranks file {path} does not exist.")
        if _sha256(path) != GPT2_RANKS_SHA256:
            raise PrometheanError(f"{path} is not the GPT-2 ranks file (sha256 mismatch).")
        return path
    candidates = [cache_dir() / "gpt2.tiktoken"]
    if os.environ.get("TIKTOKEN_CACHE_DIR"):
        url_key = hashlib.sha1(TIKTOKEN_R50K_URL.encode()).hexdigest()
        candidates.append(Path(os.environ["TIKTOKEN_CACHE_DIR"]) / url_key)
    for path in candidates:
        if path.is_file() and _sha256(path) == GPT2_RANKS_SHA256:
            return path
    return _fetch_gpt2_ranks(candidates[0])


def _fetch_gpt2_ranks(destination: Path) -> Path:
    """Extract the ranks from the pinned sdist. The package itself is never installed: it would
    pull in triton and a CUDA stack for one 1.6 MB file."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=destination.parent) as scratch:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                   "--quiet", "--dest", scratch, GPT2_RANKS_ARCHIVE]
        result = subprocess.run(command, capture_output=True, text=True)
        archives = list(Path(scratch).glob("*.tar.gz"))
        if result.returncode != 0 or not archives:
            raise PrometheanError(
                f"the GPT-2 vocabulary is not cached and could not be fetched ({GPT2_RANKS_ARCHIVE} "
                "from PyPI); connect to a package index once, or set PROMETHEAN_GPT2_RANKS to a "
                "local gpt2.tiktoken file."
            )
        with tarfile.open(archives[0]) as archive:
            member = next(m for m in archive.getmembers() if m.name.endswith(GPT2_RANKS_MEMBER))
            extracted = Path(scratch) / "gpt2.tiktoken"
            extracted.write_bytes(archive.extractfile(member).read())
        if _sha256(extracted) != GPT2_RANKS_SHA256:
            raise PrometheanError(f"the GPT-2 ranks in {GPT2_RANKS_ARCHIVE} failed the sha256 check.")
        os.replace(extracted, destination)
    return destination


TOKENIZER_KINDS = ("bytes", "gpt2")


def get_tokenizer(kind: str) -> Tokenizer:
    if kind == "bytes":
        return ByteTokenizer()
    if kind == "gpt2":
        return GPT2Tokenizer()
    raise PrometheanError(
        f"unknown tokenizer '{kind}'; available tokenizers: {', '.join(TOKENIZER_KINDS)}."
    )


def load_tokenizer(directory: str | Path) -> Tokenizer:
    path = Path(directory) / TOKENIZER_FILE
    try:
        record = json.loads(path.read_text())
        kind = record["kind"]
    except FileNotFoundError:
        raise PrometheanError(f"{directory} has no {TOKENIZER_FILE}.") from None
    except (json.JSONDecodeError, KeyError, TypeError):
        raise PrometheanError(f"{path} is not a valid tokenizer file.") from None
    return get_tokenizer(kind)
