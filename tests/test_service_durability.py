"""`kill -9` of the server during runs, then a restart (issue 14, item 5).

Policy under test: queued runs stay queued (and run after the restart);
runs that were running are stopped and marked failed "server restarted",
never requeued; their runners, sandboxes, mounts and temp dirs are gone; the
database is consistent (integrity check, every run's state equal to its last
transition).
"""
from __future__ import annotations

import json
import sqlite3
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import require_bwrap
from httpserver import Server, serving
from servicekit import (
    SLOW_MODEL,
    ServerProcess,
    add_tenant,
    mounts_mentioning,
    pipeline,
    processes_mentioning,
    run_state,
    serve_script,
    serve_tiny,
    wait_for,
    wait_state,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]


@pytest.fixture
def web() -> Iterator[Server]:
    """A fresh local HTTP server per test (conftest's `web` is one per module)."""
    with serving() as state:
        yield state


def _state_dirs_of(pids: set[int]) -> list[str]:
    """Runner state dirs (/tmp/pcsb-*, holding sockets, volumes, mounts) of these runner pids."""
    found = []
    for path in Path(tempfile.gettempdir()).glob("pcsb-*/run.json"):
        try:
            if json.loads(path.read_text()).get("runner_pid") in pids:
                found.append(str(path.parent))
        except (OSError, ValueError):
            continue
    return found


def test_kill_9_then_restart_keeps_queued_runs_and_fails_running_ones_cleanly(tmp_path: Path, web: Server) -> None:
    require_bwrap()
    data = tmp_path / "data"
    token = add_tenant(data, "erin", "--cpus", "0.5", "--memory", "512m", "--max-running", "2")
    serve_tiny(web)
    slow = serve_script(web, "/slow/model.py", SLOW_MODEL)
    body = {"pipeline": pipeline(web.url("/tiny/datasource.py"), slow)}
    # capacity for two runs at once (0.5 CPU each): two run, the third waits
    server = ServerProcess(data, "--capacity-cpus", "1").start()
    try:
        with server.client(token) as client:
            running = [client.post("/v1/runs", json=body).json()["id"] for _ in range(2)]
            for run_id in running:
                wait_for(lambda run_id=run_id: run_state(client, run_id)["stages"].get("model") == "running", 300,
                         f"the model stage of {run_id} to run")
            queued = client.post("/v1/runs", json=body).json()["id"]
            assert run_state(client, queued)["status"] == "queued"
        runners = {run_id: processes_mentioning(f"/runs/{run_id}/") for run_id in running}
        assert all(runners.values())
        pids = {pid for found in runners.values() for pid in found}
        assert len(_state_dirs_of(pids)) == 2  # each runner holds one while it runs

        server.kill9()

        # the kernel's SIGTERM (PDEATHSIG) makes each runner tear its sandboxes down and exit
        for run_id in running:
            wait_for(lambda run_id=run_id: not processes_mentioning(f"/runs/{run_id}/"), 120,
                     f"the runner and sandboxes of {run_id} to go")
        db = sqlite3.connect(data / "service.db")
        states = dict(db.execute("SELECT id, state FROM runs"))
        db.close()
        assert states == {running[0]: "running", running[1]: "running", queued: "queued"}  # as the crash left them

        server.start()
        with server.client(token) as client:
            for run_id in running:
                after = run_state(client, run_id)
                assert after["status"] == "failed"
                assert after["error"].startswith("server restarted")
                assert [t["state"] for t in after["transitions"]] == ["queued", "running", "failed"]
            # the queued run was kept, and now runs (never failed, never run twice)
            resumed = wait_state(client, queued, ("running",), timeout=120)
            assert [t["state"] for t in resumed["transitions"]] == ["queued", "running"]
            client.post(f"/v1/runs/{queued}/cancel")
            wait_state(client, queued, ("canceled",), timeout=120)

        for run_id in running + [queued]:
            assert not processes_mentioning(f"/runs/{run_id}/")
            assert not mounts_mentioning(f"/runs/{run_id}")
        assert _state_dirs_of(pids) == []  # no sandbox state dir left behind

        db = sqlite3.connect(data / "service.db")
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        for run_id, state in db.execute("SELECT id, state FROM runs"):
            last = db.execute("SELECT state FROM transitions WHERE run_id = ? ORDER BY seq DESC LIMIT 1",
                              (run_id,)).fetchone()[0]
            assert last == state, run_id
        db.close()
    finally:
        assert server.stop() == 0


def test_a_second_server_on_the_same_data_is_refused(tmp_path: Path) -> None:
    require_bwrap()
    data = tmp_path / "data"
    first = ServerProcess(data).start()
    try:
        second = ServerProcess(data)
        with pytest.raises(AssertionError, match="another server is running"):
            second.start()
    finally:
        assert first.stop() == 0
