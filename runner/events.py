"""A run's event stream: what `run --json` prints, one JSON object per line.

The same events feed every consumer of a run: the service (which stores
them in the run's events.jsonl and serves them as server-sent events), its
clients (`logs -f`) and a live terminal display. Each line is an object with
`event` (the kind), `time` (Unix seconds) and the kind's own fields:

    stage     {"stage": str, "status": "started"|"exited", "code": int|None}
    progress  {"value": float 0..100, "extra": {str: number|str}}
    metrics   {"stage": str, "step": int|None, "metrics": {str: number|str}}
    log       {"stage": str|None, "message": str}        a line the runner said
    verdict   {"status": "succeeded"|"failed"|"interrupted", "exit_code": int,
               "error": str|None, "stage": str|None, "script": str|None}

`verdict` is always the last line of a run that ended by itself. Strings
that came from a stage are hostile: JSON encoding (`ensure_ascii`) keeps
them inert on the wire, and whoever shows them on a terminal must escape
them (control.shown). Readers skip unknown kinds and fields, so kinds may
be added without breaking them.
"""
from __future__ import annotations

import json
import threading
import time
from typing import IO, Any

KINDS = ("stage", "progress", "metrics", "log", "verdict")
SUCCEEDED, FAILED, INTERRUPTED = "succeeded", "failed", "interrupted"
MAX_LINE = 64 << 10  # a reader ignores longer lines: no event of ours comes near it


def make(kind: str, **fields: Any) -> dict[str, Any]:
    return {"event": kind, "time": round(time.time(), 3), **fields}


def encode(event: dict[str, Any]) -> str:
    """One line, ASCII only: every control character and escape sequence is \\u-escaped."""
    return json.dumps(event, ensure_ascii=True, separators=(",", ":"), default=str)


def decode(line: str | bytes) -> dict[str, Any] | None:
    """The event on LINE, or None for anything that is not one (a torn or foreign line)."""
    if len(line) > MAX_LINE:
        return None
    try:
        value = json.loads(line)
    except ValueError:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("event"), str):
        return None
    return value


def verdict_of(code: int) -> str:
    return SUCCEEDED if code == 0 else INTERRUPTED if code in (130, 143) else FAILED


class Emitter:
    """Writes events to a stream, a whole line at a time, from any thread."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream
        self.lock = threading.Lock()

    def emit(self, kind: str, **fields: Any) -> None:
        line = encode(make(kind, **fields))
        with self.lock:
            try:
                self.stream.write(line + "\n")
                self.stream.flush()
            except (OSError, ValueError):
                pass  # the reader went away: the run itself goes on, its verdict is its exit status

    def progress(self, value: float, extra: dict) -> None:
        self.emit("progress", value=value, extra=extra)

    def metrics(self, stage: str, step: Any, metrics: dict) -> None:
        self.emit("metrics", stage=stage, step=step, metrics=metrics)

    def stage_event(self, stage: str, what: str) -> None:
        """The orchestrator's on_event(stage, what): starts and exits become `stage`, the rest `log`."""
        if what == "started":
            self.emit("stage", stage=stage, status="started", code=None)
        elif what.startswith("exited with code "):
            try:
                code: int | None = int(what.rsplit(" ", 1)[1])
            except ValueError:
                code = None
            self.emit("stage", stage=stage, status="exited", code=code)
        else:
            self.emit("log", stage=stage, message=what)

    def log(self, message: str) -> None:
        self.emit("log", stage=None, message=message)

    def verdict(self, code: int, error: BaseException | None = None) -> None:
        self.emit("verdict", status=verdict_of(code), exit_code=code,
                  error=str(error) if error is not None else None,
                  stage=getattr(error, "stage", None), script=getattr(error, "script", None))
