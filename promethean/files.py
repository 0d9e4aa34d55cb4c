"""Writing files and directories so that a crash never leaves half a file under a final name."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_directory(final: str | Path) -> Iterator[Path]:
    """Yield an empty temporary directory beside `final`; on success it replaces `final`.

    On error the temporary directory is removed and `final` is untouched. Replacing an existing
    directory takes two renames (old aside, new in); the old copy is deleted only once the new one
    is in place, so a crash between them leaves `<final>.old-*` holding the previous version.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield scratch
        _fsync_tree(scratch)
        if final.exists():
            retired = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
            os.rename(final, retired / final.name)
            os.rename(scratch, final)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.rename(scratch, final)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise


def _fsync_tree(directory: Path) -> None:
    for path in directory.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
