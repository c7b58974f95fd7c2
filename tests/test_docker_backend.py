"""The Docker backend against a real engine and the real worker image.

One assertion per confinement promise of runner/backends/docker.py, then
`pipcook-sandbox run --isolation docker` end to end through the CLI. Every
test also checks that no container of its run is left behind.

Without a Docker engine these tests skip locally with the reason, and FAIL
with CI=true (.ci/start-docker.sh starts dockerd and builds the image).
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest
from conftest import TINY, require_docker, run_cli, write_pipeline
from waiting import wait_until
from httpserver import http_server  # noqa: F401  (fixture)

from pipcook_sandbox.runner.backends import base
from pipcook_sandbox.runner.backends.base import Limits, Mount, StageSpec

pytestmark = pytest.mark.docker

SMALL = Limits(memory=256 << 20, cpus=1.0, pids=64, disk=64 << 20, timeout=60, nofile=256, output=1 << 20,
               tmp=8 << 20)


@pytest.fixture(scope="module")
def backend():
    return require_docker()


def containers(run_id: str | None = None, runner_pid: int | str | None = None) -> list[dict]:
    """Our containers as the engine lists them: {"id", "labels", "state"} (sparse: no
    inspect per container, which would race with other runs removing theirs)."""
    from pipcook_sandbox.runner.backends import docker as backend_module

    filters = [backend_module.LABEL_RUN + (f"={run_id}" if run_id else "")]
    if runner_pid is not None:
        filters.append(f"{backend_module.LABEL_PID}={runner_pid}")
    found = backend_module.client().containers.list(all=True, sparse=True, filters={"label": filters})
    return [{"id": c.id, "labels": c.attrs.get("Labels") or {}, "state": c.attrs.get("State")} for c in found]


def orphans(before: set[str]) -> list[dict]:
    """Containers made since `before` whose runner is gone: a finished CLI run's leftovers. Other runs
    on the same engine (a benchmark, a neighbour's tests) keep their live runner and do not count."""
    from pipcook_sandbox.runner.backends import docker as backend_module

    found = []
    for c in containers():
        if c["id"] in before:
            continue
        try:
            os.kill(int(c["labels"].get(backend_module.LABEL_PID, "")), 0)
        except (ValueError, ProcessLookupError):
            found.append(c)
        except PermissionError:
            pass
    return found


def run_stage(backend, tmp_path: Path, code: str, limits: Limits = SMALL, mounts: list[Mount] | None = None,
              stop_after: float | None = None, stop_reason: str = base.REASON_TIMEOUT, deadline: float = 60):
    """Start `python3 -c code` as a stage, wait for it, clean up; (outcome, log text, handle)."""
    run_id = f"test-{uuid.uuid4().hex[:8]}"
    spec = StageSpec(run_id=run_id, name="probe", mounts=mounts or [], limits=limits,
                     log_path=tmp_path / "probe.log", argv=["-c", textwrap.dedent(code)])
    handle = backend.start(spec)
    try:
        begun = time.monotonic()
        while handle.poll() is None:
            elapsed = time.monotonic() - begun
            if stop_after is not None and elapsed > stop_after:
                handle.terminate(stop_reason)
                stop_after = None
            assert elapsed < deadline, "the stage did not end"
            time.sleep(0.05)
        outcome = handle.outcome()
    finally:
        handle.cleanup()
    assert containers(run_id) == [], "cleanup() left the container behind"
    handle.cleanup()  # idempotent
    log = spec.log_path.read_text(errors="replace") if spec.log_path.exists() else ""
    return outcome, log, handle


def facts(log: str) -> dict:
    lines = [line for line in log.splitlines() if line.startswith("{")]
    assert lines, f"no facts printed; log:\n{log}"
    return json.loads(lines[-1])


# --- confinement ----------------------------------------------------------------------

PROBE = r'''
import errno, json, os, resource, socket

def attempt(fn):
    try:
        fn()
        return "ok"
    except OSError as exc:
        return errno.errorcode.get(exc.errno, str(exc.errno))

def connect(host, port):
    def go():
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.settimeout(2)
        try:
            s.connect((host, port))
        finally:
            s.close()
    return attempt(go)

def write(path, size=1):
    def go():
        with open(path, "wb") as f:
            f.write(b"x" * size)
    return attempt(go)

status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines())
out = {
    "uid": os.getuid(), "gid": os.getgid(), "groups": os.getgroups(),
    "caps": {k: status[k].strip() for k in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")},
    "no_new_privs": status["NoNewPrivs"].strip(), "seccomp": status["Seccomp"].strip(),
    "interfaces": sorted(os.listdir("/sys/class/net")),
    "host_loopback": connect("127.0.0.1", PORT),
    "docker_gateway": connect("172.17.0.1", PORT),
    "metadata": connect("169.254.169.254", 80),
    "secret_visible": os.path.exists(SECRET),
    "secret_env": "PCSB_TEST_SECRET" in os.environ,
    "shadow": attempt(lambda: open("/etc/shadow").read()),
    "pids": sorted(int(p) for p in os.listdir("/proc") if p.isdigit()),
    "root_write": write("/pipcook-test"), "etc_write": write("/etc/pipcook-test"), "usr_write": write("/usr/x"),
    "ro_mount_read": open("/workspace/ro/hello.txt").read(), "ro_mount_write": write("/workspace/ro/new.txt"),
    "rw_mount_write": write("/workspace/rw/made.txt"),
    "tmp_write": write("/tmp/small", 1 << 20), "tmp_over_quota": write("/tmp/big", 16 << 20),
    "nofile": resource.getrlimit(resource.RLIMIT_NOFILE), "fsize": resource.getrlimit(resource.RLIMIT_FSIZE),
    "core": resource.getrlimit(resource.RLIMIT_CORE),
    "home": os.environ.get("HOME"), "cwd": os.getcwd(),
}
print(json.dumps(out))
'''


def test_stage_is_confined(backend, tmp_path, monkeypatch):
    listener = socket.socket()
    listener.bind(("0.0.0.0", 0))  # the host's loopback and its docker0 address
    listener.listen()
    port = listener.getsockname()[1]
    secret = Path.home() / f".pcsb-secret-{uuid.uuid4().hex[:8]}"
    secret.write_text("host secret")
    monkeypatch.setenv("PCSB_TEST_SECRET", "do not leak")
    ro, rw = tmp_path / "ro", tmp_path / "rw"
    ro.mkdir()
    rw.mkdir()
    (ro / "hello.txt").write_text("hello")
    try:
        code = PROBE.replace("PORT", str(port)).replace("SECRET", repr(str(secret)))
        outcome, log, _ = run_stage(backend, tmp_path, code, mounts=[
            Mount(ro, "/workspace/ro"), Mount(rw, "/workspace/rw", writable=True)])
    finally:
        secret.unlink()
        listener.close()
    assert outcome.exit_code == 0 and outcome.reason is None, log
    got = facts(log)
    assert (got["uid"], got["gid"]) == (65534, 65534) and set(got["groups"]) <= {65534}  # no root groups
    assert set(got["caps"].values()) == {"0000000000000000"}
    assert got["no_new_privs"] == "1" and got["seccomp"] == "2"
    assert got["interfaces"] == ["lo"]
    for where in ("host_loopback", "docker_gateway", "metadata"):
        assert got[where] != "ok", f"{where} reachable from the sandbox"
        if backend.seccomp_profile()[0]:
            assert got[where] == "EAFNOSUPPORT"  # our seccomp profile refuses the socket itself
    assert not got["secret_visible"] and not got["secret_env"]
    assert got["shadow"] != "ok" or Path("/etc/shadow").read_text() == ""
    assert len(got["pids"]) <= 3, f"host processes visible: {got['pids']}"  # tini, python (and a racing child)
    assert got["root_write"] == got["etc_write"] == got["usr_write"] == "EROFS"
    assert got["ro_mount_read"] == "hello" and got["ro_mount_write"] == "EROFS"
    assert got["rw_mount_write"] == "ok" and (rw / "made.txt").stat().st_uid == 65534
    assert got["tmp_write"] == "ok" and got["tmp_over_quota"] == "ENOSPC"
    assert got["nofile"] == [SMALL.nofile, SMALL.nofile]
    assert got["fsize"] == [SMALL.disk, SMALL.disk] and got["core"] == [0, 0]
    assert got["home"] == "/tmp" and got["cwd"] == "/tmp"


def test_no_network_even_without_our_seccomp_profile(backend, tmp_path, monkeypatch):
    """The seccomp deny list refuses non-unix sockets (EAFNOSUPPORT); under it the
    network namespace alone must hold: a socket can be made, but nothing is reachable."""
    monkeypatch.setattr(backend, "seccomp_profile", lambda runtime=None: (None, "docker default"))
    code = """
        import errno, socket
        for host in ("127.0.0.1", "172.17.0.1", "169.254.169.254", "1.1.1.1"):
            s = socket.socket()
            s.settimeout(2)
            try:
                s.connect((host, 80))
                print(host, "ok")
            except OSError as exc:
                print(host, errno.errorcode.get(exc.errno, exc.errno))
    """
    outcome, log, _ = run_stage(backend, tmp_path, code)
    assert outcome.exit_code == 0, log
    results = dict(line.split() for line in log.splitlines() if line.count(" ") == 1)
    assert results["127.0.0.1"] == "ECONNREFUSED"  # the container's own empty loopback, not the host's
    for host in ("172.17.0.1", "169.254.169.254", "1.1.1.1"):
        assert results[host] == "ENETUNREACH", log


def test_container_settings(backend, tmp_path):
    """What the engine was asked for (the bits a probe from inside cannot see)."""
    spec = StageSpec(run_id="test-settings", name="model", mounts=[], limits=SMALL, log_path=tmp_path / "x.log")
    config = backend.container_config(spec)
    assert config["network_mode"] == "none" and config["read_only"] and config["cap_drop"] == ["ALL"]
    assert config["user"] == "65534:65534" and config["init"] is True and config["auto_remove"] is False
    assert config["mem_limit"] == config["memswap_limit"] == SMALL.memory
    assert config["pids_limit"] == SMALL.pids and config["nano_cpus"] == 10**9
    assert "no-new-privileges:true" in config["security_opt"]
    assert config["command"][0] == "python3" and config["command"][1:] == base.WORKER_ARGS
    assert "device_requests" not in config  # no GPU unless spec.gpu
    assert config["labels"][backend.LABEL_PID] == str(os.getpid())


def test_gpu_request_and_missing_nvidia_runtime(backend, tmp_path):
    """Only the config is checked with a GPU: no GPU was available where this was written."""
    spec = StageSpec(run_id="test-gpu", name="model", mounts=[], limits=SMALL, log_path=tmp_path / "g.log", gpu=True)
    config = backend.container_config(spec)
    (request,) = config["device_requests"]
    from pipcook_sandbox.runner import gpus

    ids = gpus.docker_device_ids(gpus.given())  # only the GPUs this runner was given (a Slurm job's)
    assert (request["Count"] == -1 if ids is None else request["DeviceIDs"] == ids)
    assert "gpu" in request["Capabilities"][0]
    assert config["image"].startswith("pipcook-sandbox-worker:cuda-")
    ok, _ = backend.nvidia_runtime()
    if ok:
        pytest.skip("this host has an NVIDIA runtime: the refusal cannot be shown")
    with pytest.raises(backend.DockerError, match="NVIDIA Container Toolkit"):
        backend.start(spec)
    assert containers("test-gpu") == []


# --- limits and outcomes ---------------------------------------------------------------


def test_memory_limit_is_reported(backend, tmp_path):
    code = """
        print("allocating", flush=True)
        blocks = []
        while True:
            blocks.append(bytearray(16 << 20))
    """
    outcome, log, _ = run_stage(backend, tmp_path, code, limits=SMALL.replace(memory=96 << 20))
    assert outcome.reason == base.REASON_MEMORY, (outcome, log)
    assert outcome.exit_code == -signal.SIGKILL


def test_pids_limit_stops_the_stage(backend, tmp_path):
    code = """
        import threading, time
        threads = []
        try:
            while True:
                t = threading.Thread(target=time.sleep, args=(60,), daemon=True)
                t.start()
                threads.append(t)
        except RuntimeError as exc:
            print("refused after", len(threads), exc, flush=True)
        time.sleep(60)
    """
    started = time.monotonic()
    outcome, log, _ = run_stage(backend, tmp_path, code, limits=SMALL.replace(pids=16))
    assert outcome.reason == base.REASON_PIDS, (outcome, log)
    assert "refused after" in log
    assert time.monotonic() - started < 30


def test_terminate_records_the_first_reason(backend, tmp_path):
    started = time.monotonic()
    outcome, log, handle = run_stage(backend, tmp_path, "import time; print('up', flush=True); time.sleep(60)",
                                     stop_after=1.0, stop_reason=base.REASON_TIMEOUT)
    assert outcome.reason == base.REASON_TIMEOUT and outcome.exit_code == -signal.SIGKILL
    handle.terminate(base.REASON_CANCELLED)  # later reasons never overwrite the first
    assert handle.outcome().reason == base.REASON_TIMEOUT
    assert time.monotonic() - started < 15


def test_no_reason_for_a_stage_that_already_exited(backend, tmp_path):
    run_id = f"test-{uuid.uuid4().hex[:8]}"
    spec = StageSpec(run_id=run_id, name="quick", mounts=[], limits=SMALL, log_path=tmp_path / "q.log",
                     argv=["-c", "import sys; sys.exit(3)"])
    handle = backend.start(spec)
    try:
        assert handle.wait(30) == 3
        handle.terminate(base.REASON_TIMEOUT)
        assert handle.outcome() == base.Outcome(3, None, "")
    finally:
        handle.cleanup()
    assert containers(run_id) == []


def test_signal_exit_is_negative(backend, tmp_path):
    outcome, _, _ = run_stage(backend, tmp_path, "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)")
    assert outcome.exit_code == -signal.SIGSEGV and outcome.reason is None


def test_output_cap_stops_the_stage(backend, tmp_path):
    cap = 64 << 10
    code = """
        import sys
        while True:
            sys.stdout.write("x" * 4096 + "\\n")
    """
    outcome, log, _ = run_stage(backend, tmp_path, code, limits=SMALL.replace(output=cap))
    assert outcome.reason == base.REASON_OUTPUT, outcome
    assert cap <= (tmp_path / "probe.log").stat().st_size < cap + 200
    assert "output cut" in log


# --- leftovers -----------------------------------------------------------------------


def test_clean_leftovers_removes_containers_of_dead_runners(backend):
    engine = backend.client()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    tag = backend.image_for(False)
    made = []
    try:
        for pid, start in ((dead.pid, ""), (os.getpid(), backend._process_start(os.getpid()))):
            labels = {backend.LABEL_RUN: f"test-leftover-{pid}", backend.LABEL_STAGE: "model",
                      backend.LABEL_PID: str(pid), backend.LABEL_START: start, backend.LABEL_HOST: backend.runner_host()}
            made.append(engine.containers.create(tag, ["python3", "-c", "pass"], labels=labels, network_mode="none"))
        removed = backend.clean_leftovers()
        assert any(f"test-leftover-{dead.pid}" in item for item in removed), removed
        assert containers(f"test-leftover-{dead.pid}") == []
        assert len(containers(f"test-leftover-{os.getpid()}")) == 1, "a live runner's container was removed"
    finally:
        for container in made:
            backend.remove(container)


# --- the framework in the image --------------------------------------------------------


@pytest.mark.tf
def test_host_built_tensorflow_imports_in_the_image(backend, tmp_path):
    from pipcook_sandbox.runner import frameworks

    built = frameworks.resolve("tensorflow@2.21").dir  # built once into the user cache, as a run would
    code = """
        import site, sys
        site.addsitedir("/pipcook/framework/site")
        site.addsitedir("/pipcook/site")
        import tensorflow as tf
        print("tf", tf.__version__, float(tf.reduce_sum(tf.ones([3]))), sys.version_info[:2], flush=True)
    """
    outcome, log, _ = run_stage(backend, tmp_path, code, mounts=[Mount(built, base.IN_FRAMEWORK)],
                                limits=SMALL.replace(memory=2 << 30, pids=256, tmp=256 << 20), deadline=180)
    assert outcome.exit_code == 0, log
    assert "tf 2.21.0 3.0 (3, 11)" in log


# --- end to end through the CLI ----------------------------------------------------------


def test_run_tiny_pipeline_with_docker(backend, tmp_path):
    before = {c["id"] for c in containers()}
    out = tmp_path / "ws"
    proc = run_cli("run", str(TINY / "pipeline.json"), "--isolation", "docker", "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    weights = json.loads((out / "model" / "weights.json").read_text())
    assert weights["categories"] == ["neg", "pos"]
    assert (out / "data" / "made.txt").read_text() == "200 samples\n"
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [0, 1, 2]
    assert (out / "model.zip").is_file()
    assert not orphans(before), "a container outlived the run"


def test_failing_stage_is_reported_and_cleaned(backend, tmp_path):
    before = {c["id"] for c in containers()}
    pipeline = write_pipeline(tmp_path / "p", datasource='''
        def datasource(options, ctx):
            raise ValueError("no data here")
    ''')
    proc = run_cli("run", str(pipeline), "--isolation", "docker", "-o", str(tmp_path / "ws"))
    assert proc.returncode == 1
    assert "datasource" in proc.stderr and "no data here" in proc.stderr
    assert not orphans(before)


def test_download_is_readable_inside_the_stage(backend, tmp_path, http_server):  # noqa: F811
    http_server.routes["/numbers.txt"] = (200, {}, b"1 2 3 4")
    pipeline = write_pipeline(tmp_path / "p", datasource=f'''
        from sandbox import sdk

        def datasource(options, ctx):
            path = ctx.download({http_server.url("/numbers.txt")!r})
            values = [float(v) for v in open(path).read().split()]
            samples = [{{"data": [v, v, v, v], "label": int(v > 2)}} for v in values * 10]
            return sdk.from_lists(train=samples, test=samples, meta={{"type": "general", "categories": ["a", "b"]}})
    ''')
    proc = run_cli("run", str(pipeline), "--isolation", "docker", "--allow-private", "127.0.0.1",
                   "-o", str(tmp_path / "ws"))
    assert proc.returncode == 0, proc.stderr
    assert http_server.hits["/numbers.txt"] == 1


SLOW_MODEL = '''
    import time

    def train(runtime, options, ctx):
        print("training", flush=True)
        time.sleep(120)
'''


def _start_slow_run(tmp_path: Path) -> tuple[subprocess.Popen, str]:
    pipeline = write_pipeline(tmp_path / "p", model=SLOW_MODEL)
    proc = subprocess.Popen([sys.executable, "-m", "pipcook_sandbox", "run", str(pipeline), "--isolation", "docker",
                             "-o", str(tmp_path / "ws")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            mine = containers(runner_pid=proc.pid)
            if len(mine) == 3 and all(c["state"] == "running" for c in mine):
                break
            time.sleep(0.2)
        else:
            pytest.fail("the run's three containers did not start")
        log = tmp_path / "ws" / "logs" / "model.log"
        wait_until(lambda: log.exists() and "training" in log.read_text(), 60, "the model stage to be training")
    except BaseException:
        proc.send_signal(signal.SIGINT)  # an orderly stop: the runner removes its containers
        proc.communicate(timeout=60)
        raise
    return proc, str(proc.pid)


def test_ctrl_c_removes_every_container(backend, tmp_path):
    proc, pid = _start_slow_run(tmp_path)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert containers(runner_pid=pid) == []


def test_containers_of_a_killed_runner_are_cleaned(backend, tmp_path):
    proc, pid = _start_slow_run(tmp_path)
    proc.kill()  # no teardown at all: the containers keep running
    proc.communicate(timeout=30)
    assert len(containers(runner_pid=pid)) == 3
    cleaned = run_cli("clean")
    assert cleaned.returncode == 0, cleaned.stderr
    assert containers(runner_pid=pid) == []
