"""Tenant separation on the host (issue 14, item 4), with each backend.

Tenant B's run leaves a workspace; a stage of tenant A then tries to list,
read and write that path. Inside the sandbox it fails (the path is not even
there), and outside it, where a kernel-level escape would land, A's uid
cannot read or write anything of B's: B's directories are 0700 and owned
by B's uid.
"""
from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import require_bwrap, require_docker

try:
    from httpserver import Server, start_server
    from servicekit import PROBE, ServerProcess, add_tenant, pipeline, serve_script, serve_tiny, tenant_uid, wait_state
except ImportError:
    from tests.httpserver import Server, start_server
    from tests.servicekit import (
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


@pytest.fixture(scope="module")
def web() -> Iterator[Server]:
    state, httpd = start_server()
    try:
        yield state
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture(scope="module", params=["bwrap", "docker"])
def two_tenants(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, web: Server):
    if os.geteuid() != 0:
        pytest.skip("per-tenant uids need a root server")
    if request.param == "bwrap":
        require_bwrap()
    else:
        require_docker()
    data = tmp_path_factory.mktemp(f"sep-{request.param}") / "data"
    # pytest's temp dirs are 0700 root: open them so that only the service's own modes keep tenant A
    # out of tenant B's files (else the host-level test would pass for the wrong reason)
    for parent in (data.parent, data.parent.parent, data.parent.parent.parent):
        os.chmod(parent, 0o755)
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
        assert server.stop() == 0, server.log.read_text()[-3000:]


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


def test_tenant_as_uid_outside_any_sandbox_cannot_reach_tenant_bs_files(two_tenants) -> None:
    """Where a kernel-level escape from A's sandbox would land: a process of A's uid on the host."""
    server, _, workspace_b = two_tenants
    uid_a = tenant_uid(server.data, "tenant-a")
    code = (
        "import os, sys\n"
        "target = sys.argv[1]\n"
        "outcomes = []\n"
        "for what, fn in (('list', lambda: os.listdir(target)),\n"
        "                 ('read', lambda: open(os.path.join(target, 'pipeline.json'), 'rb').read()),\n"
        "                 ('write', lambda: open(os.path.join(target, 'planted.txt'), 'w').write('x')),\n"
        "                 ('list-tenant', lambda: os.listdir(os.path.dirname(os.path.dirname(os.path.dirname(target))))),\n"
        "                 ('list-tenants', lambda: os.listdir(os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(target))))))):\n"
        "    try:\n"
        "        fn(); outcomes.append(what + ' ALLOWED')\n"
        "    except PermissionError:\n"
        "        outcomes.append(what + ' DENIED')\n"
        "print('\\n'.join(outcomes))\n"
    )

    def become_a() -> None:
        os.setgroups([])
        os.setgid(uid_a)
        os.setuid(uid_a)

    done = subprocess.run([sys.executable, "-I", "-S", "-c", code, str(workspace_b)], capture_output=True, text=True,
                          preexec_fn=become_a, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:5] == ["list DENIED", "read DENIED", "write DENIED", "list-tenant DENIED",
                                           "list-tenants DENIED"]
    assert not (workspace_b / "planted.txt").exists()
