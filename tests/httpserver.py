"""A real HTTP server on 127.0.0.1 for fetch tests.

Kept out of conftest.py so that it cannot clash with fixtures other test
modules define; import the ``http_server`` fixture where it is needed.
"""

from __future__ import annotations

import contextlib
import ssl
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

# A route answers with (status, headers, body), or is a callable that gets the
# request handler and writes the answer itself (for slow or odd servers).
Route = tuple[int, dict[str, str], bytes] | Callable[[BaseHTTPRequestHandler], None]


@dataclass
class Server:
    host: str
    port: int
    routes: dict[str, Route] = field(default_factory=dict)
    hits: Counter = field(default_factory=Counter)
    host_headers: list[str] = field(default_factory=list)

    def url(self, path: str, host: str | None = None) -> str:
        return f"http://{host or self.host}:{self.port}{path}"


def _handler_class(server: Server) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            server.hits[path] += 1
            server.host_headers.append(self.headers.get("Host", ""))
            route = server.routes.get(path, (404, {}, b"not found"))
            try:
                if callable(route):
                    route(self)
                    return
                status, headers, body = route
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                if "Content-Length" not in headers:
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up (timeouts, size caps): expected

        def log_message(self, *args: object) -> None:
            pass

    return Handler


def start_server(
    host: str = "127.0.0.1", ssl_context: ssl.SSLContext | None = None
) -> tuple[Server, ThreadingHTTPServer]:
    """Start a server in a thread; the caller must shut it down."""
    state = Server(host=host, port=0)
    httpd = ThreadingHTTPServer((host, 0), _handler_class(state))
    httpd.daemon_threads = True
    # Don't wait on handlers that sleep on purpose (timeout tests).
    httpd.block_on_close = False
    if ssl_context is not None:
        httpd.socket = ssl_context.wrap_socket(httpd.socket, server_side=True)
    state.port = httpd.server_address[1]
    # A short poll keeps shutdown() quick.
    threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True).start()
    return state, httpd


@contextlib.contextmanager
def serving(host: str = "127.0.0.1", ssl_context: ssl.SSLContext | None = None) -> Iterator[Server]:
    """start_server for the length of a with block."""
    state, httpd = start_server(host, ssl_context)
    try:
        yield state
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture
def http_server() -> Iterator[Server]:
    with serving() as state:
        yield state
