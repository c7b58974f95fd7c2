"""The service's warm runners (`server --warm N`, engines/warmpool.py, runner/warmrunner.py): a tenant's
next run is handed to a runner started for that tenant and kind of run, whose sandboxes are booted
with the tenant's uid; never to another tenant's; each takes one run; nothing is left behind by a
shutdown or a `kill -9` of the server."""
from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import leftover_mounts, require_bwrap
from httpserver import Server
from servicekit import (
    ServerProcess,
    add_tenant,
    pipeline,
    serve_script,
    tenant_uid,
    wait_for,
    wait_state,
)

pytestmark = [pytest.mark.e2e, pytest.mark.hostile, pytest.mark.timeout(900)]

WHOAMI = '''
import os

from sandbox import sdk


def datasource(options, ctx):
    print("uid", os.getuid(), flush=True)
    samples = [{"data": [float(i), 1.0, 0.0, 0.0], "label": i % 2} for i in range(40)]
    return sdk.from_lists(train=samples, test=samples[:8], meta={"type": "general", "categories": ["a", "b"]})
'''
DATAFLOW = '''
def dataflow(pool, options, ctx):
    return pool
'''
MODEL = '''
def train(runtime, options, ctx):
    runtime.dataset.train.next_batch(8)
'''


@pytest.fixture
def base() -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("per-tenant uids need a root server")
    require_bwrap()
    path = Path(tempfile.mkdtemp(prefix="pcsb-test-warm-"))
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def warm_runners(uid: int) -> list[int]:
    """Pids of the idle warm runners prepared for stage uid `uid`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"pipcook_sandbox.runner.warmrunner" in cmdline and f"{uid}:{uid}".encode() in cmdline:
            found.append(int(entry.name))
    return found


def submit(server: ServerProcess, token: str, body: dict) -> tuple[str, dict]:
    with server.client(token) as client:
        response = client.post("/v1/runs", json={"pipeline": body})
        assert response.status_code == 202, response.text
        run_id = response.json()["id"]
        return run_id, wait_state(client, run_id, ("succeeded", "failed", "canceled"), timeout=600)


def run_dir(data: Path, tenant: str, run_id: str) -> Path:
    return data / "tenants" / tenant / "runs" / run_id


def test_warm_runners_serve_their_own_tenant_only_and_one_run_each(base: Path, web: Server) -> None:
    data = base / "data"
    tokens = {"a": add_tenant(data, "tenant-a"), "b": add_tenant(data, "tenant-b")}
    uids = {"a": tenant_uid(data, "tenant-a"), "b": tenant_uid(data, "tenant-b")}
    body = pipeline(serve_script(web, "/warm/ds.py", WHOAMI), serve_script(web, "/warm/model.py", MODEL),
                    [serve_script(web, "/warm/df.py", DATAFLOW)])
    server = ServerProcess(data, "--warm", "1").start()
    try:
        first, state = submit(server, tokens["a"], body)  # cold; afterwards one runner waits for tenant A
        assert state["status"] == "succeeded", state["error"]
        a_runner = wait_for(lambda: warm_runners(uids["a"]), 120, "a warm runner for tenant A")
        assert not warm_runners(uids["b"])

        run_b, state = submit(server, tokens["b"], body)  # B has none ready: B's run must not take A's
        assert state["status"] == "succeeded", state["error"]
        log_b = run_dir(data, "tenant-b", run_b) / "workspace" / "logs" / "datasource.log"
        assert f"uid {uids['b']}" in log_b.read_text()
        assert "warm runner" not in (run_dir(data, "tenant-b", run_b) / "runner.log").read_text()
        assert warm_runners(uids["a"]) == a_runner, "tenant B's run took (or disturbed) tenant A's warm runner"

        second, state = submit(server, tokens["a"], body)  # A's runner takes it, booted for A
        assert state["status"] == "succeeded", state["error"]
        runner_log = (run_dir(data, "tenant-a", second) / "runner.log").read_text()
        assert "3 of 3 stages ran in the sandbox booted for them" in runner_log, runner_log[-2000:]
        log_a = run_dir(data, "tenant-a", second) / "workspace" / "logs" / "datasource.log"
        assert f"uid {uids['a']}" in log_a.read_text()
        # the runner that took it is gone (one run each); a fresh one waits in its place
        wait_for(lambda: not any(pid in warm_runners(uids["a"]) for pid in a_runner), 60,
                 "the warm runner that took a run to exit")
        wait_for(lambda: warm_runners(uids["a"]), 120, "a new warm runner for tenant A")
    finally:
        server.stop()
    wait_for(lambda: not warm_runners(uids["a"]) and not warm_runners(uids["b"]), 60,
             "the warm runners to end with the server")
    assert not leftover_mounts()


def test_kill_9_of_the_server_leaves_no_warm_runner_behind(base: Path, web: Server) -> None:
    data = base / "data"
    token = add_tenant(data, "tenant-k")
    uid = tenant_uid(data, "tenant-k")
    body = pipeline(serve_script(web, "/warmk/ds.py", WHOAMI), serve_script(web, "/warmk/model.py", MODEL))
    server = ServerProcess(data, "--warm", "2").start()
    try:
        _, state = submit(server, token, body)
        assert state["status"] == "succeeded", state["error"]
        wait_for(lambda: len(warm_runners(uid)) == 2, 120, "two warm runners for the tenant")
    finally:
        server.kill9()
    # PDEATHSIG: each warm runner gets SIGTERM and tears its booted sandboxes down
    wait_for(lambda: not warm_runners(uid), 60, "the warm runners to end after the server's kill -9")
    wait_for(lambda: not leftover_mounts(), 60, "no mount of a warm runner's state dir")


def test_the_pool_key_names_the_tenant_and_every_option_of_the_run(tmp_path: Path) -> None:
    from pipcook_sandbox.runner.engines.base import RunRequest
    from pipcook_sandbox.runner.engines.local import RUN_OPTIONS, command
    from pipcook_sandbox.runner.engines.warmpool import pool_key

    def key(**changes: object) -> tuple[str, ...]:
        fields: dict = {"run_id": "r1", "tenant": "a", "run_dir": tmp_path / "r1", "stage_uid": 200001, **changes}
        request = RunRequest(**fields)
        return pool_key(request, command(request)[RUN_OPTIONS:])

    assert key() == key(run_id="r2", run_dir=tmp_path / "r2"), "the run itself must not be part of its kind"
    for other in ({"tenant": "b"}, {"stage_uid": 200002}, {"memory": 1 << 30}, {"cpus": 0.5}, {"disk": 1 << 20},
                  {"timeout": 5.0}, {"pids": 8}, {"allow_private": ("127.0.0.1",)}, {"env": {"X": "1"}},
                  {"isolation": "docker"}):
        assert key(**other) != key(), other
