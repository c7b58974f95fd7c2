"""The one small interface every isolation backend implements.

A backend takes a `StageSpec` (what to run, what to mount, which limits, its
typed `StageOptions`) and returns a `StageHandle`. Every backend is a subclass
of the abstract `Backend` below, registered by name in `backends/__init__.py`;
what differs between them is said by typed class attributes
(`translates_paths`, `image_has_site`), never probed. A new backend (a
Kubernetes Job, a per-tenant uid) is a new subclass, not a rewrite. Host-side
code: never mounted into a sandbox.

Paths inside every sandbox are the same whatever the backend:

    /pipcook/lib         the `sandbox` package (worker + SDK), read-only
    /pipcook/site        the worker's own dependencies, read-only
    /pipcook/framework   the framework, read-only (absent without one)
    /pipcook/scripts     the stage's script, read-only
    /pipcook/stage.json  the stage's configuration, read-only
    /pipcook/ipc/...     ZeroMQ sockets: the only paths shared between stages
    /workspace/...       data/, cache/, model/ as the stage's role allows
    /tmp                 private, size-capped
"""
from __future__ import annotations

import abc
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

# The one uid/gid every stage runs as on the host (nobody), whatever the backend.
SANDBOX_UID = SANDBOX_GID = 65534

IN_LIB = "/pipcook/lib"
IN_SITE = "/pipcook/site"
IN_FRAMEWORK = "/pipcook/framework"
IN_SCRIPTS = "/pipcook/scripts"
IN_STAGE_CONFIG = "/pipcook/stage.json"
IN_IPC = "/pipcook/ipc"
IN_WORKSPACE = "/workspace"

# The worker is started with `python -I -S -c BOOT`: isolated mode ignores
# PYTHON* variables and the user site, -S keeps the interpreter's own
# site-packages off sys.path, so only what we mount is importable.
BOOT = (
    "import sys; sys.path.insert(0, %r); "
    "from sandbox.worker import main; sys.exit(main(%r))" % (IN_LIB, IN_STAGE_CONFIG)
)
WORKER_ARGS = ["-I", "-S", "-c", BOOT]


@dataclass(frozen=True)
class Limits:
    """Per-stage limits. Sizes in bytes, times in seconds."""

    memory: int = 4 << 30
    cpus: float = 2.0
    pids: int = 256
    disk: int = 10 << 30
    timeout: float = 3600.0
    nofile: int = 4096
    output: int = 16 << 20  # captured stdout + stderr
    tmp: int = 1 << 30  # the private /tmp (memory-backed, counts against memory)
    downloads: int | None = None  # all of a run's ctx.download bytes together; None: `disk`

    def replace(self, **changes: Any) -> "Limits":
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class Mount:
    source: Path
    target: str
    writable: bool = False


@dataclass(frozen=True)
class StageOptions:
    """How a backend confines a stage, where there is a choice. None: the best this host offers."""

    # Where the backend keeps its per-stage state (records, volumes); None: a directory of its own.
    # The runner passes the run's state dir, so that one `rm` and one leftover scan cover a run.
    state_dir: Path | None = None
    uid_mode: str | None = None  # bwrap: "mapped" (root only) | "plain"
    disk_quota: str | None = None  # the writable dirs' quota: "loop" | "watch" (weaker)
    runtime: str | None = None  # docker: the OCI runtime ("runsc": gVisor); None: $PIPCOOK_DOCKER_RUNTIME


UID_MODES = ("mapped", "plain")
DISK_QUOTAS = ("loop", "watch")


@dataclass
class StageSpec:
    run_id: str
    name: str  # "datasource", "dataflow-1", "model", "predict"
    mounts: list[Mount]
    limits: Limits
    log_path: Path
    # Writable directories inside the stage, each one on the stage's disk quota.
    # Maps target inside the sandbox -> host directory that holds the result.
    writable: dict[str, Path] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    gpu: bool = False
    # Names for the operator (container labels, records): run_id, stage. Never options.
    labels: dict[str, str] = field(default_factory=dict)
    options: StageOptions = field(default_factory=StageOptions)
    # Arguments for the sandbox's python instead of WORKER_ARGS (None: run the
    # worker). For tests and probes that run a worker-free program.
    argv: list[str] | None = None


# Why a stage stopped, when it was not a plain exit. The orchestrator turns
# these into the user's one-paragraph message.
REASON_TIMEOUT = "timeout"
REASON_MEMORY = "memory"
# Killed for memory below its own limit: the limit of a cgroup above the runner
# (a batch job's --mem), shared by the runner and all its stages, ran out first.
REASON_MEMORY_SHARED = "memory-shared"
REASON_PIDS = "pids"
REASON_DISK = "disk"
REASON_OUTPUT = "output"
REASON_CANCELLED = "cancelled"
REASON_PROTOCOL = "protocol"


@dataclass
class Outcome:
    exit_code: int | None
    reason: str | None = None  # one of REASON_* or None
    detail: str = ""


class StageHandle(Protocol):
    name: str

    def poll(self) -> int | None:
        """Exit code once the stage has ended, else None. Never blocks."""

    def terminate(self, reason: str | None = None) -> None:
        """Kill every process of the stage. Idempotent; records the reason."""

    def outcome(self) -> Outcome:
        """After the stage ended: exit code and why it stopped."""

    def cleanup(self) -> None:
        """Release everything the stage held on the host (cgroups, mounts,
        containers) and copy its writable dirs out, links never followed.
        Idempotent; safe after a crash of the stage."""


class Backend(abc.ABC):
    """An isolation backend: starts stages, says what it confines here, removes what crashed runs left."""

    name: ClassVar[str]
    # Paths inside the stage are the IN_* paths above (False: the stage sees the host's own paths,
    # so the runner writes host paths into stage.json).
    translates_paths: ClassVar[bool] = True
    # The worker's own dependencies come with the sandbox (the Docker image) at IN_SITE.
    image_has_site: ClassVar[bool] = False

    @abc.abstractmethod
    def start(self, spec: StageSpec) -> StageHandle:
        """Start the stage; on failure, release whatever was made and raise a PipcookError."""

    @abc.abstractmethod
    def probe(self) -> dict:
        """What confinement this backend gives on this host (for `doctor`)."""

    @abc.abstractmethod
    def clean_leftovers(self) -> list[str]:
        """Remove what runs whose runner is gone left behind; a line per thing removed."""
