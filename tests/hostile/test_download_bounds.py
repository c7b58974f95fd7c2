"""`ctx.download` is bounded in time and in bytes, whatever the server does.

- A server that trickles one byte every two seconds cannot keep the runner
  alive past its verdict: the download has a total deadline, it is cancelled
  when its stage stops, and the runner exits within seconds.
- All of a run's downloads share one byte budget (`--downloads`, by default
  the `--disk` size): many downloads cannot add up to more than one.
- The download cache is capped (least recently used entries go first) and
  `clean --cache` empties it (with the other caches).

Each server here is on 127.0.0.2 (`--allow-private 127.0.0.2`), a real HTTP
server in a thread of the test.
"""
from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from conftest import run_cli

from .attack import limit_args, private_cache, run_attack
from .conftest import require_backend

pytestmark = pytest.mark.hostile

MIB = 1 << 20
TRICKLE_FOR = 120.0  # seconds the slow server would go on; the runner must not wait for it
# The stages' --timeout in the trickle test: short, yet long enough for every stage to start on a
# loaded host (a datasource still starting at the deadline would be the one blamed).
TIMEOUT = 20

FETCH = r'''
import json

URLS = json.loads(__URLS__)


def train(runtime, options, ctx):
    results = []
    for url in URLS:
        try:
            with open(ctx.download(url), "rb") as f:
                results.append({"ok": True, "size": len(f.read())})
        except Exception as e:
            results.append({"ok": False, "error": f"{type(e).__name__}: {e}"})
        print("REPORT", json.dumps(results), flush=True)
'''


class _Server:
    """/trickle: one byte every 2 s for TRICKLE_FOR s; /big/<n>: 12 MiB."""

    def __init__(self) -> None:
        self.stopping = threading.Event()
        self.trickling = threading.Event()
        self.trickle_ended = threading.Event()
        stopping, trickling, ended = self.stopping, self.trickling, self.trickle_ended

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                try:
                    if self.path.startswith("/trickle"):
                        self.send_response(200)
                        self.send_header("Content-Length", str(10 * MIB))
                        self.end_headers()
                        trickling.set()
                        for _ in range(int(TRICKLE_FOR / 2)):
                            self.wfile.write(b"x")
                            self.wfile.flush()
                            if stopping.wait(2.0):  # the server's own pace, not an ordering of events
                                break
                        return
                    body = b"y" * (12 * MIB)
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the runner hung up: what the test wants
                finally:
                    if self.path.startswith("/trickle"):
                        ended.set()

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.2", 0), Handler)
        self.httpd.daemon_threads = True
        self.httpd.block_on_close = False
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.2:{self.httpd.server_address[1]}{path}"

    def close(self) -> None:
        self.stopping.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = _Server()
    yield s
    s.close()


def _fetching(urls: list[str]) -> str:
    return FETCH.replace("__URLS__", repr(json.dumps(urls)))


def test_a_trickling_server_cannot_hold_the_runner_past_its_timeout(tmp_path, isolation, server):
    attack = run_attack(tmp_path, isolation, model=_fetching([server.url("/trickle")]),
                        limits=limit_args(timeout=str(TIMEOUT)), args=["--allow-private", "127.0.0.2"],
                        env=private_cache(tmp_path), timeout=TRICKLE_FOR + 60)
    assert server.trickling.is_set(), attack.describe()
    assert attack.returncode == 1, attack.describe()
    assert "stage 'model'" in attack.error and "--timeout" in attack.error, attack.describe()
    # The verdict comes at TIMEOUT s plus the stages' start; the old runner then waited for the server
    # (TRICKLE_FOR s). Exit must follow the verdict within seconds, not the server's pleasure.
    assert attack.elapsed < TIMEOUT + 35, attack.describe()
    # and the runner hung up on the server: the connection did not outlive the run for long
    assert server.trickle_ended.wait(10), "the trickling connection was still open after the runner exited"
    assert not attack.leftovers()
    assert not list((tmp_path / "cache" / "downloads").rglob(".part-*")), "a partial download was left in the cache"


def test_all_downloads_of_a_run_share_one_byte_budget(tmp_path, isolation, server):
    urls = [server.url(f"/big/{i}") for i in range(3)]
    attack = run_attack(tmp_path, isolation, model=_fetching(urls), limits=limit_args(disk="16m"),
                        args=["--allow-private", "127.0.0.2"], env=private_cache(tmp_path))
    report = attack.reports("model")
    assert report[0] == {"ok": True, "size": 12 * MIB}, attack.describe()
    # 12 MiB more would pass the run's budget of 16 MiB (--disk): refused, each time
    for refused in report[1:]:
        assert refused["ok"] is False and "budget" in refused["error"], report
    assert len(report) == 3
    assert not attack.leftovers()


def test_the_downloads_option_sets_the_budget(tmp_path, server):
    require_backend("bwrap")
    urls = [server.url(f"/big/{i}") for i in range(3)]
    attack = run_attack(tmp_path, "bwrap", model=_fetching(urls), limits=limit_args(disk="16m"),
                        args=["--allow-private", "127.0.0.2", "--downloads", "30m"], env=private_cache(tmp_path))
    report = attack.reports("model")
    assert [r["ok"] for r in report] == [True, True, False], report  # 24 MiB fit in 30, 36 do not
    assert "budget of 30 MiB" in report[2]["error"]


def _cache_entries(root: Path) -> list[Path]:
    return sorted(p for p in (root / "downloads").glob("*/blob"))


def test_the_download_cache_is_capped_least_recently_used_first_and_clean_empties_it(tmp_path, server):
    require_backend("bwrap")
    env = {**private_cache(tmp_path), "PIPCOOK_SANDBOX_DOWNLOAD_CACHE_MAX": str(30 * MIB)}
    urls = [server.url(f"/big/{i}") for i in range(4)]
    attack = run_attack(tmp_path, "bwrap", model=_fetching(urls), args=["--allow-private", "127.0.0.2"],
                        limits=limit_args(disk="16m", downloads="100m"), env=env)
    assert [r["ok"] for r in attack.reports("model")] == [True] * 4, attack.describe()
    assert attack.returncode == 0, attack.describe()
    cache = tmp_path / "cache"
    blobs = _cache_entries(cache)
    assert sum(b.stat().st_size for b in blobs) <= 30 * MIB, blobs  # 48 MiB fetched, at most 30 kept
    assert len(blobs) == 2
    # the two kept are the two used last (keyed by URL and the --allow-private policy)
    kept = {b.parent.name for b in blobs}
    assert kept == {hashlib.sha256(f"{u}\x00127.0.0.2".encode()).hexdigest() for u in urls[2:]}

    cleaned = run_cli("clean", "--cache", env=env)
    assert cleaned.returncode == 0, cleaned.stderr
    assert all(str(b.parent) in cleaned.stderr for b in blobs), cleaned.stderr  # each entry named as removed
    assert _cache_entries(cache) == []
