r"""One run's life: start, events, deadlines, verdict, teardown.

    datasource --b-datasource--> dataflow-1 --b-dataflow-1--> ... --> model
         \________________ control sockets (one per stage) ___________/
                                   runner

A `Run` owns what crosses stages and outlives them: the state directory (the
ZeroMQ socket directories, each stage's `stage.json`), the control channel,
the downloads made for scripts, the disk-quota volumes of the writable dirs,
the stages' handles, and the copy of results into the workspace. Every one of
them is registered with the run's `ExitStack` as it is made, so whatever
happens (success, a failing stage, a limit, Ctrl-C) every stage is killed,
every volume unmounted and every temporary directory removed when the run
closes; the workspace is kept. A backend (runner/backends) owns only the
confinement of one stage.

`run`, `predict` (`execute`) and `serve` (a warm worker: `Run.start_stage`
with its own requests) use the same Run. Observers get typed `RunEvent`s:

    run = Run(ws, opts)
    run.subscribe(lambda event: print(event.stage, event.kind, event.data))
    with run:
        result = run.execute(plans)
"""
from __future__ import annotations

import contextlib
import json
import os
import queue
import shutil
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pipcook_sandbox.sandbox as sandbox
from pipcook_sandbox.runner.backends import base, cgroups, get_backend, quota
from pipcook_sandbox.runner.backends.base import Limits, Mount, StageOptions, StageSpec
from pipcook_sandbox.sandbox import sdk
from pipcook_sandbox.sandbox.stageconfig import StageConfig

from . import control as control_mod
from . import jsonvalue
from .downloads import IN_DOWNLOADS, Downloads
from .errors import Interrupted, StageError
from .statedir import new_state_dir, state_dir  # noqa: F401  (public here too)
from .units import fmt_bytes
from .verdict import Observation, Stage, judge, stage_failure

LIB_DIR = Path(sandbox.__file__).resolve().parent
STOP_GRACE = 5.0
KILL_WAIT = 5.0  # how long a failing run waits for every stage to die before judging
# A serving stage binds its pool socket in a directory it can write: that
# directory sits on a quota of its own (the smallest volume, a few MiB), or it
# would be unlimited disk on the host's /tmp, outside --disk.
SOCKET_DIR_QUOTA = 1 << 20
FAILURE_GRACE = 0.5
EXTRACT_MAX_FILES = 100_000
# The fields of a metrics.jsonl line that the runner writes; a stage's metric
# of the same name is kept under METRIC_ESCAPE + name (as is any name that
# starts with METRIC_ESCAPE, so that the renaming can never collide).
RUNNER_FIELDS = ("time", "stage", "step")
METRIC_ESCAPE = "~"


# Where a volume's subdirs are copied when the run closes: a mapping, or a function that gives it
# then (a warm run learns its workspace after its volumes are made).
CopyTo = dict[str, Path] | Callable[[], dict[str, Path]] | None


@dataclass
class StagePlan:
    name: str  # "datasource", "dataflow-1", "model"
    role: str  # "datasource" | "dataflow" | "model"
    script: Path  # host path of the script copy
    options: dict


@dataclass
class ExecOptions:
    isolation: str = "bwrap"
    limits: Limits = field(default_factory=Limits)
    gpu: bool = False
    nocache: bool = False
    allow_private: tuple[str, ...] = ()
    task_type: str = "train"
    framework: Any = None  # frameworks.Framework | None
    worker_site: Path | None = None
    pipeline_options: dict = field(default_factory=dict)
    source: Any = None  # a pool the runner serves to the first stage (predict)
    model_dir: Path | None = None  # read-only model for predict
    on_progress: Callable[[float, dict], None] | None = None
    on_event: Callable[[str, str], None] | None = None
    # Called with every RunEvent of the run (a live display, a service's event stream).
    observers: tuple[Callable[["RunEvent"], None], ...] = ()
    # every stage event as data (op: started, exited, progress, metrics, moved, ...) for the live display
    on_record: Callable[[str, str, dict], None] | None = None
    # A root runner's host (uid, gid) for this run's stages (a tenant's); None: the process default.
    stage_owner: tuple[int, int] | None = None
    # Boot every stage's sandbox before any stage is configured, then claim them (runner/warm.py).
    warm: bool = False


@dataclass
class ExecResult:
    meta: dict | None = None
    results: list | None = None
    metrics: int = 0
    metric_bytes: dict = field(default_factory=dict)  # per stage, what it wrote to metrics.jsonl


@dataclass(frozen=True)
class RunEvent:
    """What happened in a run, for observers (the CLI's progress, --debug lines, a live display).

    kind       data
    started    {}
    exited     {"code": int}
    serving    {}
    done       {}
    progress   {"value": 0..100, "extra": {name: short value}}   (text made inert)
    metrics    {"record": the metrics.jsonl line}
    download   {"url", "ok", "message"}                          (text made inert)
    note       {"text"}: cleanup problems, files not copied out
    """

    stage: str
    kind: str
    data: dict = field(default_factory=dict)


def legacy_observer(on_progress: Callable[[float, dict], None] | None,
                    on_event: Callable[[str, str], None] | None) -> Callable[[RunEvent], None]:
    """RunEvents as the (progress, line) callbacks of ExecOptions."""

    def observe(event: RunEvent) -> None:
        data = event.data
        if event.kind == "progress" and on_progress:
            on_progress(data["value"], data["extra"])
        if on_event is None:
            return
        if event.kind == "started":
            on_event(event.stage, "started")
        elif event.kind == "exited":
            on_event(event.stage, f"exited with code {data['code']}")
        elif event.kind == "download":
            on_event(event.stage, f"download {data['url']}: {'ok' if data['ok'] else data['message']}")
        elif event.kind == "note":
            on_event(event.stage, data["text"])

    return observe


def metrics_record(stage: str, step: int | None, metrics: dict) -> dict:
    """One metrics.jsonl line: the stage's metrics, then the runner's own fields, which no metric can set."""
    record = {(METRIC_ESCAPE + k if k in RUNNER_FIELDS or k.startswith(METRIC_ESCAPE) else k): v
              for k, v in metrics.items()}
    record.update({"time": round(time.time(), 3), "stage": stage, "step": step})
    return record


def input_pool(samples: list[dict], meta: dict | None) -> Any:
    """The pool the runner serves to the first stage in predict mode."""
    return sdk.from_lists(predicted=samples, meta=dict(meta or {}))


class Run:
    """One run: its state dir, control channel, downloads, volumes and stages, torn down together."""

    def __init__(self, ws: Any, opts: ExecOptions, *, prefix: str = "pcsb-") -> None:
        self.ws, self.opts = ws, opts  # ws: None while a warm runner prepares the run (warmrun.py)
        self.backend = get_backend(opts.isolation)
        self.translating = self.backend.translates_paths
        self.run_id = f"{os.getpid()}-{os.urandom(3).hex()}"
        self.handles: dict[str, Any] = {}
        self.volumes_of: dict[str, Any] = {}  # stage -> the quota volume of its writable dirs, if any
        self.started: dict[str, float] = {}
        self._observers: list[Callable[[RunEvent], None]] = []
        self._observe(opts)
        self._stack = contextlib.ExitStack()
        self._prefix = prefix
        self.prepared: Any = None  # a warmrun.WarmStarter whose sandboxes wait for this run's stages
        self.state = Path()
        self.control: control_mod.ControlServer
        self.downloads: Downloads

    def _observe(self, opts: ExecOptions) -> None:
        self._observers = []
        if opts.on_progress or opts.on_event:
            self._observers.append(legacy_observer(opts.on_progress, opts.on_event))
        self._observers.extend(opts.observers)

    def adopt(self, ws: Any, opts: ExecOptions) -> None:
        """A prepared run (warmrun.py) becomes the run of `ws` with `opts` (equal in all that shapes it)."""
        self.ws, self.opts = ws, opts
        self._observe(opts)

    # -------------------------------------------------------------- events

    def subscribe(self, observer: Callable[[RunEvent], None]) -> None:
        """Call `observer(event)` for every RunEvent of this run (in the runner's main thread)."""
        self._observers.append(observer)

    def record(self, stage: str, op: str, data: dict) -> None:
        """A stage event as data for ExecOptions.on_record (the live display)."""
        if self.opts.on_record:
            self.opts.on_record(stage, op, data)

    def emit(self, stage: str, kind: str, **data: Any) -> None:
        event = RunEvent(stage, kind, data)
        for observer in self._observers:
            observer(event)

    # -------------------------------------------------------------- life

    def __enter__(self) -> "Run":
        self.open()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def open(self) -> None:
        """Make the state dir, the control channel and the downloader; each is undone by `close`.
        Once: a run a warm runner opened (warmrun.py) is entered again by the execution that takes it."""
        if self.state != Path():
            return
        self.state = new_state_dir(self._prefix, self.run_id)
        self._stack.callback(shutil.rmtree, self.state, ignore_errors=True)
        self.downloads = self._new_downloads()
        self.control = control_mod.ControlServer(self.downloads)
        self._stack.callback(self.control.close)
        self._stack.callback(self.downloads.cancel)  # before the control closes: no download outlives the run

    def close(self) -> None:
        """Tear everything down (last made, first undone). Idempotent."""
        self._stack.close()

    def _new_downloads(self) -> Downloads:
        limits = self.opts.limits
        return Downloads(self.state, allow_private=self.opts.allow_private, max_bytes=limits.disk,
                         budget=limits.downloads if limits.downloads is not None else limits.disk,
                         timeout=limits.timeout, nocache=self.opts.nocache, translate=self.inside)

    def inside(self, source: Path, target: str) -> str:
        """The path a stage sees for `source` mounted at `target` (the host's own path without translation)."""
        return target if self.translating else str(source)

    def on_teardown(self, callback: Callable[..., Any], *args: Any) -> None:
        """Run `callback(*args)` when the run closes (before what was made earlier)."""
        self._stack.callback(callback, *args)

    def volume(self, name: str, size: int, subdirs: list[str], copy_to: dict[str, Path] | None = None) -> Any:
        """A quota volume in the state dir; its `copy_to` subdirs are copied out when the run closes."""
        vol = quota.create_volume(self.state / name, size, subdirs, owner=self._volume_owner())
        if copy_to:
            self._stack.callback(self._copy_out, name, vol, copy_to)
        else:
            self._stack.callback(vol.destroy)
        return vol

    def volumes(self, wanted: list[tuple[str, int, list[str], CopyTo]]) -> list[Any]:
        """`volume(name, size, subdirs, copy_to)` for each of `wanted`, made at the same time
        (quota.create_volumes: a mkfs and a mount each); when the run closes, each one's `copy_to`
        subdirs are copied out, then all are destroyed together."""
        made = quota.create_volumes([(self.state / name, size, subdirs) for name, size, subdirs, _ in wanted],
                                    owner=self._volume_owner())
        self._stack.callback(self._close_volumes, [(w[0], vol, w[3]) for w, vol in zip(wanted, made)])
        return made

    def _volume_owner(self) -> tuple[int, int] | None:
        """Who writes the run's volumes: the run's stage owner where one is set (root), else the default."""
        return self.opts.stage_owner if self.opts.stage_owner is not None and os.geteuid() == 0 else None

    def _close_volumes(self, entries: list[tuple[str, Any, CopyTo]]) -> None:
        first: BaseException | None = None
        for name, vol, mapping in entries:
            if not mapping:
                continue
            try:
                self._report_skipped(name, vol.copy_out(mapping() if callable(mapping) else mapping))
            except BaseException as exc:  # copy the others out all the same; raise the first after
                first = first or exc
        quota.destroy_volumes([vol for _, vol, _ in entries])
        if first is not None:
            raise first

    def _report_skipped(self, name: str, skipped: list[str]) -> None:
        if skipped:
            self.emit(name.removeprefix("vol-"), "note",
                      text=f"not copied (links and special files are never followed): {', '.join(skipped[:5])}")

    def _copy_out(self, name: str, vol: Any, mapping: dict[str, Path]) -> None:
        try:
            self._report_skipped(name, vol.copy_out(mapping))
        finally:
            vol.destroy()

    # -------------------------------------------------------------- stages

    def control_dir(self, stage: str) -> Path:
        """Bind `stage`'s control socket (before any stage starts); the dir to mount."""
        ctl_dir = self.state / "ipc" / f"c-{stage}"
        ctl_dir.mkdir(parents=True)
        self.control.add_stage(stage, f"ipc://{ctl_dir}/control.sock")
        return ctl_dir

    def runtime_mounts(self) -> tuple[list[Mount], list[str], dict | None]:
        """What every stage mounts to run at all: the SDK and worker, the framework, the worker's site.

        Returns (mounts, site dirs for the stage config, the framework's config entry)."""
        opts = self.opts
        mounts: list[Mount] = [Mount(LIB_DIR, f"{base.IN_LIB}/sandbox")]
        site_dirs: list[str] = []
        framework_cfg = None
        if opts.framework is not None:
            mounts.append(Mount(opts.framework.dir, base.IN_FRAMEWORK))
            site_dirs.append(self.inside(opts.framework.site, f"{base.IN_FRAMEWORK}/site"))
            framework_cfg = {"name": f"{opts.framework.name}@{opts.framework.version}",
                             "dir": self.inside(opts.framework.dir, base.IN_FRAMEWORK),
                             "initialize": opts.framework.initialize}
        if opts.worker_site is not None:
            mounts.append(Mount(opts.worker_site, base.IN_SITE))
            site_dirs.append(self.inside(opts.worker_site, base.IN_SITE))
        elif self.backend.image_has_site:
            site_dirs.append(base.IN_SITE)  # docker: the image carries the worker's site; after the framework's
        return mounts, site_dirs, framework_cfg

    def base_config(self, stage: str, role: str, script: str, ctl_dir: Path, mounts: list[Mount],
                    **fields: Any) -> StageConfig:
        """A StageConfig with what every stage gets (runtime, control socket, downloads, limits);
        the mounts those need are added to `mounts`."""
        runtime, site_dirs, framework_cfg = self.runtime_mounts()
        # the order of the mounts before: runtime, scripts, control, the caller's own, downloads
        scripts = [m for m in mounts if m.target.startswith(base.IN_SCRIPTS + "/")]
        rest = [m for m in mounts if m not in scripts]
        mounts[:] = [*runtime, *scripts, Mount(ctl_dir, f"{base.IN_IPC}/control"), *rest,
                     Mount(self.downloads.dir_for(stage), IN_DOWNLOADS)]
        limits, gpu = self.opts.limits, self.opts.gpu and role in ("model", "serve")
        workspace = {"framework_dir": framework_cfg["dir"] if framework_cfg else None, **fields.pop("workspace", {})}
        return StageConfig(
            stage=stage, role=role, script=script, task_type=self.opts.task_type,
            control=f"ipc://{self.inside(ctl_dir, base.IN_IPC + '/control')}/control.sock",
            pipeline_options=self.opts.pipeline_options, framework=framework_cfg, site_dirs=site_dirs,
            workspace=workspace, extract={"max_bytes": limits.disk, "max_files": EXTRACT_MAX_FILES},
            hints={"cpus": limits.cpus, "gpu": "1" if gpu else "0"}, **fields)

    def start_stage(self, config: StageConfig, mounts: list[Mount], log_path: Path) -> Any:
        """Write the stage's config, start its sandbox, and make sure the run stops it."""
        if not self.handles:
            self._stack.callback(self._stop_stages)
        cfg_path = self.state / f"stage-{config.stage}.json"
        cfg_path.write_text(config.to_json())
        spec = self.stage_spec(config, [*mounts, Mount(cfg_path, base.IN_STAGE_CONFIG)], log_path)
        handle = self.backend.start(spec)
        self.handles[config.stage] = handle
        self.started[config.stage] = time.monotonic()
        self.record(config.stage, "started", {})
        self.emit(config.stage, "started")
        return handle

    def stage_spec(self, config: StageConfig, mounts: list[Mount], log_path: Any) -> StageSpec:
        """The StageSpec of the stage `config` with these mounts (`log_path`: a Path or output.LogTarget)."""
        return StageSpec(run_id=self.run_id, name=config.stage, mounts=list(mounts), limits=self.opts.limits,
                         log_path=log_path, gpu=config.hints.get("gpu") == "1",
                         labels={"run_id": self.run_id, "stage": config.stage}, options=self.stage_options())

    def boot_warm(self, config: StageConfig, mounts: list[Mount], log_path: Any) -> Any:
        """Boot `config`'s sandbox warm (runner/warm.py): every mount of the stage except its
        stage.json, which arrives with the claim. Discarded at teardown unless claimed."""
        from .warm import WarmSandbox

        spec = self.stage_spec(config, mounts, log_path)
        ctl_dir = next(m.source for m in mounts if m.target == f"{base.IN_IPC}/control")
        sandbox = WarmSandbox.boot(self.backend, spec, list(config.site_dirs), Path(ctl_dir))
        self._stack.callback(self._discard_unclaimed, sandbox)
        return sandbox

    def _discard_unclaimed(self, sandbox: Any) -> None:
        if not sandbox.claimed:
            sandbox.discard()

    def claim_warm(self, sandbox: Any, key: Any, config: StageConfig) -> Any:
        """Hand the warm `sandbox` to the stage `config`, whose sandbox must have `key` (warm.WarmKey),
        exactly once; its handle, as start_stage's. warm.WarmError if it cannot be."""
        if not self.handles:
            self._stack.callback(self._stop_stages)
        self.handles[config.stage] = sandbox.handle  # stopped and cleaned up with the run's stages
        sandbox.claim(key, config)
        self.started[config.stage] = time.monotonic()
        self.record(config.stage, "started", {})
        self.emit(config.stage, "started")
        return sandbox.handle

    def stage_options(self) -> StageOptions:
        """The StageOptions of every stage of this run."""
        return StageOptions(state_dir=self.state, stage_owner=self.opts.stage_owner)

    def stop_stage(self, stage: str, reason: str = base.REASON_CANCELLED) -> None:
        self.handles[stage].terminate(reason)
        self.downloads.cancel(stage)

    def _stop_stages(self) -> None:
        for handle in self.handles.values():
            with contextlib.suppress(Exception):
                handle.terminate(base.REASON_CANCELLED)
        # Each stage's cleanup waits on its own processes, cgroup and volume: side by side, not in turn.
        handles = list(self.handles.values())
        with ThreadPoolExecutor(max_workers=max(1, len(handles)), thread_name_prefix="cleanup") as pool:
            done = [pool.submit(handle.cleanup) for handle in handles]
        for handle, future in zip(handles, done):
            exc = future.exception()
            if exc is not None:  # the others were cleaned all the same
                self.emit(handle.name, "note", text=f"cleanup problem: {exc}")
        try:  # a stage interrupted while it was being started has no handle: its cgroup goes here
            cgroups.remove_run(self.run_id)
        except OSError:
            pass

    def failure(self, stage: str, script: str, seen: Observation) -> StageError | None:
        """The one-paragraph failure of `stage` given what was seen of it; None if it did not fail."""
        found = stage_failure(stage, script, seen, self.opts.limits, self.ws.logs / f"{stage}.log")
        return found[1] if found else None

    # -------------------------------------------------------------- a pipeline

    def execute(self, plans: list[StagePlan], starter: Callable[[Run, list[StagePlan]], Any] | None = None,
                ) -> ExecResult:
        """Start every stage of `plans`, wait for the model's end; StageError if the run failed.
        `starter`: the class that starts the stages (default `_PipelineStarter`; warmrun.WarmStarter)."""
        try:
            if self.prepared is not None:  # booted before the pipeline was known (runner/warmrun.py)
                self.prepared.claim(plans)
            else:
                (starter or _PipelineStarter)(self, plans).start()
            return _Monitor(self, plans).wait()
        except KeyboardInterrupt:
            for handle in self.handles.values():
                handle.terminate(base.REASON_CANCELLED)
            raise Interrupted("interrupted (Ctrl-C): every stage was stopped; the workspace is kept") from None


def execute(plans: list[StagePlan], ws: Any, opts: ExecOptions) -> ExecResult:
    """Run the stages of one pipeline execution to the end; raise StageError on failure.
    (`warmrun.execute` is the same with warm sandboxes where the options ask for them.)"""
    with Run(ws, opts) as run:
        return run.execute(plans)


class _PipelineStarter:
    """Binds every socket, makes every volume, then starts the stages in pipeline order."""

    def __init__(self, run: Run, plans: list[StagePlan]) -> None:
        self.run, self.plans = run, plans
        self.volumes: dict[str, Any] = {}  # stage -> its writable quota volume
        self.socket_dirs: dict[str, Any] = {}
        self.data_dirs: dict[str, Path] = {}

    def start(self) -> None:
        ctl_dirs = {plan.name: self.run.control_dir(plan.name) for plan in self.plans}
        self.run.control.start()
        upstream = self._source()
        self._make_volumes()
        for plan in self.plans:
            config, mounts, upstream = self._configure(plan, ctl_dirs[plan.name], upstream)
            self.run.start_stage(config, mounts, self.run.ws.logs / f"{plan.name}.log")
            self.run.volumes_of[plan.name] = self.volumes.get(plan.name)

    def _source(self) -> tuple[Path, str] | None:
        """predict: the runner serves the inputs as the first stage's upstream pool."""
        if self.run.opts.source is None:
            return None
        import zmq

        from pipcook_sandbox.sandbox.boundary import PoolServer, serve_until

        src_dir = self.run.state / "ipc" / "b-source"
        src_dir.mkdir(parents=True)
        zctx = zmq.Context()
        self.run.on_teardown(zctx.destroy, 0)
        server = PoolServer(zctx, f"ipc://{src_dir}/pool.sock", self.run.opts.source)
        stop = threading.Event()
        thread = threading.Thread(target=serve_until, args=(server, stop.is_set), daemon=True)
        thread.start()
        self.run.on_teardown(thread.join, 2)
        self.run.on_teardown(stop.set)
        return src_dir, "input"

    def _make_volumes(self) -> None:
        run, disk = self.run, self.run.opts.limits.disk
        wanted: list[tuple[str, int, list[str], CopyTo]] = []
        for plan in self.plans:  # where to copy out: the run's workspace when it closes (warm: known late)
            if plan.role == "datasource":
                wanted.append((f"vol-{plan.name}", disk, ["data", "cache"],
                               lambda: {"data": run.ws.data, "cache": run.ws.cache} if run.ws is not None else {}))
            elif plan.role == "model" and run.opts.task_type == "train":  # no workspace: a warm run never taken
                wanted.append((f"vol-{plan.name}", disk, ["model"],
                               lambda: {"model": run.ws.model} if run.ws is not None else {}))
            if plan.role != "model":
                wanted.append((f"ipc-{plan.name}", SOCKET_DIR_QUOTA, ["out"], None))
        for (name, _, subdirs, _), vol in zip(wanted, run.volumes(wanted)):  # made at the same time
            stage = name.split("-", 1)[1]
            if name.startswith("ipc-"):
                self.socket_dirs[stage] = vol
            else:
                self.volumes[stage] = vol
                if "data" in subdirs:
                    self.data_dirs = {"data": vol.path("data"), "cache": vol.path("cache")}
        if not self.data_dirs:  # predict: no datasource ran; show the training data read-only
            self.data_dirs = {"data": run.ws.data, "cache": run.ws.cache}

    def _script_mount(self, plan: StagePlan, script_in: str) -> Mount:
        return Mount(plan.script, script_in)

    def _configure(self, plan: StagePlan, ctl_dir: Path, upstream: tuple[Path, str] | None,
                   ) -> tuple[StageConfig, list[Mount], tuple[Path, str] | None]:
        """`plan`'s StageConfig and mounts, and the upstream of the next stage."""
        run, inside = self.run, self.run.inside
        script_in = f"{base.IN_SCRIPTS}/{plan.script.name}"
        mounts = [self._script_mount(plan, script_in)]
        fields: dict[str, Any] = {"options": plan.options, "workspace": {}}
        out_dir = self.socket_dirs[plan.name].path("out") if plan.name in self.socket_dirs else None
        if out_dir is not None:
            mounts.append(Mount(out_dir, f"{base.IN_IPC}/out", writable=True))
            fields["serve"] = f"ipc://{inside(out_dir, base.IN_IPC + '/out')}/pool.sock"
        if upstream is not None:
            mounts.append(Mount(upstream[0], f"{base.IN_IPC}/in"))
            fields["upstream"] = f"ipc://{inside(upstream[0], base.IN_IPC + '/in')}/pool.sock"
            fields["upstream_stage"] = upstream[1]
        for sub in ("data", "cache"):
            mounts.append(Mount(self.data_dirs[sub], f"{base.IN_WORKSPACE}/{sub}", writable=plan.role == "datasource"))
            fields["workspace"][f"{sub}_dir"] = inside(self.data_dirs[sub], f"{base.IN_WORKSPACE}/{sub}")
        if plan.role == "model":
            model_src = self.volumes[plan.name].path("model") if plan.name in self.volumes else run.opts.model_dir
            if model_src is not None:
                mounts.append(Mount(model_src, f"{base.IN_WORKSPACE}/model", writable=plan.name in self.volumes))
                fields["workspace"]["model_dir"] = inside(model_src, f"{base.IN_WORKSPACE}/model")
        config = run.base_config(plan.name, plan.role, inside(plan.script, script_in), ctl_dir, mounts, **fields)
        return config, mounts, (out_dir, plan.name) if out_dir is not None else None


class _Monitor:
    """Takes the stages' events, enforces the deadlines and the disk quotas, decides the verdict."""

    def __init__(self, run: Run, plans: list[StagePlan]) -> None:
        self.run, self.plans = run, plans
        self.by_name = {p.name: p for p in plans}
        self.model = plans[-1].name
        self.errors: dict[str, dict] = {}
        self.violations: dict[str, str] = {}
        self.done: set[str] = set()
        self.serving: set[str] = set()
        self.stopped: set[str] = set()  # serving stages told to stop once the model said done
        self.done_at: float | None = None  # when the model said done (time.monotonic())
        self.exited: dict[str, int] = {}
        self.result = ExecResult()
        self.metrics_file: Any = None

    def wait(self) -> ExecResult:
        with open(self.run.ws.metrics, "a", encoding="utf-8") as self.metrics_file:
            failed_at: float | None = None
            while not self._succeeded():
                self._take_events()
                now = time.monotonic()
                self._check_stages(now)
                if failed_at is None and self._failing():
                    failed_at = now  # let the other stages' reports arrive: the first to fail may not be the cause
                if failed_at is not None and now - failed_at > FAILURE_GRACE:
                    raise self._verdict()
            self._stop_serving()
        return self.result

    def _take_events(self) -> None:
        # Once the model said done, its exit is what the run waits for: look for it often, not every 0.1 s
        # (the stages' exits are polled, not events; the wait was up to a tenth of every run).
        # A model that says done early and goes on working is looked for every 0.1 s again after a second.
        since = self.done_at
        timeout = 0.005 if since is not None and time.monotonic() - since < 1.0 else 0.1
        try:
            self._take(self.run.control.events.get(timeout=timeout))
            while True:
                self._take(self.run.control.events.get_nowait())
        except queue.Empty:
            return

    def _take(self, event: Any) -> None:
        name, op, data = event.stage, event.op, event.data
        if name not in self.violations:
            self.run.record(name, op, data)
        if op == "progress":  # shown on the operator's terminal: short and inert
            extra = {control_mod.shown(k, 64): control_mod.shown(v, 200) if isinstance(v, str) else v
                     for k, v in (data.get("extra") or {}).items()}
            self.run.emit(name, "progress", value=data["value"], extra=extra)
        elif op == "metrics" and name not in self.violations:
            self._metrics(name, data)
        elif op == "meta" and self.by_name[name].role == "model":
            try:  # kept as model/meta.json: plain JSON (NaN, bytes as null), never deeper than a walk can go
                self.result.meta = jsonvalue.plain(data["meta"], what="meta", lenient=True)
            except jsonvalue.Unfit as exc:
                self.violations.setdefault(name, f"sent a meta that cannot be stored: {exc}")
                self.run.stop_stage(name, base.REASON_PROTOCOL)
        elif op == "result" and self.by_name[name].role == "model":
            self.result.results = data["data"]
        elif op == "error":
            if name not in self.stopped:
                self.errors.setdefault(name, data)
        elif op == "violation":
            if name not in self.stopped:
                self.violations.setdefault(name, data["message"])
            self.run.stop_stage(name, base.REASON_PROTOCOL)
        elif op in ("done", "serving"):
            (self.done if op == "done" else self.serving).add(name)
            self.run.emit(name, op)
            if name == self.model and op == "done":
                self.done_at = time.monotonic()
                self._send_stops()
        elif op == "downloaded":
            self.run.emit(name, "download", url=data["url"], ok=data["ok"], message=data["message"])

    def _metrics(self, name: str, data: dict) -> None:
        record = metrics_record(name, data.get("step"), data["metrics"])
        line = json.dumps(record)
        logged = self.result.metric_bytes[name] = self.result.metric_bytes.get(name, 0) + len(line) + 1
        cap = self.run.opts.limits.output
        if logged > cap:  # metrics.jsonl is on the host's disk: capped like the stage's output
            self.violations[name] = f"logged more than {fmt_bytes(cap)} of metrics, the cap on what a stage may record"
            self.run.stop_stage(name, base.REASON_PROTOCOL)
            return
        self.metrics_file.write(line + "\n")
        self.metrics_file.flush()
        self.result.metrics += 1
        self.run.emit(name, "metrics", record=record)

    def _check_stages(self, now: float) -> None:
        run = self.run
        for name, handle in run.handles.items():
            if name in self.exited:
                continue
            code = handle.poll()
            if code is not None:
                self.exited[name] = code
                run.downloads.cancel(name)  # nobody is waiting for them any more
                run.record(name, "exited", {"code": code})
                run.emit(name, "exited", code=code)
                continue
            # A stage that serves its pool waits on its consumers: its time is theirs, and the
            # model's own deadline (or its end) stops it. Otherwise the first-started datasource
            # would be blamed for every run that takes too long.
            if name not in self.serving and now - run.started[name] > run.opts.limits.timeout:
                run.stop_stage(name, base.REASON_TIMEOUT)
            vol = run.volumes_of.get(name)
            if vol is not None and vol.exceeded():
                run.stop_stage(name, base.REASON_DISK)

    def _succeeded(self) -> bool:
        return (self.exited.get(self.model) == 0 and self.model in self.done
                and not self.errors and not self.violations)

    def _failing(self) -> bool:
        model_ended = self.model in self.exited
        return bool(self.errors or self.violations
                    or any(code != 0 for n, code in self.exited.items() if n not in self.stopped)
                    or (not model_ended and any(n in self.exited for n in self.run.handles
                                                if n != self.model and n not in self.stopped))
                    or (model_ended and self.model not in self.done))  # it ended itself (os._exit(0)) too soon

    def _verdict(self) -> StageError:
        run = self.run
        for name in run.handles:
            run.stop_stage(name)
        deadline = time.monotonic() + KILL_WAIT
        while time.monotonic() < deadline and any(h.poll() is None for h in run.handles.values()):
            time.sleep(0.05)
        seen = {}
        for plan in self.plans:
            if plan.name in self.stopped:
                # Told to stop at the model's done: how it ended then is not the run's cause (a hostile
                # serving stage that dies of its stop must not take the blame for the model's failure).
                seen[plan.name] = Observation()
                continue
            vol = run.volumes_of.get(plan.name)
            seen[plan.name] = Observation(run.handles[plan.name].outcome(), self.errors.get(plan.name),
                                          self.violations.get(plan.name), vol is not None and vol.exceeded())
        stages = [Stage(p.name, p.script.name, run.ws.logs / f"{p.name}.log") for p in self.plans]
        return judge(stages, seen, self.done, run.opts.limits)

    def _send_stops(self) -> None:
        """The model said done: it reads no more samples, so the serving stages are told to stop now, and
        exit while the model does (not after it: that wait was a visible part of a short run's end).
        From here on what they report or how they end no longer decides the run: the model's exit does
        (as when they were stopped after it). Not when the run is already failing: the verdict stops them."""
        if self.stopped or self.errors or self.violations:
            return
        self.stopped = {p.name for p in self.plans[:-1]} - set(self.exited)
        for name in sorted(self.stopped):
            self.run.control.send_stop(name)

    def _stop_serving(self) -> None:
        """Success: stop the serving stages politely (if the model's done did not already), then for good
        (at teardown)."""
        serving = [p.name for p in self.plans[:-1]]
        for name in serving:
            if name not in self.stopped:
                self.run.control.send_stop(name)
        deadline = time.monotonic() + STOP_GRACE
        while time.monotonic() < deadline and any(self.run.handles[n].poll() is None for n in serving):
            time.sleep(0.005)  # they exit within milliseconds of the stop; a run's end waits on this
        if self.run.opts.on_record:  # the serving stages' last counts and their ends, for the display
            self._record_last(serving)

    def _record_last(self, serving: list[str]) -> None:
        while True:
            try:
                event = self.run.control.events.get_nowait()
            except queue.Empty:
                break
            if event.op == "moved" and event.stage not in self.violations:
                self.run.record(event.stage, event.op, event.data)
        for name in serving:
            code = self.run.handles[name].poll()
            if name not in self.exited and code is not None:
                self.run.record(name, "exited", {"code": code})
