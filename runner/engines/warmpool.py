"""Warm runner processes for the local engine (`server --warm N`; docs/warm.md).

A warm runner (runner/warmrunner.py) is a `run` process started before its
run: its imports are done and its run's stage sandboxes booted (each with the
tenant's uid, limits and dirs), and it waits for one job on its stdin. The
pool keeps up to N of them per *key*: the tenant, the whole option list of
its `run` command (isolation, every limit, --stage-uid, --allow-private,
--no-gpu) and its environment. A run is handed only to a runner of exactly
its key, which takes that run and no other and exits after it; the pool then
starts a replacement. So warmth never crosses tenants, limits or runs.

The pool owns expiry: it hands out a runner only while it is younger than
`max_idle` minus a margin (`handout_window`), and SIGTERMs one past that
instead (on every look at the pool), so a job is never written into the pipe
of a runner that is giving up. The runner's own `--max-idle` timer starts
only after its sandboxes are booted, so it always fires later than the pool's:
it is a backstop for a pool that stopped looking. A runner that exits without
a job exits EXIT_NO_JOB (75) and writes no verdict; the scheduler never counts
a run without a verdict as succeeded. `close()` (server shutdown) sends each
SIGTERM and waits for its teardown. A server killed with -9 leaves them the kernel's PDEATHSIG
(SIGTERM), as for runs; what a runner killed with -9 left, the next `run`
cleans (clean_leftovers), as for any runner.

Warm runners count against the host, not against a tenant's quotas: idle,
each holds a runner's and its stages' interpreters in memory (about
`per_runner_memory`) and no CPU; once it takes a run, that run is the
tenant's and counted by the scheduler like any other.
"""
from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

from .base import RunRequest

WarmKeyT = tuple[str, ...]
CLOSE_WAIT = 10.0  # how long close() waits for the warm runners' teardown before SIGKILL
EXPIRY_MARGIN = 5.0  # a runner is handed out only until max_idle minus this (at most half of max_idle)
EXIT_NO_JOB = 75  # runner/warmrunner.py's status when it expired or saw EOF before any job (EX_TEMPFAIL)


def handout_window(max_idle: float) -> float:
    """How long after its start a warm runner may still be handed a job: well inside its own timer."""
    return max(0.0, max_idle - min(EXPIRY_MARGIN, max_idle / 2))


@dataclass
class _Runner:
    proc: subprocess.Popen
    started: float = field(default_factory=time.monotonic)


def pool_key(request: RunRequest, run_options: list[str]) -> WarmKeyT:
    """Everything that shapes a run's runner and sandboxes, except the run itself (its id, dir, pipeline)."""
    env = [f"{k}={v}" for k, v in sorted(request.env.items())]
    return (request.tenant, *run_options, "\0env", *env)


class WarmRunners:
    """Up to `per_key` warm runners per key, at most `total` in all; each hands out once."""

    def __init__(self, per_key: int, total: int, max_idle: float, wrapper: str, python: str | None = None) -> None:
        self.per_key, self.total, self.max_idle = per_key, total, max_idle
        self.wrapper, self.python = wrapper, python or sys.executable
        self._by_key: dict[WarmKeyT, collections.deque[_Runner]] = collections.defaultdict(collections.deque)
        self._expired: list[subprocess.Popen] = []  # SIGTERMed for their age, reaped as they exit

    def _fresh(self, runner: _Runner) -> bool:
        return time.monotonic() - runner.started < handout_window(self.max_idle)

    def _expire(self, runner: _Runner) -> None:
        _signal(runner.proc, signal.SIGTERM)  # its teardown runs; it exits without a verdict
        self._expired.append(runner.proc)

    def _prune(self) -> None:
        for queue in self._by_key.values():
            for runner in [r for r in queue if r.proc.poll() is not None or not self._fresh(r)]:
                queue.remove(runner)
                if runner.proc.returncode is None:
                    self._expire(runner)
        self._expired = [p for p in self._expired if p.poll() is None]

    def size(self, key: WarmKeyT | None = None) -> int:
        self._prune()
        if key is not None:
            return len(self._by_key.get(key, ()))
        return sum(len(q) for q in self._by_key.values())

    def take(self, key: WarmKeyT, job: dict) -> subprocess.Popen | None:
        """A live warm runner of exactly `key`, given `job`; None if there is none. Never given twice."""
        queue = self._by_key.get(key)
        while queue:
            runner = queue.popleft()  # out of the pool before anything else: it serves this job or none
            if runner.proc.poll() is not None or runner.proc.stdin is None:
                continue
            if not self._fresh(runner):  # too close to its own timer: it might stop reading any moment
                self._expire(runner)
                continue
            try:
                runner.proc.stdin.write((json.dumps(job) + "\n").encode())
                runner.proc.stdin.close()
            except OSError:  # it died (or expired) meanwhile: the next, or a cold start
                _stop(runner.proc)
                continue
            return runner.proc
        return None

    def fill(self, key: WarmKeyT, env: dict[str, str], run_options: list[str]) -> int:
        """Start warm runners for `key` up to the caps; how many were started. Call it from a thread
        that lives as long as the server (PDEATHSIG, engines/local.py)."""
        started = 0
        while self.size(key) < self.per_key and self.size() < self.total:
            argv = [sys.executable, "-I", "-S", "-c", self.wrapper, str(os.getpid()), self.python,
                    "-m", "pipcook_sandbox.runner.warmrunner", "--max-idle", f"{self.max_idle:g}", "--",
                    *run_options]
            try:
                proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL, cwd="/", env=env, start_new_session=True)
            except OSError:
                break  # the run itself still starts cold
            self._by_key[key].append(_Runner(proc))
            started += 1
        return started

    def close(self) -> None:
        """SIGTERM every idle warm runner, wait for its teardown (SIGKILL past CLOSE_WAIT)."""
        procs = [r.proc for q in self._by_key.values() for r in q] + self._expired
        self._by_key.clear()
        self._expired = []
        for proc in procs:
            _signal(proc, signal.SIGTERM)
        deadline = time.monotonic() + CLOSE_WAIT
        for proc in procs:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _stop(proc)


def _signal(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.kill(proc.pid, sig)
    except ProcessLookupError:
        pass


def _stop(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        pass
