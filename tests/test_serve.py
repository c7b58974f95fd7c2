"""`pipcook-sandbox serve`: the real command as a subprocess, spoken to over HTTP.

The model echoes its inputs and misbehaves on request ("raise", "sleep",
"die", "flood"), so every failure path of the server is driven for real.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import httpx
import pytest
from conftest import REPO, require_bwrap, run_cli, write_pipeline
from waiting import holds_for, wait_until

pytestmark = pytest.mark.e2e

ISOLATIONS = ["none", "bwrap"]

DATAFLOW = '''
def dataflow(pool, options, ctx):
    # proves the dataflow runs in the warm worker, in predict mode
    return pool.transform(lambda s: dict(s, task=ctx.task_type))
'''

MODEL = '''
import os, time

def train(runtime, options, ctx):
    with open(os.path.join(runtime.read_model(), "factor.txt"), "w") as f:
        f.write("2")

def predict(runtime, options, ctx):
    with open(os.path.join(runtime.read_model(), "factor.txt")) as f:
        factor = float(f.read())
    out = []
    for s in runtime.dataset.predicted:
        data = s["data"]
        if data == "sleep":
            time.sleep(120)
        if data == "die":
            os._exit(3)
        if data == "raise":
            raise ValueError("cannot use this input")
        if data == "flood":  # keeps sending after the answer, between requests, until the worker goes
            import threading
            def flood():  # its own connection, past the SDK's rate limit, as a hostile script would
                import msgpack, zmq
                endpoint = runtime._control.socket.get(zmq.LAST_ENDPOINT).decode()
                sock = zmq.Context.instance().socket(zmq.DEALER)
                sock.setsockopt(zmq.SNDHWM, 2)  # block rather than queue in the worker's own memory
                sock.connect(endpoint)
                msg = msgpack.packb({"op": "progress", "value": 50, "extra": {"note": "f" * (256 << 10)}})
                while True:
                    sock.send(msg)
            threading.Thread(target=flood, daemon=True).start()
            out.append({"flooding": True})
            continue
        if isinstance(data, bytes):
            out.append({"name": s.get("name"), "bytes": len(data), "task": s.get("task")})
        else:
            out.append({"value": float(data) * factor, "task": s.get("task")})
    return out
'''

NO_PREDICT = '''
def train(runtime, options, ctx):
    pass
'''

DATASOURCE = '''
from sandbox import sdk

def datasource(options, ctx):
    return sdk.from_lists(train=[{"data": "1", "label": 0}], meta={"type": "general"})
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


class Server:
    def __init__(self, proc: subprocess.Popen, url: str, log: Path) -> None:
        self.proc, self.url, self.log = proc, url, log

    def post(self, **kwargs) -> httpx.Response:
        return httpx.post(f"{self.url}/predict", timeout=60, **kwargs)

    def health(self) -> httpx.Response:
        return httpx.get(f"{self.url}/healthz", timeout=10)

    def wait_ready(self, timeout: float = 60) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log.read_text()
            try:
                r = self.health()
                if r.status_code == 200:
                    return r.json()
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"serve did not become ready: {self.log.read_text()}")

    def worker_pids(self) -> list[int]:
        return [p for p in descendants(self.proc.pid)
                if b"sandbox.worker" in Path(f"/proc/{p}/cmdline").read_bytes()] if self.proc.poll() is None else []


@contextlib.contextmanager
def serving(model: Path, isolation: str, *args: str, tmp: Path) -> Iterator[Server]:
    port = free_port()
    log = tmp / f"serve-{port}.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "pipcook_sandbox", "serve", str(model), "-p", str(port),
                                 "--isolation", isolation, *args], stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
    server = Server(proc, f"http://127.0.0.1:{port}", log)
    try:
        server.wait_ready()
        yield server
    finally:
        workers = server.worker_pids()
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise AssertionError("serve did not stop on Ctrl-C")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() for p in workers):
            time.sleep(0.1)
        assert not [p for p in workers if Path(f"/proc/{p}").exists()], "a worker outlived serve"
        assert "Traceback" not in log.read_text()


@pytest.fixture(scope="module", params=ISOLATIONS)
def model(request, tmp_path_factory) -> tuple[str, Path]:
    if request.param == "bwrap":
        require_bwrap()
    root = tmp_path_factory.mktemp(f"serve-{request.param}")
    pipeline = write_pipeline(root / "p", datasource=DATASOURCE, dataflow=[DATAFLOW], model=MODEL,
                              extra={"type": "TextClassification", "artifact": [{"processor": "zip", "target": "model.zip"}]})
    proc = run_cli("run", str(pipeline), "-o", str(root / "ws"), "--isolation", request.param)
    assert proc.returncode == 0, proc.stderr
    return request.param, root / "ws"


@pytest.fixture(scope="module")
def server(model, tmp_path_factory) -> Iterator[Server]:
    isolation, ws = model
    with serving(ws / "model.zip", isolation, "--request-timeout", "4", "--max-queue", "1",
                 tmp=tmp_path_factory.mktemp("log")) as s:
        yield s


def _fails(response: httpx.Response, status: int) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["success"] is False and isinstance(body["message"], str) and body["message"]
    assert "Traceback" not in response.text and 'File "' not in response.text
    return body["message"]


def test_json_inputs(server):
    r = server.post(json={"inputs": ["1", "2.5"]})
    assert r.status_code == 200, r.text
    assert r.json() == {"success": True, "data": [{"value": 2.0, "task": "predict"}, {"value": 5.0, "task": "predict"}]}


def test_multipart_files_and_fields_in_order(server):
    files = [("file", ("a.bin", b"\x00" * 100, "application/octet-stream")),
             ("inputs", (None, "3")),
             ("file", ("b.png", b"\x89PNG" + b"x" * 20, "image/png"))]
    r = server.post(files=files)
    assert r.status_code == 200, r.text
    assert r.json()["data"] == [{"name": "a.bin", "bytes": 100, "task": "predict"},
                                {"value": 6.0, "task": "predict"},
                                {"name": "b.png", "bytes": 24, "task": "predict"}]


@pytest.mark.parametrize("body, status, words", [
    (b"{not json", 400, "not valid JSON"),
    (b'{"inputs": [1, 2]}', 400, "list of strings"),
    (b'{"inputs": "1"}', 400, "list of strings"),
    (b'{"inputs": []}', 400, "no inputs"),
    (b'{"data": ["1"]}', 400, '"inputs"'),
    (b'[]', 400, '"inputs"'),
])
def test_bad_json_requests(server, body, status, words):
    message = _fails(server.post(content=body, headers={"Content-Type": "application/json"}), status)
    assert words in message


def test_bad_multipart_and_content_types(server):
    assert "unknown form field" in _fails(server.post(data={"other": "x"}, files=[("file", ("a", b"1"))]), 400)
    assert "multipart" in _fails(server.post(content=b"--x\r\nbroken", headers={"Content-Type": "multipart/form-data"}), 400)
    _fails(server.post(content=b"--x\r\nbroken", headers={"Content-Type": "multipart/form-data; boundary=x"}), 400)
    assert "application/json" in _fails(server.post(content=b"1", headers={"Content-Type": "text/plain"}), 415)


def test_too_large_body_is_413(server):
    big = json.dumps({"inputs": ["1" * (17 << 20)]}).encode()
    assert "16 MiB" in _fails(server.post(content=big, headers={"Content-Type": "application/json"}), 413)

    def chunks():  # no Content-Length: the cap holds while reading
        for _ in range(17):
            yield b"x" * (1 << 20)

    assert "16 MiB" in _fails(server.post(content=chunks(), headers={"Content-Type": "application/json"}), 413)
    assert server.post(json={"inputs": ["1"]}).status_code == 200


def test_unknown_routes_and_methods(server):
    assert "not found" in _fails(httpx.get(f"{server.url}/nope"), 404)
    assert "not allowed" in _fails(httpx.get(f"{server.url}/predict"), 405)


def test_health_info_and_page(server):
    assert server.health().json()["ok"] is True
    info = httpx.get(f"{server.url}/info").json()
    assert info["type"] == "TextClassification" and info["maxBytes"] == 16 << 20
    page = httpx.get(f"{server.url}/")
    assert page.status_code == 200 and "<textarea" in page.text and "/static/app.js" in page.text
    js = httpx.get(f"{server.url}/static/app.js")
    assert js.status_code == 200 and "fetch(\"/predict\"" in js.text
    assert "http://" not in js.text and "https://" not in js.text and "https://" not in page.text  # no CDN


def test_a_script_error_is_422_and_the_worker_stays(server):
    pids = server.worker_pids()
    message = _fails(server.post(json={"inputs": ["raise"]}), 422)
    assert "ValueError: cannot use this input" in message and "model.py, line" in message
    assert server.post(json={"inputs": ["4"]}).json()["data"] == [{"value": 8.0, "task": "predict"}]
    assert server.worker_pids() == pids  # same warm worker


def test_timeout_is_504_and_the_worker_restarts(server):
    started = time.monotonic()
    message = _fails(server.post(json={"inputs": ["sleep"]}), 504)
    assert time.monotonic() - started < 30
    assert "4 s" in message and "restarted" in message
    server.wait_ready()
    assert server.post(json={"inputs": ["1"]}).json()["data"][0]["value"] == 2.0
    assert server.health().json()["restarts"] >= 1


def test_a_dying_worker_is_500_then_replaced(server):
    message = _fails(server.post(json={"inputs": ["die"]}), 500)
    assert "exited with code 3" in message
    assert server.post(json={"inputs": ["5"]}).json()["data"][0]["value"] == 10.0


def test_a_killed_worker_is_replaced_for_the_next_request(server):
    server.wait_ready()
    pids = server.worker_pids()
    assert pids
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)

    def gone(pid: int) -> bool:  # exited, or a zombie (no command line) waiting for its parent
        try:
            return b"sandbox.worker" not in Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return True

    wait_until(lambda: all(gone(p) for p in pids), 10, "the killed workers to exit")
    r = server.post(json={"inputs": ["1.5"]})
    assert r.status_code == 200, r.text
    assert r.json()["data"] == [{"value": 3.0, "task": "predict"}]
    assert set(server.worker_pids()).isdisjoint(pids)


def test_over_the_queue_limit_is_503(server):
    """--max-queue 1: one request runs, one waits, a third is refused at once."""
    import concurrent.futures

    server.wait_ready()
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        slow = pool.submit(server.post, json={"inputs": ["sleep"]})
        wait_until(lambda: server.health().json()["pending"] == 1, 30, "the slow request to be taken")
        waiting = pool.submit(server.post, json={"inputs": ["1"]})
        wait_until(lambda: server.health().json()["pending"] == 2, 30, "the second request to wait behind it")
        refused = server.post(json={"inputs": ["1"]})
        assert "busy" in _fails(refused, 503)
        assert slow.result().status_code == 504
        assert waiting.result().status_code == 200
    server.wait_ready()


def test_a_worker_flooding_between_requests_cannot_grow_the_server(model, tmp_path):
    """serve reads the worker's events only while a request waits: between requests, what the
    worker sends must wait in bounded queues, not pile up in the server's memory."""
    isolation, ws = model
    with serving(ws / "model.zip", isolation, tmp=tmp_path) as s:
        assert s.post(json={"inputs": ["flood"]}).json()["data"] == [{"flooding": True}]

        def peak() -> int:
            return int(re.search(r"VmHWM:\s+(\d+) kB", Path(f"/proc/{s.proc.pid}/status").read_text()).group(1)) << 10

        # for five seconds of flooding (unbounded, the queue would hold gigabytes by then)
        holds_for(lambda: peak() < 256 << 20, 5, "the server's peak memory below 256 MiB", interval=0.1)
        r = s.post(json={"inputs": ["3"]})  # the flood is still on: the answer is found behind it
        assert r.status_code == 200 and r.json()["data"] == [{"value": 6.0, "task": "predict"}], r.text


def test_serve_refuses_a_model_without_predict(tmp_path):
    pipeline = write_pipeline(tmp_path / "p", datasource=DATASOURCE, dataflow=[], model=NO_PREDICT)
    assert run_cli("run", str(pipeline), "-o", str(tmp_path / "ws"), "--isolation", "none").returncode == 0
    proc = run_cli("serve", str(tmp_path / "ws"), "-p", str(free_port()), "--isolation", "none", timeout=120)
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "has no function 'predict'" in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_binding_beyond_loopback_warns(model, tmp_path):
    isolation, ws = model
    with serving(ws, isolation, "--host", "0.0.0.0", tmp=tmp_path) as s:
        assert s.post(json={"inputs": ["1"]}).status_code == 200
        assert "not loopback" in s.log.read_text()
