"""Reading a run's events.jsonl (what `run --json` wrote) as it grows.

Only whole lines are read (a line being written is left for the next read),
each at most events.MAX_LINE bytes; anything that is not an event is skipped.
`Summary` folds the events into what `GET /v1/runs/{id}` shows.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipcook_sandbox.runner import events as ev

CHUNK = 1 << 20
MAX_METRICS = 64  # latest values of at most this many metric names


def read_from(path: Path, offset: int, max_bytes: int = CHUNK) -> tuple[list[tuple[int, dict[str, Any]]], int]:
    """Events after byte OFFSET as (end offset of its line, event), and the offset to read from next."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read(max_bytes)
    except OSError:
        return [], offset
    out: list[tuple[int, dict[str, Any]]] = []
    pos = 0
    while True:
        end = data.find(b"\n", pos)
        if end < 0:
            if pos == 0 and len(data) >= max_bytes:  # one line longer than we read: skip it whole
                return out, offset + len(data)
            break
        event = ev.decode(data[pos:end])
        pos = end + 1
        if event is not None:
            out.append((offset + pos, event))
    return out, offset + pos


@dataclass
class Summary:
    offset: int = 0
    stages: dict[str, str] = field(default_factory=dict)  # name -> started | succeeded | failed (code)
    progress: float | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    verdict: dict[str, Any] | None = None
    events: int = 0

    def add(self, event: dict[str, Any]) -> None:
        self.events += 1
        kind = event.get("event")
        if kind == "stage" and isinstance(event.get("stage"), str):
            name = event["stage"][:64]
            if event.get("status") == "started":
                self.stages[name] = "running"
            else:
                self.stages[name] = "exited" if event.get("code") == 0 else f"exited with code {event.get('code')}"
        elif kind == "progress" and isinstance(event.get("value"), (int, float)):
            self.progress = float(event["value"])
        elif kind == "metrics" and isinstance(event.get("metrics"), dict):
            for key, value in event["metrics"].items():
                if key in self.metrics or len(self.metrics) < MAX_METRICS:
                    self.metrics[str(key)[:64]] = value if isinstance(value, (int, float)) else str(value)[:200]
            if event.get("step") is not None:
                self.metrics["step"] = event.get("step")
        elif kind == "verdict":
            self.verdict = event
            for name, state in self.stages.items():  # serving stages are stopped by the runner at the end
                if state == "running":
                    self.stages[name] = "stopped"


class Summaries:
    """Summary per run, brought up to date incrementally on each read."""

    def __init__(self) -> None:
        self._cache: dict[str, Summary] = {}
        self._lock = threading.Lock()

    def get(self, run_id: str, path: Path) -> Summary:
        with self._lock:
            summary = self._cache.setdefault(run_id, Summary())
            while True:
                found, summary.offset = read_from(path, summary.offset)
                for _, event in found:
                    summary.add(event)
                if not found:
                    break
            return summary

    def forget(self, run_id: str) -> None:
        with self._lock:
            self._cache.pop(run_id, None)
