"""Prefix reuse: the caches of finished sequences, kept so that a prompt starting with one of them
prefills only what follows.

A chat client resends the whole conversation every turn (the web page, `/v1/chat/completions`),
so turn N's prompt starts with turn N - 1's prompt and reply: the very tokens whose keys and
values the engine held when turn N - 1 finished. `PrefixStore` keeps those caches (one row each,
padding dropped: `KVCache.row_copy`) under their token ids, least recently used first, within a
budget of bytes. A lookup walks the prompt in blocks of `BLOCK_TOKENS`: each full block's chain
hash (the previous block's hash and this block's ids) indexes the entries whose tokens begin
with that chain, so the deepest block held names the candidates; their tokens are then compared
one by one (a hash is never trusted alone), and the longest common prefix that leaves at least
one prompt token to run wins. `KVCache.prefix` cuts a copy of the entry's cache to that length:
a global attention layer keeps the first slots, a windowed one the last `window` before it, an
SSM layer only its final state (so a hybrid model reuses an entry only whole). A new entry that
extends a held one and can stand in for all of it (a chat's next turn, on attention layers)
supersedes it: a long chat holds one sequence, not one per turn. Entries live in namespaces:
the keys and values of the same tokens differ with the LoRA adapter that computed them, so a
sequence is reused only by a request for the same adapter (the engine names it).

Reuse changes no output: on the inference kernels (`promethean.inference.quantize`) a token's
keys and values, and the logits, do not depend on how the sequence was split between prefill
calls and decode steps, so a prompt prefilled after a reused prefix gives the same logits, bit
for bit, as one prefilled whole (tests/test_prefix_cache.py).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from promethean.model.cache import KVCache

BLOCK_TOKENS = 16  # the granularity of the lookup; shorter common prefixes are not reused


@dataclass
class _Entry:
    tokens: tuple[int, ...]
    cache: KVCache
    nbytes: int
    chains: list[int]  # the chain hash of each full block of `tokens`
    namespace: object


def block_chain(tokens, namespace: object = None) -> list[int]:
    """The chain hash of each full block of `tokens` in `namespace`: hash i covers the namespace
    and tokens[: (i + 1) * BLOCK]."""
    chain, previous = [], 0 if namespace is None else hash(("namespace", namespace))
    for start in range(0, len(tokens) - BLOCK_TOKENS + 1, BLOCK_TOKENS):
        previous = hash((previous, tuple(tokens[start : start + BLOCK_TOKENS])))
        chain.append(previous)
    return chain


def common_prefix(first, second) -> int:
    length = min(len(first), len(second))
    for index in range(length):
        if first[index] != second[index]:
            return index
    return length


@dataclass
class PrefixStats:
    lookups: int = 0  # prompts looked up
    hits: int = 0  # prompts that reused a prefix
    reused_tokens: int = 0  # prompt tokens not prefilled thanks to a hit
    stored: int = 0  # sequences kept
    evicted: int = 0  # sequences dropped to stay within the budget
    superseded: int = 0  # sequences dropped because a longer one that starts with them came


class PrefixStore:
    """Caches of finished sequences by their tokens, within `budget_bytes` (module docstring)."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        self.nbytes = 0
        self._entries: OrderedDict[int, _Entry] = OrderedDict()  # least recently used first
        self._by_chain: dict[int, set[int]] = {}
        self._next_id = 0
        self.stats = PrefixStats()

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, tokens, cache: KVCache, namespace: object = None) -> None:
        """Keep `cache` (one row, unpadded, holding exactly `tokens`) in `namespace` unless it is
        shorter than a block or alone larger than the budget; older entries make room."""
        tokens = tuple(tokens)
        if len(tokens) < BLOCK_TOKENS or cache.length != len(tokens):
            return
        nbytes = cache.nbytes()
        if nbytes > self.budget_bytes:
            return
        chains = block_chain(tokens, namespace)
        # An entry this one extends (a chat's previous turn, the same sequence again) is
        # superseded when the new cache can stand in for all of it (attention layers; an SSM
        # state or a window that slid past it cannot): it would only take up the budget.
        for key in list(self._by_chain.get(chains[0], ())):
            held = self._entries[key].tokens
            if self._entries[key].namespace != namespace:
                continue
            if len(held) <= len(tokens) and tokens[: len(held)] == held and \
                    (len(held) == len(tokens) or cache.can_prefix(len(held))):
                self._drop(key)
                self.stats.superseded += 1
        while self.nbytes + nbytes > self.budget_bytes and self._entries:
            self._drop(next(iter(self._entries)))
            self.stats.evicted += 1
        key, self._next_id = self._next_id, self._next_id + 1
        self._entries[key] = _Entry(tokens, cache, nbytes, chains, namespace)
        for chain in chains:
            self._by_chain.setdefault(chain, set()).add(key)
        self.nbytes += nbytes
        self.stats.stored += 1

    def _drop(self, key: int) -> None:
        entry = self._entries.pop(key)
        for chain in entry.chains:
            holders = self._by_chain.get(chain)
            if holders is not None:
                holders.discard(key)
                if not holders:
                    del self._by_chain[chain]
        self.nbytes -= entry.nbytes

    def lookup(self, prompt: list[int], capacity: int,
               namespace: object = None) -> tuple[int, KVCache] | None:
        """(tokens reused, a fresh cache holding them with room for `capacity` slots) for the
        longest usable prefix of `prompt` held in `namespace`, leaving at least one prompt token
        to prefill; None when there is none. The entry becomes the most recently used."""
        self.stats.lookups += 1
        candidates: set[int] = set()
        for chain in block_chain(prompt[: len(prompt) - 1], namespace):
            holders = self._by_chain.get(chain)
            if not holders:
                break
            candidates = holders
        ranked = sorted(((min(common_prefix(self._entries[key].tokens, prompt), len(prompt) - 1),
                          key) for key in candidates
                         if self._entries[key].namespace == namespace), reverse=True)
        for length, key in ranked:
            if length < BLOCK_TOKENS:
                break
            cache = self._entries[key].cache.prefix(length, capacity)
            if cache is not None:
                self._entries.move_to_end(key)
                self.stats.hits += 1
                self.stats.reused_tokens += length
                return length, cache
        return None
