"""`pipcook-sandbox predict`: run a trained model on a few inputs, every stage sandboxed.

The model is found and checked by `runner/models.py` (a workspace, a model
dir, a model zip or its URL; its scripts pinned inside it, or nothing runs).
Then: the dataflows and the model's `predict` run as in training, each in
its own sandbox, with `ctx.task_type == "predict"`, the model dir read-only
and the inputs served by the runner as the `predicted` split.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from pipcook_sandbox.runner.backends.base import Limits

from . import jsonvalue, run, stages, statedir
from .errors import PipcookError, UsageError
from .models import MAX_ZIP_BYTES, Model, ModelError, load, open_model, prepare  # noqa: F401  (predict's API)


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


# ------------------------------------------------------------------ predict


def run_predict(location: str, samples: list[dict], opts: PredictOptions) -> list:
    """The model's results, one per sample; every temporary dir removed however it ends."""
    with open_model(location, opts.allow_private) as model_dir, \
            statedir.state_dir("pcsb-predict-") as tmp:
        model = load(model_dir)
        ws, copies, framework, worker_site = prepare(model, Path(tmp), isolation=opts.isolation, gpu=opts.gpu,
                                                     allow_private=opts.allow_private, log=opts.log, mirror=opts.mirror)
        plans = stages.plan(model.pipeline, copies, task_type="predict")
        result = run.execute(plans, ws, run.ExecOptions(
            isolation=opts.isolation, limits=opts.limits, gpu=opts.gpu, nocache=True,
            allow_private=opts.allow_private, task_type="predict", framework=framework, worker_site=worker_site,
            pipeline_options=dict(model.pipeline.options), source=run.input_pool(samples, model.meta),
            model_dir=model.dir, on_event=opts.on_event))
        if result.results is None:
            raise PipcookError("predict() finished without returning results", stage="model",
                               script=plans[-1].script.name)
        try:
            # Printed as JSON: NaN, Infinity, bytes or absurd nesting are refused, never printed
            # as text no JSON parser reads (or a crash).
            results = jsonvalue.plain(result.results, what="data")
        except jsonvalue.Unfit as exc:
            raise PipcookError(f"predict() returned a result that is not JSON: {exc}", stage="model",
                               script=plans[-1].script.name) from None
        if len(results) != len(samples):
            opts.log(f"warning: {len(samples)} input(s) but predict() returned {len(results)} result(s)")
        return results


def render(results: list) -> str:
    """What `predict` prints on stdout: the same envelope as `serve`'s answers.

    The results come from the model script and go to the operator's terminal,
    so control and bidi characters in them are JSON-escaped (control.json_shown)."""
    from .control import json_shown

    return json_shown({"success": True, "data": results}, indent=2)

