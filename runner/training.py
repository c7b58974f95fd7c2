"""`pipcook-sandbox run`: from a pipeline file to a trained model in a workspace.

1. load and validate the pipeline (a path or an http(s) URL);
2. fetch every script (cached, pins enforced) before anything runs;
3. resolve the framework and the worker's dependencies (built once, cached);
4. run datasource -> dataflows -> model, each in its own sandbox, streaming;
5. make `model/` self-contained (pipeline copy, scripts, meta) so `predict`
   and `serve` need nothing else;
6. run the artifact processors named by the pipeline (trusted host plugins).
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, TextIO

from pipcook_sandbox.runner.backends.base import Limits

from . import artifacts, cleanup, fetch, gpus, overrides, run, spec, stages, validate, warmrun, workspace
from .errors import PipcookError


@dataclass
class RunOptions:
    output: Path | None = None
    isolation: str = "bwrap"
    gpu: bool | None = None  # --gpu True, --no-gpu False, neither None (the pipeline may ask)
    nocache: bool = False
    allow_private: tuple[str, ...] = ()
    allow_paths: tuple[str, ...] = ()  # --allow-path: more dirs a local pipeline may name files in
    limits: Limits = field(default_factory=Limits)
    mirror: str | None = None
    log: Callable[[str], None] = print
    on_progress: Callable[[float, dict], None] | None = None
    on_event: Callable[[str, str], None] | None = None
    observers: tuple[Callable[[Any], None], ...] = ()  # each gets every run.RunEvent
    on_record: Callable[[str, str, dict], None] | None = None  # every stage event as data (runner/display.py)
    force: bool = False  # replace an -o directory this runner created (workspace.created_by_us)
    overrides: list = field(default_factory=list)  # overrides.Override, from --set
    on_workspace: Callable[[workspace.Workspace], None] | None = None  # the workspace exists
    on_trained: Callable[[workspace.Workspace], None] | None = None  # model/ is complete, artifacts next
    on_artifact: Callable[[Path], None] | None = None
    warm: bool = False  # boot every stage's sandbox first, then claim (run.ExecOptions.warm)
    stage_owner: tuple[int, int] | None = None  # --stage-uid: the host uid/gid of every stage (root)



def require_gpu_host(who: str, isolation: str, fix: str = "run without --gpu",
                     log: Callable[[str], None] | None = None) -> None:
    """Refuse a GPU request where this process was given no GPU (a host without an NVIDIA device, or a
    batch job allocated none of them: runner/gpus.py), before anything is built or started (`run`,
    `predict` and `serve` say it the same way). Under gVisor (the docker backend with
    PIPCOOK_DOCKER_RUNTIME=runsc) no GPU can be given, whatever the host has. `log` hears which GPUs
    the model stage will get."""
    if isolation == "none":
        return
    if isolation == "docker":
        from pipcook_sandbox.runner.backends import docker as docker_backend

        refused = docker_backend.gpu_refusal()
        if refused:
            raise PipcookError(f"a GPU was requested by {who}, but {refused}: {fix}, or unset "
                               f"{docker_backend.ENV_RUNTIME} to use the GPU under runc")
    given = gpus.given()
    if not given.devices:
        where = ("this host has no NVIDIA GPU (no /dev/nvidia0)" if not gpus.candidates()
                 else f"this process was given none of the host's GPUs ({given.why})")
        raise PipcookError(f"a GPU was requested by {who}, but {where}; {fix}, or run on a host (or in a job) "
                           "with a GPU and its driver")
    if log is not None:
        log(f"GPU: the model stage gets {', '.join(given.devices)} ({given.why})")


def check_gpu(pipeline: spec.Pipeline, opts: RunOptions) -> RunOptions:
    """`opts` with `gpu` decided, before anything is fetched or started.

    The pipeline's `options.train.gpu: true` may ask for a GPU (docs/pipeline.md), but
    the pipeline is untrusted input and the operator has the last word:
    `--no-gpu` refuses even then, and a request that came from the file
    rather than the command line is said so in the log. A GPU is refused
    early where it cannot work (no NVIDIA device), naming who asked."""
    from_file = pipeline.train_options.get("gpu") is True
    if opts.gpu is False:
        if from_file:
            opts.log("GPU: the pipeline file asks for one (options.train.gpu); --no-gpu refuses it, "
                     "the model stage runs on the CPU")
        return dataclasses.replace(opts, gpu=False)
    if opts.gpu is None and not from_file:
        return dataclasses.replace(opts, gpu=False)
    who = "--gpu" if opts.gpu else "the pipeline file (options.train.gpu, not the command line)"
    require_gpu_host(who, opts.isolation, "run without --gpu" if opts.gpu else "pass --no-gpu to train on the CPU",
                     log=opts.log)
    if opts.gpu is None:
        opts.log(f"GPU: requested by {who}; pass --no-gpu to refuse it")
    return dataclasses.replace(opts, gpu=True)


def run_pipeline(location: str, opts: RunOptions) -> workspace.Workspace:
    pipeline = spec.load_pipeline(location, fetch_bytes=functools.partial(fetch.fetch_bytes, allow_private=opts.allow_private),
                                  allow_paths=opts.allow_paths)
    pipeline = overrides.apply(pipeline, opts.overrides)
    validate.preflight(pipeline)  # processors and their options: a typo fails now, not after training
    opts = check_gpu(pipeline, opts)  # --gpu / --no-gpu, else options.train.gpu
    # what runners that crashed or were killed (kill -9) left behind: sandboxes, mounts, cgroups, containers
    for item in cleanup.clean_all(only=(opts.isolation,)):
        opts.log(f"removed {item} (left by a runner that is gone)")
    ws = workspace.create(opts.output, force=opts.force)
    workspace.write_json(ws.pipeline, spec.pipeline_to_json(pipeline))
    for override in opts.overrides:
        opts.log(f"override: {override}")
    opts.log(f"workspace: {ws.root}")
    if opts.on_workspace:
        opts.on_workspace(ws)
    try:
        copies = stages.fetch_scripts(pipeline, ws, nocache=opts.nocache, allow_private=opts.allow_private)
        workspace.restrict(ws.root)  # the scripts: readable by the stages, no one else
        framework, worker_site = stages.prepare_runtime(
            pipeline, isolation=opts.isolation, gpu=opts.gpu, nocache=opts.nocache,
            allow_private=opts.allow_private, log=opts.log, mirror=opts.mirror)
        if framework is not None:
            workspace.write_json(ws.framework / "framework.json",
                                 {"name": framework.name, "version": framework.version, "path": str(framework.dir)})
        plans = stages.plan(pipeline, copies)
        result = warmrun.execute(plans, ws, run.ExecOptions(
            isolation=opts.isolation, limits=opts.limits, gpu=opts.gpu is True,  # check_gpu decided it
            nocache=opts.nocache, allow_private=opts.allow_private, task_type="train", framework=framework, worker_site=worker_site,
            pipeline_options=dict(pipeline.options), on_progress=opts.on_progress, on_event=opts.on_event,
            on_record=opts.on_record, observers=opts.observers, warm=opts.warm, stage_owner=opts.stage_owner))
        finish_model_dir(ws, pipeline, copies, result.meta)
        workspace.restrict(ws.root)  # the model, before anything reports it trained
        if opts.on_trained:
            opts.on_trained(ws)
        for out in artifacts.run_all(pipeline.artifact, ws, log=opts.log, isolation=opts.isolation,
                                     limits=opts.limits):
            if opts.on_artifact:
                opts.on_artifact(out)
    finally:
        workspace.restrict(ws.root)  # logs, copied-out data, the model, artifacts: however the run ended
    return ws


def finish_model_dir(ws: workspace.Workspace, pipeline: spec.Pipeline, copies: dict[str, Path], meta: dict | None) -> None:
    """model/ gets the pipeline, rewritten to point at pinned local copies of its scripts."""
    scripts_dir = ws.model / "scripts"
    if scripts_dir.exists() or scripts_dir.is_symlink():
        if scripts_dir.is_dir() and not scripts_dir.is_symlink():
            shutil.rmtree(scripts_dir)
        else:
            scripts_dir.unlink()
    scripts_dir.mkdir()
    local: dict[str, str] = {}
    for uri, path in copies.items():
        shutil.copyfile(path, scripts_dir / path.name)
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        local[uri] = f"scripts/{path.name}#sha256={digest}"

    def rewrite(ref: spec.ScriptRef) -> str:
        from urllib.parse import urlencode

        query = urlencode([(k, v) for k, vs in ref.options.items() for v in (vs if isinstance(vs, list) else [vs])])
        path, _, pin = local[ref.uri].partition("#")
        return f"{path}{'?' + query if query else ''}#{pin}"

    raw = dict(spec.pipeline_to_json(pipeline))
    raw["datasource"] = rewrite(pipeline.datasource)
    if pipeline.dataflow:
        raw["dataflow"] = [rewrite(r) for r in pipeline.dataflow]
    raw["model"] = rewrite(pipeline.model)
    raw.pop("artifact", None)
    workspace.write_json(ws.model / "pipeline.json", raw)
    workspace.write_json(ws.model / "meta.json", meta or {})


def print_summary(ws: workspace.Workspace, out: TextIO = sys.stderr) -> None:
    print(f"model saved in {ws.model}", file=out)
