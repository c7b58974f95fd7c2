"""A trained model, found and checked: for `predict` and `serve`.

A model is found in a workspace (`DIR/model/`), a model directory itself, a
zip made by the `zip` artifact processor, or such a zip at an http(s) URL.
Its `pipeline.json` names its scripts as pinned paths inside the model dir
(`scripts/model.py#sha256=...`, written by `training.finish_model_dir`);
a model from elsewhere is as hostile as any pipeline, so those references
must stay inside the model dir and carry a pin that matches, or nothing runs.
"""
from __future__ import annotations

import contextlib
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator
from urllib.parse import urlsplit

from . import fetch, jsonvalue, localfiles, spec, stages, statedir, workspace
from .errors import ModelError

MAX_ZIP_BYTES = 4 << 30  # what a model zip may unpack to
MAX_ZIP_FILES = 100_000
MAX_DOWNLOAD_BYTES = 4 << 30
MAX_PIPELINE_BYTES = 1 << 20
MAX_META_BYTES = 16 << 20



@dataclass
class Model:
    """A model ready to run: its dir (trusted to be ours only after `load`), pipeline and meta."""

    dir: Path
    pipeline: spec.Pipeline
    meta: dict
    type: str | None


# ------------------------------------------------------------------ finding the model


def _unzip(archive: Path, dest: Path) -> None:
    """Regular files only, no absolute or `..` paths, sizes counted as written (ctx.extract's rules)."""
    from pipcook_sandbox.sandbox.extract import ExtractError, extract

    if not zipfile.is_zipfile(archive):
        raise ModelError(f"{archive} is not a zip file (predict takes a workspace, a model dir or a model zip)")
    try:
        extract(str(archive), str(dest), max_bytes=MAX_ZIP_BYTES, max_files=MAX_ZIP_FILES)
    except ExtractError as exc:
        raise ModelError(f"refused to unpack {archive.name}: {exc}") from None
    except (zipfile.BadZipFile, OSError, EOFError, RuntimeError) as exc:  # RuntimeError: encrypted entries
        raise ModelError(f"cannot unpack {archive.name}: {exc}") from None


def _model_root(folder: Path) -> Path:
    """The dir holding pipeline.json: a workspace's `model/`, `folder` itself, or a zip's single top dir."""
    if (folder / "model" / "pipeline.json").is_file():
        return folder / "model"
    if all((folder / name).exists() for name in ("model", "logs", "metrics.jsonl")):
        # a workspace's own pipeline.json is the training pipeline, not the model's
        raise ModelError(f"the workspace {folder} has no trained model (model/pipeline.json is missing): "
                         "did its `run` finish?")
    if (folder / "pipeline.json").is_file():
        return folder
    entries = [p for p in folder.iterdir() if not p.name.startswith(".")] if folder.is_dir() else []
    if len(entries) == 1 and entries[0].is_dir() and not entries[0].is_symlink():
        return _model_root(entries[0])
    raise ModelError(f"no model in {folder}: expected model/pipeline.json (a workspace written by `run`), "
                     "pipeline.json (a model dir) or a zip of one")


@contextlib.contextmanager
def open_model(location: str, allow_private: tuple[str, ...] = ()) -> Iterator[Path]:
    """The model dir for WORKSPACE|MODEL_DIR|MODEL.zip|URL; temporary copies removed on exit."""
    scheme = urlsplit(location).scheme.lower()
    if scheme in ("http", "https"):
        with statedir.state_dir("pcsb-model-") as tmp:
            archive = Path(tmp) / "model.zip"
            fetch.download(location, archive, allow_private=allow_private, max_bytes=MAX_DOWNLOAD_BYTES)
            _unzip(archive, Path(tmp) / "unpacked")
            yield _model_root(Path(tmp) / "unpacked")
        return
    if "://" in location:
        raise ModelError(f"a model is a path or an http(s) URL, not {location!r}")
    path = Path(location).expanduser()
    try:  # an unreadable workspace is the user's to fix: say so, before anything runs
        if not path.exists():
            raise ModelError(f"no such workspace, model dir or zip: {path}")
        root = _model_root(path) if path.is_dir() else None
        if root is None:
            path.open("rb").close()
    except OSError as exc:
        raise ModelError(f"cannot read the model at {path}: {exc.strerror or exc} ({exc.filename or path}); "
                         "predict and serve need to read the workspace, model dir or zip") from None
    if root is not None:
        yield root
        return
    with statedir.state_dir("pcsb-model-") as tmp:
        _unzip(path, Path(tmp) / "unpacked")
        yield _model_root(Path(tmp) / "unpacked")


def _read_json(path: Path, cap: int, what: str) -> Any:
    try:
        if path.is_symlink() or not path.is_file():
            raise ModelError(f"{what} {path} is missing or not a regular file")
        if path.stat().st_size > cap:
            raise ModelError(f"{what} {path} is larger than {cap} bytes")
        return jsonvalue.loads(path.read_text("utf-8"))  # no RecursionError, no NaN
    except (OSError, UnicodeDecodeError, ValueError) as exc:  # jsonvalue.Unfit is a ValueError
        raise ModelError(f"cannot read {what} {path}: {exc}") from None


def _check_local(ref: spec.ScriptRef, model_dir: Path, field_name: str) -> None:
    """A model's scripts must be pinned files inside it: it may not run host files or fetch code."""
    if not ref.is_local:
        raise ModelError(f"{model_dir / 'pipeline.json'}: {field_name} is {ref.uri}; a model's scripts must be "
                         "files inside the model (scripts/NAME.py#sha256=...), as `run` writes them")
    path = spec.uri_to_path(ref.uri)
    root = model_dir.resolve()
    if root not in path.resolve().parents:
        raise ModelError(f"{model_dir / 'pipeline.json'}: {field_name} points outside the model ({ref.raw})")
    if not ref.sha256:
        raise ModelError(f"{model_dir / 'pipeline.json'}: {field_name} ({ref.raw}) has no #sha256= pin; "
                         "a model's scripts must be pinned")
    try:  # a regular file: not a fifo (a read would hang), a device or a directory (runner.localfiles)
        localfiles.check(path, (str(root),))
    except localfiles.Refused as exc:
        raise ModelError(f"{model_dir / 'pipeline.json'}: {field_name} ({ref.raw}) is refused: {exc}; "
                         "a model's scripts must be regular files inside the model") from None


def load(model_dir: Path) -> Model:
    """Parse and check the model's pipeline.json; read meta.json."""
    pipeline_path = model_dir / "pipeline.json"
    raw = _read_json(pipeline_path, MAX_PIPELINE_BYTES, "the model's pipeline")
    pipeline = spec.parse_pipeline(raw, str(pipeline_path), confine=False)  # the model's own rule: _check_local
    _check_local(pipeline.datasource, model_dir, "datasource")
    for i, ref in enumerate(pipeline.dataflow):
        _check_local(ref, model_dir, f"dataflow[{i}]")
    _check_local(pipeline.model, model_dir, "model")
    if pipeline.framework_ref is not None:
        raise ModelError(f"{pipeline_path}: options.framework must be NAME@VERSION for predict, not a URL or path")
    meta_path = model_dir / "meta.json"
    meta = _read_json(meta_path, MAX_META_BYTES, "the model's meta") if meta_path.exists() else {}
    if not isinstance(meta, dict):
        raise ModelError(f"{meta_path} is not a JSON object")
    return Model(model_dir, pipeline, meta, pipeline.type)


def prepare(model: Model, tmp: Path, *, isolation: str, gpu: bool, allow_private: tuple[str, ...],
            log: Callable[[str], None], mirror: str | None = None,
            ) -> tuple[workspace.Workspace, dict[str, Path], Any, Path | None]:
    """A throwaway workspace with the verified scripts, plus the framework and worker site."""
    ws = workspace.create(tmp / "ws")
    copies = stages.fetch_scripts(model.pipeline, ws, nocache=True, allow_private=allow_private)  # pins checked here
    workspace.restrict(ws.root)  # the script copies: readable by the stages, no one else
    framework, worker_site = stages.prepare_runtime(model.pipeline, isolation=isolation, gpu=gpu, nocache=True,
                                                    allow_private=allow_private, log=log, mirror=mirror)
    return ws, copies, framework, worker_site
