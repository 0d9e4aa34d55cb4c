"""The engines a server decodes with, and its LoRA adapters (`CKPT/adapters/NAME`, served as
model `BASE:NAME`).

On Promethean's CPU kernels (a model prepared for inference, the engine built with
`max_adapters`) there is one engine: a request for an adapter runs in the same batches as the
base's and the other adapters', its rows getting their own low-rank update in every product
(promethean.inference.adapter_slots); an adapter is read from disk on first use (and again when
its files change) into one of `max_adapters` slots. Elsewhere (a GPU, a model not prepared) each
adapter gets an engine of its own over its own copy of the model with the adapter merged in,
built on first use; at most `max_adapter_engines` are kept, the least recently used idle one
being shut down to make room.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from promethean.continual.adapters import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_FILE,
    adapter_directory,
    check_name,
    checkpoint_sha256,
    list_adapters,
    load_adapter_onto,
    read_adapter,
)
from promethean.errors import PrometheanError
from promethean.inference.adapter_slots import SlotAdapter, slot_adapter
from promethean.inference.engine import Engine, RequestHandle
from promethean.model import Transformer
from promethean.serve.protocol import ApiError


class ModelVariants:
    """The base model's engine and, built lazily, one engine per adapter (see the module
    docstring). An engine is only shut down when every request given to it has finished."""

    def __init__(self, base: Engine, base_name: str, checkpoint: str | Path | None,
                 max_adapter_engines: int, dtype: str = "fp32") -> None:
        self.base, self.base_name = base, base_name
        self.checkpoint = Path(checkpoint) if checkpoint is not None else None
        self.max_adapter_engines = max_adapter_engines
        self.dtype = dtype  # what the base was prepared as; adapter engines are prepared alike
        self.engines: dict[str, Engine] = {}  # adapter name -> engine, least recently used first
        self.handles: dict[str, list[RequestHandle]] = {}
        # With slots on the base engine: adapters as read from disk, by name, with the files'
        # signature they were read at (the most recently used last, as many as there are slots).
        self.read: dict[str, tuple[tuple, SlotAdapter]] = {}
        self._base_sha256: str | None = None
        self._loading = asyncio.Lock()
        self.closing = False

    @property
    def batched(self) -> bool:
        """Whether adapters share the base engine's batches (slots) rather than own engines."""
        return self.base.adapters is not None

    def names(self) -> list[str]:
        adapters = list_adapters(self.checkpoint) if self.checkpoint is not None else []
        return [self.base_name] + [f"{self.base_name}:{name}" for name in adapters]

    def adapter_of(self, model: str | None) -> str | None:
        """The adapter a request's `model` names (None: the base); 404 for anything unknown."""
        if model is None or model == self.base_name:
            return None
        base, _, adapter = model.partition(":")
        known = self.names()
        if base == self.base_name and adapter and model in known:
            return check_name(adapter)
        raise ApiError(404, f"the model '{model}' does not exist; this server serves "
                       f"{', '.join(repr(name) for name in known)}.", param="model",
                       code="model_not_found")

    def revive(self) -> bool:
        """Start a new engine on the same model where an engine thread has died (a bug: every
        failure the engine can pin on requests ends only those); False while shutting down."""
        if self.closing:
            return False
        if not self.base.alive:
            self.base = Engine(self.base.model, self.base.tokenizer,
                               max_batch_size=self.base.max_batch_size,
                               max_queue=self.base.max_queue,
                               prefix_cache_bytes=self.base.prefix_cache_bytes,
                               max_adapters=self.base.max_adapters)
        for name, engine in list(self.engines.items()):
            if not engine.alive:
                self.engines.pop(name)  # rebuilt on its next request
                self.handles.pop(name, None)
        return True

    async def engine(self, adapter: str | None) -> Engine:
        if adapter is None or self.batched:
            self.revive()
            return self.base
        async with self._loading:  # one build at a time; later callers find it built
            if adapter not in self.engines:
                try:
                    model = await asyncio.to_thread(self._adapted_model, adapter)
                except PrometheanError as error:  # a damaged or mismatched adapter on disk
                    raise ApiError(500, f"the adapter '{adapter}' could not be loaded: {error}",
                                   param="model", error_type="server_error",
                                   code="adapter_load_failed")
                self.engines[adapter] = Engine(model, self.base.tokenizer,
                                               max_batch_size=self.base.max_batch_size,
                                               max_queue=self.base.max_queue,
                                               prefix_cache_bytes=self.base.prefix_cache_bytes)
                self.handles[adapter] = []
                self._evict(keep=adapter)
            self.engines[adapter] = self.engines.pop(adapter)  # now the most recently used
            return self.engines[adapter]

    async def slot_adapter(self, adapter: str | None) -> SlotAdapter | None:
        """What a request for `adapter` hands the base engine (None: the base, or adapters
        with engines of their own); read from disk when new or changed there."""
        if adapter is None or not self.batched:
            return None
        try:
            # Two stat calls, on the event loop: a few microseconds, where a hop to a worker
            # thread and back would wait for a core the engine is busy on.
            signature = self._signature(adapter)
            held = self.read.get(adapter)
            if held is None or held[0] != signature:
                async with self._loading:  # one read at a time; later callers find it read
                    held = self.read.get(adapter)
                    if held is None or held[0] != signature:
                        held = (signature, await asyncio.to_thread(self._read, adapter, signature))
        except (PrometheanError, OSError) as error:  # damaged, mismatched, or just removed
            raise ApiError(500, f"the adapter '{adapter}' could not be loaded: "
                           f"{str(error).rstrip('.')}.", param="model",
                           error_type="server_error", code="adapter_load_failed")
        self.read.pop(adapter, None)
        self.read[adapter] = held  # now the most recently used
        while len(self.read) > self.base.max_adapters:
            self.read.pop(next(iter(self.read)))
        return held[1]

    def _signature(self, adapter: str) -> tuple:
        directory = adapter_directory(self.checkpoint, adapter)
        return tuple((stat.st_mtime_ns, stat.st_size) for stat in
                     ((directory / name).stat() for name in (ADAPTER_CONFIG_FILE, ADAPTER_FILE)))

    def _read(self, adapter: str, signature: tuple) -> SlotAdapter:
        if self._base_sha256 is None:
            self._base_sha256 = checkpoint_sha256(self.checkpoint)
        saved = read_adapter(adapter_directory(self.checkpoint, adapter), self._base_sha256)
        return slot_adapter(self.base.model, adapter, (adapter, signature), saved.matrices,
                            saved.config.scaling, self.base.adapters.dtype)

    def _adapted_model(self, adapter: str) -> Transformer:
        # A prepared base cannot take a merge: merge into fresh fp32 weights, then prepare.
        from promethean.checkpoint import load_checkpoint
        from promethean.inference.quantize import prepare_for_inference

        model = load_checkpoint(self.checkpoint, device=self.base.device).model.eval()
        load_adapter_onto(model, self.checkpoint, adapter)
        return prepare_for_inference(model, self.dtype)

    @property
    def queue_depth(self) -> int:
        return self.base.queue_depth + sum(e.queue_depth for e in list(self.engines.values()))

    @property
    def running(self) -> int:
        return self.base.running + sum(e.running for e in list(self.engines.values()))

    def counters(self) -> dict[str, int]:
        """`Engine.counters` summed over every engine."""
        totals: dict[str, int] = {}
        for engine in [self.base, *list(self.engines.values())]:
            for key, value in engine.counters().items():
                totals[key] = totals.get(key, 0) + value
        return totals

    def track(self, adapter: str | None, handle: RequestHandle) -> None:
        if adapter is not None and adapter in self.handles:  # an engine of its own
            handles = self.handles[adapter]
            handles[:] = [h for h in handles if not h.done]
            handles.append(handle)

    def _evict(self, keep: str) -> None:
        """Shut down least recently used adapter engines with nothing in flight while there are
        more than allowed (when all are busy the limit is exceeded until they finish)."""
        for name in list(self.engines):
            if len(self.engines) <= self.max_adapter_engines:
                return
            if name != keep and all(handle.done for handle in self.handles[name]):
                self.engines.pop(name).shutdown(timeout=0)
                del self.handles[name]

    def shutdown(self) -> None:
        self.closing = True
        for engine in [self.base, *self.engines.values()]:
            engine.shutdown()
