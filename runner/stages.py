"""From a pipeline to the stages that run it: the scripts fetched, the runtime, the plan.

Shared by `run` (training.py), `predict` and `serve`, so no command imports
another.
"""
from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import Any, Callable

from . import fetch, frameworks, spec, workspace
from .errors import PipcookError
from .run import StagePlan
from .workerenv import ensure_worker_site


def model_options(pipeline: spec.Pipeline) -> dict:
    """options.train merged under the model script's query options (query values win)."""
    merged = dict(pipeline.train_options or {})
    merged.update(pipeline.model.options)
    return merged


def fetch_scripts(pipeline: spec.Pipeline, ws: workspace.Workspace, *, nocache: bool,
                  allow_private: tuple[str, ...]) -> dict[str, Path]:
    """Every distinct script URI fetched once and copied into ws/scripts; uri -> copy."""
    copies: dict[str, Path] = {}
    refs = [("datasource", pipeline.datasource)]
    refs += [(f"dataflow-{i}", ref) for i, ref in enumerate(pipeline.dataflow, 1)]
    refs.append(("model", pipeline.model))
    used: set[str] = set()
    for stage, ref in refs:
        if ref.uri in copies:
            continue
        try:
            cached = fetch.fetch_script(ref, nocache=nocache, allow_private=allow_private)
        except PipcookError as exc:
            exc.stage = exc.stage or stage
            exc.script = exc.script or ref.name
            raise
        name = ref.name if ref.name.endswith(".py") else f"{ref.name}.py"
        while name in used:  # two URIs, one file name
            name = f"{Path(name).stem}-{hashlib.sha256(ref.uri.encode()).hexdigest()[:6]}.py"
        used.add(name)
        copies[ref.uri] = ws.scripts / name
        shutil.copyfile(cached, copies[ref.uri])
    return copies


def plan(pipeline: spec.Pipeline, copies: dict[str, Path], task_type: str = "train") -> list[StagePlan]:
    plans = []
    if task_type == "train":
        plans.append(StagePlan("datasource", "datasource", copies[pipeline.datasource.uri],
                                            dict(pipeline.datasource.options)))
    for i, ref in enumerate(pipeline.dataflow, 1):
        plans.append(StagePlan(f"dataflow-{i}", "dataflow", copies[ref.uri], dict(ref.options)))
    plans.append(StagePlan("model", "model", copies[pipeline.model.uri], model_options(pipeline)))
    return plans


def prepare_runtime(pipeline: spec.Pipeline, *, isolation: str, gpu: bool | None, nocache: bool,
                    allow_private: tuple[str, ...], log: Callable[[str], None], mirror: str | None = None,
                    ) -> tuple[Any, Path | None]:
    """The framework the pipeline names (built or fetched once, cached) and the worker's own site."""
    framework = frameworks.resolve(pipeline.framework, cuda=bool(gpu), log=log, mirror=mirror,
                                   url_ref=pipeline.framework_ref, nocache=nocache, allow_private=allow_private)
    worker_site = ensure_worker_site(log=log) if isolation in ("bwrap", "none") else None
    return framework, worker_site
