"""Fair scheduling across tenants (issue 14, item 3): round robin, within capacity.

Capacity for one run at a time. Tenant "many" queues six runs, then tenant
"one" submits a single run: it must start right after the run that was
running, ahead of every other queued run of "many".
"""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import require_bwrap
from httpserver import Server, serving
from servicekit import ServerProcess, add_tenant, run_state, serve_tiny, wait_state

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]


@pytest.fixture
def web() -> Iterator[Server]:
    """A fresh local HTTP server per test (conftest's `web` is one per module)."""
    with serving() as state:
        yield state


def test_a_single_run_waits_at_most_one_slot_behind_a_tenant_with_many(tmp_path: Path, web: Server) -> None:
    require_bwrap()
    data = tmp_path / "data"
    many = add_tenant(data, "many", "--cpus", "1", "--memory", "256m", "--max-running", "4")
    one = add_tenant(data, "one", "--cpus", "1", "--memory", "256m")
    url = serve_tiny(web)
    server = ServerProcess(data, "--capacity-cpus", "1").start()
    try:
        with server.client(many) as a, server.client(one) as b:
            mine = [a.post("/v1/runs", json={"pipeline_url": url}).json()["id"] for _ in range(6)]
            wait_state(a, mine[0], ("running",), timeout=120)
            assert [run_state(a, r)["status"] for r in mine[1:]] == ["queued"] * 5  # capacity: one at a time
            single = b.post("/v1/runs", json={"pipeline_url": url}).json()["id"]
            first = wait_state(b, single, ("running", "succeeded"), timeout=300)
            submitted, started = first["created"], first["started"]
            jumped = [r for r in mine if submitted < (run_state(a, r)["started"] or float("inf")) < started]
            assert jumped == [], "a run of the busy tenant started after the other tenant's run was queued"
            assert run_state(a, mine[-1])["status"] == "queued"
            assert wait_state(b, single, ("succeeded", "failed"), timeout=300)["status"] == "succeeded"
            # and "many" is served again after it, in its own order
            second = wait_state(a, mine[1], ("running", "succeeded"), timeout=300)
            assert second["started"] > started
            for run_id in mine:
                a.post(f"/v1/runs/{run_id}/cancel")
            for run_id in mine:
                assert wait_state(a, run_id, ("succeeded", "failed", "canceled"), timeout=300)["status"] != "failed"
    finally:
        assert server.stop() == 0


def test_max_running_holds_a_tenant_while_capacity_is_free(tmp_path: Path, web: Server) -> None:
    require_bwrap()
    data = tmp_path / "data"
    token = add_tenant(data, "capped", "--cpus", "0.5", "--memory", "256m", "--max-running", "1")
    url = serve_tiny(web)
    server = ServerProcess(data, "--capacity-cpus", "8").start()
    try:
        with server.client(token) as client:
            ids = [client.post("/v1/runs", json={"pipeline_url": url}).json()["id"] for _ in range(3)]
            for run_id in ids:
                wait_state(client, run_id, ("succeeded",), timeout=300)
            spans = sorted((run_state(client, r)["started"], run_state(client, r)["ended"]) for r in ids)
            for (_, end), (start, _) in zip(spans, spans[1:]):
                assert start >= end, "two runs of a max-running 1 tenant overlapped"
    finally:
        assert server.stop() == 0
