"""The one command every engine runs for a run: `python -m pipcook_sandbox run ... --json`.

Kept in one place so a run behaves the same whichever engine carries it
(base.py's docstring is the contract).
"""
from __future__ import annotations

import json
import sys

from .base import RunRequest


def runner_argv(request: RunRequest, python: str | None = None) -> list[str]:
    """argv of the runner for `request` (stdout/stderr redirection is the engine's)."""
    argv = [python or sys.executable, "-m", "pipcook_sandbox", "run", str(request.pipeline),
            "-o", str(request.workspace), "--json", "--isolation", request.isolation,
            "--memory", str(request.memory), "--cpus", f"{request.cpus:g}", "--pids", str(request.pids),
            "--disk", str(request.disk), "--timeout", f"{request.timeout:g}"]
    if request.gpus:
        argv.append("--gpu")
    if request.stage_uid is not None:
        argv += ["--stage-uid", str(request.stage_uid)]
    for host in request.allow_private:
        argv += ["--allow-private", host]
    return argv


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
