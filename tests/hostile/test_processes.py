"""Processes: a stage cannot see, signal or trace anything outside its own
sandbox, and nothing it starts outlives the run.

Stages run as host uid 65534 with both backends, so the test keeps a canary
process of its own running as uid 65534 on the host: the one process a
stage would be allowed to signal if the pid namespace did not hide it.
"""
from __future__ import annotations

import json
import os
import subprocess

import pytest

from conftest import sandbox_processes
from waiting import wait_until

from .attack import backend_cli, limit_args, run_attack, token

pytestmark = pytest.mark.hostile

SANDBOX_UID = 65534


@pytest.fixture
def host_canary():
    """A host process running as uid 65534 (the stages' host uid), with a marker in its command line."""
    marker = token("pcsb-host-canary")
    proc = subprocess.Popen(["bash", "-c", f"exec -a {marker} sleep 600"],
                            user=SANDBOX_UID, group=SANDBOX_UID, extra_groups=[], cwd="/",
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_until(lambda: sandbox_processes(marker) or proc.poll() is not None, 10, "the canary to start")
    assert proc.poll() is None, f"the canary exited with status {proc.returncode}"
    try:
        yield proc, marker
    finally:
        proc.kill()
        proc.wait()


SIGNALS = r'''
import errno, json, os, signal, time
from sandbox import sdk


def attack(stage):
    me = os.getpid()
    report = {"pid": me, "ppid": os.getppid()}
    for name, pid in (("parent", os.getppid()), ("pid1", 1)):
        try:
            os.kill(pid, signal.SIGKILL)
            report[name] = "sent"
        except OSError as e:
            report[name] = errno.errorcode[e.errno]
    try:
        os.kill(-1, signal.SIGKILL)  # every process this uid may signal
        report["all"] = "sent"
    except OSError as e:
        report["all"] = errno.errorcode[e.errno]
    hit = []
    mine = {int(t) for t in os.listdir("/proc/self/task")}  # kill() takes thread ids too
    for pid in range(2, 100000):  # and every pid there is, one by one
        if pid in mine:
            continue
        try:
            os.kill(pid, signal.SIGKILL)
            hit.append(pid)
        except OSError:
            pass
    report["killed"] = hit
    time.sleep(0.5)
    print("REPORT", json.dumps(report), flush=True)


def datasource(options, ctx):
    attack("datasource")
    return sdk.from_lists(train=[{"data": 1, "label": 0}], meta={"type": "general"})


def train(runtime, options, ctx):
    attack("model")
    runtime.dataset.train.next_batch(0)
'''


def test_killing_parent_pid1_and_everything_stays_inside(tmp_path, isolation, host_canary):
    canary, marker = host_canary
    attack = run_attack(tmp_path, isolation, datasource=SIGNALS, dataflow=[], model=SIGNALS)
    assert canary.poll() is None, "a stage killed a host process of its uid"
    if isolation == "docker-gvisor":
        # gVisor's kernel lets a process SIGKILL its own pid namespace's init (Docker's tini, same
        # uid), which Linux refuses from inside: the container ends, so the stage killed only itself.
        # The run fails cleanly, naming a stage that did it (both do, at once); the host is untouched.
        assert attack.returncode == 1 and "killed by SIGKILL" in attack.error, attack.describe()
        assert "stage 'datasource'" in attack.error or "stage 'model'" in attack.error, attack.describe()
        assert "Traceback" not in attack.stderr and "internal error" not in attack.stderr, attack.describe()
        assert not attack.leftovers()
        return
    # Contained: the host's uid-65534 process lives, and both stages survived their own attack
    # (the sandbox's init ignores SIGKILL from inside; nothing else was there to kill).
    assert attack.returncode == 0, attack.describe()
    for stage in ("datasource", "model"):
        report = attack.reports(stage)
        assert report["killed"] == [] and report["all"] == "ESRCH", (stage, report)
        if backend_cli(isolation)[0] == "bwrap":
            assert report["parent"] == report["pid1"] == "EPERM", report  # pid 1 is bwrap, not the stage's uid
    assert not attack.leftovers()


PTRACE = r'''
import ctypes, errno, json, os

def train(runtime, options, ctx):
    libc = ctypes.CDLL(None, use_errno=True)
    libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
    report = {}
    for name, pid in (("pid1", 1), ("parent", os.getppid())):
        ctypes.set_errno(0)
        r = libc.ptrace(16, pid, None, None)  # PTRACE_ATTACH
        report["attach " + name] = "ok" if r == 0 else errno.errorcode.get(ctypes.get_errno(), "?")
        r = libc.ptrace(0x4206, pid, None, None)  # PTRACE_SEIZE
        report["seize " + name] = "ok" if r == 0 else errno.errorcode.get(ctypes.get_errno(), "?")
    ctypes.set_errno(0)
    report["traceme"] = "ok" if libc.ptrace(0, 0, None, None) == 0 else errno.errorcode.get(ctypes.get_errno(), "?")

    class iovec(ctypes.Structure):
        _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]
    buf = ctypes.create_string_buffer(64)
    local, remote = iovec(ctypes.addressof(buf), 64), iovec(0x400000, 64)
    ctypes.set_errno(0)
    r = libc.process_vm_readv(1, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)
    report["process_vm_readv pid1"] = "ok" if r >= 0 else errno.errorcode.get(ctypes.get_errno(), "?")
    for path in ("/proc/1/mem", "/proc/1/environ", "/proc/1/root/etc/hostname"):
        try:
            with open(path, "rb") as f:
                report["open " + path] = "ok"
                report["read " + path] = f.read(64).decode("utf-8", "replace")
        except OSError as e:
            report.setdefault("open " + path, errno.errorcode[e.errno])
    print("REPORT", json.dumps(report), flush=True)
'''


def test_ptrace_and_process_memory_are_denied(tmp_path, isolation):
    attack = run_attack(tmp_path, isolation, model=PTRACE)
    assert attack.returncode == 0, attack.describe()
    report = attack.reports("model")
    for key in ("attach pid1", "seize pid1", "attach parent", "seize parent", "traceme", "process_vm_readv pid1"):
        assert report[key] == "EPERM", (key, report)  # the seccomp deny list
    if backend_cli(isolation)[0] == "bwrap":
        # pid 1 is bwrap's reaper, owned by the namespace's root: nothing of it is open to the stage.
        for path in ("/proc/1/mem", "/proc/1/environ", "/proc/1/root/etc/hostname"):
            assert report["open " + path] == "EACCES", (path, report)
    else:
        # pid 1 is docker-init running as the stage's own uid 65534: its /proc files are open to
        # the stage (SECURITY.md), and what they show is the container itself, not the host.
        assert report.get("read /proc/1/root/etc/hostname", "pipcook").strip() == "pipcook", report
        assert "PATH=" not in report.get("read /proc/1/environ", "") or "/pipcook" not in report.get(
            "read /proc/1/environ", "x")
    assert not attack.leftovers()


DAEMON = r'''
import os, signal, sys, time
from sandbox import sdk

MARKER = "__MARKER__"


def spawn(role):
    """Double fork, new session, SIGTERM/SIGHUP ignored, exec'd with the marker in argv."""
    up = f"/tmp/daemon-up-{role}"  # written after the exec, by the program that carries the marker
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            signal.signal(signal.SIGHUP, signal.SIG_IGN)
            code = ("import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                    "open(sys.argv[2], 'w').close(); time.sleep(600)")
            os.execv(sys.executable, [sys.executable, "-c", code, MARKER + "-" + role, up])
        os._exit(0)
    os.wait()
    while not os.path.exists(up):
        time.sleep(0.01)
    print("daemon started", flush=True)


def datasource(options, ctx):
    spawn("datasource")
    return sdk.from_lists(train=[{"data": 1, "label": 0}], meta={"type": "general"})


def train(runtime, options, ctx):
    spawn("model")
    runtime.dataset.train.next_batch(0)
'''


@pytest.mark.parametrize("outcome", ["run succeeds", "run fails"])
def test_a_daemon_never_outlives_the_run(tmp_path, isolation, outcome):
    marker = token("pcsb-daemon")
    script = DAEMON.replace("__MARKER__", marker)
    if outcome == "run fails":
        script += "\n\ndef _fail(): raise RuntimeError('after the daemon')\n"
        script = script.replace("    runtime.dataset.train.next_batch(0)\n",
                                "    runtime.dataset.train.next_batch(0)\n    _fail()\n")
    attack = run_attack(tmp_path, isolation, datasource=script, dataflow=[], model=script)
    assert attack.returncode == (0 if outcome == "run succeeds" else 1), attack.describe()
    assert "daemon started" in attack.log("datasource") and "daemon started" in attack.log("model")
    assert not attack.leftovers(marker), "a process started in a stage outlived the run"


PROCS = r'''
import json, os

def train(runtime, options, ctx):
    pids = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
    cmdlines = {}
    for pid in pids:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdlines[pid] = f.read().replace(b"\0", b" ").decode("utf-8", "replace")[:300]
        except OSError as e:
            cmdlines[pid] = type(e).__name__
    tasks = sorted(int(t) for pid in pids for t in os.listdir(f"/proc/{pid}/task"))
    alive = []
    for pid in range(1, 1 << 17):  # probing pids by signal 0 sees no more than /proc does
        try:
            os.kill(pid, 0)
            alive.append(pid)
        except ProcessLookupError:
            pass
        except PermissionError:
            alive.append(pid)
    print("REPORT", json.dumps({"pids": pids, "tasks": tasks, "cmdlines": cmdlines, "alive": alive}), flush=True)
'''


def test_only_the_sandbox_own_processes_are_visible(tmp_path, isolation, host_canary):
    canary, marker = host_canary
    # The probe is 131,072 kill() calls; under gVisor each is a trip into its user-space kernel
    # and the loop alone takes ~19 s on an idle 2-CPU host, so the usual 20 s limit is too short.
    attack = run_attack(tmp_path, isolation, model=PROCS, limits=limit_args(timeout="120"))
    assert attack.returncode == 0, attack.describe()
    report = attack.reports("model")
    assert len(report["pids"]) <= 4, report  # init (bwrap's or docker's) and the worker
    assert report["alive"] == report["tasks"], report  # kill() reaches threads by their ids too
    everything = json.dumps(report["cmdlines"])
    for host_thing in (marker, "pytest", "pipcook_sandbox", "dockerd", "containerd", "sshd", str(os.getpid())):
        assert host_thing not in everything, host_thing
    assert canary.poll() is None
    assert not attack.leftovers()
