"""Atomic directory writes, carried-over entries, leftovers of killed writes and checksums."""

import os
import subprocess
import sys
import threading

import pytest
import torch
from safetensors.torch import load_file

import promethean.files as files
from promethean.checkpoint import load_checkpoint, save_checkpoint
from promethean.errors import CheckpointError
from promethean.files import atomic_directory, clean_leftovers
from promethean.tokenizer import ByteTokenizer
from tests.conftest import build


def dead_pid() -> int:
    """The pid of a process that has exited (so its leftovers are fair to remove)."""
    out = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                         capture_output=True, text=True, check=True)
    return int(out.stdout)


def write(directory, text):
    with atomic_directory(directory) as staging:
        (staging / "data.txt").write_text(text)


def test_the_exchange_is_used_and_readers_never_miss_the_directory(tmp_path):
    final = tmp_path / "d"
    write(final, "0")
    if files._renameat2 is None:
        pytest.skip("no renameat2 on this system: the two-rename fallback is used")
    missing = []
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            if not (final / "data.txt").is_file():
                missing.append(1)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        for index in range(200):
            write(final, str(index))
    finally:
        stop.set()
        watcher.join()
    assert missing == []
    assert (final / "data.txt").read_text() == "199"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_the_fallback_switch_is_repaired_after_a_crash_between_its_renames(tmp_path, monkeypatch):
    final = tmp_path / "d"
    write(final, "old")
    # A kill between the fallback's two renames leaves no `d`, the old copy set aside.
    aside = tmp_path / f".d.previous-{dead_pid()}-{'a' * 32}"
    os.replace(final, aside)
    partial = tmp_path / f".d.partial-{dead_pid()}-{'b' * 32}"
    partial.mkdir()
    clean_leftovers(final)
    assert (final / "data.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]
    # And the fallback itself (no exchange) still replaces the directory.
    monkeypatch.setattr(files, "_exchange", lambda a, b: False)
    write(final, "new")
    assert (final / "data.txt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_leftovers_of_live_writers_are_kept_and_dead_ones_removed(tmp_path):
    final = tmp_path / "d"
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        mine = tmp_path / f".d.partial-{live.pid}-{'c' * 32}"
        theirs = tmp_path / f".d.partial-{dead_pid()}-{'d' * 32}"
        legacy = tmp_path / f".d.previous-{'e' * 32}"  # written before pids were in the name
        other_name = tmp_path / f".e.partial-{dead_pid()}-{'f' * 32}"
        for path in (mine, theirs, legacy, other_name):
            path.mkdir()
        write(final, "x")
        assert mine.exists() and other_name.exists()
        assert not theirs.exists() and not legacy.exists()
    finally:
        live.kill()
        live.wait()


def test_a_removal_never_leaves_part_of_a_directory_under_its_name(tmp_path, monkeypatch):
    victim = tmp_path / "step-000002"
    write(victim, "weights")
    # A crash in the middle of the delete: the name is already gone, the rest is a leftover.
    monkeypatch.setattr(files, "_remove", lambda path: None)
    files.remove_tree(victim)
    assert not victim.exists()
    (leftover,) = [p for p in tmp_path.iterdir() if files.is_leftover(p.name)]
    assert ".discarded-" in leftover.name
    monkeypatch.undo()
    # The next sweep of the directory (a run claiming it) finishes the delete, and never puts a
    # discarded copy back the way it restores a set-aside one.
    os.rename(leftover, tmp_path / f".step-000002.discarded-{dead_pid()}-{'a' * 32}")
    aside = tmp_path / f".best.previous-{dead_pid()}-{'b' * 32}"
    aside.mkdir()
    files.clean_directory(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]


def test_a_resave_keeps_adapters_and_user_files_and_drops_stale_training_state(tmp_path):
    directory = save_checkpoint(tmp_path / "ck", build("tiny-gpt2"), ByteTokenizer())
    (directory / "adapters" / "verse").mkdir(parents=True)
    (directory / "adapters" / "verse" / "adapter_model.safetensors").write_bytes(b"weights")
    (directory / "continual").mkdir()
    (directory / "continual" / "continual.json").write_text("{}")
    (directory / "notes.txt").write_text("mine")
    (directory / "train_state.json").write_text("{}")  # from an older training save
    newer = build("tiny-gpt2", seed=3)
    save_checkpoint(directory, newer, ByteTokenizer())
    assert (directory / "adapters" / "verse" / "adapter_model.safetensors").read_bytes() == b"weights"
    assert (directory / "continual" / "continual.json").read_text() == "{}"
    assert (directory / "notes.txt").read_text() == "mine"
    assert not (directory / "train_state.json").exists()
    ids = torch.randint(0, 257, (1, 8))
    assert torch.equal(load_checkpoint(directory).model(ids).logits, newer(ids).logits)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_flipped_bytes_in_finite_weights_are_one_sentence_naming_the_file(tmp_path):
    directory = save_checkpoint(tmp_path / "ck", build("tiny-llama"), ByteTokenizer())
    path = directory / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01  # the low mantissa bit of a weight: still a finite number
    path.write_bytes(bytes(data))
    assert all(torch.isfinite(t).all() for t in load_file(path).values())
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(directory)
    assert str(error.value) == (
        f"{path} is corrupt: its sha256 differs from the one recorded when it was written; "
        "restore it from a copy or use another checkpoint."
    )
    load_checkpoint(directory, verify=False)  # the caller may still choose to read it
    (directory / "checksums.json").write_text("{oops")
    with pytest.raises(Exception, match="checksums.json is damaged"):
        load_checkpoint(directory)
