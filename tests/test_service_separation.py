"""Tenant separation on the host (issue 14, item 4), with each backend.

Tenant B's run leaves a workspace; a stage of tenant A then tries to list,
read and write that path. Inside the sandbox it fails (the path is not even
there), and outside it, where a kernel-level escape would land, A's uid
cannot read or write anything of B's: B's directories are 0700 and owned
by B's uid.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
from conftest import require_bwrap, require_docker
from httpserver import Server
from servicekit import (
    PROBE,
    ServerProcess,
    add_tenant,
    pipeline,
    serve_script,
    serve_tiny,
    tenant_uid,
    wait_state,
)

pytestmark = [pytest.mark.e2e, pytest.mark.hostile, pytest.mark.timeout(900)]


@pytest.fixture(scope="module", params=["bwrap", "docker"])
def two_tenants(request: pytest.FixtureRequest, web: Server):
    if os.geteuid() != 0:
        pytest.skip("per-tenant uids need a root server")
    if request.param == "bwrap":
        require_bwrap()
    else:
        require_docker()
    # Not under pytest's temp dirs: they are 0700 root, and the host-level test would pass for the wrong
    # reason. Here only the service's own modes keep tenant A out of tenant B's files.
    base = Path(tempfile.mkdtemp(prefix=f"pcsb-test-sep-{request.param}-"))
    os.chmod(base, 0o755)
    data = base / "data"
    tokens = {"a": add_tenant(data, "tenant-a"), "b": add_tenant(data, "tenant-b")}
    server = ServerProcess(data, "--isolation", request.param).start()
    try:
        url = serve_tiny(web)
        with server.client(tokens["b"]) as client:
            response = client.post("/v1/runs", json={"pipeline_url": url})
            assert response.status_code == 202, response.text
            run_b = response.json()["id"]
            done = wait_state(client, run_b, ("succeeded", "failed", "canceled"), timeout=600)
            assert done["status"] == "succeeded", done["error"]
        workspace_b = data / "tenants" / "tenant-b" / "runs" / run_b / "workspace"
        assert (workspace_b / "pipeline.json").is_file()
        yield server, tokens, workspace_b
    finally:
        try:
            assert server.stop() == 0, server.log.read_text()[-3000:]
        finally:
            shutil.rmtree(base, ignore_errors=True)


def _probe_lines(server: ServerProcess, token: str, web: Server, target: Path) -> dict[str, str]:
    probe = serve_script(web, "/probe/datasource.py", PROBE)
    body = pipeline(f"{probe}?target={target}", web.url("/tiny/model.py"))
    with server.client(token) as client:
        response = client.post("/v1/runs", json={"pipeline": body})
        assert response.status_code == 202, response.text
        run_id = response.json()["id"]
        done = wait_state(client, run_id, ("succeeded", "failed", "canceled"), timeout=600)
        assert done["status"] == "succeeded", done["error"]
        log = client.get(f"/v1/runs/{run_id}/logs/datasource").text
    return {line.split()[0]: line for line in log.splitlines() if line.split()}


def test_a_stage_of_tenant_a_cannot_read_or_write_tenant_bs_workspace(two_tenants, web: Server) -> None:
    server, tokens, workspace_b = two_tenants
    before = sorted(p.name for p in workspace_b.iterdir())
    seen = _probe_lines(server, tokens["a"], web, workspace_b)
    for what in ("list", "read", "write", "mkdir"):
        assert "DENIED" in seen[what], seen
    assert sorted(p.name for p in workspace_b.iterdir()) == before
    assert not (workspace_b / "planted.txt").exists()


def test_a_stage_runs_as_its_tenants_own_uid(two_tenants, web: Server) -> None:
    server, tokens, workspace_b = two_tenants
    seen = _probe_lines(server, tokens["a"], web, workspace_b)
    uid_a = tenant_uid(server.data, "tenant-a")
    assert seen["uid"].split()[1] == str(uid_a)
    assert uid_a != tenant_uid(server.data, "tenant-b")
    assert uid_a not in (0, 65534)


def _as_uid(uid: int, attempts: dict) -> list[str]:
    """Run each attempt in a forked child that has become host UID (no groups); its outcomes."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: only plain os calls, then _exit
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            lines = []
            for what, attempt in attempts.items():
                try:
                    attempt()
                    lines.append(f"{what} ALLOWED")
                except PermissionError:
                    lines.append(f"{what} DENIED")
                except OSError as exc:
                    lines.append(f"{what} ERROR {exc.errno}")
            os.write(write_end, "\n".join(lines).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as f:
        out = f.read().decode()
    os.waitpid(pid, 0)
    return out.splitlines()


def test_tenant_as_uid_outside_any_sandbox_cannot_reach_tenant_bs_files(two_tenants) -> None:
    """Where a kernel-level escape from A's sandbox would land: a process of A's uid on the host."""
    server, _, workspace_b = two_tenants
    uid_a = tenant_uid(server.data, "tenant-a")
    run_b = workspace_b.parent
    tenant_b = run_b.parent.parent
    attempts = {
        "list": lambda: os.listdir(workspace_b),
        "read": lambda: open(workspace_b / "pipeline.json", "rb").read(),
        "write": lambda: open(workspace_b / "planted.txt", "w").write("x"),
        "read-events": lambda: open(run_b / "events.jsonl", "rb").read(),
        "list-tenant": lambda: os.listdir(tenant_b),
        "list-cache": lambda: os.listdir(tenant_b / "cache"),
        "list-tenants": lambda: os.listdir(tenant_b.parent),
    }
    outcomes = _as_uid(uid_a, attempts)
    assert outcomes == [f"{what} DENIED" for what in attempts]
    assert not (workspace_b / "planted.txt").exists()
    # the control: A's uid can reach its own tenant directory (the denials above are B's modes at work)
    tenant_a = tenant_b.parent / "tenant-a"
    assert _as_uid(uid_a, {"list-own": lambda: os.listdir(tenant_a)}) == ["list-own ALLOWED"]
