"""A run's state directory: private, short-pathed, naming its owner.

Every temporary directory a runner makes for a run (a pipeline's, a serve
worker's, predict's model scratch space, an artifact processor's) is made
here, so `clean` and the leftover checks find the same `run.json` in all.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import PipcookError


def new_state_dir(prefix: str = "pcsb-", run_id: str | None = None, parent: str | None = None) -> Path:
    """A private temporary directory that names its owner (run.json), so leftover checks and
    `clean` can tell a live run's from an abandoned one. Short path: ipc:// endpoints must stay
    under 107 characters, so it is under /tmp unless `parent` says otherwise."""
    if parent is None:
        parent = "/tmp" if os.path.isdir("/tmp") else tempfile.gettempdir()
    record: dict[str, Any] = {"runner_pid": os.getpid()}
    if run_id is not None:
        record["run_id"] = run_id
    path: Path | None = None
    try:
        path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
        (path / "run.json").write_text(json.dumps(record))
    except OSError as exc:
        if path is not None:
            shutil.rmtree(path, ignore_errors=True)
        raise PipcookError(f"cannot make the run's private state directory under {parent} (it holds each "
                           f"stage's sockets, scratch space and disk-quota volume): {exc.strerror or exc}; "
                           f"free space on that filesystem or make it writable") from exc
    return path


@contextlib.contextmanager
def state_dir(prefix: str = "pcsb-") -> Iterator[Path]:
    """`new_state_dir`, removed on exit."""
    path = new_state_dir(prefix)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
