"""`ctx.download` refuses the addresses of the host's own interfaces.

Private and loopback ranges were refused already, but a host with a public
address reaches itself there: any service listening on 0.0.0.0 was open to
a stage. The test gives a network namespace of its own a public address
(IPv4, then IPv6) on `lo`, serves HTTP on it, and runs the real CLI inside
that namespace: the download must be refused and the server never asked.
The host's real network is not touched.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from conftest import REPO, write_pipeline

from .attack import backend_cli, limit_args, private_cache, token
from .conftest import require_backend

pytestmark = pytest.mark.hostile

FETCH = r'''
import json

def train(runtime, options, ctx):
    try:
        with open(ctx.download(__URL__), "rb") as f:
            print("REPORT", json.dumps({"ok": True, "body": f.read(100).decode()}), flush=True)
    except Exception as e:
        print("REPORT", json.dumps({"ok": False, "error": str(e)}), flush=True)
'''

# Run inside `unshare --net`: give lo a public address, serve on it, run the CLI, say what happened.
DRIVER = r'''
import json, subprocess, sys, threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
import socket

cfg = json.loads(sys.argv[1])
subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
subprocess.run(["ip", *cfg["ip_args"]], check=True)
hits = []

class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        hits.append(self.path)
        body = cfg["secret"].encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass

class Server(ThreadingHTTPServer):
    address_family = socket.AF_INET6 if ":" in cfg["address"] else socket.AF_INET

httpd = Server((cfg["address"], cfg["port"]), Handler)
threading.Thread(target=httpd.serve_forever, daemon=True).start()
proc = subprocess.run(cfg["cli"], capture_output=True, text=True, timeout=300, cwd=cfg["cwd"])
print(json.dumps({"returncode": proc.returncode, "stderr": proc.stderr, "hits": hits}))
'''


def _attack(tmp_path, isolation: str, address: str, ip_args: list[str]) -> tuple[dict, str, str]:
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("unshare(1) and ip(8) are required in CI: .ci/run installs util-linux and iproute2")
        pytest.skip("needs unshare(1) and ip(8)")
    secret = token("pcsb-ownaddr")
    host = f"[{address}]" if ":" in address else address
    url = f"http://{host}:8123/data.txt"
    pipeline = write_pipeline(tmp_path / "pipeline", model=FETCH.replace("__URL__", repr(url)))
    ws = tmp_path / "ws"
    cli_isolation, gvisor_env = backend_cli(isolation)  # docker-gvisor: --isolation docker under runsc
    cli = [sys.executable, "-m", "pipcook_sandbox", "run", str(pipeline), "-o", str(ws),
           "--isolation", cli_isolation, *limit_args(timeout="120")]
    cfg = {"address": address, "port": 8123, "ip_args": ip_args, "secret": secret, "cli": cli, "cwd": str(REPO)}
    env_extra = {**private_cache(tmp_path), **gvisor_env}
    done = subprocess.run(["unshare", "--net", sys.executable, "-c", DRIVER, json.dumps(cfg)], check=False,
                          capture_output=True, text=True, timeout=360, env={**os.environ, **env_extra})
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    log = (ws / "logs" / "model.log").read_text(errors="replace") if (ws / "logs" / "model.log").exists() else ""
    return result, log, secret


def _report(log: str) -> dict:
    lines = [line for line in log.splitlines() if line.startswith("REPORT ")]
    assert lines, log[-2000:]
    return json.loads(lines[-1][len("REPORT "):])


def test_a_public_ipv4_address_of_the_host_is_refused(tmp_path, isolation):
    if os.geteuid() != 0:
        pytest.skip("a network namespace with addresses needs root")  # CI runs as root
    result, log, secret = _attack(tmp_path, isolation, "1.2.3.4", ["addr", "add", "1.2.3.4/32", "dev", "lo"])
    report = _report(log)
    assert not report["ok"] and "own interfaces" in report["error"], (report, result["stderr"][-2000:])
    assert result["hits"] == [], result  # the host's service never saw a request
    assert secret not in log


def test_a_public_ipv6_address_of_the_host_is_refused(tmp_path):
    require_backend("bwrap")
    if os.geteuid() != 0:
        pytest.skip("a network namespace with addresses needs root")  # CI runs as root
    address = "2606:4700:10::1234"
    result, log, secret = _attack(tmp_path, "bwrap", address,
                                  ["-6", "addr", "add", f"{address}/128", "dev", "lo", "nodad"])
    report = _report(log)
    assert not report["ok"] and "own interfaces" in report["error"], (report, result["stderr"][-2000:])
    assert result["hits"] == [], result
    assert secret not in log
