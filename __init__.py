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


def __getattr__(name: str) -> str:
    # `__version__` on demand: importing importlib.metadata costs every command ~0.04 s of CPU.
    if name != "__version__":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("pipcook-sandbox")
    except PackageNotFoundError:  # pragma: no cover - running from a bare checkout
        return "0+unknown"
