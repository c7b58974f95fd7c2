"""Every limit holds and is named: a stage that passes one is stopped, the
runner exits 1 quickly with a one-paragraph error naming the limit, and the
host is left as it was (no processes, mounts, cgroups, containers or state
dirs of the run).
"""
from __future__ import annotations

import pytest

from .attack import assert_contained_failure, limit_args, run_attack, token

pytestmark = pytest.mark.hostile


def _marked(marker: str, body: str) -> str:
    """A model script that execs a fresh interpreter running `body`, so that
    every process of the attack carries `marker` in its command line."""
    return f'''
import os, sys

BODY = {body!r} + "\\n# {marker}\\n"


def train(runtime, options, ctx):
    runtime.notify_progress(1)
    os.execv(sys.executable, [sys.executable, "-c", BODY])
'''


def test_fork_bomb_is_stopped_and_named(tmp_path, isolation):
    marker = token("pcsb-forkbomb")
    bomb = "import os, time\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        time.sleep(0.001)"
    attack = run_attack(tmp_path, isolation, model=_marked(marker, bomb))
    if isolation == "docker-gvisor" and "exited with code 2" in attack.error:
        # KNOWN GAP (docs/docker.md, gVisor): the host pids bound can starve gVisor's Sentry, which then
        # ends the sandbox (exit 2) before the runner's poll reads pids.events. Contained and stopped,
        # but not named as the process limit.
        assert_contained_failure(attack, "model", "exited with code 2", within=20)
    else:
        assert_contained_failure(attack, "model", "processes", "--pids", within=20)
    assert not attack.leftovers(marker)


def test_memory_bomb_is_stopped_and_named(tmp_path, isolation):
    model = '''
def train(runtime, options, ctx):
    hoard = []
    while True:
        hoard.append(b"x" * (16 << 20))   # touched, not just reserved
'''
    attack = run_attack(tmp_path, isolation, model=model)
    assert_contained_failure(attack, "model", "memory", "--memory", within=20)
    assert not attack.leftovers()


def test_tmpfs_fill_counts_as_memory(tmp_path, isolation):
    """/tmp and /dev/shm are memory-backed: filling them is a memory bomb too, never the host's disk."""
    model = '''
import itertools
def train(runtime, options, ctx):
    chunk = b"x" * (1 << 20)
    for d in ("/tmp", "/dev/shm"):
        for i in itertools.count():
            try:
                with open(f"{d}/fill-{i}", "wb") as f:
                    f.write(chunk)
            except OSError:
                break
    hoard = []
    while True:
        hoard.append(b"y" * (16 << 20))
'''
    attack = run_attack(tmp_path, isolation, model=model)
    assert_contained_failure(attack, "model", "memory", "--memory", within=30)
    assert not attack.leftovers()


def test_cpu_spin_is_stopped_by_the_timeout(tmp_path, isolation):
    model = "def train(runtime, options, ctx):\n    while True:\n        pass\n"
    attack = run_attack(tmp_path, isolation, model=model, limits=limit_args(timeout="4"))
    assert_contained_failure(attack, "model", "--timeout", "4 s", within=20)
    assert attack.elapsed >= 4
    assert not attack.leftovers()


def test_a_datasource_that_never_returns_is_the_one_named(tmp_path, isolation):
    """The timeout names the stage that was busy: here the datasource, while the model waits for it."""
    datasource = "def datasource(options, ctx):\n    while True:\n        pass\n"
    attack = run_attack(tmp_path, isolation, datasource=datasource, limits=limit_args(timeout="4"))
    assert_contained_failure(attack, "datasource", "--timeout", within=20)
    assert not attack.leftovers()


def test_cpu_spin_in_every_thread_is_stopped_too(tmp_path, isolation):
    model = '''
import threading
def spin():
    while True:
        pass
def train(runtime, options, ctx):
    for _ in range(8):
        threading.Thread(target=spin, daemon=True).start()
    spin()
'''
    attack = run_attack(tmp_path, isolation, model=model, limits=limit_args(timeout="4"))
    assert_contained_failure(attack, "model", "--timeout", within=20)
    assert not attack.leftovers()


@pytest.mark.parametrize("how", ["raises", "keeps trying"])
def test_disk_fill_of_model_dir_is_stopped_and_named(tmp_path, isolation, how):
    catch = "except OSError:\n                    pass" if how == "keeps trying" else "finally:\n                    pass"
    model = f'''
import itertools, os
def train(runtime, options, ctx):
    chunk = b"x" * (1 << 20)
    for i in itertools.count():
        with open(os.path.join(runtime.read_model(), f"fill-{{i}}"), "wb") as f:
            for _ in range(8):
                try:
                    f.write(chunk)
                    f.flush()
                {catch}
'''
    attack = run_attack(tmp_path, isolation, model=model)
    assert_contained_failure(attack, "model", "--disk", "64 MiB", within=30)
    written = sum(p.stat().st_size for p in (attack.ws / "model").glob("fill-*"))
    assert written <= 64 << 20  # what is copied back is within the quota
    assert not attack.leftovers()


def test_disk_fill_of_data_dir_with_tiny_files_is_stopped(tmp_path, isolation):
    """Inodes are disk too: a datasource making millions of empty files stops at the quota."""
    datasource = '''
import itertools, os
from sandbox import sdk
def datasource(options, ctx):
    for i in itertools.count():
        d = os.path.join(ctx.workspace.data_dir, str(i // 1000))
        os.makedirs(d, exist_ok=True)
        open(os.path.join(d, str(i)), "w").close()
'''
    attack = run_attack(tmp_path, isolation, datasource=datasource, limits=limit_args(disk="16m", timeout="60"))
    assert_contained_failure(attack, "datasource", "--disk", within=90)
    assert not attack.leftovers()


@pytest.mark.parametrize("stage", ["datasource", "dataflow"])
def test_socket_dir_is_not_a_way_around_the_disk_quota(tmp_path, isolation, stage):
    """A serving stage binds its pool socket in a directory it may write: that
    directory is not unlimited disk on the host."""
    filler = '''
import itertools, json, os
from sandbox import sdk
def fill():
    out = "/pipcook/ipc/out"
    written, error = 0, None
    chunk = b"z" * (1 << 20)
    try:
        for i in itertools.count():
            with open(os.path.join(out, f"junk-{i}"), "wb") as f:
                for _ in range(16):
                    f.write(chunk)
                    written += len(chunk)
            if written >= (256 << 20):
                break
    except OSError as e:
        error = type(e).__name__ + ": " + str(e)
    print("REPORT", json.dumps({"written": written, "error": error}), flush=True)
    return written
def datasource(options, ctx):
    fill()
    return sdk.from_lists(train=[{"data": 1, "label": 0}], meta={"type": "general"})
def dataflow(pool, options, ctx):
    fill()
    return pool
'''
    scripts = {"datasource": filler} if stage == "datasource" else {"dataflow": [filler]}
    model = "def train(runtime, options, ctx):\n    runtime.dataset.train.next_batch(0)\n"
    attack = run_attack(tmp_path, isolation, model=model, **scripts)
    assert attack.returncode == 0, attack.describe()
    report = attack.reports("datasource" if stage == "datasource" else "dataflow-1")
    assert report["written"] <= 8 << 20 and "No space left" in report["error"], report
    assert not attack.leftovers()


def test_stdout_flood_is_cut_and_named(tmp_path, isolation):
    model = '''
import sys
def train(runtime, options, ctx):
    line = "flood " * 200 + "\\n"
    while True:
        sys.stdout.write(line)
        sys.stderr.write(line)
'''
    attack = run_attack(tmp_path, isolation, model=model)
    assert_contained_failure(attack, "model", "stdout/stderr", within=30)
    log = attack.ws / "logs" / "model.log"
    assert log.stat().st_size <= (16 << 20) + 4096  # the cap on captured output holds
    assert "output cut at" in attack.log("model")[-300:]
    assert not attack.leftovers()


def test_open_files_are_limited(tmp_path, isolation):
    model = '''
import json
def train(runtime, options, ctx):
    held = []
    try:
        while len(held) < 100000:
            held.append(open("/dev/null"))
    except OSError as e:
        print("REPORT", json.dumps({"opened": len(held), "error": e.errno}), flush=True)
'''
    attack = run_attack(tmp_path, isolation, model=model)
    assert attack.returncode == 0, attack.describe()
    report = attack.reports("model")
    assert report["opened"] < 4096 and report["error"] == 24, report  # EMFILE at the nofile limit
    assert not attack.leftovers()
