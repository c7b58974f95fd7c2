"""`ctx.download` is the only way out of a stage, and it keeps to the policy.

The runner fetches for the script only http(s), never a loopback, private,
link-local or unspecified address in any spelling (after DNS, after every
redirect), unless the operator allowed that host with --allow-private.

Setup: an allowed server on 127.0.0.2 (`--allow-private 127.0.0.2`) serves a
good file and redirects to forbidden places; "leak" servers on 127.0.0.1 and
[::1] must never see a request.
"""
from __future__ import annotations

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from .attack import private_cache, run_attack, token

pytestmark = pytest.mark.hostile

FETCH = r'''
import json

CFG = json.loads(__CFG__)


def train(runtime, options, ctx):
    results = {}
    for url in CFG["urls"]:
        try:
            path = ctx.download(url)
            with open(path, "rb") as f:
                results[url] = {"ok": True, "body": f.read(200).decode("utf-8", "replace")}
        except Exception as e:
            results[url] = {"ok": False, "error": f"{type(e).__name__}: {e}"}
    print("REPORT", json.dumps(results), flush=True)
'''


class _Server:
    def __init__(self, host: str, family: int, routes: dict) -> None:
        self.hits: list[str] = []
        hits, self.routes = self.hits, routes

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                hits.append(self.path)
                status, headers, body = routes.get(self.path.split("?")[0], (404, {}, b"no"))
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        class Server(ThreadingHTTPServer):
            address_family = family
            daemon_threads = True

        self.httpd = Server((host, 0), Handler)
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def servers():
    leak_body = token("LEAK").encode()
    leak4 = _Server("127.0.0.1", socket.AF_INET, {"/leak": (200, {}, leak_body)})
    leak6 = _Server("::1", socket.AF_INET6, {"/leak": (200, {}, leak_body)})
    good_body = token("GOOD").encode()
    allowed = _Server("127.0.0.2", socket.AF_INET, {"/ok": (200, {}, good_body)})
    try:
        yield {"allowed": allowed, "leak4": leak4, "leak6": leak6, "good": good_body.decode(),
               "leak": leak_body.decode()}
    finally:
        for s in (allowed, leak4, leak6):
            s.close()


def _redirect(location: str) -> tuple:
    return (302, {"Location": location}, b"")


def forbidden_urls(p4: int, p6: int) -> list[str]:
    """Loopback, private, link-local and unspecified addresses in every spelling, and a name for loopback."""
    return [
        f"http://127.0.0.1:{p4}/leak",
        f"http://127.1:{p4}/leak",
        f"http://2130706433:{p4}/leak",
        f"http://0x7f000001:{p4}/leak",
        f"http://0x7f.0.0.1:{p4}/leak",
        f"http://0177.0.0.1:{p4}/leak",
        f"http://127.000.000.001:{p4}/leak",
        f"http://[::1]:{p6}/leak",
        f"http://[0:0:0:0:0:0:0:1]:{p6}/leak",
        f"http://[::ffff:127.0.0.1]:{p4}/leak",
        f"http://[::ffff:7f00:1]:{p4}/leak",
        f"http://[64:ff9b::7f00:1]:{p4}/leak",
        f"http://[2002:7f00:1::1]:{p4}/leak",
        f"http://0.0.0.0:{p4}/leak",
        f"http://0:{p4}/leak",
        f"http://[::]:{p6}/leak",
        f"http://localhost:{p4}/leak",
        f"http://LOCALHOST.:{p4}/leak",
        f"http://ip6-localhost:{p6}/leak",
        "http://10.0.0.1/x",
        "http://172.16.0.1/x",
        "http://192.168.0.1/x",
        "http://100.64.0.1/x",
        "http://169.254.169.254/latest/meta-data/",
        "http://[fe80::1]/x",
        "http://[fd00::2]/x",
        "http://[fd00:ec2::254]/latest/meta-data/",
        "http://224.0.0.1/x",
        "http://255.255.255.255/x",
    ]


NON_HTTP = ["file:///etc/passwd", "file://localhost/etc/shadow", "ftp://127.0.0.2/x", "gopher://127.0.0.2:70/_x",
            "data:text/plain,hello", "dict://127.0.0.2:11211/stat", "jar:http://127.0.0.2/x!/", "/etc/passwd",
            "//127.0.0.1/leak", "ldap://127.0.0.2/x"]


def test_ctx_download_refuses_every_forbidden_address_and_scheme(tmp_path, isolation, servers):
    p4, p6 = servers["leak4"].port, servers["leak6"].port
    allowed = servers["allowed"]
    base = f"http://127.0.0.2:{allowed.port}"
    redirects = {
        "/to-127.0.0.1": f"http://127.0.0.1:{p4}/leak",
        "/to-127.1": f"http://127.1:{p4}/leak",
        "/to-v6-loopback": f"http://[::1]:{p6}/leak",
        "/to-localhost": f"http://localhost:{p4}/leak",
        "/to-metadata": "http://169.254.169.254/latest/meta-data/",
        "/to-private": "http://10.0.0.1/x",
        "/to-file": "file:///etc/passwd",
        "/to-gopher": "gopher://127.0.0.1:70/_x",
        "/to-relative-then-leak": "/to-127.0.0.1",  # a hop on the allowed host first
    }
    for path, location in redirects.items():
        allowed.routes[path] = _redirect(location)
    refused = forbidden_urls(p4, p6) + [base + path for path in redirects] + NON_HTTP + [
        f"http://user:pass@127.0.0.2:{allowed.port}/ok"]  # credentials are refused even for an allowed host
    good = f"{base}/ok"
    cfg = {"urls": [good] + refused}
    attack = run_attack(tmp_path, isolation, model=FETCH.replace("__CFG__", repr(json.dumps(cfg))),
                        args=["--allow-private", "127.0.0.2"], env=private_cache(tmp_path))
    assert attack.returncode == 0, attack.describe()
    results = attack.reports("model")
    # The positive control: an allowed download works and the stage reads it.
    assert results[good] == {"ok": True, "body": servers["good"]}, results[good]
    wrongly = {u: r for u, r in results.items() if u != good and r["ok"]}
    assert not wrongly, wrongly
    for url in refused:
        error = results[url]["error"]
        assert error.startswith("DownloadError: download of ") and "refused" in error, (url, error)
    for url in NON_HTTP:
        assert "only http and https" in results[url]["error"], results[url]
    for path in redirects:
        assert f"redirected there from {base}{path}" in results[base + path]["error"] or \
               "only http and https" in results[base + path]["error"], results[base + path]
    # Seen from the servers: the forbidden ones never got a request.
    assert servers["leak4"].hits == [] and servers["leak6"].hits == []
    assert servers["leak"] not in attack.output
    assert not attack.leftovers()


def test_a_cached_download_is_not_served_past_the_policy(tmp_path, isolation, servers):
    """A URL fetched once under --allow-private is cached; a later run without
    the permission must be refused it, not served the cached copy."""
    allowed = servers["allowed"]
    url = f"http://127.0.0.2:{allowed.port}/ok"
    script = FETCH.replace("__CFG__", repr(json.dumps({"urls": [url]})))
    env = private_cache(tmp_path)
    first = run_attack(tmp_path / "first", isolation, model=script, args=["--allow-private", "127.0.0.2"], env=env)
    assert first.returncode == 0, first.describe()
    assert first.reports("model")[url] == {"ok": True, "body": servers["good"]}
    second = run_attack(tmp_path / "second", isolation, model=script, env=env)
    assert second.returncode == 0, second.describe()
    result = second.reports("model")[url]
    assert not result["ok"] and "127.0.0.2" in result["error"], result
    assert servers["good"] not in second.output and servers["good"] not in second.log("model")
    assert allowed.hits == ["/ok"]  # fetched once, by the run that was allowed to


def test_a_cached_script_is_not_served_past_the_policy(tmp_path, isolation, servers):
    """The same for scripts: a pipeline naming a private URL that an earlier,
    allowed run fetched must not get the cached copy without the permission
    (the copy would land in its workspace's scripts/)."""
    allowed = servers["allowed"]
    body = f"# {servers['good']}\ndef train(runtime, options, ctx):\n    pass\n".encode()
    allowed.routes["/model.py"] = (200, {}, body)
    model_url = f"http://127.0.0.2:{allowed.port}/model.py"
    env = private_cache(tmp_path)
    first = run_attack(tmp_path / "first", isolation, model=None, extra={"model": model_url},
                       args=["--allow-private", "127.0.0.2"], env=env)
    assert first.returncode == 0, first.describe()
    second = run_attack(tmp_path / "second", isolation, extra={"model": model_url}, env=env)
    assert second.returncode == 1, second.describe()
    assert "127.0.0.2" in second.error and "--allow-private" in second.error, second.describe()
    assert "Traceback" not in second.stderr
    assert not any(servers["good"].encode() in p.read_bytes() for p in (second.ws / "scripts").glob("*"))
    assert allowed.hits == ["/model.py"]
