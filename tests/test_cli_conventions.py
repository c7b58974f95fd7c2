"""Command-line conventions, through the real CLI: exit statuses, limits, signals, -V, doctor --json,
--gpu refusals before anything is built, and -m MIRROR for predict."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, TINY, require_bwrap, run_cli, sandbox_processes, write_pipeline
from httpserver import http_server  # noqa: F401  (fixture)
from test_mirror import _fake_framework, _serve

from pipcook_sandbox.runner import mirror

PIPELINE = str(TINY / "pipeline.json")


@pytest.mark.parametrize("flag,value,words", [
    ("--memory", "2x", "is not a size"),
    ("--memory", "1k", "below the minimum"),
    ("--disk", "1k", "below the minimum"),
    ("--cpus", "0", "must be positive"),
    ("--timeout", "-1", "must be positive"),
    ("--pids", "2", "at least 8"),
])
def test_bad_limit_values_are_usage_errors(tmp_path, flag, value, words):
    proc = run_cli("run", PIPELINE, "-o", str(tmp_path / "ws"), flag, value)
    assert proc.returncode == 2, proc.stderr
    assert words in proc.stderr and flag in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "ws").exists()
    # one paragraph: the error line is not repeated
    assert proc.stderr.count(words) == 1


def test_cpus_above_the_host_is_capped_with_a_warning(tmp_path):
    cores = os.cpu_count() or 1
    proc = run_cli("run", str(tmp_path / "missing.json"), "--cpus", str(cores * 8))
    assert f"more than the {cores} core(s) of this host; each stage gets at most {cores}" in proc.stderr
    assert proc.returncode == 1 and "pipeline file not found" in proc.stderr  # the run went on, capped


def test_version_has_a_short_alias():
    long, short = run_cli("--version"), run_cli("-V")
    assert short.returncode == 0 and short.stdout == long.stdout and "pipcook-sandbox" in short.stdout


def test_doctor_json_is_machine_readable():
    proc = run_cli("doctor", "--json")
    data = json.loads(proc.stdout)
    assert set(data) == {"ok", "backends"} and {"bwrap", "docker", "none"} <= set(data["backends"])
    assert proc.returncode == (0 if data["ok"] else 1)
    bwrap = data["backends"]["bwrap"]
    assert isinstance(bwrap["usable"], bool) and isinstance(bwrap["problems"], list)
    assert data["backends"]["none"]["confined"] is False


SLOW_MODEL = '''
import time
def train(runtime, options, ctx):
    runtime.notify_progress(1.0, phase="waiting for a signal")
    time.sleep(600)
'''


def _start_and_wait_for_model(tmp_path: Path) -> tuple[subprocess.Popen, Path]:
    require_bwrap()
    pipeline = write_pipeline(tmp_path / "p", model=SLOW_MODEL)
    log = tmp_path / "runner.log"
    out = open(log, "w")
    proc = subprocess.Popen([sys.executable, "-m", "pipcook_sandbox", "run", str(pipeline), "-o", str(tmp_path / "ws")],
                            stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
    deadline = time.monotonic() + 120
    while "waiting for a signal" not in log.read_text():  # the model runs: a stage is up to be torn down
        assert proc.poll() is None, log.read_text()
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.1)
    return proc, log


@pytest.mark.parametrize("sig,code,word", [(signal.SIGTERM, 143, "terminated (SIGTERM)"),
                                           (signal.SIGINT, 130, "interrupted (Ctrl-C)")])
def test_signals_exit_with_their_own_status_and_word(tmp_path, sig, code, word):
    proc, log = _start_and_wait_for_model(tmp_path)
    proc.send_signal(sig)
    assert proc.wait(timeout=60) == code, log.read_text()
    text = log.read_text()
    assert word in text and "Traceback" not in text
    assert ("interrupted" in text) == (sig == signal.SIGINT)
    assert not sandbox_processes(str(tmp_path / "p"))  # every stage was stopped
    assert (tmp_path / "ws" / "logs").is_dir()  # the workspace is kept


needs_no_gpu = pytest.mark.skipif(any(Path("/dev").glob("nvidia[0-9]*")), reason="this host has a GPU")


@needs_no_gpu
@pytest.mark.parametrize("command", ["run", "predict", "serve"])
def test_gpu_is_refused_the_same_way_on_a_host_without_one(tmp_path, command):
    target = PIPELINE if command == "run" else str(tmp_path / "no-model-needed")
    started = time.monotonic()
    proc = run_cli(command, target, "--gpu", env={"PIPCOOK_SANDBOX_CACHE": str(tmp_path / "cache")})
    assert proc.returncode == 1, proc.stderr
    assert "a GPU was requested by --gpu, but this host has no NVIDIA GPU (no /dev/nvidia0); run without --gpu" \
        in proc.stderr
    assert time.monotonic() - started < 30
    assert not (tmp_path / "cache").exists()  # nothing fetched or built


PREDICTING_MODEL = '''
import os
import tinyfw

def train(runtime, options, ctx):
    runtime.log_metrics(answer=tinyfw.ANSWER)

def predict(runtime, options, ctx):
    return [{"answer": tinyfw.ANSWER} for _ in runtime.dataset.predicted]
'''


def test_predict_takes_a_mirror_for_the_models_framework(tmp_path, http_server):
    """A model moved to a host that has never built its framework gets it from -m MIRROR."""
    require_bwrap()
    mirror.pack(_fake_framework(tmp_path), tmp_path / "mirror", "tinyfw", "1.0", cuda=False)
    _serve(http_server, tmp_path / "mirror")
    pipeline = write_pipeline(tmp_path / "p", dataflow=[], model=PREDICTING_MODEL,
                              extra={"options": {"framework": "tinyfw@1.0"}})
    url = http_server.url("")
    trained = run_cli("run", str(pipeline), "-m", url, "--allow-private", "127.0.0.1", "-o", str(tmp_path / "ws"),
                      env={"PIPCOOK_SANDBOX_CACHE": str(tmp_path / "cache-a")})
    assert trained.returncode == 0, trained.stderr
    fresh = {"PIPCOOK_SANDBOX_CACHE": str(tmp_path / "cache-b")}  # the other host: no framework built
    without = run_cli("predict", str(tmp_path / "ws"), "-s", "x", env=fresh)
    assert without.returncode == 1
    proc = run_cli("predict", str(tmp_path / "ws"), "-s", "x", "-m", url, "--allow-private", "127.0.0.1", env=fresh)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"success": True, "data": [{"answer": 42}]}
    zips = [p for p in http_server.hits if p.endswith(".zip")]
    assert sum(http_server.hits[z] for z in zips) == 2  # once for training, once for the fresh host


def test_framework_build_with_an_empty_name_is_a_usage_error(tmp_path):
    # resolve() answers None for no framework; `framework build ""` used to reach `None.dir` (internal error)
    proc = run_cli("framework", "build", "", "-o", str(tmp_path / "mirror"))
    assert proc.returncode == 2, proc.stderr
    assert "empty NAME@VERSION names no framework" in proc.stderr
    assert "Traceback" not in proc.stderr and "internal error" not in proc.stderr
    assert not (tmp_path / "mirror").exists()
