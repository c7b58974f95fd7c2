"""Isolation backends: each a subclass of `base.Backend`, registered here by name.

`get_backend(name)` imports the backend's module only when it is asked for
(Docker's client library is not loaded for a bwrap run). Adding one (a
Kubernetes Job, say) is a new module with a `Backend` subclass plus a line in
BACKENDS.
"""
from __future__ import annotations

import importlib
from functools import cache

from pipcook_sandbox.runner.errors import UnknownBackend

from .base import Backend

# name -> "module:class"
BACKENDS = {
    "bwrap": "pipcook_sandbox.runner.backends.bwrap:BwrapBackend",
    "docker": "pipcook_sandbox.runner.backends.docker:DockerBackend",
    "none": "pipcook_sandbox.runner.backends.none:NoneBackend",
}


@cache
def get_backend(name: str) -> Backend:
    try:
        module, cls = BACKENDS[name].split(":")
    except KeyError:
        raise UnknownBackend(f"unknown isolation {name!r} (choose from {', '.join(BACKENDS)})") from None
    backend = getattr(importlib.import_module(module), cls)()
    assert isinstance(backend, Backend)
    return backend
