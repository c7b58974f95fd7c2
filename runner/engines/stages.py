"""What an engine needs to know of a run's pipeline before it starts (its command line is
`local.command`, shared by every engine so a run behaves the same whichever carries it)."""
from __future__ import annotations

import json

from .base import RunRequest


def concurrent_stages(request: RunRequest) -> int:
    """How many stages of the run may hold their limits at once: the datasource,
    each dataflow and the model stream together. A pipeline that cannot be read
    counts as the smallest one (it will fail in the runner with its own error)."""
    try:
        spec = json.loads(request.pipeline.read_text())
        flows = spec.get("dataflow") or []
        return 2 + (len(flows) if isinstance(flows, list) else 1)
    except (OSError, ValueError, AttributeError):
        return 2
