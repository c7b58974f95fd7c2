"""Where a queued run executes: on this host (`local`) or as a Slurm job (`slurm`).

The service (runner/service) decides *which* run starts and *when*; an engine
only starts, watches and stops one run, always as the same command a user
would type (`pipcook-sandbox run ... --json`), so a run behaves the same
whichever engine carries it. See `base.py` for the interface.
"""
from __future__ import annotations

import importlib

from .base import Engine, EngineError, JobState, RunRequest

ENGINES = {"local": "pipcook_sandbox.runner.engines.local", "slurm": "pipcook_sandbox.runner.engines.slurm"}


def get_engine(name: str, **options: object) -> Engine:
    """The engine called NAME, built with its options (e.g. `partition=` for slurm)."""
    try:
        module = importlib.import_module(ENGINES[name])
    except KeyError:
        raise EngineError(f"unknown engine {name!r} (choose from {', '.join(ENGINES)})") from None
    return module.create(**options)


__all__ = ["ENGINES", "Engine", "EngineError", "JobState", "RunRequest", "get_engine"]
