"""Isolation backends: one module each, all behind `base.Backend`.

A backend module has `NAME`, `start(spec) -> StageHandle` and `probe() -> dict`
(what confinement it gives on this host, for `doctor`). Adding one (a
Kubernetes Job, say) is a new module plus a line in BACKENDS.
"""
from __future__ import annotations

import importlib
from types import ModuleType

BACKENDS = {"bwrap": "pipcook_sandbox.runner.backends.bwrap", "docker": "pipcook_sandbox.runner.backends.docker",
            "none": "pipcook_sandbox.runner.backends.none"}


class UnknownBackend(ValueError):
    pass


def get_backend(name: str) -> ModuleType:
    try:
        return importlib.import_module(BACKENDS[name])
    except KeyError:
        raise UnknownBackend(f"unknown isolation {name!r} (choose from {', '.join(BACKENDS)})") from None
