"""gVisor (`runsc`) as the Docker backend's runtime (runner/backends/gvisor.py, docs/docker.md).

The whole attack suite runs under gVisor too (tests/hostile, backend id
`docker-gvisor`); these are the facts particular to gVisor: that stages really
run on gVisor's kernel, how its registration is checked, what it changes in
the seccomp profile, the limits it enforces itself, the shared-memory ring
falling back to frames, and the GPU it cannot give.

Without runsc registered these tests skip locally with the reason and FAIL
with CI=true (.ci/start-docker.sh registers it).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import TINY, require_docker, run_cli, write_pipeline
from pipcook_sandbox.runner.backends import gvisor
from pipcook_sandbox.runner.backends.seccomp import docker_profile

pytestmark = pytest.mark.docker

RUNSC = {"PIPCOOK_DOCKER_RUNTIME": "runsc"}
GOOD = {"path": "/usr/bin/runsc", "runtimeArgs": ["--network=none", "--host-uds=all", "--oci-seccomp"]}


@pytest.fixture(scope="module")
def gvisor_engine():
    """The docker backend, with a runsc runtime the backend accepts."""
    backend = require_docker()
    problem = backend.runtime_problem("runsc")
    if problem:
        if os.environ.get("CI") == "true":
            pytest.fail(f"gVisor is required in CI: {problem} (.ci/start-docker.sh registers it)")
        pytest.skip(f"gVisor not usable here: {problem}")
    return backend


# --- the registration and the profile (no engine needed) -----------------------------------


def test_a_runsc_registered_with_the_flags_is_accepted():
    assert gvisor.is_gvisor(GOOD)
    assert gvisor.missing_flags(GOOD) == []
    assert gvisor.registration_problem("runsc", GOOD) is None
    spelled_apart = {"path": "/usr/local/bin/runsc", "runtimeArgs": ["--oci-seccomp", "--network", "none",
                                                                     "--host-uds", "all"]}
    assert gvisor.missing_flags(spelled_apart) == []


@pytest.mark.parametrize("args, missing", [
    ([], ["--oci-seccomp", "--network=none", "--host-uds=all"]),  # what `runsc install` registers
    (["--network=none", "--host-uds=all"], ["--oci-seccomp"]),
    (["--network=sandbox", "--host-uds=all", "--oci-seccomp"], ["--network=none"]),
    (["--network=none", "--host-uds=open", "--oci-seccomp"], ["--host-uds=all"]),
    (["--network=none", "--host-uds=all", "--oci-seccomp", "--network=host"], ["--network=none"]),  # the last wins
])
def test_a_runsc_without_the_flags_is_refused_with_the_fix(args, missing):
    entry = {"path": "/usr/bin/runsc", "runtimeArgs": args}
    assert gvisor.missing_flags(entry) == missing
    why = gvisor.registration_problem("runsc", entry)
    assert why and all(flag in why for flag in missing) and "daemon.json" in why


def test_runc_is_not_taken_for_gvisor():
    assert not gvisor.is_gvisor({"path": "runc"})
    assert not gvisor.is_gvisor(None)


def test_the_profile_under_gvisor_differs_only_where_runsc_needs_it():
    profile = docker_profile()
    adapted = gvisor.adapt_profile(profile)
    assert profile == docker_profile(), "adapt_profile must not change its argument"
    assert adapted["defaultAction"] == "SCMP_ACT_ERRNO"
    allowed = {n for r in adapted["syscalls"] if r["action"] == "SCMP_ACT_ALLOW" and not r.get("args")
               for n in r["names"]}
    before = {n for r in profile["syscalls"] if r["action"] == "SCMP_ACT_ALLOW" and not r.get("args")
              for n in r["names"]}
    assert allowed - before == {"clone3", "pselect"}  # ENOSYS from the Sentry; gVisor's name for pselect6
    assert before <= allowed
    # Every other rule (clone's flags, ioctl, socket families, personality) is kept as it was.
    rest = [r for r in adapted["syscalls"] if r.get("args")]
    assert rest == [r for r in profile["syscalls"] if r.get("args")]
    for denied in ("ptrace", "mount", "unshare", "setns", "bpf", "keyctl", "io_uring_setup", "open_by_handle_at"):
        assert denied not in allowed


def test_host_pids_leave_room_for_the_sentry_but_stay_bounded():
    for pids in (16, 64, 256, 4096):
        assert pids + 44 < gvisor.host_pids(pids) <= 64 + 4 * pids


# --- against the engine --------------------------------------------------------------------


PROBE = '''
import json, os, threading

def train(runtime, options, ctx):
    ev, made = threading.Event(), 0
    try:
        for _ in range(int(options.get("threads", "0"))):
            threading.Thread(target=ev.wait, daemon=True).start()
            made += 1
    except RuntimeError:
        pass
    ev.set()
    ds, total, n = runtime.dataset.train, 0.0, 0
    while True:
        batch = ds.next_batch(4)
        if not batch:
            break
        n += len(batch)
        total += sum(float(s["data"].sum()) for s in batch)
    ring = getattr(getattr(runtime.dataset, "_ring", None), "size", 0)
    print("REPORT", json.dumps({"release": os.uname().release, "threads": made, "ring": ring,
                                "n": n, "total": total}), flush=True)
'''

BIG = '''
import numpy as np
from sandbox import sdk

def datasource(options, ctx):
    samples = [{"data": np.full(1 << 18, i, dtype=np.float32), "label": i % 2} for i in range(24)]
    return sdk.from_lists(train=samples, meta={"type": "general", "categories": ["a", "b"]})
'''


def _report(ws: Path) -> dict:
    lines = [line for line in (ws / "logs" / "model.log").read_text().splitlines() if line.startswith("REPORT ")]
    assert lines, (ws / "logs" / "model.log").read_text()[-2000:]
    return json.loads(lines[-1][len("REPORT "):])


@pytest.mark.parametrize("runtime", ["runc", "runsc"])
def test_gvisor_kernel_pids_and_ring_per_runtime(gvisor_engine, tmp_path, runtime):
    """One run per runtime: under runsc the stage sees gVisor's kernel (never the host's), the Sentry
    refuses threads past --pids, and 1 MiB tensors arrive whole over frames because the shared-memory
    ring cannot cross two gVisor sandboxes; under runc the ring is mapped."""
    # Under runc a refused thread is a refused fork of the pids cgroup, which stops the stage
    # (tests/hostile/test_limits.py); under gVisor the Sentry refuses it and the stage goes on.
    threads = "200" if runtime == "runsc" else "0"
    pipeline = write_pipeline(tmp_path / "p", datasource=BIG, dataflow=[], model=PROBE,
                              query={"model": f"?threads={threads}"})
    env = RUNSC if runtime == "runsc" else {"PIPCOOK_DOCKER_RUNTIME": ""}
    proc = run_cli("run", str(pipeline), "-o", str(tmp_path / "ws"), "--isolation", "docker", "--pids", "64",
                   "--memory", "512m", "--timeout", "120", env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = _report(tmp_path / "ws")
    assert report["n"] == 24 and report["total"] == sum(i * (1 << 18) for i in range(24)), report
    if runtime == "runsc":
        assert report["release"] != os.uname().release, report  # gVisor's own kernel answers uname
        assert report["ring"] == 0, report  # frames took over
        # RLIMIT_NPROC = --pids inside the Sentry: the worker's own threads count too
        assert 0 < report["threads"] < 64, report
    else:
        assert report["release"] == os.uname().release, report
        assert report["ring"] > 0, report


def test_gpu_under_gvisor_is_refused_before_anything_runs(gvisor_engine, tmp_path):
    pipeline = write_pipeline(tmp_path / "p")
    proc = run_cli("run", str(pipeline), "-o", str(tmp_path / "ws"), "--isolation", "docker", "--gpu", env=RUNSC)
    assert proc.returncode == 1, proc.stderr
    error = [line for line in proc.stderr.splitlines() if line.startswith("error: ")][-1]
    assert "gVisor" in error and "--gpu" in error and "PIPCOOK_DOCKER_RUNTIME" in error, error
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "ws").exists()


@pytest.mark.parametrize("command", ["predict", "serve"])
def test_predict_and_serve_gpu_under_gvisor_are_refused_first(gvisor_engine, tmp_path, command):
    proc = run_cli(command, str(tmp_path / "no-model"), "--isolation", "docker", "--gpu", env=RUNSC, timeout=120)
    assert proc.returncode == 1, proc.stderr
    error = [line for line in proc.stderr.splitlines() if line.startswith("error: ")][-1]
    assert "gVisor" in error and "--gpu" in error and "PIPCOOK_DOCKER_RUNTIME" in error, error


def test_gpu_stage_under_gvisor_is_refused_by_the_backend(gvisor_engine, tmp_path):
    """predict/serve reach the backend directly: start() refuses a GPU stage under gVisor itself."""
    from pipcook_sandbox.runner.backends.base import Limits, StageOptions, StageSpec

    spec = StageSpec(run_id="gvgpu", name="model", mounts=[], limits=Limits(timeout=30), log_path=tmp_path / "log",
                     argv=["-c", "pass"], options=StageOptions(runtime="runsc"), gpu=True)
    with pytest.raises(gvisor_engine.DockerError, match="gVisor"):
        gvisor_engine.start(spec)


def test_doctor_says_gvisor_is_in_use_and_what_it_adds(gvisor_engine):
    proc = run_cli("doctor", env=RUNSC)
    assert "gvisor_in_use          yes (PIPCOOK_DOCKER_RUNTIME=runsc)" in proc.stdout, proc.stdout
    assert "user-space kernel" in proc.stdout and "bench/RESULTS.md" in proc.stdout
    assert "applied inside gVisor" in proc.stdout
    plain = run_cli("doctor", env={"PIPCOOK_DOCKER_RUNTIME": ""})
    assert "gvisor                 yes (runsc:" in plain.stdout, plain.stdout
    assert "gvisor_in_use          no (set PIPCOOK_DOCKER_RUNTIME=runsc" in plain.stdout


def test_an_unknown_runtime_is_refused_by_doctor_and_run(gvisor_engine, tmp_path):
    env = {"PIPCOOK_DOCKER_RUNTIME": "no-such-runtime"}
    proc = run_cli("run", str(write_pipeline(tmp_path / "p")), "-o", str(tmp_path / "ws"), "--isolation", "docker",
                   env=env)
    assert proc.returncode == 1 and "no-such-runtime" in proc.stderr and "not registered" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_tiny_example_pipeline_predicts_under_gvisor(gvisor_engine, tmp_path):
    ws = tmp_path / "ws"
    proc = run_cli("run", str(TINY / "pipeline.json"), "-o", str(ws), "--isolation", "docker", env=RUNSC)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = run_cli("predict", str(ws / "model"), "--isolation", "docker", "-s", "1,2,3,4", env=RUNSC)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout)
    assert result["success"] is True and result["data"][0]["label"] in ("neg", "pos"), out.stdout
