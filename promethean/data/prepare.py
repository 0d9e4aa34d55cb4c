"""Preparation: a stream of documents -> flat token files `train.bin` / `val.bin` + `meta.json`.

    prepare(corpus.documents(), tokenizer, "data/shakespeare-gpt2",
            source_name=corpus.name, source_sha256=corpus.fingerprint())

What lands in the output directory:

- `train.bin`, `val.bin`: every document's tokens followed by the end-of-text token, documents in
  corpus order within each split, as one flat array of `uint16` (vocabularies of at most 65,536
  ids) or `uint32`, native byte order (little-endian on every machine we run on), no header:
  `numpy.memmap(path, dtype=meta["dtype"], mode="r")` reads it.
- `meta.json`: the format below; "bytes" is the UTF-8 size of the documents' text in a split
  (end-of-text tokens excluded), the denominator of bits per byte.

      {"format": "promethean-tokens", "version": 1,
       "tokenizer": {"kind", "fingerprint", "vocab_size", "eot_id"}, "dtype": "uint16"|"uint32",
       "source": {"name", "sha256"}, "settings": {"val_fraction", "split", "encoding"},
       "splits": {"train": {"file", "tokens", "bytes", "documents"}, "val": {...}},
       "replaced_bytes": int}

The rules, each chosen so that the same input always gives byte-identical files:

- Split: a document goes to `val` when the first 8 bytes of the BLAKE2b digest of its UTF-8 text,
  read as a big-endian integer, are below `val_fraction * 2**64` (`is_validation_document`). The
  content decides, not the position, so identical documents always land in the same split (a
  duplicate can never leak from train into val) and inserting a document elsewhere in the corpus
  moves no other. Two fix-ups keep small corpora usable: if `val` would be empty while
  `val_fraction > 0` and `train` holds at least two documents, the train document with the
  smallest digest moves to `val`; if `train` would be empty, the val document with the largest
  digest moves to `train`.
- A separate validation source (`val_documents`, `data prepare --val FILE`; TinyStories ships
  one) replaces that rule: `val` is that source's documents, in its order, and `train` every
  document of the corpus except those identical to a validation document (dropped, and counted
  in meta.json's "val_duplicates_dropped", so no validation text is ever trained on). The
  settings then record the validation source's name and sha256 instead of a fraction.
- Encoding: a document is ordinary text. A literal "<|endoftext|>" inside it is encoded as the
  characters it is (tiktoken's `encode_ordinary`; the bytes tokenizer's plain UTF-8), so the
  end-of-text tokens in a file are exactly the document boundaries. Tokenizers we do not know are
  asked for `encode_ordinary(text)` when they have one, else `encode(text)`.
- Empty documents ("") are skipped: they would add a lone end-of-text token and no text.
- `replaced_bytes` counts the bytes of the source that were not valid UTF-8 and became U+FFFD:
  those the corpus replaced while decoding (reported through `source_replaced_bytes`) plus any
  lone surrogate in a document (how Python's `surrogateescape` carries an undecodable byte), which
  is replaced here before anything else, since UTF-8 cannot encode it.

How it runs: the parent reads the documents lazily, cuts them into chunks of about
`chunk_chars` characters, and keeps at most `2 * workers` chunks in flight in a pool of worker
processes; results come back in order and are appended to the files as they arrive, so memory
stays bounded (a few chunks plus the largest single document) whatever the corpus size. Workers
are started by the `forkserver` method (`spawn` where there is none): they never inherit the
caller's heap, threads or imports (torch included), and this module's import graph has no torch.
Everything is written into a staging directory that replaces `out_dir` only once complete
(`promethean.files.atomic_directory`): an interrupted run leaves the previous output as it was.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import itertools
import json
import multiprocessing
import os
import re
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from promethean.errors import PrometheanError
from promethean.files import atomic_directory
from promethean.tokenizer import ByteTokenizer, GPT2Tokenizer, Tokenizer

META_FILE = "meta.json"
META_FORMAT = "promethean-tokens"
META_VERSION = 1
SPLITS = ("train", "val")
SPLIT_FILES = {"train": "train.bin", "val": "val.bin"}
DTYPES = {"uint16": np.uint16, "uint32": np.uint32}
DEFAULT_VAL_FRACTION = 0.005
MAX_VAL_FRACTION = 0.5
# The split and encoding rules of the module docstring, by name: a change to either must change
# its name, so that a directory made under the old rule is prepared again, not taken as current.
SPLIT_RULE = "blake2b-64-content-v1"
# With a separate validation source: its documents are val, train drops any identical to one.
SEPARATE_VAL_RULE = "separate-val-source-blake2b-64-dedup-v1"
ENCODING_RULE = "ordinary-text-eot-after-each-document-v1"
DEFAULT_CHUNK_CHARS = 1 << 20
COPY_BLOCK = 1 << 24
_SURROGATES = re.compile("[\ud800-\udfff]")
_THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


@dataclass(frozen=True)
class PrepareResult:
    """What `prepare` left in `directory`: its meta.json, and whether it was there already."""

    directory: Path
    meta: dict[str, Any]
    already_prepared: bool
    seconds: float

    @property
    def tokens(self) -> int:
        return sum(split["tokens"] for split in self.meta["splits"].values())

    @property
    def documents(self) -> int:
        return sum(split["documents"] for split in self.meta["splits"].values())

    @property
    def text_bytes(self) -> int:
        return sum(split["bytes"] for split in self.meta["splits"].values())


def default_workers() -> int:
    """The cores this process may run on (its affinity mask), not merely those the machine has."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return max(1, os.cpu_count() or 1)


def dtype_for(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def _split_threshold(val_fraction: float) -> int:
    return int(val_fraction * 2**64)


def _document_digest(utf8: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(utf8, digest_size=8).digest(), "big")


def is_validation_document(text: str, val_fraction: float) -> bool:
    """The split rule before the small-corpus fix-ups (see the module docstring)."""
    utf8 = _SURROGATES.sub("\ufffd", text).encode("utf-8")
    return _document_digest(utf8) < _split_threshold(val_fraction)


def tokenizer_record(tokenizer: Tokenizer) -> dict[str, Any]:
    fingerprint = getattr(tokenizer, "fingerprint", None)
    if not isinstance(fingerprint, str) or not fingerprint:
        raise PrometheanError(
            f"tokenizer '{tokenizer.kind}' has no fingerprint, so prepared data could not be "
            "matched to it later; give it a `fingerprint` (the sha256 of what defines it)."
        )
    return {
        "kind": tokenizer.kind,
        "fingerprint": fingerprint,
        "vocab_size": int(tokenizer.vocab_size),
        "eot_id": int(tokenizer.eot_id),
    }


def settings_record(val_fraction: float,
                    val_source: dict[str, str] | None = None) -> dict[str, Any]:
    if val_source is not None:
        return {"val_source": dict(val_source), "split": SEPARATE_VAL_RULE,
                "encoding": ENCODING_RULE}
    return {"val_fraction": float(val_fraction), "split": SPLIT_RULE, "encoding": ENCODING_RULE}


def document_digest(text: str) -> int:
    """The 64-bit digest a document is split and matched by (lone surrogates replaced first)."""
    return _document_digest(_SURROGATES.sub("\ufffd", text).encode("utf-8"))


# ----------------------------------------------------------------------------------- encoding
class _Candidate(NamedTuple):
    """One document that a fix-up may move to the other split: where its tokens lie."""

    digest: int
    offset: int  # in tokens, from the start of its split's file (or chunk, inside a worker)
    tokens: int
    text_bytes: int


class _ChunkResult(NamedTuple):
    tokens: dict[str, bytes]  # split -> the split's tokens of this chunk, as raw array bytes
    documents: dict[str, int]
    text_bytes: dict[str, int]
    replaced: int
    smallest_train: _Candidate | None
    largest_val: _Candidate | None
    dropped: int  # documents left out because their digest is in `exclude`


def _ordinary_encoder(tokenizer: Tokenizer, dtype: type):
    """text (already valid UTF-8) and its UTF-8 bytes -> token ids as a numpy array."""
    # Exact types: a subclass may encode differently.
    if type(tokenizer) is ByteTokenizer:
        return lambda text, utf8: np.frombuffer(utf8, dtype=np.uint8)
    if type(tokenizer) is GPT2Tokenizer:
        encoding = tokenizer.encoding
        # encode_to_numpy fills a uint32 buffer in Rust: no Python list of ints on the way.
        return lambda text, utf8: encoding.encode_to_numpy(text, disallowed_special=())
    encode = getattr(tokenizer, "encode_ordinary", None) or tokenizer.encode
    return lambda text, utf8: np.asarray(encode(text), dtype=dtype)


class _ChunkEncoder:
    """Turns a list of documents into a `_ChunkResult`; lives in each worker (or in-process)."""

    def __init__(self, tokenizer: Tokenizer, val_fraction: float,
                 exclude: frozenset[int] = frozenset()) -> None:
        self.dtype = DTYPES[dtype_for(tokenizer.vocab_size)]
        self.end_of_text = np.array([tokenizer.eot_id], dtype=self.dtype)
        # 0 sends every document to train; 1 (2**64, above every digest) every one to val.
        self.threshold = _split_threshold(val_fraction)
        self.encode = _ordinary_encoder(tokenizer, self.dtype)
        self.exclude = exclude  # digests of documents to leave out (a separate val source's)

    def __call__(self, documents: list[str]) -> _ChunkResult:
        pieces: dict[str, list[np.ndarray]] = {"train": [], "val": []}
        counts = {"train": 0, "val": 0}
        sizes = {"train": 0, "val": 0}
        offsets = {"train": 0, "val": 0}
        replaced = dropped = 0
        smallest_train = largest_val = None
        for text in documents:
            try:
                utf8 = text.encode("utf-8")
            except UnicodeEncodeError:
                text, count = _SURROGATES.subn("\ufffd", text)
                replaced += count
                utf8 = text.encode("utf-8")
            digest = _document_digest(utf8)
            if digest in self.exclude:
                dropped += 1
                continue
            split = "val" if digest < self.threshold else "train"
            ids = self.encode(text, utf8)
            length = len(ids) + 1
            candidate = _Candidate(digest, offsets[split], length, len(utf8))
            if split == "train":
                if smallest_train is None or digest < smallest_train.digest:
                    smallest_train = candidate
            elif largest_val is None or digest > largest_val.digest:
                largest_val = candidate
            pieces[split] += (ids, self.end_of_text)
            counts[split] += 1
            sizes[split] += len(utf8)
            offsets[split] += length
        tokens = {
            split: np.concatenate(parts).astype(self.dtype, copy=False).tobytes() if parts else b""
            for split, parts in pieces.items()
        }
        return _ChunkResult(tokens, counts, sizes, replaced, smallest_train, largest_val, dropped)


_WORKER_ENCODER: _ChunkEncoder | None = None


def _start_worker(tokenizer: Tokenizer, val_fraction: float, exclude: frozenset[int]) -> None:
    global _WORKER_ENCODER
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # see _worker_birth; this covers a fork server
    _WORKER_ENCODER = _ChunkEncoder(tokenizer, val_fraction, exclude)


def _encode_in_worker(documents: list[str]) -> _ChunkResult:
    assert _WORKER_ENCODER is not None
    return _WORKER_ENCODER(documents)


def _chunks(documents: Iterable[str], chunk_chars: int) -> Iterator[list[str]]:
    chunk: list[str] = []
    size = 0
    for text in documents:
        if not isinstance(text, str):
            raise PrometheanError(
                f"a document must be text (str), but the corpus gave a {type(text).__name__}."
            )
        if not text:
            continue
        chunk.append(text)
        size += len(text)
        if size >= chunk_chars:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def _pool_context():
    methods = multiprocessing.get_all_start_methods()
    if "forkserver" in methods:
        context = multiprocessing.get_context("forkserver")
        # The server imports this module once; each worker is then a cheap fork of it.
        context.set_forkserver_preload([__name__])
        return context
    return multiprocessing.get_context("spawn")


def start_worker_server() -> None:
    """Start the fork server now, in the background, so that its imports overlap whatever the
    caller does before `prepare` (hashing the corpus, say). Optional; a no-op without one."""
    if _pool_context().get_start_method() == "forkserver":
        from multiprocessing import forkserver

        with _worker_birth():
            forkserver.ensure_running()


@contextlib.contextmanager
def _worker_birth() -> Iterator[None]:
    """The state that processes started inside this block are born with.

    - SIGINT ignored: Ctrl-C reaches the whole process group, and the parent alone should handle
      it (stop the pool, remove the staging directory); a worker or fork server caught in the
      middle of its imports would otherwise print a traceback. A process that starts with SIGINT
      ignored keeps it so, and so do the workers that the fork server forks.
    - numpy's BLAS limited to one thread: a worker that imports numpy itself (when the fork
      server could not preload this module) would otherwise start a BLAS thread per core, which
      spins for a while at start-up and takes CPU from the tokenizer.
    """
    saved = {name: os.environ.get(name) for name in _THREAD_VARIABLES}
    os.environ.update(dict.fromkeys(_THREAD_VARIABLES, "1"))
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous_handler = signal.signal(signal.SIGINT, signal.SIG_IGN) if in_main_thread else None
    try:
        yield
    finally:
        if in_main_thread:
            signal.signal(signal.SIGINT, previous_handler)
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _encoded_chunks(
    documents: Iterable[str], tokenizer: Tokenizer, val_fraction: float, workers: int,
    chunk_chars: int, exclude: frozenset[int] = frozenset(),
) -> Iterator[_ChunkResult]:
    """Results in corpus order; at most 2 * workers chunks are read ahead of the one written."""
    chunks = _chunks(documents, chunk_chars)
    # A corpus of one chunk is encoded here: starting a pool would cost more than it saves.
    first = list(itertools.islice(chunks, 2))
    if workers == 1 or len(first) < 2:
        encoder = _ChunkEncoder(tokenizer, val_fraction, exclude)
        yield from map(encoder, itertools.chain(first, chunks))
        return
    # A process pool from concurrent.futures rather than multiprocessing.Pool: when a worker dies
    # (killed for memory, say) its futures fail at once, where Pool would wait forever.
    pool = ProcessPoolExecutor(workers, mp_context=_pool_context(), initializer=_start_worker,
                               initargs=(tokenizer, val_fraction, exclude))
    in_flight: collections.deque[Future] = collections.deque()
    finished = False
    try:
        start_worker_server()
        with _worker_birth():  # the first submit starts the workers
            in_flight.append(pool.submit(_encode_in_worker, first[0]))
        for chunk in itertools.chain(first[1:], chunks):
            in_flight.append(pool.submit(_encode_in_worker, chunk))
            del chunk
            if len(in_flight) >= 2 * workers:
                yield in_flight.popleft().result()
        while in_flight:
            yield in_flight.popleft().result()
        finished = True
    except BrokenProcessPool:
        raise PrometheanError(
            "a tokenizing worker process died (killed by the system, perhaps for lack of memory); "
            "nothing was written, so run again with fewer --workers or more memory."
        ) from None
    finally:
        # Once every result is in, the workers exit while the caller finishes its files; after a
        # failure they are waited for, so that none outlives the error.
        pool.shutdown(wait=not finished, cancel_futures=True)


# ------------------------------------------------------------------------------------ writing
class _SplitWriter:
    def __init__(self, path: Path, itemsize: int) -> None:
        self.path = path
        self.itemsize = itemsize
        self.handle = open(path, "wb")
        self.tokens = self.documents = self.text_bytes = 0
        self.candidate: _Candidate | None = None

    def append(self, data: bytes, documents: int, text_bytes: int, candidate, keep) -> None:
        if candidate is not None:
            candidate = candidate._replace(offset=self.tokens + candidate.offset)
            if self.candidate is None or keep(candidate.digest, self.candidate.digest):
                self.candidate = candidate
        self.handle.write(data)
        self.tokens += len(data) // self.itemsize
        self.documents += documents
        self.text_bytes += text_bytes

    def record(self) -> dict[str, Any]:
        return {
            "file": self.path.name,
            "tokens": self.tokens,
            "bytes": self.text_bytes,
            "documents": self.documents,
        }


def _move_document(source: _SplitWriter, destination: _SplitWriter) -> None:
    """Move `source.candidate` to the end of `destination`, streaming: memory stays bounded."""
    moving = source.candidate
    assert moving is not None
    source.handle.close()
    start, end = moving.offset * source.itemsize, (moving.offset + moving.tokens) * source.itemsize
    rewritten = source.path.with_name(source.path.name + ".tmp")
    with open(source.path, "rb") as reader, open(rewritten, "wb") as writer:
        for low, high, target in ((0, start, writer), (start, end, destination.handle),
                                  (end, source.tokens * source.itemsize, writer)):
            reader.seek(low)
            remaining = high - low
            while remaining:
                block = reader.read(min(COPY_BLOCK, remaining))
                target.write(block)
                remaining -= len(block)
    os.replace(rewritten, source.path)
    source.tokens -= moving.tokens
    source.documents -= 1
    source.text_bytes -= moving.text_bytes
    destination.tokens += moving.tokens
    destination.documents += 1
    destination.text_bytes += moving.text_bytes
    source.candidate = None


# --------------------------------------------------------------------------------------- meta
def _meta_problem(meta: Any, directory: Path) -> str | None:
    """Why `meta` does not describe a complete prepared directory, or None when it does."""
    if not isinstance(meta, dict) or meta.get("format") != META_FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else None
        return f"is not a prepared token directory (format {found!r}, expected '{META_FORMAT}')"
    if meta.get("version") != META_VERSION:
        return (f"has version {meta.get('version')!r}, but this Promethean reads version "
                f"{META_VERSION}; prepare the data again")
    tokenizer = meta.get("tokenizer")
    types = {"kind": str, "fingerprint": str, "vocab_size": int, "eot_id": int}
    if not isinstance(tokenizer, dict) or not all(
        isinstance(tokenizer.get(key), kind) for key, kind in types.items()
    ):
        return "lacks the tokenizer's kind, fingerprint, vocab_size or eot_id"
    if meta.get("dtype") not in DTYPES:
        return f"names dtype {meta.get('dtype')!r}; expected one of {', '.join(DTYPES)}"
    if meta["dtype"] != dtype_for(tokenizer["vocab_size"]) and meta["dtype"] == "uint16":
        return f"stores ids as uint16, too narrow for a vocabulary of {tokenizer['vocab_size']}"
    source = meta.get("source")
    if not isinstance(source, dict) or not all(
        isinstance(source.get(key), str) for key in ("name", "sha256")
    ):
        return "lacks the source's name or sha256"
    if not isinstance(meta.get("settings"), dict):
        return "lacks its settings"
    if not isinstance(meta.get("replaced_bytes"), int):
        return "lacks replaced_bytes"
    splits = meta.get("splits")
    if not isinstance(splits, dict) or set(splits) != set(SPLITS):
        return f"does not list exactly the splits {', '.join(SPLITS)}"
    itemsize = np.dtype(DTYPES[meta["dtype"]]).itemsize
    for name, split in splits.items():
        if not isinstance(split, dict) or not isinstance(split.get("file"), str) or not all(
            isinstance(split.get(key), int) and split[key] >= 0
            for key in ("tokens", "bytes", "documents")
        ):
            return f"lacks the file, tokens, bytes or documents of the '{name}' split"
        path = directory / split["file"]
        if Path(split["file"]).name != split["file"] or not path.is_file():
            return f"lists {split['file']} for the '{name}' split, and it is missing"
        expected, actual = split["tokens"] * itemsize, path.stat().st_size
        if actual != expected:
            return (f"says {split['tokens']} {meta['dtype']} tokens ({expected} bytes) for "
                    f"{split['file']}, which holds {actual} bytes: it is truncated or belongs to "
                    "another preparation")
    return None


def _load_meta(directory: Path) -> Any:
    path = directory / META_FILE
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise PrometheanError(
            f"{directory} has no {META_FILE}; prepare it first with `promethean data prepare`."
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise PrometheanError(f"{path} is not valid JSON.") from None


def read_meta(directory: str | Path, tokenizer: Tokenizer | None = None) -> dict[str, Any]:
    """The checked `meta.json` of a prepared directory; given a tokenizer, refuse a mismatch.

    Checks the format, version, fields and that each split's file holds exactly the tokens meta
    says. With `tokenizer`, its fingerprint and vocabulary size must be those the data was
    prepared with: ids from another tokenizer would train a model on noise, silently.
    """
    directory = Path(directory)
    meta = _load_meta(directory)
    problem = _meta_problem(meta, directory)
    if problem:
        raise PrometheanError(f"{directory / META_FILE} {problem}.")
    if tokenizer is not None:
        prepared = meta["tokenizer"]
        given = tokenizer_record(tokenizer)
        if any(given[key] != prepared[key] for key in ("fingerprint", "vocab_size")):
            raise PrometheanError(
                f"{directory} was prepared with tokenizer '{prepared['kind']}' (fingerprint "
                f"{prepared['fingerprint'][:12]}, vocab {prepared['vocab_size']}) but the tokenizer "
                f"given is '{given['kind']}' (fingerprint {given['fingerprint'][:12]}, vocab "
                f"{given['vocab_size']}); prepare the data again with this tokenizer or use the "
                "one it was prepared with."
            )
    return meta


def _existing_output(out_dir: Path) -> dict[str, Any] | None:
    """The meta of a complete earlier preparation in `out_dir`, None if `out_dir` is free.

    Refuses a directory holding anything else: it is about to be replaced as a whole.
    """
    if not out_dir.exists():
        return None
    if not out_dir.is_dir():
        raise PrometheanError(f"{out_dir} exists and is not a directory; choose another --out.")
    names = {path.name for path in out_dir.iterdir()}
    if not names:
        return None
    ours = {META_FILE, *SPLIT_FILES.values()}
    if META_FILE not in names or not names <= ours:
        strangers = sorted(names - ours) or sorted(names)
        raise PrometheanError(
            f"{out_dir} is not empty and is not a prepared token directory (it holds "
            f"{', '.join(strangers[:3])}{', ...' if len(strangers) > 3 else ''}); choose a new or "
            "empty --out, since preparation replaces the whole directory."
        )
    try:
        meta = json.loads((out_dir / META_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return meta if _meta_problem(meta, out_dir) is None else {}


def _difference(meta: dict[str, Any], wanted: dict[str, Any]) -> str:
    if meta["tokenizer"] != wanted["tokenizer"]:
        old, new = meta["tokenizer"], wanted["tokenizer"]
        return (f"tokenizer '{old['kind']}' (fingerprint {old['fingerprint'][:12]}), not "
                f"'{new['kind']}' (fingerprint {new['fingerprint'][:12]})")
    if meta["source"] != wanted["source"]:
        old, new = meta["source"], wanted["source"]
        return (f"source '{old['name']}' (sha256 {old['sha256'][:12]}), not '{new['name']}' "
                f"(sha256 {new['sha256'][:12]})")
    return f"settings {json.dumps(meta['settings'])}, not {json.dumps(wanted['settings'])}"


# ------------------------------------------------------------------------------------ prepare
def prepare(
    documents: Iterable[str],
    tokenizer: Tokenizer,
    out_dir: str | Path,
    *,
    source_name: str,
    source_sha256: str,
    workers: int | None = None,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    overwrite: bool = False,
    progress: bool = True,
    chunk_chars: int = DEFAULT_CHUNK_CHARS,
    source_replaced_bytes: Callable[[], int] | None = None,
    val_documents: Iterable[str] | None = None,
    val_source_name: str | None = None,
    val_source_sha256: str | None = None,
) -> PrepareResult:
    """Tokenize `documents` into `out_dir` (train.bin, val.bin, meta.json); see the module doc.

    A directory already prepared from the same source sha256 with the same tokenizer and
    settings is left untouched (`already_prepared=True`, documents not even read). One prepared
    differently is replaced only with `overwrite=True`; anything else in the way is refused.

    `workers` > 1 starts worker processes by `forkserver`/`spawn`, which import the caller's main
    script: call this from under `if __name__ == "__main__":` there. `source_replaced_bytes`, if
    given, is called once every document is read, for the undecodable bytes the source itself
    replaced (`Corpus.stats.replaced_bytes`); they add to `replaced_bytes` in meta.json.

    `val_documents`, with `val_source_name` and `val_source_sha256` identifying it as the main
    source's name and sha256 do, is a separate validation source: the val split is its documents,
    `val_fraction` is not used, and train documents identical to one of them are dropped (see the
    module docstring). Its undecodable bytes are not in `source_replaced_bytes`' count.
    """
    started = time.perf_counter()
    out_dir = Path(out_dir)
    workers = default_workers() if workers is None else workers
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise PrometheanError(f"workers must be a whole number of at least 1 (got {workers!r}).")
    if not 0 <= val_fraction <= MAX_VAL_FRACTION:
        raise PrometheanError(
            f"the validation fraction must lie between 0 and {MAX_VAL_FRACTION} "
            f"(got {val_fraction})."
        )
    if chunk_chars < 1:
        raise PrometheanError(f"chunk_chars must be at least 1 (got {chunk_chars}).")
    val_source = None
    if val_documents is not None:
        if not val_source_name or not val_source_sha256:
            raise PrometheanError(
                "a separate validation source needs its name and sha256 (val_source_name, "
                "val_source_sha256), so that prepared data can tell when it changed."
            )
        val_source = {"name": val_source_name, "sha256": val_source_sha256}
    record = tokenizer_record(tokenizer)
    dtype = dtype_for(record["vocab_size"])
    wanted = {
        "tokenizer": record,
        "dtype": dtype,
        "source": {"name": source_name, "sha256": source_sha256},
        "settings": settings_record(val_fraction, val_source),
    }
    existing = _existing_output(out_dir)
    if existing:
        if all(existing[key] == value for key, value in wanted.items()):
            return PrepareResult(out_dir, existing, True, time.perf_counter() - started)
        if not overwrite:
            raise PrometheanError(
                f"{out_dir} already holds data prepared with {_difference(existing, wanted)}; "
                "pass --overwrite to replace it, or choose another --out."
            )
    elif existing == {} and not overwrite:
        raise PrometheanError(
            f"{out_dir} holds an incomplete or invalid earlier preparation; pass --overwrite to "
            "replace it, or choose another --out."
        )

    itemsize = np.dtype(DTYPES[dtype]).itemsize
    with atomic_directory(out_dir) as staging, _Progress(progress) as shown:
        writers = {split: _SplitWriter(staging / SPLIT_FILES[split], itemsize) for split in SPLITS}
        replaced = dropped = 0
        streams = [(documents, val_fraction, frozenset())]
        if val_documents is not None:
            # The validation source first, every document to val (fraction 1), its digests kept
            # as they pass; then the corpus, every document to train (fraction 0) but those.
            val_digests: set[int] = set()

            def recorded(texts: Iterable[str]) -> Iterator[str]:
                for text in texts:
                    if isinstance(text, str) and text:
                        val_digests.add(document_digest(text))
                    yield text

            streams = [(recorded(val_documents), 1.0, frozenset()),
                       (documents, 0.0, val_digests)]
        try:
            for stream, fraction, exclude in streams:
                for result in _encoded_chunks(stream, tokenizer, fraction, workers, chunk_chars,
                                              frozenset(exclude)):
                    writers["train"].append(
                        result.tokens["train"], result.documents["train"],
                        result.text_bytes["train"], result.smallest_train,
                        keep=lambda new, old: new < old)
                    writers["val"].append(
                        result.tokens["val"], result.documents["val"], result.text_bytes["val"],
                        result.largest_val, keep=lambda new, old: new > old)
                    replaced += result.replaced
                    dropped += result.dropped
                    shown.update(writers)
                if val_source is not None and fraction == 1.0 and writers["val"].documents == 0:
                    raise PrometheanError(
                        f"the validation source '{val_source_name}' has no documents with any "
                        "text; give it one that has some."
                    )
            train, val = writers["train"], writers["val"]
            if val_source is not None and train.documents == 0:
                raise PrometheanError(
                    f"the corpus '{source_name}' has no documents with any text that are not also "
                    f"in the validation source '{val_source_name}'; nothing is left to train on."
                )
            if train.documents + val.documents == 0:
                raise PrometheanError(
                    f"the corpus '{source_name}' has no documents with any text; nothing to "
                    "prepare."
                )
            small = val.documents == 0 and val_fraction > 0 and train.documents >= 2
            if val_source is None and small:
                _move_document(train, val)
            if train.documents == 0:
                _move_document(val, train)
        finally:
            for writer in writers.values():
                writer.handle.close()
        if source_replaced_bytes is not None:
            replaced += int(source_replaced_bytes())
        meta = {
            "format": META_FORMAT,
            "version": META_VERSION,
            **wanted,
            "splits": {split: writer.record() for split, writer in writers.items()},
            "replaced_bytes": replaced,
        }
        if val_source is not None:
            meta["val_duplicates_dropped"] = dropped
        (staging / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return PrepareResult(out_dir, meta, False, time.perf_counter() - started)


class _Progress:
    """Documents, tokens and MB/s of text on stderr with rich; nothing at all when disabled."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.started = time.perf_counter()

    def __enter__(self) -> _Progress:
        if self.enabled:
            from rich.console import Console
            from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

            self.bar = Progress(SpinnerColumn(), TextColumn("{task.description}"),
                                TimeElapsedColumn(), console=Console(stderr=True))
            self.bar.__enter__()
            self.task = self.bar.add_task("preparing")
        return self

    def update(self, writers: dict[str, _SplitWriter]) -> None:
        if not self.enabled:
            return
        documents = sum(writer.documents for writer in writers.values())
        tokens = sum(writer.tokens for writer in writers.values())
        megabytes = sum(writer.text_bytes for writer in writers.values()) / 1e6
        rate = megabytes / max(time.perf_counter() - self.started, 1e-9)
        self.bar.update(self.task, description=(
            f"{documents:,} documents, {tokens:,} tokens, {megabytes:,.1f} MB of text, "
            f"{rate:.1f} MB/s"
        ))

    def __exit__(self, *exc_info) -> None:
        if self.enabled:
            self.bar.__exit__(*exc_info)
