"""Issue #17, item 1: a run handed to a warm runner that is giving up must never be reported as
succeeded. The pool owns expiry (engines/warmpool.py: no runner is handed out past its window, and
such a runner is stopped), a runner that gets no job exits 75 without a verdict
(runner/warmrunner.py), and the scheduler counts a run as succeeded only on its runner's verdict."""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from waiting import wait_until

from pipcook_sandbox.runner.engines.local import DEATH_WRAPPER, LocalEngine
from pipcook_sandbox.runner.engines.warmpool import EXIT_NO_JOB, WarmRunners, handout_window
from pipcook_sandbox.runner.service import tenants
from pipcook_sandbox.runner.service.db import FAILED, QUEUED, RUNNING, Database
from pipcook_sandbox.runner.service.scheduler import Scheduler, run_dir

# `--isolation none` cannot boot warm sandboxes, so the runner prepares nothing and only waits:
# what is tested here is the runner's and the pool's handling of time and of stdin, not the sandboxes.
OPTIONS = ["--isolation", "none"]


def runner(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pipcook_sandbox.runner.warmrunner", *args, "--", *OPTIONS],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_a_warm_runner_whose_timer_runs_out_exits_75_without_a_verdict() -> None:
    proc = runner("--max-idle", "0.2")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_NO_JOB, err
    assert b"verdict" not in out and out == b"", out


def test_a_warm_runner_whose_stdin_closes_without_a_job_exits_75() -> None:
    proc = runner("--max-idle", "300")
    out, err = proc.communicate(b"", timeout=120)
    assert proc.returncode == EXIT_NO_JOB, err
    assert out == b""


def test_a_warm_runner_given_a_malformed_job_exits_75() -> None:
    proc = runner("--max-idle", "300")
    out, err = proc.communicate(b'{"argv": "not a list"}\n', timeout=120)
    assert proc.returncode == EXIT_NO_JOB, err
    assert out == b""


def test_the_pool_never_hands_out_a_runner_past_its_window_and_stops_it(tmp_path: Path) -> None:
    pool = WarmRunners(per_key=1, total=1, max_idle=1.0, wrapper=DEATH_WRAPPER)
    key = ("tenant-a", *OPTIONS)
    try:
        assert pool.fill(key, dict(os.environ), OPTIONS) == 1
        started = time.monotonic()  # after the pool noted the runner's start
        proc = pool._by_key[key][0].proc
        wait_until(lambda: time.monotonic() - started > handout_window(1.0), 10, "the runner's handout window")
        assert proc.poll() is None, "the runner's own timer must run longer than the pool's window"
        job = {"argv": ["--version"], "stdout": str(tmp_path / "out"), "stderr": str(tmp_path / "err"),
               "cwd": str(tmp_path)}
        assert pool.take(key, job) is None, "a runner past its window was handed a job"
        code = wait_until(lambda: proc.poll() is not None and [proc.returncode], 60, "the expired runner to stop")
        assert code[0] != 0
        assert not (tmp_path / "out").exists(), "the expired runner must not have run the job"
        assert pool.size() == 0
    finally:
        pool.close()


def test_the_pool_hands_out_a_runner_inside_its_window_and_it_runs_the_job(tmp_path: Path) -> None:
    pool = WarmRunners(per_key=1, total=1, max_idle=60.0, wrapper=DEATH_WRAPPER)
    key = ("tenant-a", *OPTIONS)
    try:
        pool.fill(key, dict(os.environ), OPTIONS)
        job = {"argv": ["--version"], "stdout": str(tmp_path / "out"), "stderr": str(tmp_path / "err"),
               "cwd": str(tmp_path)}
        proc = pool.take(key, job)
        assert proc is not None
        assert proc.wait(120) == 0
        assert "pipcook-sandbox" in (tmp_path / "out").read_text()
    finally:
        pool.close()


def _fake_runner(tmp_path: Path, body: str) -> str:
    """A runner interpreter that ends the way `body` says and never writes a verdict."""
    path = tmp_path / "fake-python"
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


def _one_run(tmp_path: Path, engine: LocalEngine) -> dict:
    data = tmp_path / "data"
    db = Database(data / "service.db")
    tenants.add(db, data, "alice")
    run_id = "r-no-verdict"
    run_dir(data, "alice", run_id).mkdir(parents=True)
    db.insert_run({"id": run_id, "tenant": "alice", "state": QUEUED, "source": "test", "stages": 3, "cpus": 0.5,
                   "memory": 1 << 28, "disk": 1 << 24, "timeout": 60.0, "pids": 64, "gpus": 0,
                   "created": time.time()})
    scheduler = Scheduler(db, engine, data, isolation="none")
    try:
        scheduler.turn()

        def ended() -> dict | None:
            scheduler.turn()
            run = db.run(run_id)
            return run if run is not None and run["state"] not in (QUEUED, RUNNING) else None

        return wait_until(ended, 60, "the run to end")
    finally:
        engine.close()
        db.close()


def test_a_runner_that_exits_0_without_a_verdict_is_a_failed_run_never_a_succeeded_one(tmp_path: Path) -> None:
    run = _one_run(tmp_path, LocalEngine(python=_fake_runner(tmp_path, "exit 0")))
    assert run["state"] == FAILED
    assert "without a verdict" in run["error"] and "\n" not in run["error"], run["error"]


def test_a_run_whose_runner_wrote_a_failed_verdict_keeps_that_verdicts_error(tmp_path: Path) -> None:
    verdict = json.dumps({"event": "verdict", "status": "failed", "exit_code": 1, "error": "stage model: boom"})
    run = _one_run(tmp_path, LocalEngine(python=_fake_runner(tmp_path, f"echo '{verdict}'; exit 0")))
    assert run["state"] == FAILED
    assert run["error"] == "stage model: boom"


@pytest.mark.parametrize("how", ["kill -9 $$", "exit 75"])
def test_a_run_whose_runner_dies_without_a_verdict_fails_with_a_reason(tmp_path: Path, how: str) -> None:
    run = _one_run(tmp_path, LocalEngine(python=_fake_runner(tmp_path, how)))
    assert run["state"] == FAILED
    assert "without a verdict" in run["error"], run["error"]
