"""Artifact processors: trusted host plugins that package a trained model.

They are Python entry points in the group `pipcook_sandbox.artifacts`,
installed by the operator (`pip install`). A pipeline names one
(`{"processor": "zip", ...options}`) but can never install one. Each is
called as `process(model_dir: Path, options: dict, workspace: Path) -> Path`
and must treat everything under `model/` as hostile: read only regular files,
never follow a link (see `safefiles`).

Where the output lands is the pipeline's wish, not its right: a `target` is
taken relative to the workspace, and one that points outside it is written
into `DIR/artifacts/` instead, so a pipeline cannot overwrite host files.
"""
from __future__ import annotations

from contextvars import ContextVar
from pathlib import Path
from typing import Any, Callable

from ..errors import ArtifactError, PipcookError
from ..processors import GROUP, installed  # noqa: F401  (this package's API too)

# The isolation and limits of the run whose model is being processed. Processors are trusted, the
# model files are not: code that parses them (Keras, TensorFlow) runs in this sandbox
# (`confined.run`). Called outside a run, the default sandbox.
_confinement: ContextVar[tuple[str, Any]] = ContextVar("pipcook_artifact_confinement", default=("bwrap", None))


def confinement() -> tuple[str, Any]:
    """(isolation, Limits or None) for code that reads the model's files."""
    return _confinement.get()


def target_path(ws_root: Path, target: Any, default_name: str, log: Callable[[str], None] = print) -> Path:
    """Where a processor may write: inside the workspace, whatever the pipeline asked."""
    ws_root = ws_root.resolve()
    if not isinstance(target, str) or not target:
        return ws_root / "artifacts" / default_name
    wanted = Path(target)
    resolved = (ws_root / wanted).resolve() if not wanted.is_absolute() else wanted.resolve()
    if resolved == ws_root or ws_root not in resolved.parents:
        safe = ws_root / "artifacts" / (wanted.name or default_name)
        log(f"artifact target {target} is outside the workspace; writing {safe} instead "
            "(a pipeline may not choose where files land on the host)")
        return safe
    return resolved


def run_all(entries: list[dict], ws: Any, log: Callable[[str], None] = print, isolation: str = "bwrap",
            limits: Any = None) -> list[Path]:
    token = _confinement.set((isolation, limits))
    try:
        return _run_all(entries, ws, log)
    finally:
        _confinement.reset(token)


def _run_all(entries: list[dict], ws: Any, log: Callable[[str], None]) -> list[Path]:
    outputs = []
    available = installed()
    for i, entry in enumerate(entries or []):
        name = entry.get("processor")
        ep = available.get(name) if isinstance(name, str) else None
        if ep is None:
            raise ArtifactError(
                f"artifact[{i}]: no artifact processor {name!r} is installed on this host "
                f"(installed: {', '.join(sorted(available)) or 'none'}); an operator installs processors, a pipeline cannot")
        try:
            process = ep.load()
        except Exception as exc:
            raise ArtifactError(f"artifact processor {name!r} cannot be loaded: {exc}") from None
        try:
            out = process(ws.model, dict(entry), ws.root, log=log)
        except PipcookError:
            raise
        except Exception as exc:
            raise ArtifactError(f"artifact processor {name!r} failed: {type(exc).__name__}: {exc}") from None
        log(f"artifact {name}: {out}")
        outputs.append(Path(out))
    return outputs
