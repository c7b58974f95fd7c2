"""Capture a stage's stdout+stderr into its log file, capped.

A script that floods its output must not fill the host's disk or slow the
runner: past `cap` bytes nothing more is written, a last line says so, and
`on_exceeded` (the backend's terminate) stops the stage.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Callable, Iterable

log = logging.getLogger(__name__)


def capture(chunks: Iterable[bytes], log_path: Path, cap: int, on_exceeded: Callable[[], None]) -> threading.Thread:
    """Start a thread copying `chunks` into `log_path`; returns the thread."""
    it = iter(chunks)

    def pump() -> None:
        try:
            _copy(it, log_path, cap, on_exceeded)
        except OSError as exc:  # a full or read-only log dir: the run's own error says so; the stage goes on
            log.warning("the output of %s is not kept: %s", log_path.stem, exc)
            for _ in it:
                pass  # keep draining so the stage never blocks on a full pipe

    thread = threading.Thread(target=pump, name=f"log-{log_path.stem}", daemon=True)
    thread.start()
    return thread


def _copy(chunks: Iterator[bytes], log_path: Path, cap: int, on_exceeded: Callable[[], None]) -> None:
    written = 0
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as out:
        for chunk in chunks:
            if written >= cap:
                continue  # keep draining so the stage never blocks on a full pipe before it is killed
            room = cap - written
            out.write(chunk[:room])
            written += min(len(chunk), room)
            out.flush()
            if written >= cap:
                out.write(f"\n[pipcook-sandbox: output cut at {cap} bytes; the stage was stopped]\n".encode())
                out.flush()
                on_exceeded()


def pipe_chunks(stream: IO[bytes], size: int = 65536) -> Iterable[bytes]:
    while True:
        chunk = stream.read1(size) if hasattr(stream, "read1") else stream.read(size)
        if not chunk:
            return
        yield chunk
