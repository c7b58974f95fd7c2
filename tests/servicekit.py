"""Helpers for the service tests: a real `pipcook-sandbox server` process on 127.0.0.1, real
tenants made with the real `tenants` command, pipelines served by a real HTTP server (tenants
cannot name local paths)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from waiting import wait_until

try:
    from httpserver import Server
except ImportError:  # run from the repository root
    from tests.httpserver import Server

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "tests" / "pipelines" / "tiny"
START_TIMEOUT = 120.0

SLOW_MODEL = '''
import time


def train(runtime, options, ctx):
    runtime.notify_progress(1, phase="sleeping")
    time.sleep(float(options.get("sleep", "600")))
'''

# Tries the path in `target` (another tenant's workspace) from inside a stage; prints each outcome.
PROBE = '''
import errno
import os

from sandbox import sdk


def _try(what, fn):
    try:
        fn()
        print(what, "ALLOWED", flush=True)
    except OSError as exc:
        print(what, "DENIED", errno.errorcode.get(exc.errno, exc.errno), flush=True)


def datasource(options, ctx):
    target = options["target"]
    print("uid", os.getuid(), "gid", os.getgid(), flush=True)
    _try("list", lambda: os.listdir(target))
    _try("read", lambda: open(os.path.join(target, "pipeline.json"), "rb").read())
    _try("write", lambda: open(os.path.join(target, "planted.txt"), "w").write("from another tenant"))
    _try("mkdir", lambda: os.mkdir(os.path.join(target, "model", "planted")))
    samples = [{"data": [float(i), 1.0, 0.0, 0.0], "label": i % 2} for i in range(40)]
    return sdk.from_lists(train=samples, test=samples[:8], meta={"type": "general", "categories": ["a", "b"]})
'''


def serve_tiny(http: Server, prefix: str = "/tiny") -> str:
    """The tiny pipeline and its scripts under PREFIX; returns the pipeline's URL."""
    for name in ("pipeline.json", "datasource.py", "dataflow.py", "model.py"):
        http.routes[f"{prefix}/{name}"] = (200, {}, (TINY / name).read_bytes())
    return http.url(f"{prefix}/pipeline.json")


def serve_script(http: Server, path: str, source: str) -> str:
    http.routes[path] = (200, {}, source.encode())
    return http.url(path)


def pipeline(datasource: str, model: str, dataflow: list[str] | None = None, epochs: int = 1) -> dict[str, Any]:
    return {"specVersion": "2.0", "datasource": datasource, "dataflow": dataflow or [], "model": model,
            "options": {"train": {"epochs": epochs}}}


def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipcook_sandbox", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})}, cwd=REPO, stdin=subprocess.DEVNULL)


def add_tenant(data: Path, name: str, *options: str) -> str:
    done = cli("tenants", "add", name, "--data", str(data), *options)
    assert done.returncode == 0, done.stderr
    token = done.stdout.strip()
    assert token.startswith("pcsb_") and "\n" not in token
    return token


def tenant_uid(data: Path, name: str) -> int:
    done = cli("tenants", "list", "--data", str(data), "--json")
    assert done.returncode == 0, done.stderr
    for line in done.stdout.splitlines():
        entry = json.loads(line)
        if entry["name"] == name:
            return int(entry["uid"])
    raise AssertionError(f"no tenant {name} in {done.stdout}")


def wait_for(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    """waiting.wait_until, polling every 0.2 s: each look is an HTTP request to the server."""
    return wait_until(condition, timeout, what, interval=0.2)


class ServerProcess:
    """`pipcook-sandbox server --port 0` in a subprocess of its own."""

    def __init__(self, data: Path, *args: str) -> None:
        self.data = data
        self.args = args
        self.proc: subprocess.Popen | None = None
        self.url = ""
        self.log = data.parent / f"server-{data.name}.log"

    def start(self) -> ServerProcess:
        self.data.mkdir(parents=True, exist_ok=True)
        (self.data / "server.json").unlink(missing_ok=True)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "pipcook_sandbox", "server", "--port", "0", "--data", str(self.data),
                 "--allow-private", "127.0.0.1", *self.args],
                stdout=log, stderr=log, stdin=subprocess.DEVNULL, cwd=REPO, start_new_session=True)
        proc = self.proc

        def ready() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"the server exited with {proc.returncode}: {self.log.read_text()[-2000:]}")
            try:
                info = json.loads((self.data / "server.json").read_text())
            except (OSError, ValueError):
                return False
            if info.get("pid") != proc.pid:
                return False
            self.url = info["url"]
            try:
                return httpx.get(self.url + "/healthz", timeout=5).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(ready, START_TIMEOUT, "the server to answer")
        return self

    def client(self, token: str | None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=60)

    def stop(self, timeout: float = 120) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()


def run_state(client: httpx.Client, run_id: str) -> dict[str, Any]:
    response = client.get(f"/v1/runs/{run_id}")
    assert response.status_code == 200, response.text
    return response.json()


def wait_state(client: httpx.Client, run_id: str, states: tuple[str, ...], timeout: float = 300) -> dict[str, Any]:
    return wait_for(lambda: (lambda r: r if r["status"] in states else None)(run_state(client, run_id)),
                    timeout, f"run {run_id} to be {' or '.join(states)}")


def processes_mentioning(text: str) -> list[int]:
    """Pids whose command line mentions TEXT (a run's directory): runners and their sandboxes."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode("utf-8", "replace")
        except OSError:
            continue
        if text in cmdline and int(entry.name) != os.getpid():
            found.append(int(entry.name))
    return found


def mounts_mentioning(text: str) -> list[str]:
    return [line for line in Path("/proc/self/mountinfo").read_text().splitlines() if text in line]
