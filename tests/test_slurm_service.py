"""`pipcook-sandbox server --engine slurm` end to end: tenants submit runs over the API, each run is a
Slurm job under the tenant's account on a real slurmctld/slurmd (.ci/start-slurm.sh), and every
answer the tests wait for comes from the API or from Slurm itself."""
from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import require_bwrap, require_slurm, sandbox_processes
from httpserver import Server
from servicekit import (
    SLOW_MODEL,
    ServerProcess,
    add_tenant,
    cli,
    pipeline,
    run_state,
    serve_script,
    serve_tiny,
    wait_for,
    wait_state,
)

from pipcook_sandbox.runner.engines import slurm as slurm_engine

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]
ENDED = ("succeeded", "failed", "canceled")

from slurmkit import GPU_MODEL, HUNGRY_MODEL  # noqa: E402  (shared with test_slurm)


def _sacct(job_id: str, field: str) -> str:
    return subprocess.run(["sacct", "-X", "-n", "-P", "-j", job_id, "-o", field], capture_output=True, text=True,
                          check=False).stdout.strip()


def _cancel_account_jobs(account: str) -> None:
    subprocess.run(["scancel", f"--account={account}"], capture_output=True, check=False)
    wait_for(lambda: not subprocess.run(["squeue", "-h", "-A", account], capture_output=True, text=True,
                                        check=False).stdout.strip(), 120, f"the jobs of {account} to end")


class Cluster:
    """One server with --engine slurm and two tenants: `capped` runs one job at a time (its account's
    GrpJobs, from --max-running 1, made by `tenants add --slurm-account`), `free` two (its account made
    by the server before its first run)."""

    def __init__(self, data: Path, *server_args: str) -> None:
        tag = secrets.token_hex(3)
        self.capped, self.free = f"pcsb{tag}-capped", f"pcsb{tag}-free"
        self.server = ServerProcess(data, "--engine", "slurm", *server_args)
        self.jobs: list[str] = []
        self.tokens: dict[str, str] = {}

    def start(self) -> Cluster:
        self.server.start()
        self.tokens[self.capped] = add_tenant(self.server.data, self.capped, "--slurm-account", "--max-running", "1",
                                              "--max-queued", "2", "--memory", "256m", "--cpus", "1", "--gpus", "1")
        self.tokens[self.free] = add_tenant(self.server.data, self.free, "--max-running", "2", "--memory", "1g",
                                            "--cpus", "1", "--gpus", "1")
        return self

    def client(self, tenant: str) -> Any:
        return self.server.client(self.tokens[tenant])

    def submit(self, tenant: str, body: dict[str, Any]) -> str:
        with self.client(tenant) as client:
            response = client.post("/v1/runs", json=body)
        assert response.status_code == 202, response.text
        return response.json()["id"]

    def job(self, tenant: str, run_id: str, timeout: float = 120) -> dict[str, Any]:
        """The run's Slurm job as the API shows it, once it has one."""
        with self.client(tenant) as client:
            job = wait_for(lambda: run_state(client, run_id).get("job"), timeout,
                           f"run {run_id} to be given a Slurm job")
        assert job["engine"] == "slurm"
        if job["id"] not in self.jobs:
            self.jobs.append(job["id"])
        return job

    def wait(self, tenant: str, run_id: str, states: tuple[str, ...] = ENDED, timeout: float = 300) -> dict[str, Any]:
        with self.client(tenant) as client:
            return wait_state(client, run_id, states, timeout)

    def close(self) -> None:
        for account in (self.capped, self.free):
            _cancel_account_jobs(account)  # jobs outlive the server by design
        assert self.server.stop() == 0, self.server.log.read_text()[-3000:]
        for name in (self.capped, self.free):
            done = cli("tenants", "remove", name, "--data", str(self.server.data), "--slurm-account")
            assert done.returncode == 0, done.stderr


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    require_slurm()
    require_bwrap()
    mp = pytest.MonkeyPatch()
    # The server passes PIPCOOK_* settings on to its jobs: the fake GPUs are the job's GPU devices.
    mp.setenv("PIPCOOK_SANDBOX_GPU_DEVICES", "/dev/fakegpu[0-9]*")
    made = Cluster(tmp_path_factory.mktemp("slurmsvc") / "data")
    try:
        made.start()
        yield made
    finally:
        made.close()
        mp.undo()


def test_two_tenants_runs_finish(cluster: Cluster, web: Server) -> None:
    url = serve_tiny(web, "/tiny-both")
    runs = {tenant: cluster.submit(tenant, {"pipeline_url": url}) for tenant in (cluster.capped, cluster.free)}
    for tenant, run_id in runs.items():
        job = cluster.job(tenant, run_id)
        done = cluster.wait(tenant, run_id)
        assert done["status"] == "succeeded", done["error"]
        assert done["metrics"]["accuracy"] > 0.9 and "model.zip" in done["artifacts"]
        assert _sacct(job["id"], "Account") == tenant
        assert _sacct(job["id"], "State") == "COMPLETED"
    # The account `tenants add --slurm-account` made, and the one the server made before the first run.
    assert slurm_engine.account_limits(cluster.capped)["GrpJobs"] == "1"
    assert slurm_engine.account_limits(cluster.free)["GrpJobs"] == "2"


def test_a_tenant_over_grpjobs_waits_while_the_other_runs_and_cancel_reaches_scancel(
        cluster: Cluster, web: Server) -> None:
    slow = serve_script(web, "/grp/slow.py", SLOW_MODEL)
    data = serve_script(web, "/grp/datasource.py", (Path(__file__).parent / "pipelines/tiny/datasource.py").read_text())
    url = serve_tiny(web, "/tiny-grp")
    first = cluster.submit(cluster.capped, {"pipeline": pipeline(data, slow)})
    wait_for(lambda: (cluster.job(cluster.capped, first)["state"] == "running"), 120, "the first job to run")
    second = cluster.submit(cluster.capped, {"pipeline_url": url})
    held = cluster.job(cluster.capped, second)
    # The service handed it to Slurm; Slurm holds it for the tenant's GrpJobs.
    wait_for(lambda: cluster.job(cluster.capped, second)["reason"] == "AssocGrpJobsLimit", 60,
             "Slurm to hold the capped tenant's second job (AssocGrpJobsLimit)")
    assert cluster.job(cluster.capped, second)["state"] == "pending"
    other = cluster.submit(cluster.free, {"pipeline_url": url})
    # Runs waiting in Slurm count against the tenant's room: max-running 1 + max-queued 2, then 429
    # (not a run that fails when sbatch meets the account's GrpSubmitJobs).
    third = cluster.submit(cluster.capped, {"pipeline_url": url})
    third_job = cluster.job(cluster.capped, third)["id"]  # handed to Slurm, which holds it
    with cluster.client(cluster.capped) as client:
        refused = client.post("/v1/runs", json={"pipeline_url": url})
        assert refused.status_code == 429, refused.text
        assert "max-running 1 + max-queued 2" in refused.json()["detail"]
        assert client.post(f"/v1/runs/{third}/cancel").status_code == 202  # cancelled while Slurm holds it
    assert cluster.wait(cluster.capped, third, timeout=120)["status"] == "canceled"
    assert _sacct(third_job, "State").startswith("CANCELLED")
    assert cluster.wait(cluster.free, other)["status"] == "succeeded"  # the other tenant ran meanwhile
    assert cluster.job(cluster.capped, second)["state"] == "pending"

    first_job = cluster.job(cluster.capped, first)["id"]
    with cluster.client(cluster.capped) as client:
        assert client.post(f"/v1/runs/{first}/cancel").status_code == 202
    assert cluster.wait(cluster.capped, first, timeout=120)["status"] == "canceled"
    assert _sacct(first_job, "State").startswith("CANCELLED")  # scancel, as Slurm recorded it
    assert cluster.wait(cluster.capped, second)["status"] == "succeeded"
    # Slurm's accounting keeps why it waited, and that it ran once the first was gone.
    assert (_sacct(held["id"], "State"), _sacct(held["id"], "Reason")) == ("COMPLETED", "AssocGrpJobsLimit")


def test_the_jobs_memory_limit_kills_a_run_that_exceeds_it(tmp_path: Path, web: Server) -> None:
    require_slurm()
    require_bwrap()
    capped = Cluster(tmp_path / "data", "--slurm-job-memory", "300m").start()
    try:
        hungry = serve_script(web, "/mem/model.py", HUNGRY_MODEL)
        data = serve_script(web, "/mem/datasource.py",
                            (Path(__file__).parent / "pipelines/tiny/datasource.py").read_text())
        run_id = capped.submit(capped.free, {"pipeline": pipeline(data, hungry)})  # 1g per stage, 300m the job
        job = capped.job(capped.free, run_id)
        done = capped.wait(capped.free, run_id)
        # slurmdbd records a job asynchronously: right after the run ends sacct may still show a half-made
        # ReqMem ("16?" was seen in CI), so wait until the record holds the request.
        wait_for(lambda: _sacct(job["id"], "ReqMem") == "300M", 60, "sacct to record the job's 300M request")
        assert done["status"] == "failed"
        # One paragraph naming the stage, the script and the limit that was hit: the job's, not --memory.
        assert "stage 'model'" in done["error"] and "model.py" in done["error"], done["error"]
        assert "the memory the whole run may use ran out" in done["error"], done["error"]
        assert "Traceback" not in done["error"]
    finally:
        capped.close()


def test_a_fake_gpu_gres_is_scheduled_and_only_it_is_visible(cluster: Cluster, web: Server) -> None:
    if not Path("/dev/fakegpu1").exists():
        pytest.fail("/dev/fakegpu0 and 1 are missing: .ci/start-slurm.sh makes them (gres.conf names them)")
    holder_account = slurm_engine.ensure_account(f"{cluster.capped[:10]}-holder", {})
    holder = subprocess.run(["sbatch", "--parsable", f"--account={holder_account}", "--gres=gpu:1", "--mem=64M",
                             "--output=/dev/null", "--wrap=sleep 600"], capture_output=True, text=True, check=True)
    holder_id = holder.stdout.strip().split(";")[0]
    try:
        found = wait_for(lambda: re.search(r"gpu(?::\w+)?:1\(IDX:(\d)\)", subprocess.run(
            ["scontrol", "show", "job", "-d", holder_id], capture_output=True, text=True, check=False).stdout),
            60, "the job holding one GPU to start")
        held = int(found.group(1))
        model = serve_script(web, "/gpu/model.py", GPU_MODEL)
        data = serve_script(web, "/gpu/datasource.py",
                            (Path(__file__).parent / "pipelines/tiny/datasource.py").read_text())
        run_id = cluster.submit(cluster.capped, {"pipeline": pipeline(data, model), "gpu": 1})
        job = cluster.job(cluster.capped, run_id)
        done = cluster.wait(cluster.capped, run_id)
        assert done["status"] == "succeeded", done["error"]
    finally:
        _cancel_account_jobs(holder_account)
        slurm_engine.remove_account(holder_account)
    assert "gres/gpu=1" in _sacct(job["id"], "AllocTRES")
    workspace = cluster.server.data / "tenants" / cluster.capped / "runs" / run_id / "workspace"
    seen = json.loads((workspace / "model" / "gpus.json").read_text())
    assert seen == [f"fakegpu{1 - held}"], (held, seen)  # both exist on the host: the stage sees its own only


def test_runs_survive_a_server_restart(cluster: Cluster, web: Server) -> None:
    """Slurm jobs outlive the server: one that finished while it was down is settled from sacct, one
    still running is watched again (and can be cancelled)."""
    url = serve_tiny(web, "/tiny-restart")
    slow = serve_script(web, "/restart/slow.py", SLOW_MODEL)
    data = serve_script(web, "/restart/datasource.py",
                        (Path(__file__).parent / "pipelines/tiny/datasource.py").read_text())
    quick = cluster.submit(cluster.free, {"pipeline_url": url})
    long = cluster.submit(cluster.free, {"pipeline": pipeline(data, slow)})
    quick_job = cluster.job(cluster.free, quick)["id"]
    long_job = cluster.job(cluster.free, long)["id"]
    assert cluster.server.stop() == 0
    engine = slurm_engine.SlurmEngine()
    wait_for(lambda: engine.poll(quick_job).state == "succeeded", 300, "the quick job to finish while the server is down")
    assert engine.poll(long_job).state in ("running", "pending")
    cluster.server.start()
    assert cluster.wait(cluster.free, quick)["status"] == "succeeded"
    with cluster.client(cluster.free) as client:
        assert run_state(client, long)["status"] == "running"
        assert client.post(f"/v1/runs/{long}/cancel").status_code == 202
    assert cluster.wait(cluster.free, long, timeout=120)["status"] == "canceled"


def test_nothing_is_left_after_the_jobs(cluster: Cluster) -> None:
    """Runs last in this module: every job the tests made has ended, and left no cgroup or process."""
    assert cluster.jobs
    for job_id in cluster.jobs:
        wait_for(lambda j=job_id: _sacct(j, "State") not in ("", "RUNNING", "PENDING", "COMPLETING"), 120,
                 f"job {job_id} to end")
        wait_for(lambda j=job_id: not list(Path("/sys/fs/cgroup").glob(f"*/slurm*/uid_*/job_{j}")), 60,
                 f"Slurm to remove job {job_id}'s cgroups")
    assert not list(Path("/sys/fs/cgroup").glob("*/slurm*/**/pipcook-sandbox"))
    wait_for(lambda: not sandbox_processes(str(cluster.server.data / "tenants")), 30,
             "the runs' runners and sandboxes to exit")
    assert os.path.isdir(cluster.server.data)
