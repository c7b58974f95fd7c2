"""`pipcook-sandbox predict`: run a trained model on a few inputs, every stage sandboxed.

A model is found in a workspace (`DIR/model/`), a model directory itself, a
zip made by the `zip` artifact processor, or such a zip at an http(s) URL.
Its `pipeline.json` names its scripts as pinned paths inside the model dir
(`scripts/model.py#sha256=...`, written by `training.finish_model_dir`);
a model from elsewhere is as hostile as any pipeline, so those references
must stay inside the model dir and carry a pin that matches, or nothing runs.

Then: the dataflows and the model's `predict` run as in training, each in
its own sandbox, with `ctx.task_type == "predict"`, the model dir read-only
and the inputs served by the runner as the `predicted` split.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator
from urllib.parse import urlsplit

from pipcook_sandbox.runner.backends.base import Limits

from . import fetch, orchestrator, spec, training, workspace
from .errors import PipcookError

MAX_ZIP_BYTES = 4 << 30  # what a model zip may unpack to
MAX_ZIP_FILES = 100_000
MAX_DOWNLOAD_BYTES = 4 << 30
MAX_PIPELINE_BYTES = 1 << 20
MAX_META_BYTES = 16 << 20


class ModelError(PipcookError):
    """The model (workspace, dir or zip) cannot be used for prediction."""


class UsageError(PipcookError):
    """The command was called wrongly (no inputs, say)."""


@dataclass
class Model:
    """A model ready to run: its dir (trusted to be ours only after `load`), pipeline and meta."""

    dir: Path
    pipeline: spec.Pipeline
    meta: dict
    type: str | None


@dataclass
class PredictOptions:
    isolation: str = "bwrap"
    gpu: bool = False
    mirror: str | None = None  # -m: prebuilt frameworks from this mirror
    allow_private: tuple[str, ...] = ()
    limits: Limits = field(default_factory=Limits)
    log: Callable[[str], None] = print
    on_event: Callable[[str, str], None] | None = None


# ------------------------------------------------------------------ inputs


def samples_from(strings: tuple[str, ...] | list[str], files: tuple[str, ...] | list[str]) -> list[dict]:
    """`-s` and `-u` as samples (docs/scripts.md): strings first, then files, each in order."""
    samples: list[dict] = [{"data": s, "label": None} for s in strings]
    for name in files:
        path = Path(name)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise UsageError(f"input file not found: {path}") from None
        except IsADirectoryError:
            raise UsageError(f"input {path} is a directory; -u takes a file") from None
        except OSError as exc:
            raise UsageError(f"cannot read input file {path}: {exc.strerror}") from None
        samples.append({"data": data, "label": None, "name": path.name})
    if not samples:
        raise UsageError("no inputs: give at least one -s STRING or -u FILE "
                         "(e.g. pipcook-sandbox predict ./workspace -s '5.1,3.5,1.4,0.2')")
    return samples


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
def _scratch(prefix: str) -> Iterator[str]:
    """A temporary dir that names its owner (run.json), like a run's state dir, so leftover checks
    and `clean` can tell a live predict's scratch space from an abandoned one."""
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        (Path(tmp) / "run.json").write_text(json.dumps({"runner_pid": os.getpid()}))
        yield tmp


@contextlib.contextmanager
def open_model(location: str, allow_private: tuple[str, ...] = ()) -> Iterator[Path]:
    """The model dir for WORKSPACE|MODEL_DIR|MODEL.zip|URL; temporary copies removed on exit."""
    scheme = urlsplit(location).scheme.lower()
    if scheme in ("http", "https"):
        with _scratch("pcsb-model-") as tmp:
            archive = Path(tmp) / "model.zip"
            fetch.download(location, archive, allow_private=allow_private, max_bytes=MAX_DOWNLOAD_BYTES)
            _unzip(archive, Path(tmp) / "unpacked")
            yield _model_root(Path(tmp) / "unpacked")
        return
    if "://" in location:
        raise ModelError(f"a model is a path or an http(s) URL, not {location!r}")
    path = Path(location).expanduser()
    if not path.exists():
        raise ModelError(f"no such workspace, model dir or zip: {path}")
    if path.is_dir():
        yield _model_root(path)
        return
    with _scratch("pcsb-model-") as tmp:
        _unzip(path, Path(tmp) / "unpacked")
        yield _model_root(Path(tmp) / "unpacked")


def _read_json(path: Path, cap: int, what: str) -> Any:
    try:
        if path.is_symlink() or not path.is_file():
            raise ModelError(f"{what} {path} is missing or not a regular file")
        if path.stat().st_size > cap:
            raise ModelError(f"{what} {path} is larger than {cap} bytes")
        return json.loads(path.read_text("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
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


def load(model_dir: Path) -> Model:
    """Parse and check the model's pipeline.json; read meta.json."""
    pipeline_path = model_dir / "pipeline.json"
    raw = _read_json(pipeline_path, MAX_PIPELINE_BYTES, "the model's pipeline")
    pipeline = spec.parse_pipeline(raw, str(pipeline_path))
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


def prepare(model: Model, tmp: Path, opts: PredictOptions) -> tuple[workspace.Workspace, dict[str, Path], Any, Path | None]:
    """A throwaway workspace with the verified scripts, plus the framework and worker site."""
    ws = workspace.create(tmp / "ws")
    run_opts = training.RunOptions(isolation=opts.isolation, gpu=opts.gpu, nocache=True,
                                   allow_private=opts.allow_private, log=opts.log, mirror=opts.mirror)
    copies = training.fetch_scripts(model.pipeline, ws, run_opts)  # pins checked here
    framework, worker_site = training.prepare_runtime(model.pipeline, run_opts)
    return ws, copies, framework, worker_site


# ------------------------------------------------------------------ predict


def run_predict(location: str, samples: list[dict], opts: PredictOptions) -> list:
    """The model's results, one per sample; every temporary dir removed however it ends."""
    with open_model(location, opts.allow_private) as model_dir, \
            _scratch("pcsb-predict-") as tmp:
        model = load(model_dir)
        ws, copies, framework, worker_site = prepare(model, Path(tmp), opts)
        plans = training.plan(model.pipeline, copies, task_type="predict")
        result = orchestrator.execute(plans, ws, orchestrator.ExecOptions(
            isolation=opts.isolation, limits=opts.limits, gpu=opts.gpu, nocache=True,
            allow_private=opts.allow_private, task_type="predict", framework=framework, worker_site=worker_site,
            pipeline_options=dict(model.pipeline.options), source=orchestrator.input_pool(samples, model.meta),
            model_dir=model.dir, on_event=opts.on_event))
        if result.results is None:
            raise PipcookError("predict() finished without returning results", stage="model",
                               script=plans[-1].script.name)
        if len(result.results) != len(samples) and opts.log:
            opts.log(f"warning: {len(samples)} input(s) but predict() returned {len(result.results)} result(s)")
        return result.results


def render(results: list) -> str:
    """What `predict` prints on stdout: the same envelope as `serve`'s answers.

    The results come from the model script and go to the operator's terminal,
    so control and bidi characters in them are JSON-escaped (control.json_shown)."""
    from .control import json_shown

    return json_shown({"success": True, "data": results}, indent=2)

