"""Which queued run starts next, and watching the runs that have started.

Fairness: round robin across tenants. Among tenants with a queued run that
may start (under their max-running), the one served least recently goes
first (a tenant never served yet before all others), and within a tenant
runs go in submission order. So a tenant with 100 queued runs gets one
start, then every other waiting tenant gets one, and so on: another
tenant's single run waits at most one start per other tenant.

Capacity: a run holds its per-stage memory times its number of stages (all
stages of a run are started at once and each may use its limit), its
per-stage CPUs once (the stages stream: a datasource or dataflow computes
when the model pulls, so mostly one stage computes at a time; each stays
capped by its own CPU limit), and its GPUs, from start to end.
When the next tenant's run does not fit what is free, nothing else starts
before it (no backfill): a big run is never starved by small ones. Runs that
could never fit are refused at submission (422). An engine that queues by
itself (Slurm: `capacity()` is None) gets every run a tenant's max-running
allows; one that also holds each tenant to its own limits (`queues_tenants`:
Slurm, through the tenant's account's GrpJobs = its max-running) gets every
queued run at once, and its queue decides (fair share, QOS, GrpJobs).

One thread does all of it, every SCHEDULE_PERIOD seconds or when woken: the
local engine's runners get SIGTERM when the thread that started them dies,
so that thread must live as long as the server.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipcook_sandbox.runner.engines import Engine, EngineError, JobState, RunRequest
from pipcook_sandbox.runner.engines import base as engine_base

from . import tenants as tenants_mod
from .db import CANCELED, FAILED, QUEUED, RUNNING, SUCCEEDED, Database
from .eventlog import Summaries

log = logging.getLogger(__name__)
SCHEDULE_PERIOD = 0.25
RESTART_GRACE = 60.0  # seconds a stopped runner gets to tear its sandboxes down at a restart
RESTARTED = ("server restarted: the run was stopped when the server went down and is not retried "
             "(its workspace is kept); submit it again")
STOPPED = "server stopped: the run was stopped when the server shut down (its workspace is kept); submit it again"


def tenant_quotas(tenant: tenants_mod.Tenant) -> dict[str, float | int | None]:
    """What an engine that enforces per-tenant limits (Slurm) is told of a tenant."""
    from pipcook_sandbox.runner.engines.slurm import tenant_quotas as as_slurm

    return as_slurm(max_running=tenant.max_running, max_queued=tenant.max_queued, cpus=tenant.cpus,
                    gpus=tenant.gpus)


def run_dir(data: Path, tenant: str, run_id: str) -> Path:
    return tenants_mod.tenant_dir(data, tenant) / "runs" / run_id


@dataclass
class Needs:
    cpus: float
    memory: float
    gpus: float

    @classmethod
    def of(cls, run: dict[str, Any]) -> Needs:
        return cls(run["cpus"], float(run["memory"]) * run["stages"], float(run["gpus"]))

    def fits(self, free: dict[str, float]) -> bool:
        return (self.cpus <= free["cpus"] + 1e-9 and self.memory <= free["memory"]
                and self.gpus <= free["gpus"])


class Scheduler:
    def __init__(self, db: Database, engine: Engine, data: Path, *, isolation: str = "bwrap",
                 allow_private: tuple[str, ...] = (), summaries: Summaries | None = None,
                 on_finished: Callable[[dict[str, Any], str], None] | None = None) -> None:
        self.db, self.engine, self.data = db, engine, Path(data)
        engine.on_job_end = self.wake
        self.isolation = isolation
        self.allow_private = allow_private
        self.summaries = summaries or Summaries()
        self.on_finished = on_finished
        self.on_started: Callable[[dict[str, Any]], None] | None = None
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._served: dict[str, float] = {}  # tenant -> when it last had a run started (monotonic order)
        self._known_tenants: set[str] = set()  # tenants the engine was told about (ensure_tenant) this life
        # run id -> what the engine last said of its job (e.g. Slurm holding it: pending, AssocGrpJobsLimit)
        self.job_states: dict[str, JobState] = {}
        self._turns = 0

    # --- life --------------------------------------------------------------------

    def start(self) -> None:
        self.recover()
        self._thread = threading.Thread(target=self._loop, name="scheduler", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def stop(self, timeout: float = RESTART_GRACE) -> None:
        """Stop scheduling; runs that would die with the server are stopped and marked failed."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if not self.engine.jobs_outlive_server:
            running = self.db.in_state(RUNNING)
            self._stop_all(running, STOPPED, timeout)
        self.engine.close()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.turn()
            except Exception:  # one bad turn (a full disk, say) must not end scheduling for good
                log.exception("scheduler turn failed")
            self._wake.wait(SCHEDULE_PERIOD)
            self._wake.clear()

    # --- restart -------------------------------------------------------------------

    def recover(self) -> None:
        """After a start (the last server may have died with runs in flight): queued runs stay
        queued; running runs whose jobs die with the server are stopped, their sandboxes removed,
        and marked failed "server restarted" (never requeued: a run may have had effects, such as
        downloads, that a silent second try would repeat); jobs that outlive it are watched again."""
        running = self.db.in_state(RUNNING)
        if self.engine.jobs_outlive_server:
            states = self.engine.recover([r["job_id"] for r in running if r["job_id"]])
            for run in running:
                state = states.get(run["job_id"]) if run["job_id"] else JobState(engine_base.GONE)
                if state is not None and state.final:
                    self._finish(run, state)
        else:
            self._stop_all(running, RESTARTED, RESTART_GRACE)
        from pipcook_sandbox.runner.cleanup import clean_all

        for item in clean_all():  # sandboxes of runners that are gone: mounts, cgroups, containers
            log.warning("removed leftover %s", item)

    def _stop_all(self, runs: list[dict[str, Any]], why: str, timeout: float) -> None:
        for run in runs:
            if run["job_id"]:
                self.engine.cancel(run["job_id"])
        deadline = time.monotonic() + timeout
        for run in runs:
            if run["job_id"]:
                while time.monotonic() < deadline and not self.engine.poll(run["job_id"]).final:
                    time.sleep(0.1)
            if self.db.transition(run["id"], FAILED, expect=(RUNNING,), note=why.split(":")[0], error=why):
                self._finished(run, FAILED)

    # --- one turn ------------------------------------------------------------------

    def turn(self) -> None:
        self._turns += 1
        present = {t.name for t in tenants_mod.all_tenants(self.db)}
        for run in self.db.in_state(RUNNING):
            if run["tenant"] not in present and not run["cancel_requested"]:
                self.db.execute("UPDATE runs SET cancel_requested = 1 WHERE id = ?", (run["id"],))
                run["cancel_requested"] = 1
            if not run["job_id"]:
                continue  # being started right now by this thread: cannot happen; by a dead server: recover()
            if run["cancel_requested"]:
                self.engine.cancel(run["job_id"])
            state = self.engine.poll(run["job_id"])
            self.job_states[run["id"]] = state
            if state.final:
                self._finish(run, state)
                self.job_states.pop(run["id"], None)
        self._schedule()

    def _finish(self, run: dict[str, Any], state: JobState) -> None:
        path = run_dir(self.data, run["tenant"], run["id"]) / "events.jsonl"
        verdict = self.summaries.get(run["id"], path).verdict or {}
        fields: dict[str, Any] = {"exit_code": state.exit_code}
        if run["cancel_requested"] or state.state == engine_base.CANCELED:
            to, note = CANCELED, "canceled"
            fields["error"] = "canceled by the tenant: every stage was stopped; the workspace is kept"
        # Success needs the runner's own verdict: an exit status of 0 alone may be a runner that never ran
        # the run (a warm runner handed a job as it expired), and an empty workspace is not a success.
        elif state.state == engine_base.SUCCEEDED and verdict.get("status") == "succeeded":
            to, note = SUCCEEDED, "succeeded"
        else:
            to, note = FAILED, "failed"
            fields["error"] = verdict.get("error") or self._no_verdict(run, state)
        if self.db.transition(run["id"], to, expect=(RUNNING,), note=note, **fields):
            self._finished(run, to)

    def _no_verdict(self, run: dict[str, Any], state: JobState) -> str:
        how = {engine_base.GONE: "disappeared (its process or job is gone)"}.get(
            state.state, f"ended with exit status {state.exit_code}" + (f" ({state.reason})" if state.reason else ""))
        tail = ""
        try:
            with open(run_dir(self.data, run["tenant"], run["id"]) / "runner.log", "rb") as f:
                f.seek(max(0, os.fstat(f.fileno()).st_size - 600))
                from pipcook_sandbox.runner.control import shown

                tail = shown(f.read().decode("utf-8", "replace").strip().replace("\n", " | "), 600)
        except OSError:
            pass
        return f"the runner {how} without a verdict" + (f"; its last output: {tail}" if tail else "")

    def _finished(self, run: dict[str, Any], state: str) -> None:
        if self.on_finished is not None:
            self.on_finished(run, state)

    # --- choosing ----------------------------------------------------------------

    def free(self, running: list[dict[str, Any]]) -> dict[str, float] | None:
        capacity = self.engine.capacity()
        if capacity is None:
            return None
        free = {k: float(capacity.get(k, 0.0)) for k in ("cpus", "memory", "gpus")}
        for run in running:
            needs = Needs.of(run)
            free["cpus"] -= needs.cpus
            free["memory"] -= needs.memory
            free["gpus"] -= needs.gpus
        return free

    def _schedule(self) -> None:
        if self._stop.is_set():
            return
        running = self.db.in_state(RUNNING)
        free = self.free(running)
        per_tenant: dict[str, int] = {}
        for run in running:
            per_tenant[run["tenant"]] = per_tenant.get(run["tenant"], 0) + 1
        queues: dict[str, list[dict[str, Any]]] = {}
        for run in self.db.in_state(QUEUED):
            queues.setdefault(run["tenant"], []).append(run)
        limits = {t.name: t for t in tenants_mod.all_tenants(self.db)}
        while queues:
            # An engine that holds each tenant to its own limits (Slurm's GrpJobs) gets every queued run.
            eligible = [t for t in queues if t in limits
                        and (self.engine.queues_tenants or per_tenant.get(t, 0) < limits[t].max_running)]
            if not eligible:
                return
            # least recently served first; never served before all; ties: whose head was submitted first
            tenant = min(eligible, key=lambda t: (self._served.get(t, -1.0), queues[t][0]["seq"]))
            run = queues[tenant][0]
            if free is not None:
                needs = Needs.of(run)
                if not needs.fits(free):
                    return  # no backfill: this run is next, whatever frees up goes to it
                free["cpus"] -= needs.cpus
                free["memory"] -= needs.memory
                free["gpus"] -= needs.gpus
            queues[tenant].pop(0)
            if not queues[tenant]:
                del queues[tenant]
            self._served[tenant] = time.monotonic()
            if self._start(run, limits[tenant]):
                per_tenant[tenant] = per_tenant.get(tenant, 0) + 1

    def _start(self, run: dict[str, Any], tenant: tenants_mod.Tenant) -> bool:
        if not self.db.transition(run["id"], RUNNING, expect=(QUEUED,), note="started"):
            return False  # canceled meanwhile
        directory = run_dir(self.data, run["tenant"], run["id"])
        cache = tenants_mod.tenant_dir(self.data, tenant.name) / "cache"
        root = os.geteuid() == 0
        request = RunRequest(
            run_id=run["id"], tenant=run["tenant"], run_dir=directory, isolation=self.isolation,
            memory=int(run["memory"]), cpus=float(run["cpus"]), pids=int(run["pids"]), disk=int(run["disk"]),
            timeout=float(run["timeout"]), gpus=int(run["gpus"]),
            stage_uid=tenant.uid if root else None, stage_gid=tenant.uid if root else None,
            account=tenant.name, allow_private=self.allow_private,
            env={"PIPCOOK_SANDBOX_DOWNLOAD_CACHE": str(cache)})
        try:
            if tenant.name not in self._known_tenants:
                self.engine.ensure_tenant(tenant.name, tenant_quotas(tenant))
                self._known_tenants.add(tenant.name)
            job_id = self.engine.submit(request)
        except EngineError as exc:
            if self.db.transition(run["id"], FAILED, expect=(RUNNING,), note="engine refused", error=str(exc)):
                self._finished(run, FAILED)
            return False
        self.db.execute("UPDATE runs SET job_id = ? WHERE id = ?", (job_id, run["id"]))
        if self.on_started is not None:
            self.on_started(run)
        return True
