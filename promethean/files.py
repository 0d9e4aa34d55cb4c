"""Writing files and directories so that a crash never leaves half a file under a final name."""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_directory(final: str | Path) -> Iterator[Path]:
    """Yield an empty staging directory beside `final`; on success it replaces `final`.

    Renames within one filesystem are atomic, so readers see the old directory or the complete
    new one, never a partial write. A directory cannot be renamed over a non-empty one, so an
    existing `final` is moved aside first, put back if the new one cannot take its place, and
    deleted only once it has. On error the staging directory is removed and `final` is untouched.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    # A plain mkdir rather than tempfile.mkdtemp, whose 0700 mode the result would keep.
    staging = final.parent / f".{final.name}.partial-{uuid.uuid4().hex}"
    staging.mkdir()
    try:
        yield staging
        _fsync_tree(staging)
        if final.exists() and (not final.is_dir() or any(final.iterdir())):
            previous = final.parent / f".{final.name}.previous-{uuid.uuid4().hex}"
            os.replace(final, previous)
            try:
                os.replace(staging, final)
            except BaseException:
                os.replace(previous, final)
                raise
            if previous.is_dir():
                shutil.rmtree(previous)
            else:
                previous.unlink()
        else:
            os.replace(staging, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(final: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `final` to write; on success it is fsynced and renamed over
    `final`, on error removed, so `final` is always the old file or the complete new one."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    partial = final.parent / f".{final.name}.partial-{uuid.uuid4().hex}"
    try:
        yield partial
        with open(partial, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(partial, final)
    finally:
        partial.unlink(missing_ok=True)


def _fsync_tree(directory: Path) -> None:
    for path in directory.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
