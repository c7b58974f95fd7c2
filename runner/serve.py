"""`pipcook-sandbox serve`: a model over HTTP, with ONE sandboxed worker kept warm.

The worker is a single sandbox (same backends, mounts and limits as the
stages of `predict`) started in the worker's `serve` role: it imports the
dataflow scripts and the model script once, then per request applies the
dataflows in-process (`ctx.task_type == "predict"`) to the inputs and calls
`predict`. Requests reach it over its control socket, one at a time; the
inputs travel as a pool the runner serves on a data socket, as in `predict`.

Everything the worker says is hostile input (the control server validates
it) and no answer ever carries a traceback. A request that runs past
`--request-timeout` gets 504 and the worker is killed and started again; a
worker that dies is started again for the next request.
"""
from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import os
import queue
import socket
import stat
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from pipcook_sandbox.runner.backends import base
from pipcook_sandbox.runner.backends.base import Limits, Mount
from pipcook_sandbox.sandbox.stageconfig import ScriptEntry

from . import jsonvalue, models, report, stages
from . import run as run_mod
from .errors import (
    BadRequest,
    PipcookError,
    RequestFailed,
    RequestTimeout,
    StageError,
    WorkerError,
    WorkerUnavailable,
)
from .verdict import Observation

STATIC_DIR = Path(__file__).resolve().parent / "static"
STAGE = "serve"
MAX_BODY = 16 << 20  # one request, JSON or multipart
MAX_INPUTS = 1024
MAX_STRING = 1 << 20
STOP_GRACE = 3.0


@dataclass
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 9091
    request_timeout: float = 60.0
    startup_timeout: float = 300.0  # importing TensorFlow and loading a model takes a while
    max_queue: int = 8
    max_body: int = MAX_BODY
    isolation: str = "bwrap"
    gpu: bool = False
    mirror: str | None = None  # -m: prebuilt frameworks from this mirror
    access_log: bool = True  # one line per request on stderr (serve --no-access-log turns it off)
    allow_private: tuple[str, ...] = ()
    limits: Limits = field(default_factory=Limits)
    debug: bool = False
    log: Callable[[str], None] = print
    warn: Callable[[str], None] = print


class WarmWorker:
    """One sandbox running the worker in its `serve` role, in a `Run` of its own. Not thread-safe:
    callers serialise."""

    def __init__(self, model: models.Model, ws: Any, copies: dict[str, Path], framework: Any,
                 worker_site: Path | None, opts: ServeOptions) -> None:
        self.model, self.ws, self.opts = model, ws, opts
        self.plans = stages.plan(model.pipeline, copies, task_type="predict")
        self.exec_opts = run_mod.ExecOptions(
            isolation=opts.isolation, limits=opts.limits, gpu=opts.gpu, allow_private=opts.allow_private,
            task_type="predict", framework=framework, worker_site=worker_site,
            pipeline_options=dict(model.pipeline.options), model_dir=model.dir,
            on_event=(lambda stage, what: opts.log(f"[{stage}] {what}")) if opts.debug else None)
        self.run: run_mod.Run | None = None
        self.handle: Any = None
        self.zctx: Any = None
        self.req = 0
        self.starts = 0
        self.status = "down"  # down | starting | ready

    # -------------------------------------------------------------- lifecycle

    @property
    def log_path(self) -> Path:
        return self.ws.logs / "serve.log"

    def _start_sandbox(self, run: run_mod.Run) -> Any:
        inside = run.inside
        mounts: list[Mount] = []
        scripts = []
        for plan in self.plans:
            target = f"{base.IN_SCRIPTS}/{plan.script.name}"
            if Mount(plan.script, target) not in mounts:  # one file may serve several stages
                mounts.append(Mount(plan.script, target))
            scripts.append(ScriptEntry(plan.name, inside(plan.script, target), plan.options))
        in_dir = run.state / "ipc" / "in"
        in_dir.mkdir(parents=True)
        mounts.append(Mount(in_dir, f"{base.IN_IPC}/in"))
        workspace = {}
        for sub in ("data", "cache"):  # the throwaway workspace's, empty and read-only
            mounts.append(Mount(getattr(self.ws, sub), f"{base.IN_WORKSPACE}/{sub}"))
            workspace[f"{sub}_dir"] = inside(getattr(self.ws, sub), f"{base.IN_WORKSPACE}/{sub}")
        mounts.append(Mount(self.model.dir, f"{base.IN_WORKSPACE}/model"))
        workspace["model_dir"] = inside(self.model.dir, f"{base.IN_WORKSPACE}/model")
        config = run.base_config(STAGE, "serve", scripts[-1].script, run.control_dir(STAGE), mounts,
                                 dataflows=scripts[:-1], model=scripts[-1], workspace=workspace)
        run.control.start()
        return run.start_stage(config, mounts, self.log_path)

    def start(self) -> None:
        """Start the sandbox and wait until it has imported every script; WorkerError if it cannot."""
        import zmq

        self.stop()
        self.status = "starting"
        self.starts += 1
        self.run = run_mod.Run(self.ws, self.exec_opts, prefix="pcsb-serve-")
        try:
            self.run.open()
            self.zctx = zmq.Context()
            self.handle = self._start_sandbox(self.run)
            deadline = time.monotonic() + self.opts.startup_timeout
            while True:
                event = self._next_event(deadline, "starting")
                if event is not None and event.op == "serving":
                    break
                if event is not None and event.op == "error":
                    raise self._failure(event.data)
        except BaseException:
            self.stop()
            raise
        self.status = "ready"

    def stop(self) -> None:
        """Stop the sandbox and remove everything it held. Idempotent."""
        self.status = "down"
        if self.run is not None:
            if self.handle is not None and self.handle.poll() is None:
                self.run.control.send(STAGE, {"op": "stop"})
                deadline = time.monotonic() + STOP_GRACE
                while time.monotonic() < deadline and self.handle.poll() is None:
                    time.sleep(0.05)
            self.run.close()  # stops the sandbox, the control channel, the downloads; removes the state dir
            self.run = None
        self.handle = None
        if self.zctx is not None:
            self.zctx.destroy(linger=0)
            self.zctx = None

    def alive(self) -> bool:
        return self.status == "ready" and self.handle is not None and self.handle.poll() is None

    # -------------------------------------------------------------- requests

    def _failure(self, error: dict | None, violation: str | None = None) -> PipcookError:
        """The one-paragraph reason the worker failed, the worker stopped first."""
        if self.handle is not None and self.handle.poll() is None and error is None and violation is None:
            self.handle.terminate(base.REASON_CANCELLED)
        if violation is not None and self.handle is not None:
            self.handle.terminate(base.REASON_PROTOCOL)
        outcome = self.handle.outcome() if self.handle is not None else base.Outcome(None)
        script = self.plans[-1].script.name
        err = self.run.failure(STAGE, script, Observation(outcome, error, violation)) if self.run else None
        return WorkerError(str(err or StageError("the worker stopped", STAGE, script)))

    def _live_run(self) -> run_mod.Run:
        """The run of the worker now started: a WorkerError, not an AttributeError on None, once it
        was stopped (requests are serialised, so only a caller that skipped start() meets it)."""
        if self.run is None:
            raise WorkerError("the worker is not running")
        return self.run

    def _next_event(self, deadline: float, doing: str) -> Any:
        """The next event from the worker, None on a quiet 0.1 s; raise if it died or time ran out."""
        run = self._live_run()
        try:
            event = run.control.events.get(timeout=0.1)
        except queue.Empty:
            event = None
        if event is not None:
            if event.op == "violation":
                raise self._failure(None, event.data["message"])
            if event.op == "downloaded":
                run.emit(STAGE, "download", url=event.data["url"], ok=event.data["ok"],
                              message=event.data["message"])
            return event
        if self.handle.poll() is not None:
            time.sleep(0.2)  # its last report may still be on the way
            try:
                event = run.control.events.get_nowait()
            except queue.Empty:
                event = None
            raise self._failure(event.data if event is not None and event.op == "error" else None)
        if time.monotonic() > deadline:
            self.handle.terminate(base.REASON_TIMEOUT)
            if doing == "starting":
                raise WorkerError(f"the worker did not finish starting in {self.opts.startup_timeout:g} s")
            raise RequestTimeout(f"the request took longer than {self.opts.request_timeout:g} s "
                                 "(--request-timeout); the worker was stopped and is being restarted")
        return None

    def predict(self, samples: list[dict]) -> list:
        """Results for `samples`, starting the worker first if it is not running."""
        if not self.alive():
            if self.handle is not None:
                self.opts.log("serve: the worker had stopped; starting a new one")
            try:
                self.start()
            except PipcookError as exc:
                raise WorkerUnavailable(f"the worker could not be started: {exc}") from None
        try:
            return self._exchange(samples)
        except (WorkerError, RequestTimeout):
            self.stop()  # only once the input pool's thread is done with the shared ZeroMQ context
            raise

    def _exchange(self, samples: list[dict]) -> list:
        """One request: serve the inputs as a pool, ask the worker, wait for its answer."""
        from pipcook_sandbox.sandbox.boundary import PoolServer, serve_until

        run = self._live_run()
        self.req += 1
        req = self.req
        sock = run.state / "ipc" / "in" / f"r{req}.sock"
        server = PoolServer(self.zctx, f"ipc://{sock}", run_mod.input_pool(samples, self.model.meta))
        # bound after the sandbox started, so the backend could not open it up: the stage may run as
        # another uid (bwrap's mapped mode); the directory is private to this worker
        os.chmod(sock, 0o666)
        done = threading.Event()
        thread = threading.Thread(target=serve_until, args=(server, done.is_set), daemon=True)
        thread.start()
        try:
            where = run.inside(sock.parent, f"{base.IN_IPC}/in")
            run.control.send(STAGE, {"op": "predict", "req": req, "input": f"ipc://{where}/{sock.name}"})
            deadline = time.monotonic() + self.opts.request_timeout
            while True:
                event = self._next_event(deadline, "predicting")
                if event is None:
                    continue
                if event.op == "result" and event.data.get("req") == req:
                    return event.data["data"]
                if event.op == "error":
                    if event.data.get("kind") == "request":
                        raise RequestFailed(event.data["message"])
                    raise self._failure(event.data)
        finally:
            done.set()
            thread.join(timeout=5)
            server.close()
            with contextlib.suppress(OSError):
                sock.unlink()


# ------------------------------------------------------------------ HTTP


class Service:
    """The worker behind an asyncio lock: one request at a time, a bounded queue before it."""

    def __init__(self, worker: WarmWorker, opts: ServeOptions) -> None:
        self.worker, self.opts = worker, opts
        self.lock = asyncio.Lock()
        self.pending = 0  # running + waiting
        self.restarts = 0

    async def run(self, samples: list[dict]) -> list:
        import anyio

        async with self.lock:
            try:
                return await anyio.to_thread.run_sync(self.worker.predict, samples)
            except (RequestTimeout, WorkerError):
                self.restarts += 1
                asyncio.get_running_loop().create_task(self.restart())
                raise

    async def restart(self) -> None:
        """Bring the worker back right away, so the next request does not pay for its start."""
        import anyio

        async with self.lock:
            if self.worker.alive():
                return
            try:
                await anyio.to_thread.run_sync(self.worker.start)
                self.opts.log("serve: worker restarted")
            except Exception as exc:  # the next request tries again and reports it
                self.opts.log(f"serve: the worker could not be restarted: {exc}")


def _answer(status: int, message: str | None = None, data: list | None = None) -> Any:
    from starlette.responses import JSONResponse

    body = {"success": True, "data": data} if message is None else {"success": False, "message": message}
    return JSONResponse(body, status_code=status)


async def _read_body(request: Any, cap: int) -> bytes:
    """The body, or 413 as soon as it is known to pass `cap` (before reading it, when declared)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            if int(declared) > cap:
                raise BadRequest(413, f"request body of {declared} bytes is larger than the {cap >> 20} MiB limit")
        except ValueError:
            raise BadRequest(400, "Content-Length is not a number") from None
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > cap:
            raise BadRequest(413, f"request body is larger than the {cap >> 20} MiB limit")
        chunks.append(chunk)
    return b"".join(chunks)


def _json_samples(body: bytes) -> list[dict]:
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(400, f"the body is not valid JSON: {exc}") from None
    if not isinstance(doc, dict) or "inputs" not in doc:
        raise BadRequest(400, 'the body must be a JSON object {"inputs": ["...", ...]}')
    inputs = doc["inputs"]
    if not isinstance(inputs, list) or not all(isinstance(x, str) for x in inputs):
        raise BadRequest(400, '"inputs" must be a list of strings')
    if any(len(x) > MAX_STRING for x in inputs):
        raise BadRequest(413, f"an input string is longer than {MAX_STRING} characters")
    return [{"data": x, "label": None} for x in inputs]


async def _form_samples(request: Any, body: bytes) -> list[dict]:
    """Multipart: every file part is a sample (bytes + name), every `inputs` text field a string sample."""
    from starlette.requests import Request

    sent = False

    async def replay() -> dict:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(request.scope, replay).form(max_files=MAX_INPUTS, max_fields=MAX_INPUTS,
                                                         max_part_size=MAX_STRING)
    except Exception as exc:  # the parser's errors: a malformed body is the client's
        raise BadRequest(400, f"the multipart body cannot be read: {getattr(exc, 'detail', None) or exc}") from None
    samples: list[dict] = []
    try:
        for key, value in form.multi_items():
            if isinstance(value, str):
                if key != "inputs":
                    raise BadRequest(400, f"unknown form field {key!r}: send files, or text in fields named 'inputs'")
                samples.append({"data": value, "label": None})
            else:
                samples.append({"data": await value.read(), "label": None, "name": os.path.basename(value.filename or "")})
    finally:
        await form.close()
    return samples


async def _samples(request: Any, cap: int) -> list[dict]:
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype not in ("application/json", "multipart/form-data"):
        raise BadRequest(415, "send JSON {\"inputs\": [...]} (application/json) or files (multipart/form-data)")
    body = await _read_body(request, cap)
    samples = _json_samples(body) if ctype == "application/json" else await _form_samples(request, body)
    if not samples:
        raise BadRequest(400, "no inputs: send at least one string or file")
    if len(samples) > MAX_INPUTS:
        raise BadRequest(413, f"{len(samples)} inputs in one request; at most {MAX_INPUTS}")
    return samples


def _read_report(path: Path | None, cap: int = 16 << 20) -> bytes | None:
    """The model's report.html if it is a regular file (never through a link), else None."""
    if path is None:
        return None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            return None
        data = f.read(cap + 1)
    return data if len(data) <= cap else None


def create_app(service: Service, info: dict, report_file: Path | None = None) -> Any:
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.responses import FileResponse, HTMLResponse, JSONResponse, Response
    from starlette.routing import Mount as RouteMount
    from starlette.routing import Route
    from starlette.staticfiles import StaticFiles

    from . import apidocs

    opts = service.opts

    async def predict_endpoint(request: Any) -> Any:
        """
        summary: Run the model on inputs
        description: >-
          JSON {"inputs": [strings]} or multipart files (one sample each), at most maxInputs
          inputs and maxBytes in all (GET /info). The answer holds one result per input, in order.
        requestBody:
          content:
            application/json:
              schema: {type: object, required: [inputs], properties: {inputs: {type: array, items: {type: string}}}}
            multipart/form-data:
              schema: {type: object, properties: {file: {type: array, items: {type: string, format: binary}}}}
        responses:
          200: {description: "{success: true, data: [one result per input]}"}
          400: {description: "{success: false, message}: the request is malformed"}
          413: {description: "{success: false, message}: the body is larger than maxBytes"}
          422: {description: "{success: false, message}: the pipeline's scripts failed on these inputs"}
          503: {description: "{success: false, message}: busy, or the worker is restarting"}
          504: {description: "{success: false, message}: the request ran past --request-timeout"}
        """
        try:
            samples = await _samples(request, opts.max_body)
        except BadRequest as exc:
            return _answer(exc.status, str(exc))
        if service.pending > opts.max_queue:
            return _answer(503, f"busy: {service.pending} requests are already running or waiting; try again later")
        service.pending += 1
        try:
            # What the model returned, as plain JSON: NaN, Infinity, bytes or absurd nesting would
            # make the response itself fail (a 500 and a traceback in the log).
            return _answer(200, data=jsonvalue.plain(await service.run(samples), what="data"))
        except jsonvalue.Unfit as exc:
            return _answer(502, f"the model returned a result that is not JSON: {exc}")
        except RequestFailed as exc:
            return _answer(422, f"the pipeline's scripts could not handle these inputs: {exc}")
        except RequestTimeout as exc:
            return _answer(504, str(exc))
        except WorkerUnavailable as exc:
            return _answer(503, f"{exc}; the next request tries again")
        except WorkerError as exc:
            return _answer(500, f"the model worker failed: {exc}; it is being restarted")
        finally:
            service.pending -= 1

    async def healthz(request: Any) -> Any:
        """
        summary: Whether the model worker is up
        responses:
          200: {description: "{ok: true, worker, restarts, pending}"}
          503: {description: "{ok: false, worker: its state, ...}: starting or restarting"}
        """
        ready = service.worker.alive()
        body = {"ok": ready, "worker": service.worker.status if not ready else "ready",
                "restarts": service.restarts, "pending": service.pending}
        return JSONResponse(body, status_code=200 if ready else 503)

    async def info_endpoint(request: Any) -> Any:
        """
        summary: What the model is and takes
        description: >-
          type (the pipeline's task type), categories, columns (a tabular model's input
          columns, in order, or null), report (the training report's path or null), maxBytes, maxInputs.
        responses:
          200: {description: "{type, categories, columns, report, maxBytes, maxInputs}"}
        """
        return JSONResponse(info)

    async def index(request: Any) -> Any:
        return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-store"})

    async def report_page(request: Any) -> Any:
        """
        summary: The training report (curves, parameters, stage timings, test metrics)
        responses:
          200: {description: a self-contained HTML page}
          404: {description: the model was trained without a report}
        """
        text = _read_report(report_file)
        if text is None:
            return _answer(404, "this model has no training report")
        # The file came with the model, which may be someone else's: no script of it may run here.
        return Response(text, media_type="text/html", headers={
            "Content-Security-Policy": report.CSP + "; sandbox", "Cache-Control": "no-store",
            "X-Content-Type-Options": "nosniff"})

    async def openapi(request: Any) -> Any:
        return JSONResponse(apidocs.schema(app.routes, info))

    async def docs(request: Any) -> Any:
        return HTMLResponse(apidocs.render_docs(apidocs.schema(app.routes, info)),
                            headers={"Content-Security-Policy": report.CSP})

    async def http_error(request: Any, exc: Any) -> Any:
        message = {404: f"not found: {request.method} {request.url.path}",
                   405: f"method {request.method} not allowed on {request.url.path}"}.get(exc.status_code, str(exc.detail))
        return _answer(exc.status_code, message)

    async def internal_error(request: Any, exc: Exception) -> Any:
        opts.log(f"serve: internal error on {request.url.path}: {type(exc).__name__}: {exc}")
        if opts.debug:
            opts.log(traceback.format_exc())
        return _answer(500, "internal error in pipcook-sandbox serve (see the server's log)")

    routes = [
        Route("/", index, methods=["GET"]),
        Route("/predict", predict_endpoint, methods=["POST"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/info", info_endpoint, methods=["GET"]),
        Route("/report", report_page, methods=["GET"]),
        Route("/openapi.json", openapi, methods=["GET"], include_in_schema=False),
        Route("/docs", docs, methods=["GET"], include_in_schema=False),
        RouteMount("/static", app=StaticFiles(directory=STATIC_DIR), name="static"),
    ]
    app = Starlette(routes=routes, exception_handlers={HTTPException: http_error, Exception: internal_error})
    if opts.access_log:
        app.add_middleware(apidocs.AccessLog, log=opts.log)
    return app


# ------------------------------------------------------------------ the command


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _bind(host: str, port: int) -> socket.socket:
    """Bind before the (slow) worker start, so a port in use fails at once."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise PipcookError(f"cannot bind {host}:{port}: {exc.strerror}") from None
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise PipcookError(f"cannot bind {host}:{port}: {exc.strerror}"
                           + (" (another server is using it; choose another with -p)" if exc.errno == 98 else "")) from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def input_columns(meta: dict) -> list[str] | None:
    """The input columns of a tabular model, from its dataset meta (`columns`, as sdk.from_csv sets it,
    or a dataflow's `standardize.columns`); None when the meta names none. The meta was written by
    the pipeline's scripts: only a short list of short strings is passed on."""
    found = meta.get("columns")
    if not isinstance(found, list) and isinstance(meta.get("standardize"), dict):
        found = meta["standardize"].get("columns")
    if not isinstance(found, list) or not found or len(found) > 1024 or \
            not all(isinstance(c, str) and 0 < len(c) <= 128 for c in found):
        return None
    return list(found)


def model_info(model: models.Model, opts: ServeOptions) -> dict:
    """What the demo page needs to adapt itself to the model."""
    categories = model.meta.get("categories")
    return {"type": model.type, "categories": categories if isinstance(categories, list) else None,
            "columns": input_columns(model.meta),
            "report": "/report" if (model.dir / report.REPORT_NAME).is_file() else None,
            "maxBytes": opts.max_body, "maxInputs": MAX_INPUTS}


def serve_model(location: str, opts: ServeOptions) -> None:
    import uvicorn

    if not is_loopback(opts.host):
        opts.warn(f"WARNING: serving on {opts.host}, not loopback: anyone who can reach this machine can send "
                  "inputs to the model. There is no authentication; put a proxy in front of it.")
    with models.open_model(location, opts.allow_private) as model_dir, \
            tempfile.TemporaryDirectory(prefix="pcsb-serve-ws-") as tmp:
        model = models.load(model_dir)
        ws, copies, framework, worker_site = models.prepare(model, Path(tmp), isolation=opts.isolation, gpu=opts.gpu,
                                                            allow_private=opts.allow_private, log=opts.log,
                                                            mirror=opts.mirror)
        sock = _bind(opts.host, opts.port)
        worker = WarmWorker(model, ws, copies, framework, worker_site, opts)
        try:
            worker.start()
            service = Service(worker, opts)
            config = uvicorn.Config(create_app(service, model_info(model, opts), model.dir / report.REPORT_NAME),
                                    log_level="warning", access_log=False, lifespan="off", timeout_graceful_shutdown=5)
            host, port = sock.getsockname()[:2]
            shown = f"[{host}]" if ":" in host else host
            opts.log(f"serving {model.type or 'model'} from {location} on http://{shown}:{port}/ "
                     f"(POST /predict, GET /healthz, API docs at /docs; Ctrl-C stops)")
            if opts.debug:
                opts.log(f"serve: the worker's output goes to {worker.log_path}")
            try:
                uvicorn.Server(config).run(sockets=[sock])
            except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it shut down on: a normal stop
                pass
            opts.log("serve: stopped")
        finally:
            worker.stop()
            sock.close()
