"""Experience replay: token windows from earlier domains, kept on disk, mixed into new batches.

A `ReplayBuffer` is a directory holding `windows.bin` (a flat int32 memmap of
`slots x (block_size + 1)` tokens, one window per slot) and `index.json` (which slots belong to
which domain, how many windows each domain's stream has offered). Each domain has its own quota
of slots, filled by reservoir sampling (Algorithm R) over the stream of windows it is offered,
so every window of the stream is kept with the same probability whatever the stream's length;
the random choice for the n-th window is drawn from a generator seeded with (seed, domain, n),
so adding more windows after a restart continues the very same reservoir.

Every change rewrites the directory through `atomic_directory` (a buffer of a few thousand
windows is a few megabytes): a crash leaves the previous buffer, never half of one.

`ReplayMixer` replaces a share of the rows of each new-domain batch with windows drawn from the
buffer (about `ratio` of them; with fractional rows a seeded coin decides per batch), so the model
keeps seeing the earlier domains while it learns the new one.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from promethean.errors import PrometheanError
from promethean.files import atomic_directory

WINDOWS_FILE = "windows.bin"
INDEX_FILE = "index.json"
REPLAY_FORMAT = "promethean-replay-buffer"
REPLAY_VERSION = 1


def _domain_seed(name: str) -> int:
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")


class ReplayBuffer:
    """Per-domain reservoirs of token windows in a directory (see the module docstring)."""

    def __init__(self, directory: str | Path, block_size: int, quota: int = 512,
                 seed: int = 0) -> None:
        """Open the buffer in `directory`, or start an empty one there (written on first add)."""
        if block_size < 1:
            raise PrometheanError(f"the replay block size must be at least 1, got {block_size}.")
        if quota < 1:
            raise PrometheanError(f"the replay quota must be at least 1 window, got {quota}.")
        self.directory = Path(directory)
        self.block_size, self.quota, self.seed = block_size, quota, seed
        self.domains: dict[str, dict[str, int]] = {}  # name -> first_slot, filled, seen
        self._windows = np.zeros((0, block_size + 1), dtype=np.int32)
        if (self.directory / INDEX_FILE).is_file():
            self._open()

    # ------------------------------------------------------------------------------ disk
    def _open(self) -> None:
        from promethean.checkpoint import read_versioned_record

        index = read_versioned_record(self.directory / INDEX_FILE, REPLAY_FORMAT, REPLAY_VERSION,
                                      "replay buffer index")
        if index["block_size"] != self.block_size:
            raise PrometheanError(
                f"the replay buffer in {self.directory} holds windows of {index['block_size']} "
                f"tokens but this run uses a block size of {self.block_size}; use the same block "
                "size or another buffer."
            )
        self.quota, self.seed = index["quota"], index["seed"]
        self.domains = {name: dict(entry) for name, entry in index["domains"].items()}
        slots = len(self.domains) * self.quota
        path = self.directory / WINDOWS_FILE
        expected = slots * (self.block_size + 1) * 4
        if not path.is_file() or path.stat().st_size != expected:
            raise PrometheanError(
                f"{path} is missing or not {expected:,} bytes long as {INDEX_FILE} says; the "
                "replay buffer is damaged, delete it to start afresh."
            )
        if slots:
            self._windows = np.array(np.memmap(path, dtype=np.int32, mode="r",
                                               shape=(slots, self.block_size + 1)))

    def _write(self) -> None:
        index = {
            "format": REPLAY_FORMAT,
            "version": REPLAY_VERSION,
            "block_size": self.block_size,
            "quota": self.quota,
            "seed": self.seed,
            "dtype": "int32",
            "domains": self.domains,
        }
        with atomic_directory(self.directory) as scratch:
            if len(self._windows):
                out = np.memmap(scratch / WINDOWS_FILE, dtype=np.int32, mode="w+",
                                shape=self._windows.shape)
                out[:] = self._windows
                out.flush()
                del out
            else:
                (scratch / WINDOWS_FILE).write_bytes(b"")
            (scratch / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")

    # ------------------------------------------------------------------------------- adding
    def __contains__(self, domain: str) -> bool:
        return domain in self.domains

    def __len__(self) -> int:
        return sum(entry["filled"] for entry in self.domains.values())

    def add(self, domain: str, windows: Iterable[np.ndarray]) -> int:
        """Offer `windows` (arrays of block_size + 1 token ids) to `domain`'s reservoir, then
        write the buffer. Returns how many windows the domain holds."""
        if domain not in self.domains:
            self.domains[domain] = {"first_slot": len(self.domains) * self.quota, "filled": 0,
                                    "seen": 0}
            grown = np.zeros((len(self.domains) * self.quota, self.block_size + 1), np.int32)
            grown[: len(self._windows)] = self._windows
            self._windows = grown
        entry = self.domains[domain]
        first, domain_seed = entry["first_slot"], _domain_seed(domain)
        for window in windows:
            window = np.asarray(window)
            if window.shape != (self.block_size + 1,):
                raise PrometheanError(
                    f"a replay window must hold block_size + 1 = {self.block_size + 1} tokens, "
                    f"got shape {window.shape}."
                )
            seen = entry["seen"]
            if entry["filled"] < self.quota:
                slot = entry["filled"]
                entry["filled"] += 1
            else:
                slot = int(np.random.default_rng([self.seed, domain_seed, seen]).integers(0, seen + 1))
            if slot < self.quota:
                self._windows[first + slot] = window
            entry["seen"] = seen + 1
        self._write()
        return entry["filled"]

    def add_split(self, domain: str, dataset, split: str = "train") -> int:
        """Offer every non-overlapping window of a prepared split, in order (a uniform sample of
        the domain's text is kept)."""
        tokens = dataset.tokens(split)
        length = self.block_size + 1
        count = len(tokens) // length
        if count == 0:
            raise PrometheanError(
                f"the '{split}' split of {dataset.directory} has {len(tokens)} tokens, fewer than "
                f"one replay window of {length}."
            )

        def windows() -> Iterator[np.ndarray]:
            for index in range(count):
                yield np.asarray(tokens[index * length : (index + 1) * length], dtype=np.int32)

        return self.add(domain, windows())

    # ------------------------------------------------------------------------------ sampling
    def filled_slots(self, domains: Iterable[str] | None = None) -> np.ndarray:
        chosen = self.domains if domains is None else domains
        slots = [np.arange(self.domains[d]["first_slot"],
                           self.domains[d]["first_slot"] + self.domains[d]["filled"])
                 for d in chosen if d in self.domains]
        return np.concatenate(slots) if slots else np.zeros(0, dtype=np.int64)

    def sample(self, rows: int, generator: np.random.Generator,
               domains: Iterable[str] | None = None) -> np.ndarray:
        """`rows` windows drawn uniformly (with replacement) from the chosen domains' slots;
        domains have equal quotas, so each is about equally represented once filled."""
        slots = self.filled_slots(domains)
        if len(slots) == 0:
            raise PrometheanError(f"the replay buffer in {self.directory} holds no windows yet.")
        return self._windows[slots[generator.integers(0, len(slots), size=rows)]]

    def describe(self) -> dict[str, Any]:
        return {name: {"windows": entry["filled"], "offered": entry["seen"]}
                for name, entry in self.domains.items()}


class ReplayMixer:
    """Batches of a sampler with about `ratio` of their rows swapped for replayed windows.

    Its state is the wrapped sampler's (the replay draw for batch k is seeded by (seed, k)), so a
    run that restores the sampler's position replays exactly the same windows.
    """

    def __init__(self, sampler, buffer: ReplayBuffer, ratio: float,
                 domains: Iterable[str] | None = None, seed: int = 0) -> None:
        if not 0 <= ratio < 1:
            raise PrometheanError(f"the replay ratio must lie in [0, 1), got {ratio}.")
        self.sampler, self.buffer, self.ratio, self.seed = sampler, buffer, ratio, seed
        self.domains = None if domains is None else list(domains)
        self.replayed_rows = 0

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        step = self.sampler.step
        inputs, targets = self.sampler.next_batch()
        rows = inputs.shape[0]
        generator = np.random.default_rng([self.seed, 7919, step])
        exact = self.ratio * rows
        count = int(exact) + int(generator.random() < exact - int(exact))
        if count == 0:
            return inputs, targets
        windows = torch.from_numpy(self.buffer.sample(count, generator, self.domains).astype(np.int64))
        windows = windows.to(inputs.device)
        inputs, targets = inputs.clone(), targets.clone()
        # The last rows are replaced: which rows does not matter, the loss is a mean over all.
        inputs[rows - count :] = windows[:, :-1]
        targets[rows - count :] = windows[:, 1:]
        self.replayed_rows += count
        return inputs, targets
