"""The workspace a run writes (docs/cli.md):

    DIR/pipeline.json  scripts/  framework/  data/  cache/  model/  logs/  metrics.jsonl

The runner creates it, never reuses a non-empty one (a mistyped -o must not
clobber a previous run), and keeps it whatever happens, so a failed run can
be inspected.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import PipcookError

SUBDIRS = ("scripts", "framework", "data", "cache", "model", "logs")


@dataclass(frozen=True)
class Workspace:
    root: Path

    def __getattr__(self, name: str) -> Path:
        if name in SUBDIRS:
            return self.root / name
        raise AttributeError(name)

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def pipeline(self) -> Path:
        return self.root / "pipeline.json"


def default_dir() -> Path:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path.cwd() / f"pipcook-output-{stamp}"


def create(root: Path | None) -> Workspace:
    root = Path(root) if root else default_dir()
    root = root.absolute()
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise PipcookError(f"output directory {root} already exists and is not empty; choose another with -o")
    try:
        root.mkdir(parents=True, exist_ok=True)
        for sub in SUBDIRS:
            (root / sub).mkdir(exist_ok=True)
        (root / "metrics.jsonl").touch()
    except OSError as exc:
        raise PipcookError(f"cannot create the workspace {root}: {exc.strerror}") from None
    return Workspace(root)


def write_json(path: Path, data) -> None:
    """Write atomically; a stage-planted file or dir of that name is replaced, never followed."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, default=str)
        f.write("\n")
    if path.is_dir() and not path.is_symlink():
        import shutil

        shutil.rmtree(path)
    os.replace(tmp, path)
