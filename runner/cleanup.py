"""`pipcook-sandbox clean`: remove what runs that crashed left behind.

Each backend knows its own leftovers (mounts, cgroups, containers labelled
with the run); a run whose runner process is gone is fair game.
"""
from __future__ import annotations

import os
import re
import shutil
import time
from collections.abc import Iterable
from pathlib import Path

from pipcook_sandbox.runner.backends import BACKENDS, get_backend

from .errors import UsageError

_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")
_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def clean_all(only: Iterable[str] | None = None) -> list[str]:
    """Every backend's leftovers of dead runners (`only`: just these backends). `run` calls it first,
    so what a runner killed with -9 left is gone by the next run."""
    removed: list[str] = []
    for name in BACKENDS if only is None else [n for n in only if n in BACKENDS]:
        try:
            backend = get_backend(name)
        except ImportError:
            continue
        clean = getattr(backend, "clean_leftovers", None)
        if clean is None:
            continue
        try:
            removed.extend(clean())
        except Exception as exc:  # one backend's trouble must not stop the others
            removed.append(f"({name}: could not finish cleaning: {exc})")
    return removed


def parse_duration(text: str) -> float:
    """'30d', '12h', '90m', '45s', '2w' (a bare number is seconds) -> seconds; UsageError otherwise."""
    m = _DURATION_RE.match(str(text).lower())
    if not m:
        raise UsageError(f"--older-than {text!r} is not a duration like 30d, 12h, 90m or 45s")
    return float(m.group(1)) * _SECONDS[m.group(2)]


def prune_cache(root: Path, older_than: float | None = None) -> list[str]:
    """Remove cache entries (each item of each cache folder: a script, a download, a framework build,
    a worker site) cached more than `older_than` seconds ago; all of them when it is None. An entry
    is judged by its own modification time, the time it was fetched or built."""
    removed: list[str] = []
    if not root.is_dir() or root.is_symlink():
        return removed
    now = time.time()
    for folder in sorted(root.iterdir()):
        if not folder.is_dir() or folder.is_symlink():
            continue
        for entry in sorted(folder.iterdir()):
            try:
                age = now - os.lstat(entry).st_mtime
            except FileNotFoundError:
                continue
            if older_than is not None and age < older_than:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(str(entry))
    return removed
