"""The HTTP API of `pipcook-sandbox server` (FastAPI on Starlette/uvicorn).

Every route under /v1 needs `Authorization: Bearer TOKEN`; a tenant sees
only its own runs (another tenant's run id answers 404, exactly as a run
that does not exist). Errors are `{"detail": "<one paragraph>"}`. The
OpenAPI schema at /openapi.json is generated from the models below.
"""
from __future__ import annotations

import asyncio
import json
import os
import re
import stat
import threading
import time
import zipfile
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Request, Response
from fastapi.responses import FileResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator

from pipcook_sandbox.runner.engines import Engine
from pipcook_sandbox.runner.errors import PipcookError
from pipcook_sandbox.runner.limits import parse_size

from . import submit as submit_mod
from . import tenants as tenants_mod
from .db import ACTIVE, CANCELED, FINAL, QUEUED, RUNNING, Database
from .eventlog import Summaries, read_from
from .metrics import Metrics
from .scheduler import Scheduler, run_dir

STAGE_RE = re.compile(r"^(datasource|model|dataflow-[0-9]{1,3}|runner)$")
SSE_POLL = 0.2
FETCHES_PER_TENANT = 2  # pipeline_url downloads a tenant may have in flight (each holds a worker thread)


# --- models --------------------------------------------------------------------------


class Limits(BaseModel):
    model_config = ConfigDict(extra="forbid")
    cpus: float | None = Field(default=None, description="CPUs per stage (at most the tenant's quota)")
    memory: int | str | None = Field(default=None, description="Memory per stage: bytes, or a size like 512m")
    disk: int | str | None = Field(default=None, description="All a stage may write: bytes, or a size like 1g")
    timeout: float | None = Field(default=None, description="Wall-clock seconds per stage")
    pids: int | None = Field(default=None, description="Processes and threads per stage")


class RunCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    pipeline: dict[str, Any] | None = Field(default=None, description="An inline pipeline (absolute http(s) references only)")
    pipeline_url: str | None = Field(default=None, max_length=2000, description="An http(s) URL of a pipeline file")
    limits: Limits | None = None
    gpu: bool | int = Field(default=False, description="GPUs for the model stage (true = 1)")

    @model_validator(mode="after")
    def one_source(self) -> RunCreate:
        if (self.pipeline is None) == (self.pipeline_url is None):
            raise ValueError("give exactly one of 'pipeline' (an object) or 'pipeline_url'")
        return self


class RunAccepted(BaseModel):
    id: str
    status: str = Field(description="queued, running, succeeded, failed or canceled")


class Transition(BaseModel):
    state: str
    at: float
    note: str


class RunInfo(BaseModel):
    id: str
    status: str
    tenant: str
    source: str
    created: float
    started: float | None = None
    ended: float | None = None
    limits: dict[str, Any]
    queue_position: int | None = Field(default=None, description="Runs of this tenant ahead of it in the queue")
    stages: dict[str, str] = Field(default_factory=dict, description="Each stage's state, from the run's events")
    progress: float | None = None
    metrics: dict[str, Any] = Field(default_factory=dict, description="The latest value of each metric")
    error: str | None = Field(default=None, description="Why it failed, in one paragraph")
    exit_code: int | None = None
    artifacts: list[str] = Field(default_factory=list)
    transitions: list[Transition] = Field(default_factory=list)
    job: dict[str, Any] | None = Field(None, description="The engine's job (its id: a Slurm job id for sacct) and, "
                                       "while running, its state and reason (e.g. Slurm holding it: pending, "
                                       "AssocGrpJobsLimit)")


class RunList(BaseModel):
    runs: list[RunInfo]


def tenant_of(request: Request) -> tenants_mod.Tenant:
    """The tenant whose bearer token the request carries, else 401."""
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    db = request.app.state.service.db
    found = tenants_mod.authenticate(db, token.strip()) if scheme.lower() == "bearer" else None
    if found is None:
        raise HTTPException(401, "a valid token is needed: send 'Authorization: Bearer TOKEN' with the token "
                                 "the operator gave you (`pipcook-sandbox tenants add` or `tenants token`)",
                            headers={"WWW-Authenticate": "Bearer"})
    return found


TenantDep = Annotated[tenants_mod.Tenant, Depends(tenant_of)]


# --- the service -------------------------------------------------------------------------


@dataclass
class Service:
    db: Database
    engine: Engine
    data: Path
    isolation: str = "bwrap"
    allow_private: tuple[str, ...] = ()
    summaries: Summaries = field(default_factory=Summaries)
    scheduler: Scheduler | None = None
    metrics: Metrics | None = None

    def __post_init__(self) -> None:
        self.metrics = Metrics(self.db)
        self.scheduler = Scheduler(self.db, self.engine, self.data, isolation=self.isolation,
                                   allow_private=self.allow_private, summaries=self.summaries,
                                   on_finished=lambda run, state: self.metrics.finished(run, state, time.time())
                                   if self.metrics else None)
        self.scheduler.on_started = lambda run: self.metrics.started(run, time.time()) if self.metrics else None

    def start(self) -> None:
        assert self.scheduler is not None
        self.scheduler.start()

    def stop(self) -> None:
        assert self.scheduler is not None
        self.scheduler.stop()


def create_app(service: Service) -> FastAPI:
    app = FastAPI(title="pipcook-sandbox service", version="1",
                  description="Runs untrusted machine-learning pipelines for many tenants, each stage sandboxed.")
    app.state.service = service
    tenancy = _Tenancy(service)
    _add_body_cap(app)
    _add_run_routes(app, service, tenancy)
    _add_output_routes(app, service, tenancy)
    _add_operator_routes(app, service)
    return app


class _Tenancy:
    """What every route needs: the tenant's own runs only, their directories, their public view."""

    def __init__(self, service: Service) -> None:
        self.service = service
        self.db = service.db
        self.fetching: dict[str, int] = {}
        self.fetching_lock = threading.Lock()

    def fetch_for(self, tenant: tenants_mod.Tenant, url: str) -> dict[str, Any]:
        """A slow server named by one tenant must not hold every worker thread: a few fetches each."""
        with self.fetching_lock:
            if self.fetching.get(tenant.name, 0) >= FETCHES_PER_TENANT:
                raise submit_mod.Rejected(429, f"tenant {tenant.name!r} has {FETCHES_PER_TENANT} pipeline_url "
                                               "downloads in flight already; wait for them to finish")
            self.fetching[tenant.name] = self.fetching.get(tenant.name, 0) + 1
        try:
            return submit_mod.fetch_pipeline(url, self.service.allow_private)
        finally:
            with self.fetching_lock:
                self.fetching[tenant.name] -= 1

    def own_run(self, run_id: str, tenant: tenants_mod.Tenant) -> dict[str, Any]:
        run = self.db.run(run_id, tenant.name) if len(run_id) <= 64 else None
        if run is None:
            raise HTTPException(404, f"no run {run_id[:64]!r} among this tenant's runs")
        return run

    def workspace(self, run: dict[str, Any]) -> Path:
        return run_dir(self.service.data, run["tenant"], run["id"]) / "workspace"

    def info(self, run: dict[str, Any], detail: bool = True) -> RunInfo:
        directory = run_dir(self.service.data, run["tenant"], run["id"])
        summary = self.service.summaries.get(run["id"], directory / "events.jsonl")
        position = None
        if run["state"] == QUEUED:
            row = self.db.one("SELECT count(*) AS n FROM runs WHERE tenant = ? AND state = ? AND seq < ?",
                              (run["tenant"], QUEUED, run["seq"]))
            position = int(row["n"]) if row else None
        return RunInfo(
            id=run["id"], status=run["state"], tenant=run["tenant"], source=run["source"], created=run["created"],
            started=run["started"], ended=run["ended"], queue_position=position,
            limits={k: run[k] for k in ("cpus", "memory", "disk", "timeout", "pids", "gpus")},
            stages=summary.stages, progress=summary.progress, metrics=summary.metrics, error=run["error"],
            exit_code=run["exit_code"], artifacts=list_artifacts(self.workspace(run)) if detail else [],
            transitions=[Transition(**t) for t in self.db.transitions(run["id"])] if detail else [],
            job=self.job_info(run))

    def job_info(self, run: dict[str, Any]) -> dict[str, Any] | None:
        if not run["job_id"]:
            return None
        service = self.service
        seen = service.scheduler.job_states.get(run["id"]) if service.scheduler and run["state"] == RUNNING else None
        return {"engine": service.engine.name, "id": run["job_id"], "state": seen.state if seen else None,
                "reason": seen.reason if seen else None}


def _add_body_cap(app: FastAPI) -> None:
    @app.middleware("http")
    async def cap_body(request: Request, call_next: Any) -> Any:
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > submit_mod.MAX_BODY):
            return PlainTextResponse(json.dumps({"detail": f"the request body is larger than {submit_mod.MAX_BODY} "
                                                           "bytes, the cap on what a request may send"}),
                                     status_code=413, media_type="application/json")
        if length is None and "chunked" in request.headers.get("transfer-encoding", "").lower():
            return PlainTextResponse(json.dumps({"detail": "a request body needs a Content-Length header"}),
                                     status_code=411, media_type="application/json")
        return await call_next(request)


def _add_run_routes(app: FastAPI, service: Service, h: _Tenancy) -> None:
    db = service.db

    @app.post("/v1/runs", status_code=202, response_model=RunAccepted,
              responses={401: {}, 413: {}, 422: {}, 429: {}})
    def create_run(body: RunCreate, tenant: TenantDep) -> RunAccepted:
        """Queue a run of a pipeline (inline or by URL), within the tenant's quota."""
        try:
            if body.pipeline is not None:
                pipeline = submit_mod.check_inline(body.pipeline)
                source = "inline"
            else:
                assert body.pipeline_url is not None
                pipeline = h.fetch_for(tenant, body.pipeline_url)
                source = body.pipeline_url
            limits = body.limits or Limits()
            try:
                asked = submit_mod.Asked(
                    cpus=limits.cpus, timeout=limits.timeout, pids=limits.pids, gpus=int(body.gpu),
                    memory=parse_size(str(limits.memory), "limits.memory") if limits.memory is not None else None,
                    disk=parse_size(str(limits.disk), "limits.disk") if limits.disk is not None else None)
            except PipcookError as exc:
                raise submit_mod.Rejected(422, str(exc)) from None
            decided = submit_mod.decide_limits(tenant, asked, service.engine.capacity(),
                                               submit_mod.stage_count(pipeline))
            run = submit_mod.enqueue(db, service.data, tenant, pipeline, source, decided,
                                     engine_queues=service.engine.queues_tenants)
        except submit_mod.Rejected as exc:
            raise HTTPException(exc.status, str(exc)) from None
        assert service.scheduler is not None
        service.scheduler.wake()
        return RunAccepted(id=run["id"], status=QUEUED)

    @app.get("/v1/runs", response_model=RunList)
    def list_runs(tenant: TenantDep, status: str | None = None, limit: int = 100) -> RunList:
        """This tenant's runs, newest first."""
        rows = db.runs(tenant.name, max(1, min(limit, 1000)), status)
        return RunList(runs=[h.info(r, detail=False) for r in rows])

    @app.get("/v1/runs/{run_id}", response_model=RunInfo)
    def get_run(run_id: str, tenant: TenantDep) -> RunInfo:
        """State, stage progress, latest metrics and the error paragraph of one run."""
        return h.info(h.own_run(run_id, tenant))

    @app.post("/v1/runs/{run_id}/cancel", status_code=202, response_model=RunAccepted)
    def cancel_run(run_id: str, tenant: TenantDep) -> RunAccepted:
        """Cancel a run in any state: a queued one at once, a running one as soon as its sandboxes are down."""
        run = h.own_run(run_id, tenant)
        if db.transition(run_id, CANCELED, expect=(QUEUED,), note="canceled while queued",
                         error="canceled by the tenant before it started"):
            return RunAccepted(id=run_id, status=CANCELED)
        if run["state"] == RUNNING or (db.run(run_id) or {}).get("state") == RUNNING:  # None: deleted meanwhile
            db.execute("UPDATE runs SET cancel_requested = 1 WHERE id = ? AND state = ?", (run_id, RUNNING))
            assert service.scheduler is not None
            service.scheduler.wake()
        current = db.run(run_id)
        return RunAccepted(id=run_id, status=current["state"] if current else CANCELED)

    @app.delete("/v1/runs/{run_id}", status_code=204, responses={409: {}})
    def delete_run(run_id: str, tenant: TenantDep) -> Response:
        """Forget a finished run and delete its workspace (cancel a queued or running one first)."""
        run = h.own_run(run_id, tenant)
        if run["state"] in ACTIVE:
            raise HTTPException(409, f"run {run_id} is {run['state']}: cancel it first, then delete it")
        import shutil

        shutil.rmtree(run_dir(service.data, run["tenant"], run_id), ignore_errors=True)
        db.delete_run(run_id)
        service.summaries.forget(run_id)
        return Response(status_code=204)


def _add_output_routes(app: FastAPI, service: Service, h: _Tenancy) -> None:
    db = service.db

    @app.get("/v1/runs/{run_id}/logs/{stage}", response_class=PlainTextResponse)
    def stage_log(run_id: str, stage: str, tenant: TenantDep) -> Response:
        """What a stage wrote to stdout/stderr (`runner` for the runner's own log). Stage output is
        hostile text: escape it before showing it on a terminal."""
        run = h.own_run(run_id, tenant)
        if not STAGE_RE.match(stage):
            raise HTTPException(404, f"no stage {stage[:64]!r}: stages are datasource, dataflow-N, model, runner")
        directory = run_dir(service.data, run["tenant"], run_id)
        path = directory / "runner.log" if stage == "runner" else directory / "workspace" / "logs" / f"{stage}.log"
        if not _regular(path):
            raise HTTPException(404, f"stage {stage!r} of run {run_id} has no log (yet)")
        return FileResponse(path, media_type="text/plain; charset=utf-8")

    @app.get("/v1/runs/{run_id}/events")
    async def run_events(run_id: str, request: Request, tenant: TenantDep) -> StreamingResponse:
        """The run's events as server-sent events (`event:` the kind, `data:` the JSON object,
        `id:` a byte offset to resume from with Last-Event-ID), until it ends; then one `state` event."""
        run = h.own_run(run_id, tenant)
        start = request.headers.get("last-event-id", "0")
        offset = int(start) if start.isdigit() else 0
        path = run_dir(service.data, run["tenant"], run_id) / "events.jsonl"

        async def stream() -> AsyncIterator[bytes]:
            nonlocal offset
            while True:
                current = db.run(run_id)
                found, offset = await asyncio.to_thread(read_from, path, offset)
                for end, event in found:
                    yield f"id: {end}\nevent: {event['event']}\ndata: {json.dumps(event)}\n\n".encode()
                if current is None or (current["state"] in FINAL and not found):
                    state = {"id": run_id, "status": current["state"] if current else "deleted",
                             "error": current["error"] if current else None}
                    yield f"event: state\ndata: {json.dumps(state)}\n\n".encode()
                    return
                if not found:
                    if await request.is_disconnected():
                        return
                    yield b": keep-alive\n\n"
                    await asyncio.sleep(SSE_POLL)

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.get("/v1/runs/{run_id}/model.zip", response_class=FileResponse)
    def model_zip(run_id: str, tenant: TenantDep) -> Response:
        """The trained model: the pipeline's zip artifact if it made one, else model/ zipped."""
        run = h.own_run(run_id, tenant)
        if run["state"] != "succeeded":
            raise HTTPException(409, f"run {run_id} is {run['state']}: a model exists only after it succeeded")
        ws = h.workspace(run)
        made = ws / "model.zip"
        if not _regular(made):
            made = run_dir(service.data, run["tenant"], run_id) / "model.zip"
            if not _regular(made):
                _zip_dir(ws / "model", made)
        return FileResponse(made, media_type="application/zip", filename=f"{run_id}-model.zip")

    @app.get("/v1/runs/{run_id}/artifacts", response_model=list[str])
    def artifacts(run_id: str, tenant: TenantDep) -> list[str]:
        """The files the pipeline's artifact processors wrote."""
        return list_artifacts(h.workspace(h.own_run(run_id, tenant)))

    @app.get("/v1/runs/{run_id}/artifacts/{name}", response_class=FileResponse)
    def artifact(run_id: str, name: str, tenant: TenantDep) -> Response:
        ws = h.workspace(h.own_run(run_id, tenant))
        if name not in list_artifacts(ws):
            raise HTTPException(404, f"no artifact {name[:100]!r} in run {run_id}")
        path = ws / "artifacts" / name if _regular(ws / "artifacts" / name) else ws / name
        return FileResponse(path, filename=name)


def _add_operator_routes(app: FastAPI, service: Service) -> None:
    @app.get("/metrics", response_class=PlainTextResponse)
    def metrics() -> Response:
        """Prometheus metrics: runs by state, queue depth and running per tenant, wait and run durations."""
        assert service.metrics is not None
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(service.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/healthz", response_class=PlainTextResponse)
    def healthz() -> str:
        return "ok"


WORKSPACE_FILES = {"pipeline.json", "metrics.jsonl"}


def _regular(path: Path) -> bool:
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def list_artifacts(ws: Path) -> list[str]:
    """Regular files at the workspace's top (but its own) and in artifacts/; never a link."""
    names: list[str] = []
    for folder in (ws, ws / "artifacts"):
        try:
            with os.scandir(folder) as entries:
                for entry in entries:
                    if entry.is_file(follow_symlinks=False) and entry.name not in WORKSPACE_FILES:
                        names.append(entry.name)
        except OSError:
            continue
    return sorted(set(names))


def _zip_dir(src: Path, dest: Path) -> None:
    """model/ as a zip: regular files only, links never followed (the stage wrote them)."""
    tmp = dest.with_name(f".{dest.name}.{threading.get_ident()}.tmp")  # two requests at once: two temp files
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
        for root, dirs, files in os.walk(src, followlinks=False):
            for name in files:
                path = Path(root) / name
                if _regular(path):
                    zf.write(path, path.relative_to(src).as_posix())
    os.replace(tmp, dest)
