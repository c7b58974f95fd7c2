"""The process that runs inside a stage's sandbox.

It reads /pipcook/stage.json, makes the framework and the worker's own
dependencies importable, runs the framework's `initialize(options)`, loads
the script, calls its entry, and then either serves the resulting pool to the
next stage (datasource, dataflow) or reports that training / prediction is
done (model). Everything it tells the runner goes over the control socket,
and the worker exits only once the runner has confirmed reading it (`sync`);
stdout and stderr are the stage's log.

Imports nothing of the host side (`runner`), by design.
"""
from __future__ import annotations

import atexit
import importlib.util
import io
import json
import os
import site
import sys
import traceback
from typing import Any

from .errors import StageFailure
from .fastexit import flush_open_files
from .stageconfig import StageConfig

# How long a finished stage waits for the runner to confirm it has read the stage's last reports.
# The runner answers at once unless it is gone or starved; the stage's own deadline still applies.
SYNC_TIMEOUT = 30.0
ENTRIES = {"datasource": "datasource", "dataflow": "dataflow"}
SIGNATURES = {
    "datasource": "datasource(options, ctx)",
    "dataflow": "dataflow(pool, options, ctx)",
    "train": "train(runtime, options, ctx)",
    "predict": "predict(runtime, options, ctx)",
}


def _script_frame(tb: Any, script: str | tuple[str, ...]) -> str:
    """' (model.py, line 12, in train)' for the innermost frame in the script (or any of the scripts)."""
    scripts = (script,) if isinstance(script, str) else script
    where = ""
    for frame in traceback.extract_tb(tb):
        if frame.filename in scripts:
            where = f" ({os.path.basename(frame.filename)}, line {frame.lineno}, in {frame.name})"
    return where


def _load_script(path: str) -> Any:
    name = os.path.basename(path)
    spec = importlib.util.spec_from_file_location("pipcook_script", path)
    if spec is None or spec.loader is None:
        raise StageFailure(f"{name} cannot be loaded as a Python module")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except SyntaxError as exc:
        raise StageFailure(f"{name} has a syntax error at line {exc.lineno}: {exc.msg}", tb=traceback.format_exc()) from None
    except BaseException as exc:
        raise StageFailure(
            f"{name} failed while being imported: {type(exc).__name__}: {exc}{_script_frame(exc.__traceback__, path)}",
            tb=traceback.format_exc(),
        ) from None
    return module


def _entry(module: Any, script: str, name: str) -> Any:
    fn = getattr(module, name, None)
    if not callable(fn):
        raise StageFailure(
            f"{os.path.basename(script)} has no function {name!r}; this stage calls {SIGNATURES.get(name, name + '(...)')}",
            kind="entry",
        )
    return fn


def _initialize_framework(cfg: StageConfig) -> None:
    fw = cfg.framework
    if not fw or not fw.get("initialize"):
        return
    path = os.path.join(fw["dir"], fw["initialize"])
    spec = importlib.util.spec_from_file_location("pipcook_framework_init", path)
    if spec is None or spec.loader is None:
        raise StageFailure(f"framework {fw.get('name', '?')}: {fw['initialize']} cannot be loaded as a Python module",
                           kind="framework")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
        module.initialize(dict(cfg.pipeline_options))
    except BaseException as exc:
        raise StageFailure(
            f"framework {fw.get('name', '?')} failed to initialize: {type(exc).__name__}: {exc}",
            kind="framework",
            tb=traceback.format_exc(),
        ) from None


def _check_pool(pool: Any, script: str, entry: str) -> Any:
    if pool is None or not any(hasattr(pool, s) for s in ("train", "test", "valid", "predicted")):
        raise StageFailure(
            f"{entry}() in {os.path.basename(script)} returned {type(pool).__name__}, not a pool "
            "(an object with meta and train/test/valid/predicted datasets, e.g. sdk.from_lists(...))"
        )
    return pool


def run_stage(cfg: StageConfig, control: Any, zctx: Any) -> None:
    from . import boundary
    from .context import Context, Runtime, check_results

    if cfg.role == "serve":
        return run_serve(cfg, control, zctx)
    role, script = cfg.role, cfg.script
    ctx = Context(control, cfg)
    options = dict(cfg.options)
    _initialize_framework(cfg)
    module = _load_script(script)

    upstream = None
    if cfg.upstream:
        upstream = boundary.RemotePool(zctx, cfg.upstream, cfg.upstream_stage)

    if role in ("datasource", "dataflow"):
        fn = _entry(module, script, ENTRIES[role])
        args = (options, ctx) if role == "datasource" else (upstream, options, ctx)
        pool = _check_pool(_call(fn, script, *args), script, ENTRIES[role])
        if cfg.serve is None:
            raise StageFailure("the stage configuration names no socket to serve the pool on", kind="worker")
        server = boundary.PoolServer(zctx, cfg.serve, pool)
        control.send({"op": "serving"})
        reported = [0]

        def report_moved() -> None:
            if server.samples_sent != reported[0]:
                reported[0] = server.samples_sent
                control.send({"op": "moved", "samples": server.samples_sent})

        try:
            boundary.serve_until(server, lambda: control.stop_requested, control.socket, control.drain, report_moved)
            report_moved()  # the final count: the runner reads it while this stage stops
        except boundary.SampleError as exc:
            raise StageFailure(str(exc), kind="sample") from None
        except boundary.UpstreamError as exc:
            raise StageFailure(str(exc), kind="upstream") from None
        except Exception as exc:
            # user code runs lazily here: transforms and datasets read on demand
            raise StageFailure(
                f"{type(exc).__name__}: {exc}{_script_frame(exc.__traceback__, script)} while producing samples",
                tb=traceback.format_exc(),
            ) from None
        return

    # model stage
    entry = "predict" if cfg.task_type == "predict" else "train"
    fn = _entry(module, script, entry)
    runtime = Runtime(control, upstream, cfg.workspace.get("model_dir"))
    if upstream is not None and entry == "train":
        try:
            control.send({"op": "meta", "meta": dict(upstream.meta)})
        except Exception:
            pass  # meta holding odd types is only a loss for predict, reported there
    result = _call(fn, script, runtime, options, ctx)
    if entry == "predict":
        try:
            control.send({"op": "result", "data": check_results(result)})
        except (TypeError, ValueError) as exc:
            raise StageFailure(str(exc)) from None


# ------------------------------------------------------------------ serve
# `pipcook-sandbox serve` keeps one sandbox warm: this worker imports the
# dataflow scripts and the model script once, then answers requests that the
# runner sends over the control socket, one at a time, until told to stop:
#   runner -> worker  {op: predict, req: n, input: "ipc://.../in-n.sock"}
#   worker -> runner  {op: result, req: n, data: [...]}
#                  or {op: error, kind: "request", message: ...}  (the worker stays up)
# The inputs come as a pool the runner serves at `input`, exactly as the first
# stage of `predict` gets them, so samples may be as large as data sockets allow.


def _next_request(control: Any) -> dict | None:
    """The runner's next predict request, or None once it asked the worker to stop."""
    from .protocol import CONTROL_CAPS, ProtocolError, unpack

    while not control.stop_requested:
        with control._lock:  # the lock ctx.download holds while it waits for its reply
            if not control.socket.poll(200):
                continue
            frames = control.socket.recv_multipart()
        try:
            msg = unpack(frames, CONTROL_CAPS)
        except ProtocolError:
            continue  # the runner never sends garbage; ignore rather than die
        if isinstance(msg, dict) and msg.get("op") == "predict" and isinstance(msg.get("req"), int) \
                and isinstance(msg.get("input"), str):
            return msg
        control._dispatch(frames)  # stop, or a late download reply
    return None


def run_serve(cfg: StageConfig, control: Any, zctx: Any) -> None:
    from . import boundary
    from .context import Context, Runtime, check_results

    ctx = Context(control, cfg)  # task_type "predict"
    _initialize_framework(cfg)
    modules: dict[str, Any] = {}  # one module may export several entries (docs/pipeline.md)
    model = cfg.model
    if model is None:
        raise StageFailure("the stage configuration of a serve worker names no model script", kind="worker")
    for entry in [*cfg.dataflows, model]:
        if entry.script not in modules:
            modules[entry.script] = _load_script(entry.script)
    flows = [(d.stage, d.script, _entry(modules[d.script], d.script, "dataflow"), dict(d.options))
             for d in cfg.dataflows]
    predict = _entry(modules[model.script], model.script, "predict")
    model_dir = cfg.workspace.get("model_dir")
    control.send({"op": "serving"})
    while True:
        msg = _next_request(control)
        if msg is None:
            return
        where, pool = model.stage, None
        try:
            pool = boundary.RemotePool(zctx, msg["input"], "input")
            current: Any = pool
            for stage, script, fn, options in flows:
                where = stage
                current = _check_pool(_call(fn, script, current, dict(options), ctx), script, "dataflow")
            where = model.stage
            # samples are read lazily: a dataflow's transform fails inside predict(), so name any script's line
            result = _call(predict, model.script, Runtime(control, current, model_dir), dict(model.options),
                           ctx, frames_in=tuple(modules))
            control.send({"op": "result", "req": msg["req"], "data": check_results(result)})
        except StageFailure as exc:
            _report(control, "request", f"{where}: {exc}", exc.tb)
        except (TypeError, ValueError) as exc:  # results that cannot be returned, or too large to send
            _report(control, "request", f"{where}: {exc}", "")
        except boundary.UpstreamError as exc:
            _report(control, "request", f"{where}: {exc}", "")
        except Exception as exc:  # lazily evaluated script code fails while results are read
            _report(control, "request", f"{where}: {type(exc).__name__}: {exc}", traceback.format_exc())
        finally:
            if pool is not None:
                pool.close()


def _call(fn: Any, script: str, *args: Any, frames_in: tuple[str, ...] | None = None) -> Any:
    """fn(*args) with failures as StageFailure; `frames_in`: the scripts whose lines may be named."""
    from .boundary import UpstreamError

    try:
        return fn(*args)
    except UpstreamError as exc:
        raise StageFailure(str(exc), kind="upstream") from None
    except StageFailure:
        raise
    except BaseException as exc:
        if isinstance(exc, KeyboardInterrupt):
            raise
        from .protocol import BoundaryTypeError

        kind = "sample" if isinstance(exc, BoundaryTypeError) else "script"
        raise StageFailure(
            f"{type(exc).__name__}: {exc}{_script_frame(exc.__traceback__, frames_in or script)}", kind=kind,
            tb=traceback.format_exc()
        ) from None


def _size_thread_pools(cpus: str | None) -> None:
    """Native thread pools sized to the stage's CPU quota, set before anything imports numpy.

    OpenBLAS (numpy's BLAS) and OpenMP start one thread per core of the *host* at import: 64 threads
    for a 2-CPU stage on a big training host, which costs start-up and then only thrashes. A script
    or the framework's initialize() may still choose otherwise (setdefault)."""
    try:
        n = max(1, int(float(cpus) + 0.5)) if cpus else os.cpu_count() or 1
    except ValueError:
        n = 1
    n = min(n, os.cpu_count() or n)
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, str(n))


def setup_process() -> None:
    """What every worker does first, cold or warm."""
    sys.dont_write_bytecode = True  # scripts and the SDK are read-only mounts
    # stdout and stderr share the stage's log: line-buffer both so a print() reaches logs/ as it
    # happens and the two streams keep their order; child processes inherit the same through the env.
    os.environ["PYTHONUNBUFFERED"] = "1"
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, io.TextIOWrapper):  # not when a test harness replaced it
            try:
                stream.reconfigure(line_buffering=True)
            except ValueError:
                pass


def add_site_dirs(site_dirs: list) -> None:
    """Framework first: its numpy (say) must win over the worker's own copy. Once per directory."""
    for path in site_dirs:
        if isinstance(path, str) and os.path.isdir(path) and path not in sys.path:
            site.addsitedir(path)


def main(config_path: str) -> int:
    setup_process()
    with open(config_path, encoding="utf-8") as f:
        try:
            cfg = StageConfig.parse(json.load(f))
        except ValueError as exc:  # ConfigError included; the runner wrote it: a mismatch is a bug, said plainly
            print(f"pipcook-sandbox worker: {exc}", file=sys.stderr)
            return 2
    return run_config(cfg)


def run_config(cfg: StageConfig) -> int:
    """Run the stage `cfg` describes to its end; the worker's exit code. A warm sandbox
    (warmboot.py) calls this once its claim arrived, with its imports already done."""
    # The first atexit handler runs last: after the script's handlers and its threads (fastexit.py).
    atexit.register(flush_open_files)
    add_site_dirs(cfg.site_dirs)
    # What initialize() may need to know about its sandbox, as plain variables.
    for key, value in cfg.hints.items():
        os.environ[f"PIPCOOK_{key.upper()}"] = str(value)
    _size_thread_pools(os.environ.get("PIPCOOK_CPUS"))
    import zmq

    from .context import ControlClient

    zctx = zmq.Context()
    control = ControlClient(zctx, cfg.control)
    code = 0
    try:
        control.send({"op": "hello", "pid": os.getpid(), "python": sys.version.split()[0]})
        run_stage(cfg, control, zctx)
        control.send({"op": "done"})
    except StageFailure as exc:
        code = 1
        _report(control, exc.kind, str(exc), exc.tb)
    except KeyboardInterrupt:
        code = 130
    except BaseException as exc:  # a bug in the worker itself
        code = 2
        _report(control, "worker", f"internal error in the stage worker: {type(exc).__name__}: {exc}", traceback.format_exc())
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        if code != 130:
            control.sync(timeout=SYNC_TIMEOUT)
        control.close()
        zctx.destroy()  # data sockets linger 0; the control socket flushes its last report
    return code


def _report(control: Any, kind: str, message: str, tb: str) -> None:
    if tb:
        print(tb, file=sys.stderr)
    try:
        control.send({"op": "error", "kind": kind, "message": message[:8000], "traceback": tb[-100_000:]})
    except Exception:
        print(f"could not report the error to the runner: {message}", file=sys.stderr)
