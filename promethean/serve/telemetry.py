"""What the server records: request counters and a latency histogram for `/metrics` (Prometheus'
text format), and the chat log, one JSON line per finished chat turn."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# The engine's prefix reuse and adapter slots: each metric, the `Engine.counters` key it shows,
# its type and its help.
ENGINE_METRICS = (
    ("prefilled_tokens_total", "prefilled_tokens", "counter",
     "Prompt tokens run through the model."),
    ("prefix_reused_tokens_total", "reused_tokens", "counter",
     "Prompt tokens taken from the prefix cache instead."),
    ("prefix_lookups_total", "lookups", "counter", "Prompts looked up in the prefix cache."),
    ("prefix_hits_total", "hits", "counter", "Prompts that reused a cached prefix."),
    ("prefix_cache_bytes", "bytes", "gauge", "Bytes of finished sequences' caches kept for reuse."),
    ("prefix_cache_sequences", "sequences", "gauge", "Finished sequences kept for reuse."),
    ("adapter_slots", "adapter_slots", "gauge", "LoRA adapters the engine can hold at once."),
    ("adapter_slots_in_use", "adapter_slots_in_use", "gauge",
     "Adapter slots held by requests queued or running."),
    ("adapter_bytes", "adapter_bytes", "gauge", "Bytes of the held adapters' matrices."),
    ("kv_cache_bytes", "kv_bytes", "gauge",
     "Bytes of the running batch's keys and values (padding and room included)."),
    ("kv_cache_tokens", "kv_tokens", "gauge", "Tokens whose keys and values the running rows hold."),
    ("kv_cache_peak_bytes", "peak_kv_bytes", "gauge", "The most bytes the batch cache has held."),
    ("kv_cache_peak_tokens", "peak_kv_tokens", "gauge", "The most tokens the running rows have held."),
)


class Metrics:
    """Counters and a latency histogram, rendered in Prometheus' text format."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = {}
        self.prompt_tokens = 0
        self.generated_tokens = 0
        self.latency_counts = [0] * len(LATENCY_BUCKETS)
        self.latency_sum = 0.0
        self.latency_count = 0

    def record_request(self, route: str, status: int) -> None:
        with self._lock:
            self.requests[route, status] = self.requests.get((route, status), 0) + 1

    def record_generation(self, prompt_tokens: int, generated_tokens: int, seconds: float) -> None:
        with self._lock:
            self.prompt_tokens += prompt_tokens
            self.generated_tokens += generated_tokens
            self.latency_sum += seconds
            self.latency_count += 1
            for index, bound in enumerate(LATENCY_BUCKETS):
                if seconds <= bound:
                    self.latency_counts[index] += 1

    def render(self, queue_depth: int, running: int, engine: dict[str, int] | None = None) -> str:
        """The metrics text; `queue_depth`, `running` and `engine` (`Engine.counters`) are
        summed over every engine."""
        with self._lock:
            lines = ["# HELP promethean_requests_total HTTP requests by route and status.",
                     "# TYPE promethean_requests_total counter"]
            for (route, status), count in sorted(self.requests.items()):
                lines.append(f'promethean_requests_total{{route="{route}",status="{status}"}} {count}')
            lines += [
                "# HELP promethean_prompt_tokens_total Prompt tokens of finished generations.",
                "# TYPE promethean_prompt_tokens_total counter",
                f"promethean_prompt_tokens_total {self.prompt_tokens}",
                "# HELP promethean_generated_tokens_total Tokens generated.",
                "# TYPE promethean_generated_tokens_total counter",
                f"promethean_generated_tokens_total {self.generated_tokens}",
                "# HELP promethean_queue_depth Requests waiting to join the decode batch.",
                "# TYPE promethean_queue_depth gauge",
                f"promethean_queue_depth {queue_depth}",
                "# HELP promethean_running_requests Requests in the decode batch.",
                "# TYPE promethean_running_requests gauge",
                f"promethean_running_requests {running}",
            ]
            for name, key, kind, what in ENGINE_METRICS if engine is not None else ():
                lines += [f"# HELP promethean_{name} {what}", f"# TYPE promethean_{name} {kind}",
                          f"promethean_{name} {engine[key]}"]
            lines += [
                "# HELP promethean_request_latency_seconds Time from submission to the last token.",
                "# TYPE promethean_request_latency_seconds histogram",
            ]
            for bound, count in zip(LATENCY_BUCKETS, self.latency_counts):
                lines.append(f'promethean_request_latency_seconds_bucket{{le="{bound}"}} {count}')
            lines += [
                f'promethean_request_latency_seconds_bucket{{le="+Inf"}} {self.latency_count}',
                f"promethean_request_latency_seconds_sum {self.latency_sum}",
                f"promethean_request_latency_seconds_count {self.latency_count}",
            ]
        return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------- chat log
class ChatLog:
    """Append-only JSONL of chat turns: one line per turn, written whole under a lock and fsynced,
    so concurrent requests never interleave and a crash loses no acknowledged turn."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._owner_only = False

    def append(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, ensure_ascii=False) + "\n"
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # Created owner-only (0600): the log holds every user's words.
            descriptor = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            with open(descriptor, "a", encoding="utf-8") as file:
                if not self._owner_only:  # a log from before, made with the umask's mode
                    os.fchmod(descriptor, 0o600)
                    self._owner_only = True
                file.write(line)
                file.flush()
                os.fsync(file.fileno())

    def append_turn(self, chat_id: str, human: str, completion, route: str) -> None:
        """Append a finished turn (not one whose client left before the reply was complete)."""
        if completion.finish_reason != "cancelled":
            self.append({"chat_id": chat_id, "time": time.time(), "route": route,
                         "human": human, "assistant": completion.text.strip()})
