"""The slurm engine against a real slurmctld/slurmd (.ci/start-slurm.sh starts one).

Each test submits real `pipcook-sandbox run` jobs (bwrap stages inside the job's
cgroup) for two tenants whose Slurm accounts `ensure_account` made, and waits on
Slurm's own answers: states, reasons, exit codes, the job's cgroup going away.
Under CI=true a cluster that is not up fails the tests; elsewhere they skip,
saying so in the skip banner.
"""
from __future__ import annotations

import json
import os
import pwd
import re
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    REPO,
    require_bwrap,
    require_slurm,
    sandbox_processes,
    write_pipeline,
)
from waiting import wait_until

from pipcook_sandbox.runner.engines import get_engine
from pipcook_sandbox.runner.engines import slurm as slurm_engine
from pipcook_sandbox.runner.engines.base import (
    CANCELED,
    FAILED,
    PENDING,
    RUNNING,
    SUCCEEDED,
    JobState,
    RunRequest,
)

MiB = 1 << 20
JOB_USER = "nobody"  # a user without a writable home, as many batch jobs' users are
JOB_VENV = Path("/var/tmp/pipcook-sandbox-test-jobvenv")

# A datasource that holds its job until the test cancels it (bounded by the stage timeout).
BLOCKING_DATASOURCE = '''
import time
from sandbox import sdk

def datasource(options, ctx):
    time.sleep(600)
    return sdk.from_lists(train=[], test=[], meta={})
'''

from slurmkit import GPU_MODEL, HUNGRY_MODEL  # noqa: E402  (shared with test_slurm_service)


@pytest.fixture(scope="module")
def cluster() -> None:
    require_slurm()


@pytest.fixture(scope="module")
def tenants(cluster: None) -> Iterator[dict[str, str]]:
    """Two tenants: `capped` may run one job at a time (GrpJobs=1), `free` has no job limit."""
    tag = secrets.token_hex(3)
    names = {"capped": f"pcsb-{tag}-capped", "free": f"pcsb-{tag}-free"}
    users = ["root", JOB_USER]  # the server's user, and the one test_a_non_root_job_user... runs jobs as
    slurm_engine.ensure_account(names["capped"], {"max_jobs": 1}, users=users)
    slurm_engine.ensure_account(names["free"], {}, users=users)
    try:
        yield names
    finally:
        for name in names.values():
            subprocess.run(["scancel", f"--account={name}"], capture_output=True, check=False)
        for name in names.values():
            wait_for(lambda n=name: not _jobs_of(n), 60, f"jobs of {name} to end")
            slurm_engine.remove_account(name)


def _jobs_of(account: str) -> list[str]:
    out = subprocess.run(["squeue", "-h", "-A", account, "-o", "%i"], capture_output=True, text=True,
                         check=False).stdout
    return out.split()


def wait_for(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    """waiting.wait_until, polling every 0.5 s: each look runs squeue/sacct."""
    return wait_until(condition, timeout, what, interval=0.5)


@pytest.fixture
def engine(cluster: None) -> slurm_engine.SlurmEngine:
    require_bwrap()
    made = get_engine("slurm", setup_time=300)
    assert isinstance(made, slurm_engine.SlurmEngine)
    return made


def request(tmp_path: Path, name: str, tenant: str, pipeline_dir: Path | None = None, **kw: Any) -> RunRequest:
    run_dir = tmp_path / name
    run_dir.mkdir()
    src = pipeline_dir or write_pipeline(tmp_path / f"{name}-src").parent
    shutil.copy(src / "pipeline.json", run_dir / "pipeline.json")
    for script in src.glob("*.py"):
        shutil.copy(script, run_dir / script.name)
    defaults: dict[str, Any] = {"memory": 256 * MiB, "cpus": 1.0, "timeout": 600.0}
    return RunRequest(run_id=f"{name}-{secrets.token_hex(3)}", tenant=tenant, run_dir=run_dir, **{**defaults, **kw})


def final(engine: slurm_engine.SlurmEngine, job_id: str, timeout: float = 300) -> JobState:
    return wait_for(lambda: (s := engine.poll(job_id)).final and s, timeout, f"job {job_id} to end")


def job_cgroups(job_id: str) -> list[str]:
    """Directories Slurm made for the job in any cgroup hierarchy (v1 or v2)."""
    return [str(p) for p in Path("/sys/fs/cgroup").glob(f"**/job_{job_id}") if p.is_dir()]


def verdict(req: RunRequest) -> dict[str, Any] | None:
    """The runner's final event, where its event stream has one."""
    for line in reversed(req.events.read_text().splitlines() if req.events.exists() else []):
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if event.get("event") == "verdict":
            return event
    return None


def test_two_tenants_runs_finish(engine: slurm_engine.SlurmEngine, tenants: dict[str, str], tmp_path: Path) -> None:
    reqs = [request(tmp_path, who, tenants[who]) for who in ("capped", "free")]
    jobs = [engine.submit(r) for r in reqs]
    states = [final(engine, j) for j in jobs]
    for req, job, state in zip(reqs, jobs, states):
        assert state.state == SUCCEEDED, (state, req.runner_log.read_text())
        assert state.exit_code == 0
        assert (req.workspace / "model" / "weights.json").is_file()
        account = subprocess.run(["sacct", "-X", "-n", "-P", "-j", job, "-o", "Account"], capture_output=True,
                                 text=True, check=False).stdout.strip()
        assert account == req.tenant
    # Jobs are found again by id alone, as after a server restart.
    fresh = get_engine("slurm")
    assert {j: s.state for j, s in fresh.recover(jobs).items()} == dict.fromkeys(jobs, SUCCEEDED)


def test_a_tenant_over_grpjobs_waits_while_the_other_runs(engine: slurm_engine.SlurmEngine,
                                                          tenants: dict[str, str], tmp_path: Path) -> None:
    blocking = write_pipeline(tmp_path / "blocking-src", datasource=BLOCKING_DATASOURCE).parent
    first = request(tmp_path, "capped-1", tenants["capped"], blocking)
    first_job = engine.submit(first)
    wait_for(lambda: engine.poll(first_job).state == RUNNING, 120, "the capped tenant's first job to run")
    second = request(tmp_path, "capped-2", tenants["capped"])
    second_job = engine.submit(second)
    other = request(tmp_path, "free-1", tenants["free"])
    other_job = engine.submit(other)

    held = wait_for(lambda: (s := engine.poll(second_job)).reason == "AssocGrpJobsLimit" and s, 60,
                    "the capped tenant's second job to be held by GrpJobs")
    assert held.state == PENDING
    assert final(engine, other_job).state == SUCCEEDED  # the other tenant runs meanwhile
    assert engine.poll(second_job).state == PENDING
    assert engine.poll(first_job).state == RUNNING

    # Cancel reaches scancel: Slurm records the job as cancelled, the runner's stages are gone.
    engine.cancel(first_job)
    ended = final(engine, first_job, 120)
    assert ended.state == CANCELED and ended.reason == "CANCELLED"
    engine.cancel(first_job)  # idempotent
    wait_for(lambda: not sandbox_processes(str(first.run_dir)), 60, "the cancelled run's processes to exit")
    # ... and the tenant's next job starts.
    assert final(engine, second_job).state == SUCCEEDED


def test_the_jobs_memory_limit_kills_a_run_that_exceeds_it(cluster: None, tenants: dict[str, str],
                                                            tmp_path: Path) -> None:
    require_bwrap()
    capped = slurm_engine.SlurmEngine(job_memory_cap=300 * MiB, setup_time=300)
    src = write_pipeline(tmp_path / "hungry-src", model=HUNGRY_MODEL).parent
    req = request(tmp_path, "hungry", tenants["free"], src, memory=1 << 30)
    assert "--mem=300M" in capped.job_options(req)
    job = capped.submit(req)
    state = final(capped, job)
    assert state.state == FAILED and state.exit_code == 1, state
    # The kernel killed the biggest process of the job, the stage; the runner says which limit it hit
    # (one paragraph naming the stage and the script), not the stage's own --memory.
    said = req.runner_log.read_text() + req.events.read_text()
    assert "stage 'model' (model.py): killed when the memory the whole run may use ran out" in said, said
    assert "the limit of 300 MiB above the runner" in said
    assert "Traceback" not in said
    assert not (req.workspace / "model" / "weights.json").exists()
    assert "more memory than it was given" in slurm_engine.explain("OUT_OF_MEMORY")  # when Slurm itself saw it


def test_a_fake_gpu_is_scheduled_and_only_it_is_visible(engine: slurm_engine.SlurmEngine, tenants: dict[str, str],
                                                        tmp_path: Path) -> None:
    if not Path("/dev/fakegpu1").exists():
        pytest.fail("/dev/fakegpu0 and 1 are missing: .ci/start-slurm.sh makes them (gres.conf names them)")
    # Another job holds one of the two GPUs, so the run must get the other one.
    holder = subprocess.run(["sbatch", "--parsable", f"--account={tenants['free']}", "--gres=gpu:1", "--mem=64M",
                             "--output=/dev/null", "--wrap=sleep 600"], capture_output=True, text=True, check=True)
    holder_id = holder.stdout.strip().split(";")[0]
    try:
        detail = wait_for(lambda: re.search(r"gpu(?::\w+)?:1\(IDX:(\d)\)", subprocess.run(
            ["scontrol", "show", "job", "-d", holder_id], capture_output=True, text=True, check=False).stdout),
            60, "the GPU holder job to start")
        held = int(detail.group(1))
        src = write_pipeline(tmp_path / "gpu-src", model=GPU_MODEL).parent
        req = request(tmp_path, "gpu", tenants["capped"], src, gpus=1,
                      env={"PIPCOOK_SANDBOX_GPU_DEVICES": "/dev/fakegpu[0-9]*"})
        assert "--gres=gpu:1" in engine.job_options(req)
        job = engine.submit(req)
        assert final(engine, job).state == SUCCEEDED, req.runner_log.read_text()
    finally:
        subprocess.run(["scancel", holder_id], check=False)
    seen = json.loads((req.workspace / "model" / "gpus.json").read_text())
    assert seen == [f"fakegpu{1 - held}"], (held, seen)  # both exist on the host; the stage sees its own only
    assert f"/dev/fakegpu{1 - held}" in req.runner_log.read_text()  # the runner says which it gave


def test_nothing_is_left_after_the_jobs(engine: slurm_engine.SlurmEngine, tenants: dict[str, str],
                                        tmp_path: Path) -> None:
    blocking = write_pipeline(tmp_path / "blocking-src", datasource=BLOCKING_DATASOURCE).parent
    done_req = request(tmp_path, "clean-done", tenants["free"])
    cancel_req = request(tmp_path, "clean-cancel", tenants["free"], blocking)
    done_job, cancel_job = engine.submit(done_req), engine.submit(cancel_req)
    # While it runs, its stages' cgroups nest under the job's (memory at least): cancel then, so the
    # runner's teardown, not only Slurm's, is what the checks below see.
    wait_for(lambda: list(Path("/sys/fs/cgroup").glob(f"*/slurm*/**/job_{cancel_job}/**/pipcook-sandbox/*-datasource")),
             120, "the blocking run's datasource stage to start inside the job's cgroup")
    engine.cancel(cancel_job)
    assert final(engine, done_job).state == SUCCEEDED
    assert final(engine, cancel_job).state == CANCELED
    for job, req in ((done_job, done_req), (cancel_job, cancel_req)):
        wait_for(lambda j=job: not job_cgroups(j), 60, f"Slurm to remove job {job}'s cgroups")
        wait_for(lambda r=req: not sandbox_processes(str(r.run_dir)), 30, f"{req.run_id}'s processes to exit")
    leftover = [str(p) for p in Path("/sys/fs/cgroup").glob("*/slurm*/**/pipcook-sandbox")]
    assert not leftover


def test_submit_refuses_a_tenant_slurm_cannot_name(engine: slurm_engine.SlurmEngine, tmp_path: Path) -> None:
    req = request(tmp_path, "badname", "Tenant With Spaces")
    with pytest.raises(slurm_engine.EngineError, match="cannot be a Slurm account name"):
        engine.submit(req)


def test_submit_under_an_unknown_account_is_a_clear_error(engine: slurm_engine.SlurmEngine, tmp_path: Path) -> None:
    req = request(tmp_path, "noaccount", f"pcsb-missing-{secrets.token_hex(3)}")
    with pytest.raises(slurm_engine.EngineError, match="does not exist or this user may not use it"):
        engine.submit(req)


def test_unknown_jobs_are_gone_not_errors(engine: slurm_engine.SlurmEngine) -> None:
    states = engine.recover(["999999999", "not-a-job"])
    assert states["999999999"].state == "gone"
    assert states["not-a-job"].state == "gone"
    engine.cancel("999999999")  # cancelling what Slurm does not know is not an error


def test_tenant_account_limits_follow_the_quotas(cluster: None) -> None:
    name = f"pcsb-{secrets.token_hex(3)}-quota"
    try:
        assert slurm_engine.ensure_account(name, {"max_jobs": 2, "cpus": 2, "memory": 1 << 30, "job_gpus": 1}) == name
        held = slurm_engine.account_limits(name)
        assert held["GrpJobs"] == "2"
        assert set(held["GrpTRES"].split(",")) == {"cpu=2", "mem=1G"}
        assert held["MaxTRESPerJob"] == "gres/gpu=1"
        slurm_engine.ensure_account(name, {"max_jobs": 3})  # checks and updates; limits not named stay
        held = slurm_engine.account_limits(name)
        assert (held["GrpJobs"], held["MaxTRESPerJob"]) == ("3", "gres/gpu=1")
        assert set(held["GrpTRES"].split(",")) == {"cpu=2", "mem=1G"}
        slurm_engine.ensure_account(name, {"cpus": None, "memory": None, "job_gpus": None})  # None clears
        held = slurm_engine.account_limits(name)
        assert (held["GrpJobs"], held["GrpTRES"], held["MaxTRESPerJob"]) == ("3", "", "")
        with pytest.raises(slurm_engine.EngineError, match="unknown Slurm quota"):
            slurm_engine.ensure_account(name, {"max_jobz": 1})
    finally:
        assert slurm_engine.remove_account(name)
    assert not slurm_engine.remove_account(name)
    with pytest.raises(slurm_engine.EngineError, match="no account"):
        slurm_engine.account_limits(name)


def test_job_script_keeps_the_servers_environment_out(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No cluster needed: what would be submitted."""
    if shutil.which("sbatch") is None:
        pytest.skip("sbatch not installed (the engine refuses to start without it)")
    monkeypatch.setenv("SERVER_SECRET", "hunter2")
    monkeypatch.setenv("PIPCOOK_SANDBOX_CACHE", "/srv/cache dir")
    made = slurm_engine.SlurmEngine(partition="gpu", python="/opt/py/bin/python")
    req = request(tmp_path, "script", "acme", gpus=2, qos="high", env={"EXTRA": "a'b"})
    script = made.job_script(req)
    opts = made.job_options(req)
    assert "hunter2" not in script and "--export=NONE" in opts
    assert "export PIPCOOK_SANDBOX_CACHE='/srv/cache dir'" in script
    assert "export EXTRA='a'\"'\"'b'" in script
    assert script.splitlines()[-1].startswith("exec /opt/py/bin/python -m pipcook_sandbox run ")
    for expected in ("--account=acme", "--qos=high", "--partition=gpu", "--gres=gpu:2", "--cpus-per-task=1",
                     f"--output={req.events}", f"--error={req.runner_log}", "--mem=1280M", "--time=25"):
        assert expected in opts, (expected, opts)


@pytest.fixture(scope="module")
def job_python(cluster: None) -> str:
    """A Python that a non-root job user may run, with this checkout installed (the tests' own
    interpreter may live where that user cannot read, e.g. under /root)."""
    system = shutil.which("python3", path="/usr/bin:/bin")
    if system is None:
        pytest.fail("no /usr/bin/python3 to build the job user's environment from")
    py = JOB_VENV / "bin" / "python"
    if not py.exists():
        subprocess.run([system, "-m", "venv", str(JOB_VENV)], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", str(REPO)], check=True, timeout=900)
    else:  # this checkout's code and any dependency it gained, not what was installed last time
        subprocess.run([str(py), "-m", "pip", "install", "-q", str(REPO)], check=True, timeout=900)
        subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--force-reinstall", str(REPO)],
                       check=True, timeout=300)
    subprocess.run(["chmod", "-R", "a+rX", str(JOB_VENV)], check=True)
    return str(py)


def test_a_non_root_job_user_without_a_home(cluster: None, tenants: dict[str, str], job_python: str) -> None:
    """What the integration found: as the job's user the runner crashed without a writable home and
    only warned that pids/cpu limits were not enforced. Now: a cache under the job's temp dir, memory
    per stage through the job's delegated cgroup, and a statement of what bounds pids and cpu."""
    require_bwrap()
    user = pwd.getpwnam(JOB_USER)
    made = slurm_engine.SlurmEngine(job_user=JOB_USER, python=job_python, setup_time=300)
    base = Path(tempfile.mkdtemp(prefix="pcsb-slurm-"))  # not under pytest's root-only tmp
    try:
        os.chmod(base, 0o755)
        src = write_pipeline(base / "src").parent
        req = request(base, "nobody", tenants["free"], src)
        for path in (req.run_dir, *req.run_dir.iterdir()):
            os.chown(path, user.pw_uid, user.pw_gid)
        assert f"--uid={user.pw_uid}" in made.job_options(req)
        job = made.submit(req)
        state = final(made, job)
        log = req.runner_log.read_text()
        assert state.state == SUCCEEDED, log
        assert (req.workspace / "model" / "weights.json").stat().st_uid == user.pw_uid
        assert "notice: cache" in log and f"pipcook-sandbox-{user.pw_uid}" in log
        assert "PermissionError" not in log
        # Memory per stage holds (the job's memory cgroup is delegated to its user); pids and cpu
        # are said to be bounded by RLIMIT_NPROC and the job's cpuset.
        # (the runner's log lines carry their level and logger first: "WARNING: ...bwrap: stage model: ...")
        degraded = [line for line in log.splitlines() if "stage model: per-stage cgroup limits" in line]
        assert degraded and "NOT enforced: pids, cpu (not delegated" in degraded[0], log
        assert "RLIMIT_NPROC=" in degraded[0] and "cpuset" in degraded[0]
        assert "memory" not in degraded[0].split("what holds instead")[0]
    finally:
        shutil.rmtree(base, ignore_errors=True)
