"""Writes go only to the stage's own directories.

Every stage tries to create a file in every directory it can see (each mount
point, and the usual suspects: /usr, /etc, the scripts, the SDK, the worker's
site, the other stages' sockets, the workspace dirs of other roles) and to
open for writing the files it should never change (its stage.json, its
script, the worker, /proc/sys/kernel/core_pattern). The test compares the
set of places that took a write with what the contract allows, and checks
from the host that nothing landed where it should not.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

from .attack import run_attack, token

import pipcook_sandbox.sandbox

# The SDK a stage sees is the installed one (site-packages under a wheel install).
SANDBOX_LIB = Path(pipcook_sandbox.sandbox.__file__).resolve().parent

pytestmark = pytest.mark.hostile

PROBE = r'''
import errno, json, os, sys
from sandbox import sdk

TOK = "__TOKEN__"
DIRS = ["/", "/usr", "/usr/bin", "/usr/lib", "/bin", "/lib", "/etc", "/root", "/home", "/var", "/var/tmp", "/run",
        "/opt", "/srv", "/mnt", "/pipcook", "/pipcook/scripts", "/pipcook/lib", "/pipcook/lib/sandbox",
        "/pipcook/lib/sandbox/backends", "/pipcook/site", "/pipcook/framework", "/pipcook/ipc", "/pipcook/ipc/control",
        "/pipcook/ipc/in", "/pipcook/ipc/out", "/pipcook/downloads", "/workspace", "/workspace/data",
        "/workspace/cache", "/workspace/model", "/tmp", "/dev", "/dev/shm", "/dev/mqueue", "/dev/pts", "/proc",
        "/sys", "/sys/fs/cgroup", sys.prefix, os.path.dirname(os.__file__)]
FILES = ["/pipcook/stage.json", "/etc/passwd", "/etc/hosts", "/etc/resolv.conf", "/etc/hostname",
         "/proc/sys/kernel/core_pattern", "/proc/sys/kernel/modprobe", "/proc/sysrq-trigger", "/proc/self/oom_score_adj",
         "/sys/kernel/uevent_helper", "/sys/fs/cgroup/cgroup.procs", "/dev/null", os.__file__]


def mounts():
    with open("/proc/self/mountinfo") as f:
        return [line.split()[4].replace("\\040", " ") for line in f]


def probe(role):
    with open("/pipcook/stage.json") as f:
        cfg = json.load(f)
    files = FILES + [cfg["script"], "/pipcook/lib/sandbox/worker.py"]
    writable, written_files = [], []
    for d in sorted(set(DIRS + mounts())):
        if not os.path.isdir(d):
            continue
        target = os.path.join(d, f".write-test-{TOK}")
        try:
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            os.close(fd)
            os.unlink(target)
            writable.append(d)
        except OSError:
            pass
    for path in files:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND)
            os.close(fd)
            written_files.append(path)
        except OSError:
            pass
    print("REPORT", json.dumps({"writable": writable, "files": written_files}), flush=True)


def datasource(options, ctx):
    probe("datasource")
    return sdk.from_lists(train=[{"data": 1, "label": 0}], meta={"type": "general"})


def dataflow(pool, options, ctx):
    probe("dataflow")
    return pool


def train(runtime, options, ctx):
    probe("model")
    runtime.dataset.train.next_batch(0)
'''

PRIVATE = {"/tmp", "/dev/shm"}
ALLOWED = {
    "datasource": PRIVATE | {"/workspace/data", "/workspace/cache", "/pipcook/ipc/out"},
    "dataflow-1": PRIVATE | {"/pipcook/ipc/out"},
    "model": PRIVATE | {"/workspace/model"},
}


def _tree_digest(root: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        if "__pycache__" in path.parts:
            continue
        h.update(str(path.relative_to(root)).encode())
        if path.is_file():
            h.update(path.read_bytes())
    return h.hexdigest()


def test_writes_land_only_in_the_stage_own_directories(tmp_path, isolation):
    tok = token("pcsb-write")
    script = PROBE.replace("__TOKEN__", tok)
    sdk_before = _tree_digest(SANDBOX_LIB)
    attack = run_attack(tmp_path, isolation, datasource=script, dataflow=[script], model=script)
    assert attack.returncode == 0, attack.describe()
    for stage, allowed in ALLOWED.items():
        report = attack.reports(stage)
        writable = set(report["writable"])
        if isolation == "docker":
            # Docker's /dev/mqueue: POSIX message queues of the container's own IPC namespace
            # (private, bounded by RLIMIT_MSGQUEUE), like /dev/shm.
            writable.discard("/dev/mqueue")
        assert writable == allowed, (stage, sorted(writable))
        # /dev/null, and its own OOM score (a process may only make itself likelier to be killed)
        assert set(report["files"]) <= {"/dev/null", "/proc/self/oom_score_adj"}, (stage, report["files"])
    # From the host: the SDK, the workspace's scripts and the worker site are as they were.
    assert _tree_digest(SANDBOX_LIB) == sdk_before
    scripts = attack.ws / "scripts"
    assert {p.read_text() for p in scripts.iterdir()} == {script}
    found = subprocess.run(["find", "/usr", "/etc", str(REPO), str(Path(sys.base_prefix)), "/tmp", "-xdev",
                            "-name", f"*{tok}*"], capture_output=True, text=True).stdout.split()
    assert found == [], found
    assert not attack.leftovers()
