"""Preparation of token files: exact content, the split rule, determinism, bounded memory,
atomicity, refusals, and the `data prepare` command as a user runs it."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from promethean.data.prepare import (
    DEFAULT_VAL_FRACTION,
    META_FILE,
    is_validation_document,
    prepare,
    read_meta,
)
from promethean.errors import PrometheanError
from promethean.tokenizer import END_OF_TEXT, ByteTokenizer, resolve_tokenizer

ROOT = Path(__file__).resolve().parent.parent
SOURCE = {"source_name": "test", "source_sha256": "0" * 64}
# Unicode, a literal end-of-text marker, an empty document (skipped), a lone surrogate (replaced).
SPECIAL = ["héllo wörld ✓", f"a {END_OF_TEXT} inside", "", "tab\tnew\nline", "bad \udcff byte"]


def documents(count: int = 400, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    words = ["the", "cat", "sat", "on", "a", "mat", "Ünïcode", "日本語", "def", "return", "\n", "  "]
    docs = [" ".join(rng.choice(words, size=int(rng.integers(1, 60)))) + f" #{i}" for i in range(count)]
    return SPECIAL + docs


def run_prepare(docs, tokenizer, out, **options):
    options = {"workers": 1, "progress": False, **SOURCE, **options}
    return prepare(iter(docs), tokenizer, out, **options)


def tokens(directory: Path, split: str) -> np.ndarray:
    meta = read_meta(directory)
    return np.fromfile(directory / meta["splits"][split]["file"], dtype=meta["dtype"])


def expected_splits(docs: list[str], val_fraction: float) -> dict[str, list[str]]:
    """The split rule written out independently of the module: BLAKE2b-64 of the UTF-8 text."""
    threshold = int(val_fraction * 2**64)
    split = {"train": [], "val": []}
    for text in docs:
        if not text:
            continue
        text = "".join("\ufffd" if "\ud800" <= c <= "\udfff" else c for c in text)
        digest = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")
        split["val" if digest < threshold else "train"].append(text)
    return split


def files_of(directory: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(directory.iterdir())}


@pytest.fixture(scope="module")
def gpt2():
    return resolve_tokenizer("gpt2")


# ------------------------------------------------------------------------------------ content
@pytest.mark.parametrize("kind", ["bytes", "gpt2"])
def test_each_split_decodes_to_its_documents_joined_by_end_of_text(kind, gpt2, tmp_path):
    tokenizer = gpt2 if kind == "gpt2" else ByteTokenizer()
    docs = documents()
    result = run_prepare(docs, tokenizer, tmp_path / "out", val_fraction=0.2)
    expected = expected_splits(docs, 0.2)
    assert expected["val"] and expected["train"]
    meta = result.meta
    assert meta["dtype"] == "uint16"
    assert meta["tokenizer"] == {"kind": kind, "fingerprint": tokenizer.fingerprint,
                                 "vocab_size": tokenizer.vocab_size, "eot_id": tokenizer.eot_id}
    assert meta["source"] == {"name": "test", "sha256": "0" * 64}
    assert meta["replaced_bytes"] == 1
    for split in ("train", "val"):
        ids = tokens(tmp_path / "out", split)
        assert tokenizer.decode(ids.tolist()) == "".join(text + END_OF_TEXT for text in expected[split])
        # Every end-of-text id is a document boundary: the literal marker stayed text.
        assert int((ids == tokenizer.eot_id).sum()) == len(expected[split])
        assert ids[-1] == tokenizer.eot_id
        record = meta["splits"][split]
        assert record["file"] == f"{split}.bin"
        assert record["tokens"] == len(ids)
        assert record["documents"] == len(expected[split])
        assert record["bytes"] == sum(len(text.encode()) for text in expected[split])
    assert read_meta(tmp_path / "out") == json.loads((tmp_path / "out" / META_FILE).read_text())
    # The fast paths (raw UTF-8 bytes; tiktoken's encode_to_numpy) give the tokenizer's own ids.
    for split in ("train", "val"):
        expected_ids = []
        for text in expected[split]:
            expected_ids += tokenizer.encode_ordinary(text) + [tokenizer.eot_id]
        assert tokens(tmp_path / "out", split).tolist() == expected_ids


def test_literal_end_of_text_in_a_document_is_ordinary_text(gpt2, tmp_path):
    run_prepare([f"x{END_OF_TEXT}y"], gpt2, tmp_path / "out", val_fraction=0.0)
    ids = tokens(tmp_path / "out", "train").tolist()
    assert ids == gpt2.encode_ordinary(f"x{END_OF_TEXT}y") + [gpt2.eot_id]
    assert ids.count(gpt2.eot_id) == 1


class WideTokenizer:
    """A fake tokenizer with 70,000 ids: one id per character, shifted past 65,535."""

    kind = "wide"
    vocab_size = 70_000
    eot_id = 69_999
    fingerprint = "w" * 64

    def encode_ordinary(self, text):
        return [65_000 + ord(c) % 4_000 for c in text]

    encode = encode_ordinary


@pytest.mark.parametrize("workers", [1, 2])
def test_a_vocabulary_over_65536_ids_is_stored_as_uint32(workers, tmp_path):
    docs = ["abc", "hello world", "z"]
    result = run_prepare(docs, WideTokenizer(), tmp_path / "out", val_fraction=0.0, workers=workers)
    assert result.meta["dtype"] == "uint32"
    ids = tokens(tmp_path / "out", "train")
    assert ids.dtype == np.uint32
    expected = []
    for text in docs:
        expected += WideTokenizer().encode_ordinary(text) + [69_999]
    assert ids.tolist() == expected
    assert (tmp_path / "out" / "train.bin").stat().st_size == 4 * len(expected)


# ------------------------------------------------------------------------------------- split
def test_the_split_rule_is_blake2b_of_the_text_below_the_fraction():
    rng = np.random.default_rng(1)
    texts = [f"document {i} {rng.integers(1 << 30)}" for i in range(20_000)]
    for text in texts[:200]:
        digest = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")
        assert is_validation_document(text, 0.1) == (digest < int(0.1 * 2**64))
    share = sum(is_validation_document(text, 0.1) for text in texts) / len(texts)
    assert 0.09 < share < 0.11
    assert not any(is_validation_document(text, 0.0) for text in texts[:1000])


def test_duplicates_land_in_the_same_split_wherever_they_are(tmp_path):
    docs = [f"doc {i}" for i in range(300)]
    docs = docs + docs[::-1]  # every document twice, in other positions
    run_prepare(docs, ByteTokenizer(), tmp_path / "out", val_fraction=0.3)
    meta = read_meta(tmp_path / "out")
    assert meta["splits"]["val"]["documents"] % 2 == 0
    expected = expected_splits(docs, 0.3)
    val = ByteTokenizer().decode(tokens(tmp_path / "out", "val").tolist())
    assert val == "".join(text + END_OF_TEXT for text in expected["val"])


def test_a_small_corpus_still_gets_a_validation_document(tmp_path):
    docs = [f"play {i}" for i in range(30)]
    assert not any(is_validation_document(text, DEFAULT_VAL_FRACTION) for text in docs)
    run_prepare(docs, ByteTokenizer(), tmp_path / "out")
    # The document with the smallest digest moves to val; train keeps the rest in order.
    digest = lambda text: hashlib.blake2b(text.encode(), digest_size=8).digest()  # noqa: E731
    moved = min(docs, key=digest)
    decode = lambda split: ByteTokenizer().decode(tokens(tmp_path / "out", split).tolist())  # noqa: E731
    assert decode("val") == moved + END_OF_TEXT
    assert decode("train") == "".join(text + END_OF_TEXT for text in docs if text != moved)
    meta = read_meta(tmp_path / "out")
    assert meta["splits"]["val"]["documents"] == 1 and meta["splits"]["train"]["documents"] == 29
    assert meta["splits"]["val"]["bytes"] == len(moved)


def test_train_is_never_empty_and_val_may_be(tmp_path):
    lone = next(f"doc {i}" for i in range(1000) if is_validation_document(f"doc {i}", 0.5))
    result = run_prepare([lone], ByteTokenizer(), tmp_path / "one", val_fraction=0.5)
    assert result.meta["splits"]["train"]["documents"] == 1
    assert result.meta["splits"]["val"] == {"file": "val.bin", "tokens": 0, "bytes": 0, "documents": 0}
    assert (tmp_path / "one" / "val.bin").stat().st_size == 0
    result = run_prepare(["a", "b", "c"], ByteTokenizer(), tmp_path / "none", val_fraction=0.0)
    assert result.meta["splits"]["val"]["documents"] == 0


# ------------------------------------------------------------------------------- determinism
def test_two_runs_give_identical_files(gpt2, tmp_path):
    docs = documents(300, seed=3)
    run_prepare(docs, gpt2, tmp_path / "a", val_fraction=0.1)
    run_prepare(docs, gpt2, tmp_path / "b", val_fraction=0.1)
    assert files_of(tmp_path / "a") == files_of(tmp_path / "b")


@pytest.mark.parametrize("kind", ["bytes", "gpt2"])
def test_one_worker_and_two_workers_give_identical_files(kind, gpt2, tmp_path):
    tokenizer = gpt2 if kind == "gpt2" else ByteTokenizer()
    docs = documents(600, seed=4)
    # Small chunks: many tasks in flight, results arriving out of order from the workers.
    run_prepare(docs, tokenizer, tmp_path / "one", val_fraction=0.1, workers=1, chunk_chars=500)
    run_prepare(docs, tokenizer, tmp_path / "two", val_fraction=0.1, workers=2, chunk_chars=500)
    assert files_of(tmp_path / "one") == files_of(tmp_path / "two")


# ------------------------------------------------------------------------ reruns and refusals
def refuse_to_iterate():
    raise AssertionError("an up-to-date preparation must not read the corpus")
    yield  # pragma: no cover


def test_rerunning_with_the_same_input_changes_nothing(tmp_path):
    out = tmp_path / "out"
    run_prepare(documents(50), ByteTokenizer(), out)
    before = {path.name: path.stat().st_mtime_ns for path in out.iterdir()}
    time.sleep(0.01)
    result = prepare(refuse_to_iterate(), ByteTokenizer(), out, workers=2, progress=False, **SOURCE)
    assert result.already_prepared
    assert {path.name: path.stat().st_mtime_ns for path in out.iterdir()} == before
    assert result.meta == read_meta(out)


def test_a_different_preparation_is_replaced_only_when_asked(gpt2, tmp_path):
    out = tmp_path / "out"
    run_prepare(documents(50), ByteTokenizer(), out)
    with pytest.raises(PrometheanError) as error:
        run_prepare(documents(50), gpt2, out)
    assert str(error.value) == (
        f"{out} already holds data prepared with tokenizer 'bytes' (fingerprint "
        f"{ByteTokenizer.fingerprint[:12]}), not 'gpt2' (fingerprint {gpt2.fingerprint[:12]}); "
        "pass --overwrite to replace it, or choose another --out."
    )
    with pytest.raises(PrometheanError, match="settings"):
        run_prepare(documents(50), ByteTokenizer(), out, val_fraction=0.2)
    with pytest.raises(PrometheanError, match="source 'test'"):
        run_prepare(documents(50), ByteTokenizer(), out, source_sha256="1" * 64)
    result = run_prepare(documents(50), gpt2, out, overwrite=True)
    assert not result.already_prepared and read_meta(out)["tokenizer"]["kind"] == "gpt2"


def test_a_damaged_earlier_preparation_is_replaced_only_when_asked(tmp_path):
    out = tmp_path / "out"
    run_prepare(documents(50), ByteTokenizer(), out)
    train = out / "train.bin"
    train.write_bytes(train.read_bytes()[:-2])
    with pytest.raises(PrometheanError) as error:
        run_prepare(documents(50), ByteTokenizer(), out)
    assert str(error.value) == (
        f"{out} holds an incomplete or invalid earlier preparation; pass --overwrite to replace "
        "it, or choose another --out."
    )
    assert not run_prepare(documents(50), ByteTokenizer(), out, overwrite=True).already_prepared
    assert read_meta(out)["splits"]["train"]["tokens"] * 2 == train.stat().st_size


def test_a_directory_holding_other_files_is_refused_even_with_overwrite(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(PrometheanError) as error:
        run_prepare(["x"], ByteTokenizer(), tmp_path, overwrite=True)
    assert str(error.value) == (
        f"{tmp_path} is not empty and is not a prepared token directory (it holds notes.txt); "
        "choose a new or empty --out, since preparation replaces the whole directory."
    )
    assert (tmp_path / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("docs", [[], ["", ""]])
def test_an_empty_corpus_is_refused(docs, tmp_path):
    with pytest.raises(PrometheanError) as error:
        run_prepare(docs, ByteTokenizer(), tmp_path / "out", workers=2)
    assert str(error.value) == "the corpus 'test' has no documents with any text; nothing to prepare."
    assert not (tmp_path / "out").exists()
    assert list(tmp_path.iterdir()) == []  # nor any staging directory


@pytest.mark.parametrize(
    "options, sentence",
    [
        ({"workers": 0}, "workers must be a whole number of at least 1 (got 0)."),
        ({"val_fraction": 0.7}, "the validation fraction must lie between 0 and 0.5 (got 0.7)."),
        ({"val_fraction": -0.1}, "the validation fraction must lie between 0 and 0.5 (got -0.1)."),
    ],
)
def test_bad_settings_are_refused_in_one_sentence(options, sentence, tmp_path):
    with pytest.raises(PrometheanError) as error:
        run_prepare(["x"], ByteTokenizer(), tmp_path / "out", **options)
    assert str(error.value) == sentence


def test_a_document_that_is_not_text_is_refused(tmp_path):
    with pytest.raises(PrometheanError, match="a document must be text .str., but the corpus gave a bytes"):
        run_prepare(["fine", b"raw"], ByteTokenizer(), tmp_path / "out")


# ---------------------------------------------------------------------------------- read_meta
def test_read_meta_refuses_another_tokenizer_naming_both(gpt2, tmp_path):
    run_prepare(documents(20), gpt2, tmp_path / "out")
    assert read_meta(tmp_path / "out", gpt2)["tokenizer"]["kind"] == "gpt2"
    with pytest.raises(PrometheanError) as error:
        read_meta(tmp_path / "out", ByteTokenizer())
    assert str(error.value) == (
        f"{tmp_path / 'out'} was prepared with tokenizer 'gpt2' (fingerprint "
        f"{gpt2.fingerprint[:12]}, vocab 50257) but the tokenizer given is 'bytes' (fingerprint "
        f"{ByteTokenizer.fingerprint[:12]}, vocab 257); prepare the data again with this "
        "tokenizer or use the one it was prepared with."
    )


def test_read_meta_refuses_missing_truncated_or_foreign_data(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(PrometheanError, match="has no meta.json; prepare it first"):
        read_meta(out)
    run_prepare(documents(20), ByteTokenizer(), out)
    train = out / "train.bin"
    train.write_bytes(train.read_bytes()[:-2])
    with pytest.raises(PrometheanError, match="it is truncated or belongs to another preparation"):
        read_meta(out)
    (out / META_FILE).write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(PrometheanError, match="is not a prepared token directory"):
        read_meta(out)
    (out / META_FILE).write_text("{not json")
    with pytest.raises(PrometheanError, match="is not valid JSON"):
        read_meta(out)


# -------------------------------------------------------------------------------- interruption
def failing_after(docs, count):
    for index, text in enumerate(docs):
        if index == count:
            raise RuntimeError("the corpus broke")
        yield text


@pytest.mark.parametrize("workers", [1, 2])
def test_an_error_midway_leaves_no_files_and_the_previous_output_intact(workers, tmp_path):
    out = tmp_path / "out"
    docs = documents(400)
    with pytest.raises(RuntimeError, match="the corpus broke"):
        prepare(failing_after(docs, 300), ByteTokenizer(), out, workers=workers, progress=False,
                chunk_chars=200, **SOURCE)
    assert list(tmp_path.iterdir()) == []
    run_prepare(docs, ByteTokenizer(), out)
    before = files_of(out)
    with pytest.raises(RuntimeError, match="the corpus broke"):
        prepare(failing_after(docs, 300), ByteTokenizer(), out, workers=workers, progress=False,
                chunk_chars=200, overwrite=True, val_fraction=0.3, **SOURCE)
    assert files_of(out) == before
    assert [path.name for path in tmp_path.iterdir()] == ["out"]


class DyingTokenizer:
    """Kills the worker process that meets the document "die", as the system's OOM killer would."""

    kind = "dying"
    vocab_size = 257
    eot_id = 256
    fingerprint = "d" * 64

    def encode_ordinary(self, text):
        if text == "die":
            os._exit(1)
        return list(text.encode())

    encode = encode_ordinary


def test_a_worker_that_dies_fails_the_run_in_one_sentence(tmp_path):
    with pytest.raises(PrometheanError) as error:
        run_prepare(["a", "b", "die", "c", "d"], DyingTokenizer(), tmp_path / "out", workers=2,
                    chunk_chars=1)
    assert str(error.value) == (
        "a tokenizing worker process died (killed by the system, perhaps for lack of memory); "
        "nothing was written, so run again with fewer --workers or more memory."
    )
    assert list(tmp_path.iterdir()) == []


KILLED_RUN = """
import sys, time
from pathlib import Path
from promethean.data.prepare import prepare
from promethean.tokenizer import ByteTokenizer

def documents():
    for index in range(10**9):
        if index == 2000:
            Path(sys.argv[2]).touch()  # well past the first writes: now kill me
        if index >= 2000:
            time.sleep(0.01)
        yield f"document {index} " * 50

if __name__ == "__main__":
    prepare(documents(), ByteTokenizer(), sys.argv[1], source_name="endless",
            source_sha256="1" * 64, workers=2, progress=False, chunk_chars=10_000, overwrite=True)
"""


def test_a_killed_run_leaves_the_previous_output_intact(tmp_path):
    out, marker, script = tmp_path / "out", tmp_path / "marker", tmp_path / "killed.py"
    run_prepare(documents(50), ByteTokenizer(), out)
    before = files_of(out)
    script.write_text(KILLED_RUN)
    process = subprocess.Popen([sys.executable, str(script), str(out), str(marker)], cwd=ROOT,
                               start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert process.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        staging = [path for path in tmp_path.iterdir() if path.name.startswith(".out.partial-")]
        assert len(staging) == 1 and (staging[0] / "train.bin").stat().st_size > 0
    finally:
        os.killpg(process.pid, signal.SIGKILL)  # the run, its fork server and workers
        process.wait()
    assert files_of(out) == before


# ------------------------------------------------------------------------- memory and imports
BOUNDED_RUN = """
import faulthandler, resource, sys
faulthandler.dump_traceback_later(90, exit=True)  # a hang fails with its stacks, not a timeout
LIMIT = 256 * 2**20
# Writable private memory (heap, anonymous maps, thread stacks), inherited by the fork server and
# every worker: holding the corpus (or the output) in any one process would need more than this.
# Not RLIMIT_AS: glibc reserves 64 MiB of address space per malloc arena, one per thread that
# allocates, which makes an address-space limit fail or pass by the threads' timing.
resource.setrlimit(resource.RLIMIT_DATA, (LIMIT, LIMIT))
from promethean.data.prepare import prepare
from promethean.tokenizer import ByteTokenizer

CORPUS_MB = 384

def documents():
    block = "".join(chr(32 + (i * 7) % 90) for i in range(4096)) * 16
    for index in range(CORPUS_MB * 16):  # 64 KiB documents
        yield f"{index}:" + block

if __name__ == "__main__":
    result = prepare(documents(), ByteTokenizer(), sys.argv[1], source_name="generated",
                     source_sha256="2" * 64, workers=2, progress=False)
    # VmHWM, not ru_maxrss: Linux carries a parent's ru_maxrss into a child across fork + exec.
    status = open("/proc/self/status").read()
    peak = int(status.split("VmHWM:")[1].split()[0]) * 1024
    print(result.text_bytes, result.tokens, peak)
"""


def test_memory_stays_bounded_on_a_corpus_larger_than_the_limit(tmp_path):
    script = tmp_path / "bounded.py"
    script.write_text(BOUNDED_RUN)
    result = subprocess.run([sys.executable, str(script), str(tmp_path / "out")], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    text_bytes, token_count, peak = map(int, result.stdout.split())
    assert text_bytes > 1.4 * 256 * 2**20  # the corpus is half as large again as the limit
    assert token_count == text_bytes + 384 * 16  # one byte id each, plus an end-of-text per document
    assert peak < 128 * 2**20  # the parent's resident peak (61 MB here), a third of the corpus
    sizes = sum(path.stat().st_size for path in (tmp_path / "out").glob("*.bin"))
    assert sizes == 2 * token_count


class TorchProbe:
    """Encodes each document as one id: 1 if the process encoding it has torch imported."""

    kind = "probe"
    vocab_size = 3
    eot_id = 2
    fingerprint = "p" * 64

    def encode_ordinary(self, text):
        return [int("torch" in sys.modules)]

    encode = encode_ordinary


def test_workers_never_import_torch_even_when_the_caller_has(tmp_path):
    assert "torch" in sys.modules  # conftest imported it into this process
    run_prepare(["a", "b", "c", "d"], TorchProbe(), tmp_path / "out", workers=2, chunk_chars=1,
                val_fraction=0.0)
    assert tokens(tmp_path / "out", "train").tolist() == [0, 2] * 4


def test_the_preparation_module_does_not_import_torch():
    code = "import sys, promethean.data.prepare; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.stdout.strip() == "False", result.stderr


# ---------------------------------------------------------------------------------------- CLI
def cli(*args, cwd=ROOT):
    result = subprocess.run([sys.executable, "-m", "promethean", "data", "prepare", *map(str, args)],
                            capture_output=True, text=True, cwd=cwd, timeout=300)
    assert "Traceback" not in result.stderr, result.stderr
    return result


def test_cli_prepares_a_text_file_and_then_has_nothing_to_do(tmp_path):
    (tmp_path / "corpus").mkdir()
    for index in range(40):
        (tmp_path / "corpus" / f"{index:02}.txt").write_text(f"story {index}: once upon a time\n")
    out = tmp_path / "out"
    result = cli(tmp_path / "corpus", "--tokenizer", "bytes", "--out", out, "--workers", "2",
                 "--val-fraction", "0.2")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"wrote {out}: 40 documents,")
    assert "documents" in result.stderr and "MB/s" in result.stderr  # rich progress
    meta = read_meta(out, ByteTokenizer())
    assert meta["settings"]["val_fraction"] == 0.2
    assert meta["splits"]["train"]["documents"] + meta["splits"]["val"]["documents"] == 40
    again = cli(tmp_path / "corpus", "--tokenizer", "bytes", "--out", out, "--val-fraction", "0.2")
    assert again.returncode == 0 and again.stdout.startswith("already prepared:")


def test_cli_prepares_a_single_file_and_says_val_is_empty(tmp_path):
    (tmp_path / "some.txt").write_text("To be, or not to be.\n")
    result = cli(tmp_path / "some.txt", "--tokenizer", "bytes", "--out", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    assert "note: val.bin is empty" in result.stderr
    assert ByteTokenizer().decode(tokens(tmp_path / "out", "train").tolist()) == (
        "To be, or not to be.\n" + END_OF_TEXT
    )


def test_cli_counts_the_bytes_the_corpus_replaced(tmp_path):
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9 cr\xe8me\n")
    result = cli(tmp_path / "latin1.txt", "--tokenizer", "bytes", "--out", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    assert "warning:" in result.stderr and "not valid UTF-8" in result.stderr
    assert read_meta(tmp_path / "out")["replaced_bytes"] == 2
    assert ByteTokenizer().decode(tokens(tmp_path / "out", "train").tolist()) == (
        "caf\ufffd cr\ufffdme\n" + END_OF_TEXT
    )


def test_cli_default_val_fraction_is_the_library_default(tmp_path):
    (tmp_path / "some.txt").write_text("x")
    assert cli(tmp_path / "some.txt", "--tokenizer", "bytes", "--out", tmp_path / "out").returncode == 0
    assert read_meta(tmp_path / "out")["settings"]["val_fraction"] == DEFAULT_VAL_FRACTION


def test_cli_bad_input_exits_1_with_one_sentence(tmp_path):
    (tmp_path / "some.txt").write_text("hello")
    (tmp_path / "blank.txt").write_text("  \n")
    out = tmp_path / "out"
    cases = [
        ((tmp_path / "missing.txt", "--tokenizer", "bytes", "--out", out), "neither a named corpus"),
        ((tmp_path / "some.txt", "--tokenizer", "nonsense", "--out", out), "unknown tokenizer"),
        ((tmp_path / "some.txt", "--tokenizer", "bytes", "--out", out, "--val-fraction", "0.9"),
         "the validation fraction must lie between 0 and 0.5 (got 0.9)."),
        ((tmp_path / "some.txt", "--tokenizer", "bytes", "--out", out, "--workers", "0"),
         "workers must be a whole number of at least 1 (got 0)."),
        ((tmp_path / "blank.txt", "--tokenizer", "bytes", "--out", out), "is empty"),
    ]
    for args, sentence in cases:
        result = cli(*args)
        assert result.returncode == 1, (args, result.stdout, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert lines[-1].startswith("error: ") and sentence in lines[-1], (args, result.stderr)
    assert not out.exists()
    assert cli(tmp_path / "some.txt", "--tokenizer", "bytes", "--out", out).returncode == 0
    result = cli(tmp_path / "some.txt", "--tokenizer", "gpt2", "--out", out)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith(
        f"error: {out} already holds data prepared with tokenizer 'bytes'"
    )


# -------------------------------------------------------------- a separate validation source
@pytest.mark.parametrize("workers", [1, 2])
def test_a_separate_validation_source_is_the_val_split_and_never_trained_on(gpt2, workers,
                                                                            tmp_path):
    corpus = documents(200)
    held_out = ["a story kept for validation", "another one, ünïcode ✓", corpus[30], "",
                "bad \udcff byte"]
    result = run_prepare(corpus, gpt2, tmp_path / "out", workers=workers, chunk_chars=200,
                         val_documents=iter(held_out), val_source_name="valid.txt",
                         val_source_sha256="1" * 64)
    eot = gpt2.eot_id
    # val: each validation document (empty skipped, surrogate replaced) encoded, then eot.
    val_texts = [text.replace("\udcff", "\ufffd") for text in held_out if text]
    expected_val = [i for text in val_texts for i in (*gpt2.encode_ordinary(text), eot)]
    assert tokens(tmp_path / "out", "val").tolist() == expected_val
    # train: the corpus in order, without the documents that are also validation documents
    # (corpus[30], and SPECIAL's "bad \udcff byte", the same text once replaced).
    train_texts = [text.replace("\udcff", "\ufffd") for text in corpus if text]
    train_texts = [text for text in train_texts if text not in val_texts]
    assert len(train_texts) == len([t for t in corpus if t]) - 2
    expected_train = [i for text in train_texts for i in (*gpt2.encode_ordinary(text), eot)]
    assert tokens(tmp_path / "out", "train").tolist() == expected_train
    meta = result.meta
    assert meta["val_duplicates_dropped"] == 2
    assert meta["splits"]["val"]["documents"] == len(val_texts)
    assert meta["splits"]["val"]["bytes"] == sum(len(t.encode()) for t in val_texts)
    assert meta["settings"]["val_source"] == {"name": "valid.txt", "sha256": "1" * 64}
    assert "val_fraction" not in meta["settings"]
    # The same sources again: nothing to do; another validation source: replaced only when asked.
    again = run_prepare(corpus, gpt2, tmp_path / "out", val_documents=iter(held_out),
                        val_source_name="valid.txt", val_source_sha256="1" * 64)
    assert again.already_prepared
    with pytest.raises(PrometheanError, match="already holds data prepared with settings"):
        run_prepare(corpus, gpt2, tmp_path / "out", val_documents=iter(["x"]),
                    val_source_name="other.txt", val_source_sha256="2" * 64)


def test_a_separate_validation_source_is_refused_when_empty_or_unnamed_or_all_of_train(tmp_path):
    byte = ByteTokenizer()
    with pytest.raises(PrometheanError, match=(
            "the validation source 'v.txt' has no documents with any text; give it one that "
            "has some.")):
        run_prepare(["a", "b"], byte, tmp_path / "a", val_documents=iter(["", ""]),
                    val_source_name="v.txt", val_source_sha256="1" * 64)
    with pytest.raises(PrometheanError, match="the corpus 'test' has no documents with any text "
                                              "that are not also in the validation source"):
        run_prepare(["a", "b", "a"], byte, tmp_path / "b", val_documents=iter(["b", "a"]),
                    val_source_name="v.txt", val_source_sha256="1" * 64)
    with pytest.raises(PrometheanError, match="needs its name and sha256"):
        run_prepare(["a"], byte, tmp_path / "c", val_documents=iter(["b"]))
    assert not any(tmp_path.iterdir())  # nothing half-written


def test_cli_val_file_is_the_validation_split(tmp_path):
    (tmp_path / "train.txt").write_text(f"one story{END_OF_TEXT}two story{END_OF_TEXT}held out")
    (tmp_path / "valid.txt").write_text(f"held out{END_OF_TEXT}a new one")
    out = tmp_path / "out"
    result = cli(tmp_path / "train.txt", "--tokenizer", "bytes", "--out", out,
                 "--val", tmp_path / "valid.txt")
    assert result.returncode == 0, result.stderr
    byte = ByteTokenizer()
    assert byte.decode(tokens(out, "val").tolist()) == (
        f"held out{END_OF_TEXT}a new one{END_OF_TEXT}")
    assert byte.decode(tokens(out, "train").tolist()) == (
        f"one story{END_OF_TEXT}two story{END_OF_TEXT}")
    assert "1 corpus document identical to a document of" in result.stderr
    both = cli(tmp_path / "train.txt", "--tokenizer", "bytes", "--out", tmp_path / "o2",
               "--val", tmp_path / "valid.txt", "--val-fraction", "0.1")
    assert both.returncode == 1
    assert both.stderr.strip() == ("error: --val names the validation data and --val-fraction "
                                   "carves it out of the corpus; give one of them, not both.")
    assert not (tmp_path / "o2").exists()
