"""Fetching under the network policy, against a real local HTTP(S) server."""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import socket
import ssl
import time
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest

from pipcook_sandbox.runner import fetch
from pipcook_sandbox.runner.errors import FetchError, IntegrityError, PolicyError
from pipcook_sandbox.runner.fetch import cache_dir, download, fetch_bytes, fetch_script
from pipcook_sandbox.runner.spec import ScriptRef, uri_to_path

try:  # pytest puts tests/ on sys.path unless tests/ becomes a package
    from httpserver import Server, http_server, start_server  # noqa: F401
except ImportError:  # pragma: no cover
    from tests.httpserver import Server, http_server, start_server  # noqa: F401

LOOPBACK = {"127.0.0.1"}
SCRIPT = b"def train(runtime, options, ctx):\n    pass\n"
SCRIPT_SHA = hashlib.sha256(SCRIPT).hexdigest()


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("PIPCOOK_SANDBOX_CACHE", str(root))
    return root


def ref_for(uri: str, sha256: str | None = None, name: str = "model.py") -> ScriptRef:
    # A local file may be read only under the directories its pipeline allows: here, its own.
    roots = (os.path.realpath(uri_to_path(uri).parent),) if uri.startswith("file:") else ()
    return ScriptRef(uri=uri, options={}, sha256=sha256, name=name, raw=uri, roots=roots)


def cached_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


# ---------------------------------------------------------------- cache dir


def test_cache_dir_env_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PIPCOOK_SANDBOX_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    monkeypatch.delenv("PIPCOOK_SANDBOX_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "pipcook-sandbox"


# ---------------------------------------------------------------- policy


def test_loopback_is_refused_without_allow_private(http_server: Server) -> None:
    http_server.routes["/a"] = (200, {}, b"hello")
    with pytest.raises(PolicyError, match="--allow-private"):
        fetch_bytes(http_server.url("/a"))
    assert http_server.hits["/a"] == 0


def test_loopback_is_allowed_with_allow_private(http_server: Server, tmp_path: Path) -> None:
    http_server.routes["/a"] = (200, {}, b"hello")
    assert fetch_bytes(http_server.url("/a"), allow_private=LOOPBACK) == b"hello"
    dest = tmp_path / "out" / "a.bin"
    digest = download(http_server.url("/a"), dest, allow_private=LOOPBACK, max_bytes=100)
    assert dest.read_bytes() == b"hello"
    assert digest == hashlib.sha256(b"hello").hexdigest()
    assert list(dest.parent.iterdir()) == [dest]  # no temp file left


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://127.0.0.1/x"])
def test_only_http_is_fetched(url: str) -> None:
    with pytest.raises(PolicyError, match="only http and https"):
        fetch_bytes(url, allow_private=LOOPBACK)


def test_connects_to_the_vetted_address_not_a_second_lookup(
    http_server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The name resolves once to the allowed loopback, then "rebinds" to the
    # metadata address. Only the vetted answer may ever be used.
    http_server.routes["/r"] = (200, {}, b"pinned")
    real = socket.getaddrinfo
    answers = iter(["127.0.0.1"])

    def rebinding(host: str, port: int, *args: object, **kwargs: object) -> list:
        if host != "rebind.test":
            return real(host, port, *args, **kwargs)
        ip = next(answers, "169.254.169.254")
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port))]

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    body = fetch_bytes(http_server.url("/r", host="rebind.test"), allow_private={"rebind.test"})
    assert body == b"pinned"
    assert http_server.host_headers[-1] == f"rebind.test:{http_server.port}"
    # A second fetch sees the rebound address and is refused.
    with pytest.raises(PolicyError):
        fetch_bytes(http_server.url("/r", host="rebind.test"), allow_private={"127.0.0.1"})


# ---------------------------------------------------------------- redirects


def test_redirects_are_followed(http_server: Server) -> None:
    http_server.routes["/old"] = (302, {"Location": "/new"}, b"")
    http_server.routes["/new"] = (200, {}, b"moved")
    assert fetch_bytes(http_server.url("/old"), allow_private=LOOPBACK) == b"moved"


@pytest.mark.parametrize("target", ["http://127.0.0.2:{port}/x", "http://169.254.169.254/latest/meta-data/", "http://[::1]:{port}/x"])
def test_redirect_to_a_non_allowed_private_address_is_refused(http_server: Server, target: str) -> None:
    http_server.routes["/go"] = (302, {"Location": target.format(port=http_server.port)}, b"")
    with pytest.raises(PolicyError):
        fetch_bytes(http_server.url("/go"), allow_private=LOOPBACK)
    assert http_server.hits["/go"] == 1


def test_redirect_to_another_scheme_is_refused(http_server: Server) -> None:
    http_server.routes["/go"] = (301, {"Location": "file:///etc/passwd"}, b"")
    with pytest.raises(PolicyError, match="only http and https"):
        fetch_bytes(http_server.url("/go"), allow_private=LOOPBACK)


def test_redirect_limit(http_server: Server) -> None:
    http_server.routes["/loop"] = (302, {"Location": "/loop"}, b"")
    with pytest.raises(FetchError, match="too many redirects"):
        fetch_bytes(http_server.url("/loop"), allow_private=LOOPBACK)
    assert http_server.hits["/loop"] == fetch.MAX_REDIRECTS + 1


# ---------------------------------------------------------------- failures


def test_http_error_status(http_server: Server) -> None:
    with pytest.raises(FetchError, match="404") as info:
        fetch_bytes(http_server.url("/missing.py"), allow_private=LOOPBACK)
    assert "/missing.py" in str(info.value)


def test_size_cap_by_content_length(http_server: Server, tmp_path: Path) -> None:
    http_server.routes["/big"] = (200, {}, b"x" * 5000)
    dest = tmp_path / "d" / "big.bin"
    with pytest.raises(FetchError, match="larger than the 1 KiB limit"):
        download(http_server.url("/big"), dest, allow_private=LOOPBACK, max_bytes=1024)
    assert list(dest.parent.iterdir()) == []


def test_size_cap_while_streaming(http_server: Server, tmp_path: Path) -> None:
    def endless(handler: BaseHTTPRequestHandler) -> None:
        # No Content-Length: only counting the bytes can stop this.
        handler.send_response(200)
        handler.send_header("Connection", "close")
        handler.end_headers()
        for _ in range(100):
            handler.wfile.write(b"y" * 10_000)

    http_server.routes["/stream"] = endless
    dest = tmp_path / "d" / "s.bin"
    with pytest.raises(FetchError, match="larger than the 64 KiB limit"):
        download(http_server.url("/stream"), dest, allow_private=LOOPBACK, max_bytes=64 * 1024)
    assert list(dest.parent.iterdir()) == []


def test_read_timeout_before_headers(http_server: Server) -> None:
    def slow(handler: BaseHTTPRequestHandler) -> None:
        time.sleep(2)

    http_server.routes["/slow"] = slow
    start = time.monotonic()
    with pytest.raises(FetchError, match="timed out"):
        fetch_bytes(http_server.url("/slow"), allow_private=LOOPBACK, timeout=0.3)
    assert time.monotonic() - start < 1.5


def test_read_timeout_mid_body(http_server: Server) -> None:
    def stalls(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Length", "1000")
        handler.end_headers()
        handler.wfile.write(b"z" * 10)
        handler.wfile.flush()
        time.sleep(2)

    http_server.routes["/stall"] = stalls
    with pytest.raises(FetchError, match="timed out .* reading"):
        fetch_bytes(http_server.url("/stall"), allow_private=LOOPBACK, timeout=0.3)


def test_connection_refused_is_a_fetch_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again before use: nothing listens
    with pytest.raises(FetchError, match="could not connect"):
        fetch_bytes(f"http://127.0.0.1:{port}/x", allow_private=LOOPBACK, timeout=2)


# ---------------------------------------------------------------- scripts


def test_pin_match(http_server: Server, isolated_cache: Path) -> None:
    http_server.routes["/model.py"] = (200, {}, SCRIPT)
    path = fetch_script(ref_for(http_server.url("/model.py"), SCRIPT_SHA), nocache=False, allow_private=LOOPBACK)
    assert path.read_bytes() == SCRIPT
    assert path == isolated_cache / "scripts" / "sha256" / f"{SCRIPT_SHA}.py"


def test_pin_mismatch_caches_nothing(http_server: Server, isolated_cache: Path) -> None:
    http_server.routes["/model.py"] = (200, {}, b"import os; os.system('evil')\n")
    wrong = "0" * 64
    with pytest.raises(IntegrityError) as info:
        fetch_script(ref_for(http_server.url("/model.py"), wrong), nocache=False, allow_private=LOOPBACK)
    message = str(info.value)
    assert "model.py" in message and wrong in message
    assert hashlib.sha256(b"import os; os.system('evil')\n").hexdigest() in message
    assert cached_files(isolated_cache) == []


def test_second_fetch_uses_the_cache(http_server: Server) -> None:
    http_server.routes["/model.py"] = (200, {}, SCRIPT)
    ref = ref_for(http_server.url("/model.py"))
    before = fetch.stats["downloads"]
    first = fetch_script(ref, nocache=False, allow_private=LOOPBACK)
    second = fetch_script(ref, nocache=False, allow_private=LOOPBACK)
    assert first == second and second.read_bytes() == SCRIPT
    assert fetch.stats["downloads"] - before == 1
    assert http_server.hits["/model.py"] == 1


def test_url_index_records_the_fetch(http_server: Server, isolated_cache: Path) -> None:
    http_server.routes["/model.py"] = (200, {}, SCRIPT)
    url = http_server.url("/model.py")
    fetch_script(ref_for(url), nocache=False, allow_private=LOOPBACK)
    index = isolated_cache / "scripts" / "urls" / (hashlib.sha256(url.encode()).hexdigest() + ".json")
    entry = json.loads(index.read_text())
    assert entry["url"] == url and entry["sha256"] == SCRIPT_SHA
    assert datetime.datetime.fromisoformat(entry["fetched_at"]).tzinfo is not None


def test_pinned_cached_script_needs_no_network(http_server: Server) -> None:
    http_server.routes["/model.py"] = (200, {}, SCRIPT)
    ref = ref_for(http_server.url("/model.py"), SCRIPT_SHA)
    fetch_script(ref, nocache=False, allow_private=LOOPBACK)
    del http_server.routes["/model.py"]  # the server would now answer 404
    path = fetch_script(ref, nocache=False, allow_private=())  # and no allowance needed
    assert path.read_bytes() == SCRIPT
    assert http_server.hits["/model.py"] == 1


def test_nocache_downloads_again(http_server: Server) -> None:
    http_server.routes["/model.py"] = (200, {}, SCRIPT)
    ref = ref_for(http_server.url("/model.py"))
    fetch_script(ref, nocache=False, allow_private=LOOPBACK)
    http_server.routes["/model.py"] = (200, {}, b"# changed\n")
    assert fetch_script(ref, nocache=False, allow_private=LOOPBACK).read_bytes() == SCRIPT
    assert fetch_script(ref, nocache=True, allow_private=LOOPBACK).read_bytes() == b"# changed\n"
    assert http_server.hits["/model.py"] == 2
    # The index now points at the new content.
    assert fetch_script(ref, nocache=False, allow_private=LOOPBACK).read_bytes() == b"# changed\n"
    assert http_server.hits["/model.py"] == 2


def test_damaged_cache_entry_is_fetched_again(http_server: Server, isolated_cache: Path) -> None:
    http_server.routes["/model.py"] = (200, {}, SCRIPT)
    ref = ref_for(http_server.url("/model.py"))
    path = fetch_script(ref, nocache=False, allow_private=LOOPBACK)
    path.write_bytes(b"tampered")
    assert fetch_script(ref, nocache=False, allow_private=LOOPBACK).read_bytes() == SCRIPT
    assert http_server.hits["/model.py"] == 2


def test_script_size_cap(http_server: Server, isolated_cache: Path) -> None:
    http_server.routes["/model.py"] = (200, {}, b"#" * 2048)
    with pytest.raises(FetchError, match="limit") as info:
        fetch_script(ref_for(http_server.url("/model.py")), nocache=False, allow_private=LOOPBACK, max_bytes=1024)
    assert str(info.value).startswith("model.py: ")
    assert cached_files(isolated_cache) == []


def test_script_fetch_obeys_the_policy(http_server: Server) -> None:
    http_server.routes["/model.py"] = (200, {}, SCRIPT)
    with pytest.raises(PolicyError):
        fetch_script(ref_for(http_server.url("/model.py")), nocache=False, allow_private=())
    assert http_server.hits["/model.py"] == 0


def test_local_script_is_read_every_time(tmp_path: Path) -> None:
    src = tmp_path / "model.py"
    src.write_bytes(SCRIPT)
    ref = ref_for(src.as_uri())
    before = fetch.stats["downloads"]
    assert fetch_script(ref, nocache=False, allow_private=()).read_bytes() == SCRIPT
    src.write_bytes(b"# edited\n")
    assert fetch_script(ref, nocache=False, allow_private=()).read_bytes() == b"# edited\n"
    assert fetch.stats["downloads"] == before


def test_local_script_pin_applies(tmp_path: Path, isolated_cache: Path) -> None:
    src = tmp_path / "model.py"
    src.write_bytes(SCRIPT)
    assert fetch_script(ref_for(src.as_uri(), SCRIPT_SHA), nocache=False, allow_private=()).read_bytes() == SCRIPT
    src.write_bytes(b"# edited\n")
    with pytest.raises(IntegrityError, match=SCRIPT_SHA):
        fetch_script(ref_for(src.as_uri(), SCRIPT_SHA), nocache=False, allow_private=())
    edited_sha = hashlib.sha256(b"# edited\n").hexdigest()
    assert not (isolated_cache / "scripts" / "sha256" / f"{edited_sha}.py").exists()


def test_local_script_missing_and_too_big(tmp_path: Path) -> None:
    with pytest.raises(FetchError, match="not found"):
        fetch_script(ref_for((tmp_path / "nope.py").as_uri()), nocache=False, allow_private=())
    big = tmp_path / "big.py"
    big.write_bytes(b"#" * 100)
    with pytest.raises(FetchError, match="100|limit"):
        fetch_script(ref_for(big.as_uri()), nocache=False, allow_private=(), max_bytes=50)


# ---------------------------------------------------------------- https


def _make_tls(tmp_path: Path, name: str) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(server context for ``name``, client context trusting its CA)."""
    if os.environ.get("CI") == "true":  # the TLS checks are security tests: CI runs them, never skips
        import cryptography.x509 as x509
    else:
        x509 = pytest.importorskip("cryptography.x509")
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    cert_file, key_file, ca_file = tmp_path / "leaf.pem", tmp_path / "leaf.key", tmp_path / "ca.pem"
    cert_file.write_bytes(leaf.public_bytes(pem))
    key_file.write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    ca_file.write_bytes(ca.public_bytes(pem))
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(cert_file, key_file)
    client = ssl.create_default_context(cafile=str(ca_file))
    return server, client


@pytest.fixture
def https_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    server_ctx, client_ctx = _make_tls(tmp_path, "secure.test")
    monkeypatch.setattr(fetch, "tls_verify", client_ctx)
    real = socket.getaddrinfo

    def fake_dns(host: str, port: int, *args: object, **kwargs: object) -> list:
        if host in ("secure.test", "other.test"):
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port))]
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", fake_dns)
    state, httpd = start_server(ssl_context=server_ctx)
    try:
        yield state
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_https_to_vetted_ip_keeps_name_for_tls(https_server: Server) -> None:
    # Dialled by IP, yet the certificate is checked against the name: it is
    # valid for secure.test only, so success proves SNI/verification use it.
    https_server.routes["/s.py"] = (200, {}, b"secure")
    url = f"https://secure.test:{https_server.port}/s.py"
    assert fetch_bytes(url, allow_private={"secure.test"}) == b"secure"
    assert https_server.host_headers[-1] == f"secure.test:{https_server.port}"


def test_https_certificate_for_another_name_is_refused(https_server: Server) -> None:
    https_server.routes["/s.py"] = (200, {}, b"secure")
    with pytest.raises(FetchError, match="could not connect"):
        fetch_bytes(f"https://other.test:{https_server.port}/s.py", allow_private={"other.test"})
    assert https_server.hits["/s.py"] == 0
