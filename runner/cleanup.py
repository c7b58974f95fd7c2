"""`pipcook-sandbox clean`: remove what runs that crashed left behind.

Each backend knows its own leftovers (mounts, cgroups, containers labelled
with the run); a run whose runner process is gone is fair game.
"""
from __future__ import annotations

from pipcook_sandbox.runner.backends import BACKENDS, get_backend


def clean_all() -> list[str]:
    removed: list[str] = []
    for name in BACKENDS:
        try:
            backend = get_backend(name)
        except ImportError:
            continue
        try:
            removed.extend(backend.clean_leftovers())
        except Exception as exc:  # one backend's trouble must not stop the others
            removed.append(f"({name}: could not finish cleaning: {exc})")
    return removed
