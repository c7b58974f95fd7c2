r"""Run a pipeline: every stage in its own sandbox, all started together, streaming.

    datasource --b-datasource--> dataflow-1 --b-dataflow-1--> ... --> model
         \________________ control sockets (one per stage) ___________/
                                   runner

The orchestrator owns what crosses stages and outlives them: the ZeroMQ
socket directories, the disk-quota volumes of the writable dirs, downloads
made for scripts, deadlines, and the copy of results into the workspace. A
backend (runner/backends) owns only the confinement of one stage. Whatever
happens (success, a failing stage, a limit, Ctrl-C) every stage is killed,
every volume unmounted and every temporary directory removed before `execute`
returns; the workspace is kept.
"""
from __future__ import annotations

import hashlib
import json
import os
import queue
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pipcook_sandbox.sandbox as sandbox
from pipcook_sandbox.runner.backends import base, cgroups, get_backend, quota
from pipcook_sandbox.runner.backends.base import Limits, Mount, StageSpec
from pipcook_sandbox.sandbox import sdk

from . import control as control_mod
from . import fetch
from .errors import PipcookError
from .limits import human

LIB_DIR = Path(sandbox.__file__).resolve().parent
IN_DOWNLOADS = "/pipcook/downloads"
STOP_GRACE = 5.0
# A serving stage binds its pool socket in a directory it can write: that
# directory sits on a quota of its own (the smallest volume, a few MiB), or it
# would be unlimited disk on the host's /tmp, outside --disk.
SOCKET_DIR_QUOTA = 1 << 20
FAILURE_GRACE = 0.5
UPSTREAM = 9  # the priority of a stage's "the stage before me failed" error: the cause is elsewhere


class StageError(PipcookError):
    """A stage failed; `traceback` holds the script's traceback for --debug."""

    def __init__(self, cause: str, stage: str | None = None, script: str | None = None, traceback: str = "") -> None:
        super().__init__(cause, stage=stage, script=script)
        self.traceback = traceback


class Interrupted(PipcookError):
    pass


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
    on_metrics: Callable[[str, Any, dict], None] | None = None  # (stage, step, metrics) as recorded
    # every stage event as data (op: started, exited, progress, metrics, moved, ...) for the live display
    on_record: Callable[[str, str, dict], None] | None = None


@dataclass
class ExecResult:
    meta: dict | None = None
    results: list | None = None
    metrics: int = 0
    metric_bytes: dict = field(default_factory=dict)  # per stage, what it wrote to metrics.jsonl


def _stage_failure(name: str, plan: StagePlan, outcome: base.Outcome, error: dict | None, violation: str | None,
                   limits: Limits, log_path: Path, disk_full: bool = False) -> tuple[int, StageError] | None:
    """(priority, error) for a stage that failed, lowest priority first; None if it did not.
    `disk_full`: the stage's quota volume is used up."""
    script = plan.script.name
    reason = outcome.reason
    if reason is None and disk_full and (error is not None or outcome.exit_code not in (0, None)):
        # It died of ENOSPC (a raised OSError, say) before the monitor saw the volume full.
        reason = base.REASON_DISK
    limit_messages = {
        base.REASON_TIMEOUT: f"stopped after {limits.timeout:g} s: the wall-clock limit (--timeout) was reached",
        base.REASON_MEMORY: f"killed for using more than {human(limits.memory)} of memory (--memory)",
        base.REASON_MEMORY_SHARED: ("killed when the memory the whole run may use ran out (the limit of the cgroup "
                                    "the runner runs in, e.g. a Slurm job's --mem), before its own --memory"),
        base.REASON_PIDS: f"reached the limit of {limits.pids} processes and threads (--pids)",
        base.REASON_DISK: f"filled its disk quota of {human(limits.disk)} (--disk)",
        base.REASON_OUTPUT: f"wrote more than {human(limits.output)} to stdout/stderr, the cap on captured output",
    }
    if reason in limit_messages:
        detail = f" ({outcome.detail})" if outcome.detail else ""
        return 0, StageError(limit_messages[reason] + detail, name, script)
    if violation:
        return 1, StageError(f"broke the protocol with the runner and was stopped: {violation}", name, script)
    if error is not None:
        priority = UPSTREAM if error.get("kind") == "upstream" else 2
        return priority, StageError(error["message"], name, script, error.get("traceback", ""))
    if reason == base.REASON_CANCELLED:
        return None
    code = outcome.exit_code
    if code in (0, None):
        return None
    if code < 0:
        try:
            what = f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            what = f"was killed by signal {-code}"
    else:
        what = f"exited with code {code} without reporting an error"
    return 3, StageError(f"{what}; last output: {_tail(log_path)}", name, script)


def _tail(path: Path, lines: int = 3) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.path.getsize(path) - 4096))
            text = f.read().decode("utf-8", "replace").strip().splitlines()[-lines:]
        return control_mod.shown(" | ".join(text), 1000) or "(none)"  # the stage's own output: inert
    except OSError:
        return "(no log)"


def _safe_name(url: str, index: int) -> str:
    base_name = re.sub(r"[^A-Za-z0-9._-]", "_", os.path.basename(url.split("?")[0].split("#")[0]))[:80]
    return f"{index:03d}-{base_name or 'download'}"


class _Downloads:
    """`ctx.download` on behalf of sandboxed scripts, cached by URL across runs."""

    def __init__(self, state: Path, opts: ExecOptions, translate: Callable[[Path, str], str]) -> None:
        self.state, self.opts, self.translate = state, opts, translate
        self.count = 0
        self.lock = threading.Lock()

    def dir_for(self, stage: str) -> Path:
        d = self.state / f"dl-{stage}"
        d.mkdir(exist_ok=True)
        return d

    def __call__(self, stage: str, url: str) -> str:
        with self.lock:
            self.count += 1
            index = self.count
        # Keyed by the URL and the policy it was fetched under: what a host allowed
        # with --allow-private served is never handed to a run without that permission.
        allowed = "\0".join(sorted(set(self.opts.allow_private)))
        key = hashlib.sha256((f"{url}\0{allowed}" if allowed else url).encode()).hexdigest()
        cached = fetch.download_cache_dir() / "downloads" / key
        blob = cached / "blob"
        if self.opts.nocache or not blob.is_file():
            cached.mkdir(parents=True, exist_ok=True)
            fetch.download(url, blob, allow_private=self.opts.allow_private, max_bytes=self.opts.limits.disk)
        name = _safe_name(url, index)
        target = self.dir_for(stage) / name
        try:
            os.link(blob, target)
        except OSError:
            shutil.copyfile(blob, target)
        os.chmod(target, 0o644)  # the download is private (mkstemp); the stage's uid 65534 must read it
        return self.translate(target, f"{IN_DOWNLOADS}/{name}")


def runtime_mounts(opts: ExecOptions, inside: Callable[[Path, str], str]) -> tuple[list[Mount], list[str], dict | None]:
    """What every stage mounts to run at all: the SDK and worker, the framework, the worker's site.

    Returns (mounts, site dirs for the stage config, the framework's config entry). Shared by
    `execute` and the warm worker of `serve`, so both sandboxes see exactly the same runtime.
    """
    mounts: list[Mount] = [Mount(LIB_DIR, f"{base.IN_LIB}/sandbox")]
    site_dirs: list[str] = []
    framework_cfg = None
    if opts.framework is not None:
        mounts.append(Mount(opts.framework.dir, base.IN_FRAMEWORK))
        site_dirs.append(inside(opts.framework.site, f"{base.IN_FRAMEWORK}/site"))
        framework_cfg = {"name": f"{opts.framework.name}@{opts.framework.version}",
                         "dir": inside(opts.framework.dir, base.IN_FRAMEWORK),
                         "initialize": opts.framework.initialize}
    if opts.worker_site is not None:
        mounts.append(Mount(opts.worker_site, base.IN_SITE))
        site_dirs.append(inside(opts.worker_site, base.IN_SITE))
    elif getattr(get_backend(opts.isolation), "IMAGE_HAS_SITE", False):
        site_dirs.append(base.IN_SITE)  # docker: the image carries the worker's site; after the framework's
    return mounts, site_dirs, framework_cfg


def execute(plans: list[StagePlan], ws: Any, opts: ExecOptions) -> ExecResult:
    """Run the stages of one pipeline execution to the end; raise StageError on failure."""
    backend = get_backend(opts.isolation)
    translating = getattr(backend, "TRANSLATES_PATHS", True)
    run_id = f"{os.getpid()}-{os.urandom(3).hex()}"
    # Short path: ipc:// endpoints must stay under 107 characters.
    state = Path(tempfile.mkdtemp(prefix="pcsb-", dir="/tmp" if os.path.isdir("/tmp") else None))
    (state / "run.json").write_text(json.dumps({"runner_pid": os.getpid(), "run_id": run_id}))

    def inside(source: Path, target: str) -> str:
        return target if translating else str(source)

    limits = opts.limits
    control = control_mod.ControlServer(_Downloads(state, opts, inside))
    handles: dict[str, Any] = {}
    volumes: dict[str, Any] = {}
    socket_dirs: dict[str, Any] = {}
    started: dict[str, float] = {}
    result = ExecResult()
    source_stop = threading.Event()
    source_thread = None
    zctx = None
    try:
        # --- sockets: the runner binds every control socket before any stage starts
        for plan in plans:
            (state / "ipc" / f"c-{plan.name}").mkdir(parents=True)
            control.add_stage(plan.name, f"ipc://{state}/ipc/c-{plan.name}/control.sock")
        control.start()
        upstream_dir, upstream_name = None, None
        if opts.source is not None:
            import zmq
            from pipcook_sandbox.sandbox.boundary import PoolServer, serve_until

            src_dir = state / "ipc" / "b-source"
            src_dir.mkdir(parents=True)
            zctx = zmq.Context()
            server = PoolServer(zctx, f"ipc://{src_dir}/pool.sock", opts.source)
            source_thread = threading.Thread(target=serve_until, args=(server, source_stop.is_set), daemon=True)
            source_thread.start()
            upstream_dir, upstream_name = src_dir, "input"

        # --- volumes: the writable dirs, each on a quota that holds
        # (made at the same time: quota.create_volumes)
        data_dirs: dict[str, Path] = {}
        wanted: list[tuple[str, str, Path, int, list[str]]] = []
        for plan in plans:
            if plan.role == "datasource":
                wanted.append(("vol", plan.name, state / f"vol-{plan.name}", limits.disk, ["data", "cache"]))
            elif plan.role == "model" and opts.task_type == "train":
                wanted.append(("vol", plan.name, state / f"vol-{plan.name}", limits.disk, ["model"]))
            if plan.role != "model":
                wanted.append(("ipc", plan.name, state / f"ipc-{plan.name}", SOCKET_DIR_QUOTA, ["out"]))
        made = quota.create_volumes([(path, size, subs) for _, _, path, size, subs in wanted])
        for (kind, name, *_), vol in zip(wanted, made):
            if kind == "ipc":
                socket_dirs[name] = vol
            elif "data" in vol.subdirs:
                volumes[name] = (vol, {"data": ws.data, "cache": ws.cache})
                data_dirs = {"data": vol.path("data"), "cache": vol.path("cache")}
            else:
                volumes[name] = (vol, {"model": ws.model})
        if not data_dirs:  # predict: no datasource ran; show the training data read-only
            data_dirs = {"data": ws.data, "cache": ws.cache}

        # --- stage specs
        for plan in plans:
            mounts, site_dirs, framework_cfg = runtime_mounts(opts, inside)
            script_in = f"{base.IN_SCRIPTS}/{plan.script.name}"
            mounts.append(Mount(plan.script, script_in))
            ctl_dir = state / "ipc" / f"c-{plan.name}"
            mounts.append(Mount(ctl_dir, f"{base.IN_IPC}/control"))
            out_dir = socket_dirs[plan.name].path("out") if plan.name in socket_dirs else None
            serve = None
            if out_dir is not None:
                mounts.append(Mount(out_dir, f"{base.IN_IPC}/out", writable=True))
                serve = f"ipc://{inside(out_dir, base.IN_IPC + '/out')}/pool.sock"
            upstream = None
            if upstream_dir is not None:
                mounts.append(Mount(upstream_dir, f"{base.IN_IPC}/in"))
                upstream = f"ipc://{inside(upstream_dir, base.IN_IPC + '/in')}/pool.sock"
            dl_dir = control._downloader.dir_for(plan.name)
            mounts.append(Mount(dl_dir, IN_DOWNLOADS))
            workspace = {"framework_dir": framework_cfg["dir"] if framework_cfg else None}
            writable_ds = plan.role == "datasource"
            for sub in ("data", "cache"):
                mounts.append(Mount(data_dirs[sub], f"{base.IN_WORKSPACE}/{sub}", writable=writable_ds))
                workspace[f"{sub}_dir"] = inside(data_dirs[sub], f"{base.IN_WORKSPACE}/{sub}")
            if plan.role == "model":
                model_src = volumes[plan.name][0].path("model") if plan.name in volumes else opts.model_dir
                if model_src is not None:
                    mounts.append(Mount(model_src, f"{base.IN_WORKSPACE}/model", writable=plan.name in volumes))
                    workspace["model_dir"] = inside(model_src, f"{base.IN_WORKSPACE}/model")
            config = {
                "protocol": 1,
                "stage": plan.name,
                "role": plan.role,
                "task_type": opts.task_type,
                "script": inside(plan.script, script_in),
                "options": plan.options,
                "pipeline_options": opts.pipeline_options,
                "framework": framework_cfg,
                "site_dirs": site_dirs,
                "control": f"ipc://{inside(ctl_dir, base.IN_IPC + '/control')}/control.sock",
                "upstream": upstream,
                "upstream_stage": upstream_name,
                "serve": serve,
                "workspace": workspace,
                "extract": {"max_bytes": limits.disk, "max_files": 100_000},
                "hints": {"cpus": limits.cpus, "gpu": "1" if (opts.gpu and plan.role == "model") else "0"},
            }
            cfg_path = state / f"stage-{plan.name}.json"
            cfg_path.write_text(json.dumps(config, default=str))
            mounts.append(Mount(cfg_path, base.IN_STAGE_CONFIG))
            spec = StageSpec(
                run_id=run_id,
                name=plan.name,
                mounts=mounts,
                limits=limits,
                log_path=ws.logs / f"{plan.name}.log",
                gpu=opts.gpu and plan.role == "model",
                labels={"state_dir": str(state), "run_id": run_id, "stage": plan.name},
            )
            handles[plan.name] = backend.start(spec)
            started[plan.name] = time.monotonic()
            if opts.on_record:
                opts.on_record(plan.name, "started", {})
            if opts.on_event:
                opts.on_event(plan.name, "started")
            upstream_dir, upstream_name = out_dir, plan.name

        _monitor(plans, handles, started, volumes, control, ws, opts, result)
        return result
    except KeyboardInterrupt:
        for handle in handles.values():
            handle.terminate(base.REASON_CANCELLED)
        raise Interrupted("interrupted (Ctrl-C): every stage was stopped; the workspace is kept") from None
    finally:
        for handle in handles.values():
            try:
                handle.terminate(base.REASON_CANCELLED)
            except Exception:
                pass
        for handle in handles.values():
            try:
                handle.cleanup()
            except Exception as exc:  # keep cleaning the rest
                if opts.on_event:
                    opts.on_event(handle.name, f"cleanup problem: {exc}")
        try:  # a stage interrupted while it was being started has no handle: its cgroup goes here
            cgroups.remove_run(run_id)
        except OSError:
            pass
        try:
            for name, (vol, mapping) in volumes.items():
                skipped = vol.copy_out({sub: dest for sub, dest in mapping.items()})
                if skipped and opts.on_event:
                    opts.on_event(name, f"not copied (links and special files are never followed): {', '.join(skipped[:5])}")
        finally:
            quota.destroy_volumes([vol for vol, _ in volumes.values()] + list(socket_dirs.values()))  # together
        source_stop.set()
        if source_thread is not None:
            source_thread.join(timeout=2)
        if zctx is not None:
            zctx.destroy(linger=0)
        control.close()
        shutil.rmtree(state, ignore_errors=True)


def _monitor(plans: list[StagePlan], handles: dict, started: dict, volumes: dict, control: Any, ws: Any,
             opts: ExecOptions, result: ExecResult) -> None:
    by_name = {p.name: p for p in plans}
    model = plans[-1].name
    errors: dict[str, dict] = {}
    violations: dict[str, str] = {}
    done: set[str] = set()
    serving: set[str] = set()
    exited: dict[str, int] = {}
    failed_at: float | None = None
    metrics_file = open(ws.metrics, "a", encoding="utf-8")
    try:
        while True:
            try:
                event = control.events.get(timeout=0.1)
            except queue.Empty:
                event = None
            while event is not None:
                _on_event(event, by_name, errors, violations, done, handles, opts, result, metrics_file)
                if event.op == "serving":
                    serving.add(event.stage)
                try:
                    event = control.events.get_nowait()
                except queue.Empty:
                    event = None
            now = time.monotonic()
            for name, handle in handles.items():
                if name not in exited:
                    code = handle.poll()
                    if code is not None:
                        exited[name] = code
                        if opts.on_record:
                            opts.on_record(name, "exited", {"code": code})
                        if opts.on_event:
                            opts.on_event(name, f"exited with code {code}")
                # A stage that serves its pool waits on its consumers: its time is theirs, and the
                # model's own deadline (or its end) stops it. Otherwise the first-started datasource
                # would be blamed for every run that takes too long.
                if name not in exited and name not in serving and now - started[name] > opts.limits.timeout:
                    handle.terminate(base.REASON_TIMEOUT)
                vol = volumes.get(name)
                if vol is not None and name not in exited and vol[0].exceeded():
                    handle.terminate(base.REASON_DISK)
            success = model in exited and exited[model] == 0 and model in done and not errors and not violations
            if success:
                break
            failing = errors or violations or any(code != 0 for code in exited.values()) or (
                any(n in exited for n in handles if n != model) and model not in exited) or (
                model in exited and model not in done)  # it ended itself (os._exit(0)) before its work was done
            if failing and failed_at is None:
                failed_at = now  # let the other stages' reports arrive: the first to fail may not be the cause
            if failed_at is not None and now - failed_at > FAILURE_GRACE:
                _fail(plans, handles, errors, violations, opts, ws, volumes, done)
        # Success: stop the serving stages politely, then for good.
        for plan in plans[:-1]:
            control.send_stop(plan.name)
        deadline = time.monotonic() + STOP_GRACE
        while time.monotonic() < deadline and any(handles[p.name].poll() is None for p in plans[:-1]):
            time.sleep(0.05)
        if opts.on_record:  # the serving stages' last counts and their ends, for the display
            while True:
                try:
                    event = control.events.get_nowait()
                except queue.Empty:
                    break
                if event.op == "moved" and event.stage not in violations:
                    opts.on_record(event.stage, event.op, event.data)
            for plan in plans[:-1]:
                code = handles[plan.name].poll()
                if plan.name not in exited and code is not None:
                    opts.on_record(plan.name, "exited", {"code": code})
    finally:
        metrics_file.close()


def _on_event(event: Any, by_name: dict, errors: dict, violations: dict, done: set, handles: dict,
              opts: ExecOptions, result: ExecResult, metrics_file: Any) -> None:
    name, op, data = event.stage, event.op, event.data
    if opts.on_record and name not in violations:
        opts.on_record(name, op, data)
    if op == "progress" and opts.on_progress:  # shown on the operator's terminal: short and inert
        extra = {control_mod.shown(k, 64): control_mod.shown(v, 200) if isinstance(v, str) else v
                 for k, v in (data.get("extra") or {}).items()}
        opts.on_progress(data["value"], extra)
    elif op == "metrics" and name not in violations:
        line = json.dumps({"time": round(time.time(), 3), "stage": name, "step": data.get("step"), **data["metrics"]})
        logged = result.metric_bytes[name] = result.metric_bytes.get(name, 0) + len(line) + 1
        if logged > opts.limits.output:  # metrics.jsonl is on the host's disk: capped like the stage's output
            violations[name] = f"logged more than {human(opts.limits.output)} of metrics, the cap on what a stage may record"
            handles[name].terminate(base.REASON_PROTOCOL)
            return
        metrics_file.write(line + "\n")
        metrics_file.flush()
        result.metrics += 1
        if opts.on_metrics:
            opts.on_metrics(name, data.get("step"), data["metrics"])
    elif op == "meta" and by_name[name].role == "model":
        result.meta = _jsonable(data["meta"])
    elif op == "result" and by_name[name].role == "model":
        result.results = data["data"]
    elif op == "error":
        errors.setdefault(name, data)
    elif op == "violation":
        violations.setdefault(name, data["message"])
        handles[name].terminate(base.REASON_PROTOCOL)
    elif op == "done":
        done.add(name)
    elif op == "downloaded" and opts.on_event:
        opts.on_event(name, f"download {data['url']}: {'ok' if data['ok'] else data['message']}")


def _fail(plans, handles, errors, violations, opts, ws, volumes, done) -> None:
    for handle in handles.values():
        handle.terminate(base.REASON_CANCELLED)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(h.poll() is None for h in handles.values()):
        time.sleep(0.05)
    candidates = []
    for index, plan in enumerate(plans):
        vol = volumes.get(plan.name)
        found = _stage_failure(plan.name, plan, handles[plan.name].outcome(), errors.get(plan.name),
                               violations.get(plan.name), opts.limits, ws.logs / f"{plan.name}.log",
                               disk_full=vol is not None and vol[0].exceeded())
        if found:
            candidates.append((found[0], index, found[1]))
    model = plans[-1]
    if not candidates and model.name not in done and handles[model.name].outcome().exit_code == 0:
        raise StageError("exited with code 0 before its work was done (the script ended the process itself, "
                         f"e.g. with os._exit); last output: {_tail(ws.logs / f'{model.name}.log')}",
                         model.name, model.script.name)
    if not candidates:
        served = [p.name for p in plans[:-1]]
        raise StageError(f"stopped before the model finished (a serving stage among {', '.join(served)} exited early)",
                         plans[-1].name, plans[-1].script.name)
    candidates.sort(key=lambda c: (c[0], c[1]))
    priority, index, error = candidates[0]
    named = {plans[i].name for _, i, _ in candidates}
    if priority == UPSTREAM and index > 0 and plans[index - 1].name not in named:
        # The stage before it is fine by its own account, yet what it sent could not be read:
        # it sent something outside the protocol (a malformed or hostile message). Name it.
        upstream = plans[index - 1]
        raise StageError(f"sent data that stage '{plans[index].name}' could not read: {error.cause}",
                         upstream.name, upstream.script.name, error.traceback)
    raise error


def _jsonable(obj: Any) -> Any:
    np = sys.modules.get("numpy")  # not imported: no value can be an array (the runner need not load numpy)

    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if np is not None and isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, bytes):
        return None
    return obj


def input_pool(samples: list[dict], meta: dict | None) -> Any:
    """The pool the runner serves to the first stage in predict mode."""
    return sdk.from_lists(predicted=samples, meta=dict(meta or {}))
