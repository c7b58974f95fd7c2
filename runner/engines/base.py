"""The interface between the service's scheduler and whatever executes a run.

An engine runs one `RunRequest` as one process tree (`local`) or one batch job
(`slurm`) executing

    python -m pipcook_sandbox run RUN_DIR/pipeline.json -o RUN_DIR/workspace \
        --json --isolation ISOLATION --memory ... --cpus ... --pids ... \
        --disk ... --timeout ... [--gpu] [--stage-uid UID] [--allow-private HOST ...]

with stdout (the `--json` event stream, one JSON object per line) appended to
`RUN_DIR/events.jsonl` and stderr to `RUN_DIR/runner.log`. The run's verdict
is its exit status (0 succeeded, 1 failed, 130/143 interrupted) plus the
final `{"event": "verdict", ...}` line of the event stream; the engine reports
only what it observed of the process or job (`JobState`), and the service
reads the events file for progress, metrics and the error paragraph.

Engines keep no state of their own that the service could lose: everything
needed to find a run again after a server restart is the `job_id` string the
service stores in its database (a pid + start time for `local`, a Slurm job
id for `slurm`), passed back to `poll`/`cancel`/`forget`.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pipcook_sandbox.runner.errors import EngineError  # noqa: F401  (the engines raise it from here)

# Job states as an engine sees them. The service maps them onto run states
# (queued, running, succeeded, failed, canceled).
PENDING = "pending"  # accepted by the engine, not started (e.g. held in Slurm's queue)
RUNNING = "running"
SUCCEEDED = "succeeded"
FAILED = "failed"
CANCELED = "canceled"
GONE = "gone"  # the engine has no record of the job any more (e.g. lost across a restart)
FINAL_STATES = frozenset({SUCCEEDED, FAILED, CANCELED, GONE})


@dataclass(frozen=True)
class RunRequest:
    """Everything an engine needs to start one run; built by the service."""

    run_id: str
    tenant: str
    run_dir: Path  # holds pipeline.json, events.jsonl, runner.log and workspace/
    isolation: str = "bwrap"  # "bwrap" | "docker"
    memory: int = 4 << 30  # bytes, per stage
    cpus: float = 1.0  # per stage
    pids: int = 256
    disk: int = 10 << 30  # bytes, per stage
    timeout: float = 3600.0  # seconds, per stage; the job's wall limit derives from it
    gpus: int = 0
    stage_uid: int | None = None  # the tenant's host uid for its stages (None: the default 65534)
    stage_gid: int | None = None
    account: str | None = None  # the Slurm account (the tenant's); ignored by `local`
    qos: str | None = None
    allow_private: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)  # extra environment for the runner process

    @property
    def pipeline(self) -> Path:
        return self.run_dir / "pipeline.json"

    @property
    def workspace(self) -> Path:
        return self.run_dir / "workspace"

    @property
    def events(self) -> Path:
        return self.run_dir / "events.jsonl"

    @property
    def runner_log(self) -> Path:
        return self.run_dir / "runner.log"


@dataclass(frozen=True)
class JobState:
    state: str  # one of PENDING, RUNNING, SUCCEEDED, FAILED, CANCELED, GONE
    exit_code: int | None = None
    reason: str = ""  # the engine's own words when it ended a job (e.g. "OUT_OF_MEMORY", "TIMEOUT")

    @property
    def final(self) -> bool:
        return self.state in FINAL_STATES


class Engine(ABC):
    """Starts, watches and stops runs. Implementations: local.py, slurm.py."""

    name: str
    # Whether a job keeps running when the server that submitted it dies (a Slurm job does; a local
    # runner gets SIGTERM from the kernel). After a restart the service keeps watching such jobs;
    # the others are stopped and their runs marked failed "server restarted".
    jobs_outlive_server: bool = False
    # Whether the engine holds each tenant to its own limits (Slurm: the tenant's account's GrpJobs,
    # GrpTRES, fair share). Then the service hands it every queued run at once and the engine's
    # queue is the queue; otherwise the service starts a tenant's runs only within its max-running.
    queues_tenants: bool = False
    # Called (from any thread) when a job may have ended, so that the service looks at once rather than
    # at its next period; set by the scheduler. Engines that cannot tell leave it uncalled.
    on_job_end: Callable[[], None] | None = None

    @abstractmethod
    def submit(self, request: RunRequest) -> str:
        """Start (or queue) the run; return the job id to store. Raises EngineError."""

    @abstractmethod
    def poll(self, job_id: str) -> JobState:
        """The job's state now. Never blocks for long; never raises for a finished or unknown job."""

    @abstractmethod
    def cancel(self, job_id: str) -> None:
        """Stop the job (SIGTERM to the runner, which tears its sandboxes down; `scancel`). Idempotent."""

    def recover(self, job_ids: list[str]) -> dict[str, JobState]:
        """After a server restart: the state of each job the database says was running."""
        return {job_id: self.poll(job_id) for job_id in job_ids}

    def ensure_tenant(self, tenant: str, quotas: dict[str, float | int | None]) -> None:
        """Make sure the engine knows `tenant` with these quotas (Slurm: its account). Called before
        a tenant's first run of a server's life and by `tenants add --slurm-account`; raises EngineError."""

    def capacity(self) -> dict[str, float] | None:
        """CPUs/memory/GPUs this engine may use at once, or None when the engine queues by itself (Slurm)."""
        return None

    def close(self) -> None:
        """Release what the engine holds (threads, sockets). Running jobs are left to `recover`."""
