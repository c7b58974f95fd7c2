"""Which artifact processors the operator installed: Python entry points in the group
`pipcook_sandbox.artifacts` (`pip install` of a plugin; a pipeline can never add one).

Apart from the processors themselves (runner/artifacts/), so that the pre-flight checks
(runner/validate.py) can list them without importing the processors and all they import.
"""
from __future__ import annotations

from typing import Any

GROUP = "pipcook_sandbox.artifacts"


def installed() -> dict[str, Any]:
    """Processor name -> its entry point (not loaded)."""
    import importlib.metadata  # 30 ms: only runs that name an artifact pay for it

    return {ep.name: ep for ep in importlib.metadata.entry_points(group=GROUP)}
