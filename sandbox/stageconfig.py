"""The one configuration a stage gets: written by the runner, read and checked by the worker.

It travels as `/pipcook/stage.json`. The runner builds a `StageConfig` and
writes `to_json()`; the worker reads it back with `StageConfig.parse`, which
refuses a file of another `version` or with a field of the wrong type, so the
two sides can never silently disagree. This module is mounted into every
stage: standard library only, nothing host-side.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError

VERSION = 2


@dataclass
class ScriptEntry:
    """One script of a `serve` worker: its stage name, path and options."""

    stage: str
    script: str
    options: dict = field(default_factory=dict)


@dataclass
class StageConfig:
    stage: str  # "datasource", "dataflow-1", "model", "serve"
    role: str  # "datasource" | "dataflow" | "model" | "serve"
    script: str  # the script's path inside the stage
    control: str  # the control socket's ipc:// endpoint
    task_type: str = "train"  # "train" | "predict"
    options: dict = field(default_factory=dict)
    pipeline_options: dict = field(default_factory=dict)
    framework: dict | None = None  # {"name", "dir", "initialize"}
    site_dirs: list = field(default_factory=list)
    upstream: str | None = None  # the pool to read (ipc://), None for a datasource
    upstream_stage: str = "upstream"
    serve: str | None = None  # where to serve this stage's pool (ipc://), None for the model
    workspace: dict = field(default_factory=dict)  # data_dir, cache_dir, model_dir, framework_dir
    extract: dict = field(default_factory=dict)  # ctx.extract's limits: max_bytes, max_files
    hints: dict = field(default_factory=dict)  # cpus, gpu: set as PIPCOOK_* variables
    dataflows: list = field(default_factory=list)  # serve: ScriptEntry of each dataflow
    model: ScriptEntry | None = None  # serve: the model's ScriptEntry
    version: int = VERSION

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), default=str)

    @classmethod
    def parse(cls, raw: Any) -> "StageConfig":
        """The configuration in `raw` (decoded JSON), checked field by field; ConfigError if it is not one."""
        if not isinstance(raw, dict):
            raise ConfigError("stage.json is not a JSON object")
        if raw.get("version") != VERSION:
            raise ConfigError(f"stage.json is version {raw.get('version')!r}; this worker reads version {VERSION}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - names)
        if unknown:
            raise ConfigError(f"stage.json has unknown fields: {', '.join(unknown)}")
        for key in ("stage", "role", "script", "control"):
            if key not in raw:
                raise ConfigError(f"stage.json has no {key!r}")
        values = dict(raw)
        for key, kinds in _TYPES.items():
            if key in values and not isinstance(values[key], kinds):
                raise ConfigError(f"stage.json field {key!r} has the wrong type ({type(values[key]).__name__})")
        if values.get("role") not in ROLES:
            raise ConfigError(f"stage.json role {values.get('role')!r} is not one of {', '.join(ROLES)}")
        values["dataflows"] = [_entry(d) for d in values.get("dataflows") or []]
        if values.get("model") is not None:
            values["model"] = _entry(values["model"])
        return cls(**values)


ROLES = ("datasource", "dataflow", "model", "serve")
_TYPES: dict[str, type | tuple[type, ...]] = {
    "stage": str, "role": str, "script": str, "control": str, "task_type": str, "options": dict,
    "pipeline_options": dict, "framework": (dict, type(None)), "site_dirs": list, "upstream": (str, type(None)),
    "upstream_stage": str, "serve": (str, type(None)), "workspace": dict, "extract": dict, "hints": dict,
    "dataflows": list, "model": (dict, type(None)), "version": int,
}


def _entry(raw: Any) -> ScriptEntry:
    if not isinstance(raw, dict) or not isinstance(raw.get("stage"), str) or not isinstance(raw.get("script"), str) \
            or not isinstance(raw.get("options", {}), dict):
        raise ConfigError("stage.json has a malformed script entry")
    return ScriptEntry(raw["stage"], raw["script"], dict(raw.get("options") or {}))
