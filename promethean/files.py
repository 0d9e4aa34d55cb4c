"""Writing files and directories so that a crash never leaves half a file under a final name,
and never loses what was there before.

- `atomic_directory(final)` yields an empty staging directory beside `final`; on success the
  staging directory takes `final`'s place in one step: Linux `renameat2(RENAME_EXCHANGE)` swaps
  the two names atomically, so `final` is at every instant the complete old directory or the
  complete new one. Where the exchange is not available (another OS, a filesystem without it)
  the old directory is renamed aside first and the new one renamed in; a crash between the two
  renames is repaired by the next write to that place, which puts the old directory back.
  Every file and directory written is fsynced, and so is the parent after the switch.
- `carry_over=True` keeps what `final` holds beside what the writer writes: every entry of the old
  directory that the new one does not have is hard-linked (copied where links are refused) into
  the staging directory before the switch, directories merged entry by entry. This is how a
  checkpoint re-save keeps its `adapters/` and a user's own files: a writer replaces only the
  names it writes (and those in `never_carry`).
- Leftovers of interrupted writes (`.NAME.partial-PID-*`, `.NAME.previous-PID-*`) are removed at
  the next write to the same place (`clean_leftovers`), or by `clean_directory` for a whole
  directory, unless the process that made them is still running.
- `remove_tree(path)` renames a directory to `.NAME.discarded-PID-*` before deleting it, so a
  crash mid-delete leaves a leftover, never a half-deleted directory under a name that reads as
  complete (a checkpoint missing its weights).
- `write_checksums` / `verify_checksums`: the sha256 of every file a writer wrote, recorded in
  `checksums.json` and checked on load, so a flipped byte is one sentence naming the file.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fnmatch
import hashlib
import json
import os
import re
import shutil
import sys
import time
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

from promethean.errors import PrometheanError

CHECKSUMS_FILE = "checksums.json"
CHECKSUMS_FORMAT = "promethean-checksums"
CHECKSUMS_VERSION = 1
# Tests set this to "MOMENT:GLOB" (MOMENT is "staged": written, not yet switched in, or
# "switched": in place, the old copy not yet removed) to make writes of matching names stop
# there for a minute after creating the file named by PAUSE_MARKER_ENV, so a crash test can kill
# the process inside a save.
PAUSE_ENV = "PROMETHEAN_TEST_PAUSE_SAVE"
PAUSE_MARKER_ENV = "PROMETHEAN_TEST_PAUSE_MARKER"
_LEFTOVER = re.compile(r"\.(?P<name>.+)\.(?:partial|previous|discarded)-(?:(?P<pid>\d+)-)?[0-9a-f]{32}$")

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
_renameat2 = None
if sys.platform.startswith("linux"):
    try:
        _renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
        _renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                               ctypes.c_uint]
        _renameat2.restype = ctypes.c_int
    except (AttributeError, OSError):  # glibc before 2.28, or another libc
        _renameat2 = None


def _exchange(a: Path, b: Path) -> bool:
    """Swap the names `a` and `b` atomically; False where the system cannot."""
    if _renameat2 is None:
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def _scratch_name(final: Path, kind: str) -> Path:
    return final.parent / f".{final.name}.{kind}-{os.getpid()}-{uuid.uuid4().hex}"


def is_leftover(name: str) -> bool:
    """Whether `name` is a staging or set-aside copy of an interrupted atomic write."""
    return _LEFTOVER.fullmatch(name) is not None


def leftover_of(name: str) -> str | None:
    """The final name a staging or set-aside name stands for (None for other names)."""
    match = _LEFTOVER.fullmatch(name)
    return match["name"] if match else None


def _running(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def clean_leftovers(final: str | Path) -> None:
    """Remove what interrupted writes of `final` left beside it; if a crash fell between the two
    renames of the fallback switch (no `final`, an old copy set aside), put the old copy back."""
    final = Path(final)
    try:
        entries = list(os.scandir(final.parent))
    except FileNotFoundError:
        return
    set_aside = []
    for entry in entries:
        match = _LEFTOVER.fullmatch(entry.name)
        if match is None or match["name"] != final.name:
            continue
        if match["pid"] is not None and _running(int(match["pid"])):
            continue  # a write in progress in a live process
        if ".previous-" in entry.name:
            set_aside.append(Path(entry.path))
        else:
            _remove(Path(entry.path))
    if set_aside and not os.path.lexists(final):
        newest = max(set_aside, key=lambda p: p.stat().st_mtime)
        os.replace(newest, final)
        _fsync_directory(final.parent)
        set_aside.remove(newest)
    for path in set_aside:
        _remove(path)


def clean_directory(directory: str | Path) -> None:
    """`clean_leftovers` for every name in `directory` that has leftovers."""
    try:
        names = {m["name"] for e in os.scandir(directory) if (m := _LEFTOVER.fullmatch(e.name))}
    except FileNotFoundError:
        return
    for name in sorted(names):
        clean_leftovers(Path(directory) / name)


def remove_tree(path: str | Path) -> None:
    """Delete a directory (or file) so that no crash can leave part of it under its name: one
    rename to a leftover name, then the delete (finished by the next clean if interrupted)."""
    path = Path(path)
    if not os.path.lexists(path):
        return
    doomed = _scratch_name(path, "discarded")
    os.replace(path, doomed)
    _fsync_directory(path.parent)
    _remove(doomed)


def _pause_for_tests(final: Path, moment: str) -> None:
    setting = os.environ.get(PAUSE_ENV)
    if not setting:
        return
    wanted, _, pattern = setting.partition(":")
    if wanted == moment and fnmatch.fnmatch(final.name, pattern or "*"):
        marker = os.environ.get(PAUSE_MARKER_ENV)
        if marker:
            Path(marker).write_text(f"{moment} {final}\n")
        time.sleep(60)


def _link_or_copy(source: str, target: Path) -> None:
    if os.path.islink(source):
        os.symlink(os.readlink(source), target)
        return
    try:
        os.link(source, target)
    except OSError:  # a filesystem without hard links, or a file we may read but not link
        shutil.copy2(source, target)


def _carry(old: Path, new: Path, never: Iterable[str] = ()) -> None:
    """Hard-link every entry of `old` that `new` lacks into `new`, merging directories."""
    never = set(never)
    for entry in os.scandir(old):
        if entry.name in never or is_leftover(entry.name):
            continue
        target = new / entry.name
        if entry.is_dir(follow_symlinks=False):
            if not os.path.lexists(target):
                target.mkdir()
                shutil.copystat(entry.path, target)
                _carry(Path(entry.path), target)
            elif target.is_dir() and not target.is_symlink():
                _carry(Path(entry.path), target)
            # else the writer put a file of that name there: the new one wins
        elif not os.path.lexists(target):
            _link_or_copy(entry.path, target)


def link_tree(source: str | Path, target: str | Path) -> Path:
    """A copy of the directory `source` at `target` made of hard links (copies where links are
    refused): cheap, and safe for files that are only ever replaced, never written in place."""
    source, target = Path(source), Path(target)
    target.mkdir(parents=True)
    shutil.copystat(source, target)
    _carry(source, target)
    return target


@contextlib.contextmanager
def atomic_directory(final: str | Path, *, carry_over: bool = False,
                     never_carry: Iterable[str] = ()) -> Iterator[Path]:
    """Yield an empty staging directory beside `final`; on success it replaces `final` in one
    atomic switch (see the module docstring). With `carry_over`, entries of the old `final`
    that the writer did not write (and that `never_carry` does not name) are kept. On error the
    staging directory is removed and `final` is untouched."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    clean_leftovers(final)
    # A plain mkdir rather than tempfile.mkdtemp, whose 0700 mode the result would keep.
    staging = _scratch_name(final, "partial")
    staging.mkdir()
    try:
        yield staging
        exists = os.path.lexists(final)
        if carry_over and exists and final.is_dir():
            _carry(final, staging, never_carry)
        _fsync_tree(staging)
        _pause_for_tests(final, "staged")
        if exists and _exchange(staging, final):
            _fsync_directory(final.parent)
            _pause_for_tests(final, "switched")
            _remove(staging)  # now the old directory
        elif exists:
            previous = _scratch_name(final, "previous")
            os.replace(final, previous)
            try:
                os.replace(staging, final)
            except BaseException:
                os.replace(previous, final)
                raise
            _fsync_directory(final.parent)
            _pause_for_tests(final, "switched")
            _remove(previous)
        else:
            os.replace(staging, final)
            _fsync_directory(final.parent)
    finally:
        if os.path.lexists(staging):
            _remove(staging)


@contextlib.contextmanager
def atomic_file(final: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `final` to write; on success it is fsynced and renamed over
    `final`, on error removed, so `final` is always the old file or the complete new one."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    clean_leftovers(final)
    partial = _scratch_name(final, "partial")
    try:
        yield partial
        with open(partial, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(partial, final)
        _fsync_directory(final.parent)
    finally:
        partial.unlink(missing_ok=True)


def _fsync_directory(directory: Path) -> None:
    try:
        handle = os.open(directory, os.O_RDONLY)
    except OSError:  # a system that cannot open directories (Windows)
        return
    try:
        os.fsync(handle)
    except OSError:
        pass  # some filesystems refuse fsync on a directory; the data files are synced
    finally:
        os.close(handle)


def _fsync_tree(directory: Path) -> None:
    for root, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(root, name)
            if os.path.islink(path):
                continue
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
        _fsync_directory(Path(root))


# ------------------------------------------------------------------------------ checksums


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def write_checksums(directory: str | Path, names: Iterable[str] | None = None) -> dict[str, str]:
    """Record the sha256 of `names` (default: every file directly in `directory`) in
    `directory/checksums.json`; returns {name: sha256}."""
    directory = Path(directory)
    if names is None:
        names = [p.name for p in directory.iterdir() if p.is_file() and p.name != CHECKSUMS_FILE]
    sums = {name: file_sha256(directory / name) for name in sorted(names)}
    record = {"format": CHECKSUMS_FORMAT, "version": CHECKSUMS_VERSION, "sha256": sums}
    (directory / CHECKSUMS_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return sums


def recorded_checksums(directory: str | Path) -> dict[str, str] | None:
    """{name: sha256} from `directory/checksums.json`, or None for a directory written before
    checksums were recorded."""
    path = Path(directory) / CHECKSUMS_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        sums = record["sha256"]
        if record.get("format") != CHECKSUMS_FORMAT or not isinstance(sums, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in sums.items()
        ):
            raise ValueError
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise PrometheanError(
            f"{path} is damaged (not the checksum record Promethean writes); the directory "
            "cannot be verified."
        ) from None
    return sums


def verify_checksums(directory: str | Path, names: Iterable[str],
                     error: type[PrometheanError] = PrometheanError) -> None:
    """Check each of `names` against the sha256 recorded when `directory` was written (when one
    was recorded); a mismatch is one sentence naming the file. (A missing file is left to the
    reader, which names it.)"""
    directory = Path(directory)
    sums = recorded_checksums(directory)
    if sums is None:
        return
    for name in names:
        path = directory / name
        if name not in sums or not path.is_file():
            continue
        if file_sha256(path) != sums[name]:
            raise error(
                f"{path} is corrupt: its sha256 differs from the one recorded when it was "
                "written; restore it from a copy or use another checkpoint."
            )
