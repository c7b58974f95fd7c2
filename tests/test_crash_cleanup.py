"""After a crash: the next run removes what a runner killed with -9 left behind; `clean --cache`
prunes the caches (all, or what is older than --older-than). Real CLI, real bubblewrap."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, TINY, require_bwrap, run_cli, state_dirs_of, write_pipeline

SLOW_MODEL = '''
import time
def train(runtime, options, ctx):
    runtime.notify_progress(1.0, phase="running")
    time.sleep(600)
'''


def _mounts_under(paths: list[Path]) -> list[str]:
    lines = Path("/proc/mounts").read_text().splitlines()
    return [line for line in lines if any(line.split()[1].startswith(str(p) + "/") for p in paths)]


def test_next_run_cleans_what_a_killed_runner_left(tmp_path):
    require_bwrap()
    pipeline = write_pipeline(tmp_path / "p", model=SLOW_MODEL)
    log = tmp_path / "runner.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "pipcook_sandbox", "run", str(pipeline), "-o", str(tmp_path / "ws")],
                                stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
    deadline = time.monotonic() + 120
    while "phase=running" not in log.read_text():
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.1)
    left = state_dirs_of(proc.pid)
    assert left and _mounts_under(left)  # the run's state dir and its quota volumes exist
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert all(d.exists() for d in left)  # kill -9: nothing could clean up

    again = run_cli("run", str(TINY / "pipeline.json"), "-o", str(tmp_path / "ws2"))
    assert again.returncode == 0, again.stderr
    assert "(left by a runner that is gone)" in again.stderr
    assert not [d for d in left if d.exists()], "a dead runner's state dir survived the next run"
    assert not _mounts_under(left)


def _entry(root: Path, folder: str, name: str, age_s: float) -> Path:
    path = root / folder / name
    path.mkdir(parents=True)
    (path / "payload").write_bytes(b"x" * 100)
    then = time.time() - age_s
    os.utime(path, (then, then))
    return path


def test_clean_cache_older_than_prunes_only_old_entries(tmp_path):
    cache = tmp_path / "cache"
    old_script = _entry(cache, "scripts", "old", 40 * 86400)
    old_fw = _entry(cache, "frameworks", "tf-old", 10 * 86400)
    fresh = _entry(cache, "frameworks", "tf-new", 3600)
    env = {"PIPCOOK_SANDBOX_CACHE": str(cache)}
    proc = run_cli("clean", "--cache", "--older-than", "7d", env=env)
    assert proc.returncode == 0, proc.stderr
    assert not old_script.exists() and not old_fw.exists() and fresh.is_dir()
    assert "2 cache entries removed" in proc.stderr
    proc = run_cli("clean", "--cache", env=env)
    assert proc.returncode == 0 and not fresh.exists()
    assert "1 cache entry removed" in proc.stderr


@pytest.mark.parametrize("args", [("--cache", "--older-than", "7x"), ("--older-than", "7d")])
def test_clean_cache_bad_values_are_usage_errors(tmp_path, args):
    proc = run_cli("clean", *args, env={"PIPCOOK_SANDBOX_CACHE": str(tmp_path / "cache")})
    assert proc.returncode == 2, proc.stderr
    assert "--older-than" in proc.stderr
