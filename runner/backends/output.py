"""Capture a stage's stdout+stderr into its log file, capped.

A script that floods its output must not fill the host's disk or slow the
runner: past `cap` bytes nothing more is written, a last line says so, and
`on_exceeded` (the backend's terminate) stops the stage.
"""
from __future__ import annotations

import logging
import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Callable, Iterable

log = logging.getLogger(__name__)


class LogTarget:
    """A log path that may move once its stage is known: a warm sandbox (runner/warm.py) logs to a
    file of the run's state dir until its claim, then to its stage's log in the workspace. The cap
    counts every byte, before and after the move."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.lock = threading.Lock()  # the pump writes a chunk, or move_to moves, never both at once

    def move_to(self, path: Path) -> None:
        """Write what comes next to `path` (created and appended to; the pump switches before its next
        write), after a copy of what was written so far: what the sandbox printed before its claim (a
        warning at import, say) is in the stage's log, as it would be for a cold stage."""
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with self.lock:
            with open(path, "ab") as new:
                try:
                    with open(self.path, "rb") as old:
                        shutil.copyfileobj(old, new)
                except FileNotFoundError:
                    pass  # nothing written yet
            self.path = Path(path)

    def __fspath__(self) -> str:
        return str(self.path)


def as_target(log_path: Path | LogTarget) -> Path | LogTarget:
    """`log_path` as capture() takes it: a LogTarget kept as it is (it may move), anything else a Path."""
    return log_path if isinstance(log_path, LogTarget) else Path(log_path)


def capture(chunks: Iterable[bytes], log_path: Path | LogTarget, cap: int,
            on_exceeded: Callable[[], None]) -> threading.Thread:
    """Start a thread copying `chunks` into `log_path` (a LogTarget: wherever it points); returns the thread."""
    it = iter(chunks)
    target = log_path if isinstance(log_path, LogTarget) else LogTarget(Path(log_path))

    def pump() -> None:
        try:
            _copy(it, target, cap, on_exceeded)
        except OSError as exc:  # a full or read-only log dir: the run's own error says so; the stage goes on
            log.warning("the output of %s is not kept: %s", target.path.stem, exc)
            for _ in it:
                pass  # keep draining so the stage never blocks on a full pipe

    thread = threading.Thread(target=pump, name=f"log-{target.path.stem}", daemon=True)
    thread.start()
    return thread


def _copy(chunks: Iterator[bytes], target: LogTarget, cap: int, on_exceeded: Callable[[], None]) -> None:
    written = 0
    target.path.parent.mkdir(parents=True, exist_ok=True)
    out = open(target.path, "ab")
    try:
        for chunk in chunks:
            if written >= cap:
                continue  # keep draining so the stage never blocks on a full pipe before it is killed
            with target.lock:
                if os.fspath(target) != out.name:  # a warm sandbox's claim moved the log (and copied it)
                    out.close()
                    out = open(target.path, "ab")
                room = cap - written
                out.write(chunk[:room])
                written += min(len(chunk), room)
                out.flush()
                if written >= cap:
                    out.write(f"\n[pipcook-sandbox: output cut at {cap} bytes; the stage was stopped]\n".encode())
                    out.flush()
            if written >= cap:
                on_exceeded()
    finally:
        out.close()


def pipe_chunks(stream: IO[bytes], size: int = 65536) -> Iterable[bytes]:
    while True:
        chunk = stream.read1(size) if hasattr(stream, "read1") else stream.read(size)
        if not chunk:
            return
        yield chunk
