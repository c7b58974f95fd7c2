"""Warm sandboxes (runner/warm.py, sandbox/warmboot.py, docs/warm.md): booted before their stage is
known, claimed by exactly one stage, never handed to another stage or another tenant, discarded when
they die or are tampered with before their claim. Real bwrap, real cgroups, the real worker."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from conftest import require_bwrap, run_cli, write_pipeline
from waiting import wait_until

from pipcook_sandbox.runner import warm
from pipcook_sandbox.runner.backends import base, bwrap, cgroups, get_backend
from pipcook_sandbox.runner.backends.base import Limits, Mount, StageOptions, StageSpec
from pipcook_sandbox.runner.run import LIB_DIR
from pipcook_sandbox.runner.statedir import new_state_dir
from pipcook_sandbox.runner.workerenv import ensure_worker_site
from pipcook_sandbox.sandbox.stageconfig import StageConfig

SMALL = Limits(memory=512 << 20, cpus=1.0, pids=128, disk=64 << 20, timeout=60, output=4 << 20, tmp=64 << 20)
MAPPED = bwrap.uid_mode() == "mapped"
TENANT_A, TENANT_B = (210001, 210001), (210002, 210002)

pytestmark = pytest.mark.hostile


@pytest.fixture(autouse=True)
def _bwrap() -> None:
    require_bwrap()


@pytest.fixture
def state():
    path = new_state_dir("pcsb-warmtest-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def booted():
    """Every sandbox a test boots, discarded at its end (whatever the test did with it)."""
    made: list[warm.WarmSandbox] = []
    yield made
    for sandbox in made:
        sandbox.discard()


def boot(state: Path, booted: list, name: str, owner: tuple[int, int] | None = None,
         limits: Limits = SMALL) -> warm.WarmSandbox:
    """A warm sandbox with the mounts every stage has: the SDK, the worker's site, its control dir."""
    ctl = state / f"c-{name}"
    ctl.mkdir(mode=0o755)
    site = ensure_worker_site(log=lambda _: None)
    mounts = [Mount(LIB_DIR, f"{base.IN_LIB}/sandbox"), Mount(site, base.IN_SITE),
              Mount(ctl, f"{base.IN_IPC}/control")]
    spec = StageSpec(run_id=cgroups.new_run_id(), name=name, mounts=mounts, limits=limits,
                     log_path=state / f"{name}.log", options=StageOptions(state_dir=state, stage_owner=owner))
    sandbox = warm.WarmSandbox.boot(get_backend("bwrap"), spec, [base.IN_SITE], ctl)
    booted.append(sandbox)
    return sandbox


def config_for(name: str, limits: Limits = SMALL) -> StageConfig:
    return StageConfig(stage=name, role="datasource", script="/pipcook/scripts/none.py",
                       control=f"ipc://{base.IN_IPC}/control/control.sock", site_dirs=[base.IN_SITE],
                       hints={"cpus": limits.cpus, "gpu": "0"})


def wait_ended(sandbox: warm.WarmSandbox, timeout: float = 60) -> int:
    code = sandbox.handle.wait(timeout)
    assert code is not None, "the warm sandbox did not end"
    return code


def test_a_claimed_sandbox_is_never_claimed_again(state: Path, booted: list) -> None:
    sandbox = boot(state, booted, "once")
    sandbox.claim(sandbox.key, config_for("datasource"))
    with pytest.raises(warm.WarmError, match="already claimed"):
        sandbox.claim(sandbox.key, config_for("dataflow-1"))
    pool = warm.WarmPool()
    assert pool.add(sandbox) is False, "a claimed sandbox went back into a pool"
    assert pool.take(sandbox.key) is None
    assert sandbox.handle.poll() is not None, "a claimed sandbox offered back was not destroyed"


def test_the_pool_hands_each_sandbox_out_once(state: Path, booted: list) -> None:
    first, second = boot(state, booted, "p1"), boot(state, booted, "p2")
    pool = warm.WarmPool()
    # both have the same shape except their control dirs: keys differ, so each is found only by its own
    assert first.key != second.key
    assert pool.add(first) and pool.add(second)
    assert pool.take(first.key) is first
    assert pool.take(first.key) is None, "the same sandbox was handed out twice"
    assert pool.take(second.key) is second


@pytest.mark.skipif(not MAPPED, reason="a stage uid per tenant needs a root runner (mapped mode)")
def test_a_stage_of_one_tenant_never_gets_a_sandbox_prepared_for_another(state: Path, booted: list) -> None:
    a, b = boot(state, booted, "tenant-a", owner=TENANT_A), boot(state, booted, "tenant-b", owner=TENANT_B)
    # each one's worker already runs as its own tenant's uid while it waits, never the other's
    for sandbox, mine, other in ((a, TENANT_A, TENANT_B), (b, TENANT_B, TENANT_A)):
        uids = wait_for_uid(sandbox, mine[0])
        assert mine[0] in uids and other[0] not in uids, uids
    pool = warm.WarmPool()
    pool.add(a)
    key_b_like_a = warm.WarmKey(**{**a.key.__dict__, "stage_owner": TENANT_B})
    assert pool.take(key_b_like_a) is None, "tenant B's claim got tenant A's sandbox"
    assert pool.size() == 1
    with pytest.raises(warm.WarmError, match="another key"):
        a.claim(key_b_like_a, config_for("datasource"))
    assert a.claimed and pool.take(a.key) is None, "a refused sandbox stayed claimable"
    assert a.handle.poll() is not None, "a sandbox refused to a claim was not destroyed"
    assert pool.take(b.key) is None, "tenant B's own sandbox was never offered: it must not appear now"


def wait_for_uid(sandbox: warm.WarmSandbox, uid: int, timeout: float = 60) -> set[int]:
    """The uids of the sandbox's processes once `uid` is among them (bwrap drops to it before the
    worker starts)."""
    def uids() -> set[int] | None:
        found = {uid_of(int(pid)) for pid in cgroups_pids(sandbox)}
        return found if uid in found else None

    return wait_until(uids, timeout, f"a process of uid {uid} in the warm sandbox")


def uid_of(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/status").read_text().split("Uid:")[1].split()[0])
    except (OSError, IndexError):
        return -1


def cgroups_pids(sandbox: warm.WarmSandbox) -> list[str]:
    """The processes of the sandbox's cgroup (the worker waiting for its claim and bwrap's init)."""
    cg = sandbox.handle.cgroup
    procs = [Path(p) for p in cg.procs_files] if cg is not None else []
    return [line for p in procs if p.exists() for line in p.read_text().split()]


def test_a_claim_without_the_token_is_refused(state: Path, booted: list) -> None:
    sandbox = boot(state, booted, "forged")
    claim = json.dumps({"token": "0" * 64, "config": json.loads(config_for("datasource").to_json())}).encode()
    fd = sandbox._open_ready(60)  # the FIFO, as any writer on the host could open it
    try:
        os.write(fd, claim)
    finally:
        os.close(fd)
    assert wait_ended(sandbox) == 3
    assert "token is not this sandbox's" in Path(sandbox.spec.log_path).read_text()
    pool = warm.WarmPool()
    pool.add(sandbox)
    assert pool.take(sandbox.key) is None, "a sandbox that refused a forged claim was handed out"


def test_a_claim_for_other_cpus_is_refused(state: Path, booted: list) -> None:
    sandbox = boot(state, booted, "cpus")
    sandbox.claim(sandbox.key, config_for("datasource", SMALL.replace(cpus=2.0)))
    assert wait_ended(sandbox) == 3
    assert "CPUs are not those" in Path(sandbox.spec.log_path).read_text()


def test_a_sandbox_that_died_before_its_claim_is_discarded(state: Path, booted: list) -> None:
    sandbox = boot(state, booted, "dead")
    pool = warm.WarmPool()
    pool.add(sandbox)
    sandbox.handle.terminate(base.REASON_CANCELLED)
    wait_ended(sandbox)
    assert pool.take(sandbox.key) is None
    assert pool.size() == 0
    with pytest.raises(warm.WarmError):
        sandbox.claim(sandbox.key, config_for("datasource"))


def test_a_replaced_claim_fifo_is_never_written(state: Path, booted: list) -> None:
    sandbox = boot(state, booted, "replaced")
    sandbox.fifo.unlink()
    sandbox.fifo.write_text("")
    with pytest.raises(warm.WarmError, match="replaced"):
        sandbox.claim(sandbox.key, config_for("datasource"))
    assert sandbox.fifo.read_text() == "", "the claim went into a file that is not the sandbox's FIFO"


def test_idle_sandboxes_expire_and_close_leaves_nothing(state: Path, booted: list) -> None:
    pool = warm.WarmPool(cap=1, max_idle=0.0)
    first, extra = boot(state, booted, "idle"), boot(state, booted, "idle2")
    assert pool.add(first)
    assert pool.expire() == 1 and pool.size() == 0
    assert first.handle.poll() is not None
    pool.add(extra)
    pool.close()
    for sandbox in (first, extra):  # destroyed: its processes, cgroup and state gone
        assert sandbox.handle.poll() is not None
        cg = sandbox.handle.cgroup
        assert cg is None or not any(d.exists() for d in cg.all_dirs()), cg
        assert not sandbox.handle.stage_dir.exists()


def test_warm_run_of_the_tiny_pipeline(tmp_path: Path) -> None:
    r = run_cli("run", str(Path(__file__).parent / "pipelines" / "tiny" / "pipeline.json"),
                "-o", str(tmp_path / "ws"), "--warm", "--isolation", "bwrap")
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "ws" / "model.zip").is_file()


LEAVE_BEHIND = """
import os
from sandbox import sdk

def datasource(options, ctx):
    planted = []
    for d in ("/tmp", "/dev/shm", "/var/tmp", os.path.expanduser("~"), "/pipcook/ipc/control", "/pipcook/lib",
              "/pipcook/site", "/pipcook/scripts", os.getcwd(), "/"):
        try:
            with open(os.path.join(d, "planted-by-datasource"), "w") as f:
                f.write("left for the next stage")
            planted.append(d)
        except OSError:
            pass
    try:  # a second claim of its own sandbox, or of the next one: the FIFO is the runner's
        fd = os.open("/pipcook/ipc/control/claim", os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
        planted.append("claim-fifo")
    except OSError:
        pass
    print("PLANTED", planted)
    return sdk.from_lists(train=[{"x": [1.0], "y": 0}] * 4, test=[{"x": [1.0], "y": 0}] * 2)
"""

LOOK_FOR_IT = """
import json, os

def train(runtime, options, ctx):
    runtime.dataset.train.next_batch(4)  # the datasource has planted by now: it serves after datasource()
    found = []
    for root in ("/tmp", "/dev/shm", "/var/tmp", os.path.expanduser("~"), "/pipcook", os.getcwd(), "/"):
        for dirpath, _dirs, files in os.walk(root):
            if dirpath.startswith(("/proc", "/sys", "/usr", "/workspace/model")):
                continue
            found += [os.path.join(dirpath, f) for f in files if f == "planted-by-datasource"]
    with open(os.path.join(runtime.read_model(), "found.json"), "w") as f:
        json.dump(found, f)
"""


def test_what_a_stage_leaves_in_its_warm_sandbox_is_not_in_the_next_stage(tmp_path: Path) -> None:
    pipeline = write_pipeline(tmp_path / "p", datasource=LEAVE_BEHIND, dataflow=[], model=LOOK_FOR_IT)
    r = run_cli("run", str(pipeline), "-o", str(tmp_path / "ws"), "--warm", "--isolation", "bwrap")
    assert r.returncode == 0, r.stderr[-3000:]
    log = (tmp_path / "ws" / "logs" / "datasource.log").read_text()
    assert "PLANTED" in log and "claim-fifo" not in log, log
    assert "'/tmp'" in log, "the datasource could not even write its own /tmp: the test proves nothing"
    assert json.loads((tmp_path / "ws" / "model" / "found.json").read_text()) == []


WHOAMI = """
import os
from sandbox import sdk

def datasource(options, ctx):
    print("STAGE-UID", os.getuid(), flush=True)
    samples = [{"data": [float(i), 1.0], "label": i % 2} for i in range(8)]
    return sdk.from_lists(train=samples, test=samples[:2], meta={"type": "general", "categories": ["a", "b"]})
"""
PASS_THROUGH = """
def dataflow(pool, options, ctx):
    return pool
"""
READ_ONE = """
def train(runtime, options, ctx):
    runtime.dataset.train.next_batch(2)
"""


def warm_runner_job(tmp_path: Path, prepared_for: tuple[int, int], job_uid: tuple[int, int]) -> tuple[str, str]:
    """A real warm runner prepared for `prepared_for` (as the service starts it), handed a `run` of the
    shape it prepared for, with `job_uid`'s --stage-uid: (the datasource's log, the runner's stderr)."""
    import subprocess
    import sys

    pipeline = write_pipeline(tmp_path / "p", datasource=WHOAMI, dataflow=[PASS_THROUGH], model=READ_ONE)
    ws = tmp_path / "ws"
    kind = ["--isolation", "bwrap", "--no-gpu"]
    proc = subprocess.Popen([sys.executable, "-m", "pipcook_sandbox.runner.warmrunner", "--dataflows", "1", "--",
                             *kind, "--stage-uid", "%d:%d" % prepared_for], stdin=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd="/")
    job = {"argv": ["run", str(pipeline), "-o", str(ws), *kind, "--stage-uid", "%d:%d" % job_uid, "--json"],
           "stdout": str(tmp_path / "events.jsonl"), "stderr": str(tmp_path / "runner.log"), "cwd": str(tmp_path)}
    proc.communicate((json.dumps(job) + "\n").encode(), timeout=600)
    runner_log = (tmp_path / "runner.log").read_text()
    assert proc.returncode == 0, runner_log[-3000:]
    return (ws / "logs" / "datasource.log").read_text(), runner_log


@pytest.mark.skipif(not MAPPED, reason="a stage uid per tenant needs a root runner (mapped mode)")
def test_a_warm_runner_prepared_for_one_uid_never_lends_its_sandboxes_to_a_run_of_another(tmp_path: Path) -> None:
    log, runner_log = warm_runner_job(tmp_path, TENANT_A, TENANT_B)
    assert f"STAGE-UID {TENANT_B[0]}" in log, log
    assert "warm runner: 0 of 3 stages" in runner_log, runner_log[-3000:]


@pytest.mark.skipif(not MAPPED, reason="a stage uid per tenant needs a root runner (mapped mode)")
def test_a_warm_runner_prepared_for_a_uid_serves_a_run_of_that_uid_warm(tmp_path: Path) -> None:
    log, runner_log = warm_runner_job(tmp_path, TENANT_A, TENANT_A)
    assert f"STAGE-UID {TENANT_A[0]}" in log, log
    assert "warm runner: 3 of 3 stages" in runner_log, runner_log[-3000:]
    # said before the run's verdict, so the runner.log's tail (what the service shows of a run that ends
    # without a verdict) is the run's own
    assert not runner_log.strip().splitlines()[-1].startswith("warm runner:"), runner_log[-3000:]


def test_the_key_names_the_uid_a_stage_really_runs_as_even_when_only_the_process_default_says_it() -> None:
    from pipcook_sandbox.runner.backends import owner

    spec = StageSpec(run_id="r", name="datasource", mounts=[], limits=SMALL, log_path=Path("/dev/null"),
                     options=StageOptions(stage_owner=None))
    saved = owner._chosen
    try:
        owner.set_stage_owner(*TENANT_A)
        key_a = warm.WarmKey.of(get_backend("bwrap"), spec, [base.IN_SITE])
        owner.set_stage_owner(*TENANT_B)
        key_b = warm.WarmKey.of(get_backend("bwrap"), spec, [base.IN_SITE])
    finally:
        owner._chosen = saved
    assert key_a.stage_owner == TENANT_A and key_b.stage_owner == TENANT_B
    assert key_a != key_b


def environ_of(pid: str) -> bytes:
    try:
        return Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return b""


def test_the_claim_token_is_not_in_the_waiting_workers_proc_environ(state: Path, booted: list) -> None:
    sandbox = boot(state, booted, "environ")
    fd = sandbox._open_ready(60)  # the worker is waiting for its claim: its boot, token handling included, is done
    try:
        environs = [environ_of(pid) for pid in cgroups_pids(sandbox)]
        assert any(b"HOME=/tmp" in e for e in environs), "no sandbox process's environment was readable"
        assert not any(sandbox.token.encode() in e for e in environs), "the claim token is in /proc/PID/environ"
    finally:
        os.close(fd)  # the worker reads an empty claim and refuses it; the fixture discards the sandbox
    # That the worker still knows its token (the runner's claims are accepted) is what every warm run
    # here shows: test_a_warm_runner_prepared_for_a_uid_serves_a_run_of_that_uid_warm, for one.


def test_readiness_is_waited_for_before_any_claim_and_kept_for_it(state: Path, booted: list) -> None:
    """warmrun waits for every sandbox of a run to be ready before it claims the first (issue #17 item 5):
    after wait_ready the worker waits on its FIFO, held open for the claim, and the claim's token reaches it."""
    import time

    ready, dead = boot(state, booted, "ready"), boot(state, booted, "dead-before-ready")
    dead.handle.terminate(base.REASON_CANCELLED)
    wait_ended(dead)
    deadline = time.monotonic() + 60
    ready.wait_ready(deadline)
    with pytest.raises(warm.WarmError, match="ended before its claim"):
        dead.wait_ready(deadline)
    assert ready._ready_fd is not None and ready.handle.poll() is None, "the ready worker must still be waiting"
    ready.claim(ready.key, config_for("datasource", SMALL.replace(cpus=2.0)))  # refused by the worker: CPUs
    assert wait_ended(ready) == 3
    log = Path(ready.spec.log_path).read_text()
    assert "CPUs are not those" in log and "token" not in log, log


def test_a_moved_log_keeps_what_the_sandbox_printed_before_its_claim(tmp_path: Path) -> None:
    import queue

    from pipcook_sandbox.runner.backends import output

    chunks: queue.Queue[bytes | None] = queue.Queue()
    target = output.LogTarget(tmp_path / "state" / "datasource.log")
    pump = output.capture(iter(chunks.get, None), target, 1 << 20, lambda: None)
    chunks.put(b"printed at import, before the claim\n")
    wait_until(lambda: target.path.exists() and target.path.read_bytes(), 10, "the pre-claim output in the log")
    target.move_to(tmp_path / "ws" / "logs" / "datasource.log")
    chunks.put(b"printed by the stage\n")
    chunks.put(None)
    pump.join(10)
    assert (tmp_path / "ws" / "logs" / "datasource.log").read_bytes() == \
        b"printed at import, before the claim\nprinted by the stage\n"
