"""The local engine: each run is a `pipcook-sandbox run --json` process on this host.

One process per run, so a run that crashes (or is killed for memory) takes
only itself down. The process leads a session of its own (so a terminal's
signals never reach it, and a stuck one can be killed as a group), and has
PR_SET_PDEATHSIG set to SIGTERM: when the server dies, even by `kill -9`,
the kernel sends each runner SIGTERM and the runner tears its sandboxes
down as it does on Ctrl-C (bwrap's --die-with-parent and the Docker
backend's leftover sweep cover a runner that dies before that). PDEATHSIG
fires when the *thread* that started the process exits, so `submit` must
be called from a thread that lives as long as the server (the scheduler's).

A job id is `PID:START` (START: the process's start time in clock ticks
since boot, /proc/PID/stat field 22), so a recycled pid is never mistaken
for the run after a restart.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any

from .base import (
    CANCELED,
    FAILED,
    GONE,
    RUNNING,
    SUCCEEDED,
    Engine,
    EngineError,
    JobState,
    RunRequest,
)
from .warmpool import EXIT_NO_JOB, WarmRunners, pool_key

# command(): [python, -m, pipcook_sandbox, run, PIPELINE, -o, WORKSPACE, options...]; the options are
# the run's kind (a warm runner's key), the rest is the run itself.
RUN_OPTIONS = 7
KILL_GRACE = 30.0  # seconds a canceled runner gets to tear its sandboxes down before SIGKILL


def command(request: RunRequest, python: str | None = None) -> list[str]:
    """The run as a user would type it (the Slurm engine runs the same line)."""
    argv = [python or sys.executable, "-m", "pipcook_sandbox", "run", str(request.pipeline),
            "-o", str(request.workspace), "--json", "--isolation", request.isolation,
            "--memory", str(request.memory), "--cpus", f"{request.cpus:g}", "--pids", str(request.pids),
            "--disk", str(request.disk), "--timeout", f"{request.timeout:g}",
            "--gpu" if request.gpus > 0 else "--no-gpu"]
    if request.stage_uid is not None:
        gid = request.stage_gid if request.stage_gid is not None else request.stage_uid
        argv += ["--stage-uid", f"{request.stage_uid}:{gid}"]
    for host in request.allow_private:
        argv += ["--allow-private", host]
    return argv


def _start_ticks(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    # the command name (field 2) may hold spaces and parentheses: split after its last ')'
    fields = data[data.rindex(b")") + 2:].split()
    try:
        if fields[0] == b"Z":  # a zombie has finished
            return None
        return int(fields[19])
    except (IndexError, ValueError):
        return None


# Sets PR_SET_PDEATHSIG, then execs the run's command (the setting survives execve). Done in a
# small program rather than a preexec_fn, which is unsafe in a threaded server. If the server
# died before prctl took effect, the parent pid has changed already: exit instead of running.
DEATH_WRAPPER = r"""
import ctypes, os, signal, sys
ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0)
if os.getppid() != int(sys.argv[1]):
    sys.exit(143)
os.execv(sys.argv[2], sys.argv[2:])
"""


class LocalEngine(Engine):
    name = "local"

    def __init__(self, cpus: float | None = None, memory: int | None = None, gpus: int = 0,
                 python: str | None = None, warm: int = 0, warm_total: int | None = None,
                 warm_idle: float = 300.0) -> None:
        self.cpus = float(cpus if cpus is not None else os.cpu_count() or 1)
        self.memory = memory if memory is not None else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        self.gpus = gpus
        self.python = python
        self._procs: dict[str, subprocess.Popen] = {}
        self._canceled: dict[str, float] = {}
        self._warm_procs: set[int] = set()  # pids of the runs handed to warm runners
        self._lock = threading.Lock()
        # `warm` runners kept started per tenant and option set (warmpool.py), `warm_total` in all
        self.warm = WarmRunners(warm, warm_total if warm_total is not None else 4 * warm, warm_idle,
                                DEATH_WRAPPER, python) if warm > 0 else None

    def submit(self, request: RunRequest) -> str:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PIPCOOK_SANDBOX_TOKEN")}
        env.update(request.env)
        env["PYTHONUNBUFFERED"] = "1"
        argv = command(request, self.python)
        proc = self._submit_warm(request, argv, env) if self.warm is not None else None
        if proc is None:
            proc = self._submit_cold(request, argv, env)
        else:
            self._warm_procs.add(proc.pid)
        if self.warm is not None:  # the tenant's next run of this kind finds one ready
            self.warm.fill(pool_key(request, argv[RUN_OPTIONS:]), env, argv[RUN_OPTIONS:])
        job_id = f"{proc.pid}:{_start_ticks(proc.pid) or 0}"
        threading.Thread(target=self._watch, args=(proc,), name=f"job-{proc.pid}", daemon=True).start()
        with self._lock:
            self._procs[job_id] = proc
        return job_id

    def _watch(self, proc: subprocess.Popen) -> None:
        """Tell the service the moment the runner exits (its terminal state is read then, not a period later)."""
        proc.wait()
        if self.on_job_end is not None:
            self.on_job_end()

    def _submit_cold(self, request: RunRequest, argv: list[str], env: dict[str, str]) -> subprocess.Popen:
        try:
            with open(request.events, "ab") as out, open(request.runner_log, "ab") as err:
                return subprocess.Popen([sys.executable, "-I", "-S", "-c", DEATH_WRAPPER, str(os.getpid()), *argv],
                                        stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                        cwd=request.run_dir, env=env, start_new_session=True)
        except OSError as exc:
            raise EngineError(f"could not start the runner for run {request.run_id}: {exc}") from None

    def _submit_warm(self, request: RunRequest, argv: list[str], env: dict[str, str]) -> subprocess.Popen | None:
        """The run handed to a warm runner of its exact key, or None (none ready: it starts cold)."""
        assert self.warm is not None
        for path in (request.events, request.runner_log):  # made by the server, as for a cold run
            with open(path, "ab"):
                pass
        job = {"argv": argv[3:], "stdout": str(request.events), "stderr": str(request.runner_log),
               "cwd": str(request.run_dir)}
        return self.warm.take(pool_key(request, argv[RUN_OPTIONS:]), job)

    def poll(self, job_id: str) -> JobState:
        with self._lock:
            proc = self._procs.get(job_id)
        if proc is None:  # not started by this server (a restart): all we can see is whether it lives
            pid, start = _parse(job_id)
            if pid is not None and _start_ticks(pid) == start:
                self._escalate(job_id, pid)
                return JobState(RUNNING)
            return JobState(GONE)
        code = proc.poll()
        if code is None:
            self._escalate(job_id, proc.pid)
            return JobState(RUNNING)
        with self._lock:
            self._procs.pop(job_id, None)
            canceled = self._canceled.pop(job_id, None) is not None
            warm = proc.pid in self._warm_procs
            self._warm_procs.discard(proc.pid)
        if canceled:
            return JobState(CANCELED, code, "canceled")
        if code == 0:
            return JobState(SUCCEEDED, 0)
        if warm and code == EXIT_NO_JOB:
            return JobState(FAILED, code, "the warm runner it was handed to stopped before taking it; nothing "
                                          "of the run was started, submit it again")
        return JobState(FAILED, code, _signal_reason(code))

    def cancel(self, job_id: str) -> None:
        pid, start = _parse(job_id)
        if pid is None or _start_ticks(pid) != start:
            return
        with self._lock:
            self._canceled.setdefault(job_id, time.monotonic())
        try:
            os.kill(pid, signal.SIGTERM)  # the runner stops its stages and removes their mounts and temp dirs
        except ProcessLookupError:
            pass

    def _escalate(self, job_id: str, pid: int) -> None:
        """A canceled runner that has not finished its teardown within KILL_GRACE: SIGKILL its group."""
        with self._lock:
            since = self._canceled.get(job_id)
        if since is not None and time.monotonic() - since > KILL_GRACE:
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    def wait_gone(self, job_id: str, timeout: float) -> bool:
        """Wait until the job's process has exited (and is reaped, if ours); True if it has."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.poll(job_id).final:
                return True
            time.sleep(0.1)
        return False

    def capacity(self) -> dict[str, float]:
        return {"cpus": self.cpus, "memory": float(self.memory), "gpus": float(self.gpus)}

    def close(self) -> None:
        if self.warm is not None:
            self.warm.close()
        with self._lock:
            self._procs.clear()


def _parse(job_id: str) -> tuple[int | None, int | None]:
    try:
        pid_text, start_text = job_id.split(":", 1)
        return int(pid_text), int(start_text)
    except ValueError:
        return None, None


def _signal_reason(code: int) -> str:
    if code < 0:
        try:
            return signal.Signals(-code).name
        except ValueError:
            return f"signal {-code}"
    return ""


def create(**options: Any) -> LocalEngine:
    """The engine with the server's options: `cpus`, `memory`, `gpus`, `python`, `warm`, `warm_total`,
    `warm_idle`; others are ignored."""
    known = {k: v for k, v in options.items() if k in ("cpus", "memory", "gpus", "python", "warm", "warm_total",
                                                         "warm_idle")}
    return LocalEngine(**known)


__all__ = ["LocalEngine", "command", "create"]
