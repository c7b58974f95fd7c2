"""Service mode end to end: a real server on 127.0.0.1, real tenants, real bwrap sandboxes.

One server for the module (starting one probes the sandbox), tenants per concern.
"""
from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import require_bwrap
from httpserver import Server
from servicekit import (
    SLOW_MODEL,
    ServerProcess,
    add_tenant,
    cli,
    pipeline,
    processes_mentioning,
    run_state,
    serve_script,
    serve_tiny,
    wait_for,
    wait_state,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def svc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    require_bwrap()
    data = tmp_path_factory.mktemp("svc") / "data"
    server = ServerProcess(data, "--capacity-cpus", "4", "--capacity-memory", "8g").start()
    try:
        yield server
    finally:
        assert server.stop() == 0, server.log.read_text()[-3000:]


@pytest.fixture(scope="module")
def tokens(svc: ServerProcess) -> dict[str, str]:
    return {
        "alice": add_tenant(svc.data, "alice", "--cpus", "0.5", "--memory", "512m", "--max-running", "2"),
        "bob": add_tenant(svc.data, "bob", "--cpus", "0.5", "--memory", "512m"),
        "carol": add_tenant(svc.data, "carol", "--cpus", "0.5", "--memory", "512m", "--max-running", "1",
                            "--max-queued", "2"),
    }


def submit(client, body: dict) -> str:
    response = client.post("/v1/runs", json=body)
    assert response.status_code == 202, response.text
    assert response.json()["status"] == "queued"
    return response.json()["id"]


def test_a_run_by_url_succeeds_with_events_logs_and_model(svc: ServerProcess, tokens: dict, web: Server) -> None:
    url = serve_tiny(web)
    with svc.client(tokens["alice"]) as client:
        run_id = submit(client, {"pipeline_url": url})
        done = wait_state(client, run_id, ("succeeded", "failed", "canceled"))
        assert done["status"] == "succeeded", done["error"]
        assert done["progress"] == 100.0
        assert done["metrics"]["accuracy"] > 0.9
        assert done["stages"]["model"] == "exited"
        assert [t["state"] for t in done["transitions"]] == ["queued", "running", "succeeded"]
        assert "model.zip" in done["artifacts"]

        model = client.get(f"/v1/runs/{run_id}/model.zip")
        assert model.status_code == 200
        names = zipfile.ZipFile(io.BytesIO(model.content)).namelist()
        assert "weights.json" in names and "pipeline.json" in names

        log = client.get(f"/v1/runs/{run_id}/logs/model")
        assert log.status_code == 200
        assert client.get(f"/v1/runs/{run_id}/logs/runner").status_code == 200
        assert client.get(f"/v1/runs/{run_id}/logs/..%2F..%2Fservice.db").status_code == 404

        kinds = []
        with client.stream("GET", f"/v1/runs/{run_id}/events") as stream:
            assert stream.headers["content-type"].startswith("text/event-stream")
            for line in stream.iter_lines():
                if line.startswith("event:"):
                    kinds.append(line.split(":", 1)[1].strip())
        assert kinds[-2:] == ["verdict", "state"]
        assert {"stage", "progress", "metrics"} <= set(kinds)

        listed = client.get("/v1/runs").json()["runs"]
        assert run_id in [r["id"] for r in listed]


def test_runner_failure_reaches_the_tenant_as_one_paragraph(svc: ServerProcess, tokens: dict, web: Server) -> None:
    serve_tiny(web)
    bad_model = serve_script(web, "/bad/model.py", "def train(runtime, options, ctx):\n    raise ValueError('no luck')\n")
    with svc.client(tokens["alice"]) as client:
        run_id = submit(client, {"pipeline": pipeline(web.url("/tiny/datasource.py"), bad_model)})
        done = wait_state(client, run_id, ("succeeded", "failed", "canceled"))
    assert done["status"] == "failed"
    assert "stage 'model'" in done["error"] and "no luck" in done["error"]
    assert "\n" not in done["error"]


@pytest.mark.parametrize("where", ["datasource", "model", "framework"])
@pytest.mark.parametrize("ref", ["/etc/passwd", "file:///etc/passwd", "datasource.py", "../../etc/passwd"])
def test_inline_pipeline_naming_a_local_path_is_refused(svc: ServerProcess, tokens: dict, web: Server, where: str,
                                                        ref: str) -> None:
    url = serve_tiny(web)
    body = pipeline(url.replace("pipeline.json", "datasource.py"), url.replace("pipeline.json", "model.py"))
    if where == "framework":
        body["options"]["framework"] = ref
    else:
        body[where] = ref
    with svc.client(tokens["bob"]) as client:
        before = len(client.get("/v1/runs").json()["runs"])
        response = client.post("/v1/runs", json={"pipeline": body})
        assert response.status_code == 422, response.text
        assert isinstance(response.json()["detail"], str)
        assert len(client.get("/v1/runs").json()["runs"]) == before  # nothing queued


def test_pipeline_url_whose_scripts_are_local_files_is_refused(svc: ServerProcess, tokens: dict, web: Server) -> None:
    web.routes["/evil/pipeline.json"] = (200, {}, json.dumps(pipeline("file:///etc/passwd", "model.py")).encode())
    with svc.client(tokens["bob"]) as client:
        response = client.post("/v1/runs", json={"pipeline_url": web.url("/evil/pipeline.json")})
    assert response.status_code == 422
    assert "file" in response.json()["detail"]


def test_pipeline_url_that_is_not_http_is_refused(svc: ServerProcess, tokens: dict) -> None:
    with svc.client(tokens["bob"]) as client:
        response = client.post("/v1/runs", json={"pipeline_url": "file:///etc/passwd"})
    assert response.status_code == 422


def test_malformed_bodies_are_refused_before_queueing(svc: ServerProcess, tokens: dict) -> None:
    with svc.client(tokens["bob"]) as client:
        assert client.post("/v1/runs", json={}).status_code == 422
        assert client.post("/v1/runs", json={"pipeline": {}, "pipeline_url": "http://x/p.json"}).status_code == 422
        assert client.post("/v1/runs", json={"pipeline": {"specVersion": "1.0"}}).status_code == 422
        assert client.post("/v1/runs", json={"pipeline_url": "http://x/", "surprise": 1}).status_code == 422
        assert client.post("/v1/runs", content=b"{not json", headers={"content-type": "application/json"}
                           ).status_code == 422
        assert client.get("/v1/runs", params={"status": "queued"}).json()["runs"] == []


def test_an_oversized_body_is_refused(svc: ServerProcess, tokens: dict) -> None:
    huge = {"pipeline": {"specVersion": "2.0", "pad": "x" * (300 << 10)}}
    with svc.client(tokens["bob"]) as client:
        response = client.post("/v1/runs", json=huge)
    assert response.status_code == 413
    assert "larger than" in response.json()["detail"]


def test_an_oversized_inline_pipeline_is_refused(svc: ServerProcess, tokens: dict, web: Server) -> None:
    url = serve_tiny(web)
    body = pipeline(url.replace("pipeline.json", "datasource.py") + "?pad=" + "y" * (100 << 10),
                    url.replace("pipeline.json", "model.py"))
    with svc.client(tokens["bob"]) as client:
        response = client.post("/v1/runs", json={"pipeline": body})
    assert response.status_code == 422
    assert "larger than" in response.json()["detail"]


def test_limits_beyond_the_quota_answer_422_with_a_reason(svc: ServerProcess, tokens: dict, web: Server) -> None:
    url = serve_tiny(web)
    with svc.client(tokens["bob"]) as client:
        for limits, word in (({"memory": "4g"}, "memory"), ({"cpus": 2}, "CPUs"), ({"timeout": 99999}, "timeout")):
            response = client.post("/v1/runs", json={"pipeline_url": url, "limits": limits})
            assert response.status_code == 422, response.text
            assert word in response.json()["detail"] and "quota" in response.json()["detail"]
        response = client.post("/v1/runs", json={"pipeline_url": url, "gpu": 1})
        assert response.status_code == 422
        assert "GPU" in response.json()["detail"]


def test_requests_without_a_valid_token_answer_401(svc: ServerProcess, tokens: dict) -> None:
    for token in (None, "pcsb_" + "A" * 43, tokens["alice"][:-1]):
        with svc.client(token) as client:
            response = client.get("/v1/runs")
            assert response.status_code == 401
            assert response.headers["www-authenticate"] == "Bearer"
    with svc.client(None) as client:
        assert client.get("/v1/runs", headers={"Authorization": f"Basic {tokens['alice']}"}).status_code == 401


def test_another_tenants_run_answers_404_everywhere(svc: ServerProcess, tokens: dict, web: Server) -> None:
    url = serve_tiny(web)
    with svc.client(tokens["alice"]) as alice, svc.client(tokens["bob"]) as bob:
        run_id = submit(alice, {"pipeline_url": url})
        for method, path in (("GET", ""), ("GET", "/events"), ("GET", "/logs/model"), ("POST", "/cancel"),
                             ("GET", "/model.zip"), ("GET", "/artifacts"), ("DELETE", "")):
            response = bob.request(method, f"/v1/runs/{run_id}{path}")
            assert response.status_code == 404, (method, path, response.text)
        assert run_id not in [r["id"] for r in bob.get("/v1/runs").json()["runs"]]
        assert run_state(alice, run_id)["status"] in ("queued", "running", "succeeded")  # bob's cancel did nothing
        wait_state(alice, run_id, ("succeeded", "failed", "canceled"))


def test_max_queued_answers_429_and_cancel_works_in_every_state(svc: ServerProcess, tokens: dict, web: Server) -> None:
    """carol: max-running 1, max-queued 2."""
    serve_tiny(web)
    slow = serve_script(web, "/slow/model.py", SLOW_MODEL)
    body = {"pipeline": pipeline(web.url("/tiny/datasource.py"), slow)}
    with svc.client(tokens["carol"]) as client:
        first = submit(client, body)
        wait_state(client, first, ("running",))
        second, third = submit(client, body), submit(client, body)
        refused = client.post("/v1/runs", json=body)
        assert refused.status_code == 429
        assert "max-queued" in refused.json()["detail"]
        assert run_state(client, second)["status"] == "queued"  # max-running 1 holds it

        # a queued run: canceled at once
        assert client.post(f"/v1/runs/{second}/cancel").json()["status"] == "canceled"
        assert run_state(client, second)["status"] == "canceled"
        # a running run, sleeping in its model stage: canceled once its sandboxes are down
        wait_for(lambda: run_state(client, first)["stages"].get("model") == "running", 120, "the model stage")
        assert client.post(f"/v1/runs/{first}/cancel").status_code == 202
        done = wait_state(client, first, ("canceled", "failed", "succeeded"), timeout=120)
        assert done["status"] == "canceled"
        assert processes_mentioning(f"/runs/{first}") == []
        # the next one started in its place; cancel it too, then a finished run: nothing changes
        wait_state(client, third, ("running",))
        client.post(f"/v1/runs/{third}/cancel")
        assert wait_state(client, third, ("canceled",), timeout=120)["status"] == "canceled"
        assert client.post(f"/v1/runs/{first}/cancel").json()["status"] == "canceled"
        # and a finished run can be deleted, an active one cannot
        assert client.delete(f"/v1/runs/{first}").status_code == 204
        assert client.get(f"/v1/runs/{first}").status_code == 404
        assert processes_mentioning(f"/runs/{third}") == []


def test_delete_of_an_active_run_is_refused(svc: ServerProcess, tokens: dict, web: Server) -> None:
    serve_tiny(web)
    slow = serve_script(web, "/slow/model.py", SLOW_MODEL)
    with svc.client(tokens["bob"]) as client:
        run_id = submit(client, {"pipeline": pipeline(web.url("/tiny/datasource.py"), slow)})
        response = client.delete(f"/v1/runs/{run_id}")
        assert response.status_code == 409
        assert "cancel it first" in response.json()["detail"]
        client.post(f"/v1/runs/{run_id}/cancel")
        wait_state(client, run_id, ("canceled",), timeout=120)
        assert client.delete(f"/v1/runs/{run_id}").status_code == 204


def test_metrics_and_openapi(svc: ServerProcess, tokens: dict) -> None:
    with svc.client(None) as client:
        text = client.get("/metrics").text
        schema = client.get("/openapi.json").json()
    assert 'pipcook_runs{state="succeeded"}' in text
    assert 'pipcook_queue_depth{tenant="alice"}' in text
    assert 'pipcook_running{tenant="bob"}' in text
    assert "pipcook_run_wait_seconds_bucket" in text
    assert {"/v1/runs", "/v1/runs/{run_id}", "/v1/runs/{run_id}/events", "/v1/runs/{run_id}/logs/{stage}",
            "/v1/runs/{run_id}/cancel", "/v1/runs/{run_id}/model.zip"} <= set(schema["paths"])
    assert "delete" in schema["paths"]["/v1/runs/{run_id}"]


def test_the_client_commands(svc: ServerProcess, tokens: dict, web: Server, tmp_path: Path) -> None:
    url = serve_tiny(web)
    env = {"PIPCOOK_SANDBOX_TOKEN": tokens["bob"], "PIPCOOK_SANDBOX_SERVER": svc.url}
    submitted = cli("submit", url, env=env)
    assert submitted.returncode == 0, submitted.stderr
    run_id = submitted.stdout.strip()
    followed = cli("logs", "-f", run_id, env=env)
    assert followed.returncode == 0, followed.stderr
    assert f"run {run_id}: succeeded" in followed.stdout
    assert "verdict: succeeded" in followed.stderr
    listed = cli("runs", env=env)
    assert run_id in listed.stdout and "succeeded" in listed.stdout
    status = json.loads(cli("status", run_id, env=env).stdout)
    assert status["status"] == "succeeded"
    target = tmp_path / "m.zip"
    downloaded = cli("download", run_id, "-o", str(target), env=env)
    assert downloaded.returncode == 0, downloaded.stderr
    assert "weights.json" in zipfile.ZipFile(target).namelist()
    stage_log = cli("logs", run_id, "--stage", "runner", env=env)
    assert stage_log.returncode == 0
    assert cli("cancel", run_id, env=env).stdout.strip() == "succeeded"
    missing = cli("status", "r-nope", env=env)
    assert missing.returncode == 1 and "404" in missing.stderr
    no_token = cli("runs", env={"PIPCOOK_SANDBOX_TOKEN": "", "PIPCOOK_SANDBOX_SERVER": svc.url})
    assert no_token.returncode == 2


def test_tenant_commands_rotate_and_remove(svc: ServerProcess, web: Server) -> None:
    old = add_tenant(svc.data, "dave")
    again = cli("tenants", "add", "dave", "--data", str(svc.data))
    assert again.returncode == 1 and "exists" in again.stderr
    rotated = cli("tenants", "token", "dave", "--data", str(svc.data))
    new = rotated.stdout.strip()
    with svc.client(old) as client:
        assert client.get("/v1/runs").status_code == 401
    with svc.client(new) as client:
        assert client.get("/v1/runs").status_code == 200
    stored = b"".join(p.read_bytes() for p in svc.data.glob("service.db*"))
    assert new.encode() not in stored and old.encode() not in stored  # only hashes are kept
    assert cli("tenants", "remove", "dave", "--data", str(svc.data)).returncode == 0
    with svc.client(new) as client:
        assert client.get("/v1/runs").status_code == 401
    assert "dave" not in cli("tenants", "list", "--data", str(svc.data)).stdout


def test_events_resume_from_last_event_id(svc: ServerProcess, tokens: dict, web: Server) -> None:
    url = serve_tiny(web)
    with svc.client(tokens["alice"]) as client:
        run_id = submit(client, {"pipeline_url": url})
        wait_state(client, run_id, ("succeeded", "failed"))

        def read(headers: dict) -> list[tuple[str, str]]:
            seen, last_id = [], ""
            with client.stream("GET", f"/v1/runs/{run_id}/events", headers=headers) as stream:
                for line in stream.iter_lines():
                    if line.startswith("id:"):
                        last_id = line[3:].strip()
                    elif line.startswith("event:"):
                        seen.append((line[6:].strip(), last_id))
            return seen

        everything = read({})
        resumed = read({"Last-Event-ID": everything[2][1]})
    assert [kind for kind, _ in resumed] == [kind for kind, _ in everything[3:]]


def test_removing_a_tenant_stops_its_running_and_queued_runs(svc: ServerProcess, web: Server) -> None:
    import sqlite3

    token = add_tenant(svc.data, "frank", "--cpus", "0.5", "--memory", "512m", "--max-running", "1")
    serve_tiny(web)
    slow = serve_script(web, "/slow/model.py", SLOW_MODEL)
    body = {"pipeline": pipeline(web.url("/tiny/datasource.py"), slow)}
    with svc.client(token) as client:
        running = submit(client, body)
        wait_for(lambda: run_state(client, running)["stages"].get("model") == "running", 120, "the model stage")
        queued = submit(client, body)
    assert cli("tenants", "remove", "frank", "--data", str(svc.data)).returncode == 0

    def states() -> dict[str, str]:
        db = sqlite3.connect(svc.data / "service.db")
        try:
            return dict(db.execute("SELECT id, state FROM runs WHERE tenant = 'frank'"))
        finally:
            db.close()

    wait_for(lambda: states() == {running: "canceled", queued: "canceled"}, 120, "frank's runs to be canceled")
    assert processes_mentioning(f"/runs/{running}/") == []
