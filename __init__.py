"""pipcook-sandbox: run someone else's machine-learning pipeline, every stage in its own sandbox.

The distribution installs one import name, `pipcook_sandbox`, whose parts are
the repository's top-level folders:

    pipcook_sandbox.sandbox     runs INSIDE a stage (worker, SDK, protocol); the
                                only code mounted into a sandbox, where it is
                                imported as plain `sandbox`
    pipcook_sandbox.runner      the host side: CLI, fetching, backends, artifacts
    pipcook_sandbox.frameworks  framework definitions (dependencies, pins)
    images/                     Docker build contexts for the worker images (data)
"""
from __future__ import annotations

try:
    from importlib.metadata import PackageNotFoundError, version

    __version__ = version("pipcook-sandbox")
except PackageNotFoundError:  # pragma: no cover - running from a bare checkout
    __version__ = "0+unknown"
