"""The `zip` artifact processor: model/ as one zip, ready for `predict MODEL.zip`."""
from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Callable

from . import target_path
from .safefiles import regular_files


# The options this processor reads besides `processor`; the runner checks a pipeline's artifact
# entries against them before any stage starts (runner/validate.py), so a typo fails in a second.
OPTIONS: dict[str, str] = {"target": "where the zip lands, relative to the workspace (default artifacts/model.zip)"}


def process(model_dir: Path, options: dict, workspace: Path, log: Callable[[str], None] = print) -> Path:
    target = target_path(Path(workspace), options.get("target"), "model.zip", log)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for rel, fd in regular_files(model_dir):
            with os.fdopen(fd, "rb") as src:
                info = zipfile.ZipInfo(rel)
                info.external_attr = 0o644 << 16
                info.compress_type = zipfile.ZIP_DEFLATED
                with zf.open(info, "w") as dst:
                    while chunk := src.read(1 << 20):
                        dst.write(chunk)
    os.replace(tmp, target)
    return target
