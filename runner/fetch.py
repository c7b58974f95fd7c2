"""Fetching scripts, frameworks and downloads, under the network policy.

Every hop of every request is checked by ``runner.netpolicy`` and then made
to the vetted IP address itself (the Host header and TLS SNI keep the real
name, so virtual hosting and certificate checks work as usual). Redirects
are followed here, by hand, so each new address is vetted before use.
"""

from __future__ import annotations

import hashlib
import json
import os
import ssl
import tempfile
import time
from collections.abc import Callable, Collection
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urljoin

from pipcook_sandbox.runner import cachedir, localfiles
from pipcook_sandbox.runner.errors import FetchError, IntegrityError, PolicyError
from pipcook_sandbox.runner.netpolicy import check_url, parse_ip_literal, resolve_and_check
from pipcook_sandbox.runner.spec import ScriptRef, uri_to_path
from pipcook_sandbox.runner.units import fmt_bytes

if TYPE_CHECKING:  # httpx is imported when something is fetched over http: a run from local files skips it
    import httpx

MAX_REDIRECTS = 5
DEFAULT_MAX_BYTES = 1 << 30
SCRIPT_MAX_BYTES = 8 << 20
_REDIRECT_STATUSES = (301, 302, 303, 307, 308)
_CHUNK = 64 * 1024

# Tests (and the operator's own code) can count network downloads here to
# check that a cached run made none.
stats: dict[str, int] = {"downloads": 0}

# What httpx uses to verify TLS certificates. A module attribute so that a
# test can trust its own CA; nothing else should change it.
tls_verify: ssl.SSLContext | bool = True


def cache_dir() -> Path:
    """Root of the runner's cache (scripts, frameworks), private to the runner's user; where it is
    (and its fallback without a writable home): runner/cachedir.py."""
    root = cachedir.cache_dir()
    if root not in _made_private:
        _make_private(root)
        _made_private.add(root)
    return root


# Cache roots already made private by this process (a stat and a chmod per folder, once).
_made_private: set[Path] = set()
# The cache's folders; what stages mount lies one level below (a framework build, the worker's
# site: 0755 themselves, reached by bwrap and Docker as root, never through these).
CACHE_FOLDERS = ("scripts", "downloads", "frameworks", "worker-site", "tools", "images")


def _make_private(root: Path) -> None:
    """The cache holds what pipelines and their scripts fetched: 0700, and so are its folders.
    Only folders this user owns are changed (an operator's shared cache is left as it is)."""
    try:
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
        for path in (root, *(root / name for name in CACHE_FOLDERS)):
            path.mkdir(exist_ok=True, mode=0o700)
            st = os.stat(path)
            if st.st_uid == os.geteuid() and st.st_mode & 0o077:
                os.chmod(path, 0o700)
    except OSError:
        pass  # a read-only or foreign cache: whoever writes there reports the real error


def download_cache_dir() -> Path:
    """Root of what remote parties supplied: fetched scripts and `ctx.download` files.

    `PIPCOOK_SANDBOX_DOWNLOAD_CACHE` gives each tenant of a service its own
    (so one tenant's downloads never feed another's run); frameworks and the
    worker site, which the operator builds, stay in the shared `cache_dir()`."""
    override = os.environ.get("PIPCOOK_SANDBOX_DOWNLOAD_CACHE")
    return Path(override) if override else cache_dir()


def _too_big(url: str, max_bytes: int) -> FetchError:
    return FetchError(f"download of {url} refused: it is larger than the {fmt_bytes(max_bytes)} limit")


def _host_header(url: httpx.URL) -> str:
    host = url.raw_host.decode("ascii")
    if ":" in host:
        host = f"[{host}]"
    default = {"http": 80, "https": 443}[url.scheme]
    return host if url.port in (None, default) else f"{host}:{url.port}"


def _send_pinned(
    client: httpx.Client, url: httpx.URL, allow_private: Collection[str], timeout: float,
    deadline: float | None = None,
) -> httpx.Response:
    """Send one GET to a vetted address of ``url``'s host; the caller closes it."""
    import httpx

    host = url.raw_host.decode("ascii")
    port = url.port or {"http": 80, "https": 443}[url.scheme]
    ips = resolve_and_check(host, port, allow_private)
    extensions: dict = {}
    if url.scheme == "https" and parse_ip_literal(host) is None:
        # Verify the certificate against the name, not the IP we dial.
        extensions["sni_hostname"] = host
    last_error: Exception | None = None
    for ip in ips:
        request = client.build_request(
            "GET",
            url.copy_with(host=ip),
            headers={"Host": _host_header(url), "Accept-Encoding": "identity"},
            extensions=extensions,
            timeout=httpx.Timeout(_remaining(timeout, deadline)),
        )
        try:
            return client.send(request, stream=True)
        except httpx.ConnectError as exc:
            # Another vetted address of the same host may answer.
            last_error = exc
    assert last_error is not None
    raise last_error


def _remaining(timeout: float, deadline: float | None) -> float:
    """The per-operation timeout, never past the download's total deadline."""
    if deadline is None:
        return timeout
    return max(0.05, min(timeout, deadline - time.monotonic()))


def _stream(
    url: str,
    sink: Callable[[bytes], None],
    *,
    allow_private: Collection[str],
    max_bytes: int,
    timeout: float,
    deadline: float | None = None,
) -> str:
    """GET ``url`` into ``sink`` following redirects by hand; return the sha256.

    ``deadline`` (time.monotonic()) bounds the whole download, not each read:
    a server that trickles a byte at a time cannot hold it past that time."""
    import httpx

    stats["downloads"] += 1
    current = url
    with httpx.Client(follow_redirects=False, trust_env=False, verify=tls_verify) as client:
        for hop in range(MAX_REDIRECTS + 1):
            try:
                check_url(current, allow_private)
                target = httpx.URL(current)
                _check_deadline(url, deadline)
                response = _send_pinned(client, target, allow_private, timeout, deadline)
            except PolicyError as exc:
                if hop:
                    # Say where the redirect came from, or the refusal of an
                    # address the user never wrote makes no sense.
                    raise PolicyError(f"{exc.cause} (redirected there from {url})") from None
                raise
            except httpx.InvalidURL as exc:
                raise FetchError(f"cannot fetch {current}: malformed URL ({exc})") from None
            except httpx.ConnectTimeout:
                raise FetchError(f"timed out after {timeout:g} s connecting to {current}") from None
            except httpx.TimeoutException:
                raise FetchError(
                    f"timed out after {timeout:g} s waiting for an answer from {current}"
                ) from None
            except httpx.HTTPError as exc:
                raise FetchError(f"could not connect to {current}: {exc}") from None
            try:
                if response.status_code in _REDIRECT_STATUSES:
                    location = response.headers.get("location")
                    if not location:
                        raise FetchError(
                            f"{current} answered {response.status_code} (a redirect) with no Location"
                        )
                    current = urljoin(current, location)
                    continue
                if response.status_code >= 300 or response.status_code < 200:
                    raise FetchError(
                        f"{current} answered HTTP {response.status_code} "
                        f"{response.reason_phrase or ''}".rstrip()
                    )
                return _read_body(response, current, sink, max_bytes, timeout, deadline)
            finally:
                response.close()
        raise FetchError(f"too many redirects (more than {MAX_REDIRECTS}) fetching {url}")


def _read_body(
    response: httpx.Response,
    url: str,
    sink: Callable[[bytes], None],
    max_bytes: int,
    timeout: float,
    deadline: float | None = None,
) -> str:
    import httpx

    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise _too_big(url, max_bytes)
    digest = hashlib.sha256()
    total = 0
    try:
        # No chunk size: each network read is seen as it arrives, so the
        # deadline is checked even when a server sends one byte at a time.
        for chunk in response.iter_bytes():
            _check_deadline(url, deadline)
            total += len(chunk)
            if total > max_bytes:
                raise _too_big(url, max_bytes)
            digest.update(chunk)
            sink(chunk)
    except httpx.TimeoutException:
        raise FetchError(f"timed out after {timeout:g} s reading from {url}") from None
    except httpx.HTTPError as exc:
        raise FetchError(f"download of {url} failed: {exc}") from None
    return digest.hexdigest()


def _check_deadline(url: str, deadline: float | None) -> None:
    if deadline is not None and time.monotonic() > deadline:
        raise FetchError(f"download of {url} stopped: it ran past its deadline")


def fetch_bytes(
    url: str,
    *,
    allow_private: Collection[str] = (),
    max_bytes: int = DEFAULT_MAX_BYTES,
    timeout: float = 30.0,
) -> bytes:
    """Download ``url`` (http/https only) into memory."""
    parts: list[bytes] = []
    _stream(url, parts.append, allow_private=allow_private, max_bytes=max_bytes, timeout=timeout)
    return b"".join(parts)


def download(
    url: str,
    dest: Path,
    *,
    allow_private: Collection[str] = (),
    max_bytes: int,
    timeout: float = 30.0,
    deadline: float | None = None,
    on_chunk: Callable[[int], None] | None = None,
) -> str:
    """Download ``url`` (http/https only) to ``dest``; return its sha256 hex.

    The file appears at ``dest`` only once complete: a failed or refused
    download leaves nothing behind. ``deadline`` (a time.monotonic() value)
    bounds the whole download; ``on_chunk(n)`` is told each chunk's size
    before it is written and may raise to stop the download (a byte budget,
    a cancelled stage).
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=".part-")
    try:
        with os.fdopen(fd, "wb") as out:

            def sink(chunk: bytes) -> None:
                if on_chunk is not None:
                    on_chunk(len(chunk))
                out.write(chunk)

            digest = _stream(
                url, sink, allow_private=allow_private, max_bytes=max_bytes, timeout=timeout,
                deadline=deadline,
            )
        os.replace(tmp_name, dest)
    except BaseException:
        _unlink(Path(tmp_name))
        raise
    return digest


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


# ---------------------------------------------------------------- scripts


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _read_local(ref: ScriptRef, max_bytes: int) -> bytes:
    path = uri_to_path(ref.uri)
    try:
        # Checked again at the moment of reading (runner.localfiles): the
        # pipeline's directory, or an --allow-path, and a regular file.
        data = localfiles.read_confined(path, ref.roots, max_bytes)
    except localfiles.Refused as exc:
        raise FetchError(f"refused to read {ref.raw!r}: {exc}; {localfiles.RULE}", script=ref.name) from None
    except FileNotFoundError:
        raise FetchError(f"script not found: {path}", script=ref.name) from None
    except IsADirectoryError:
        raise FetchError(f"script path is a directory: {path}", script=ref.name) from None
    except OSError as exc:
        raise FetchError(f"cannot read script {path}: {exc.strerror}", script=ref.name) from None
    if len(data) > max_bytes:
        raise FetchError(
            f"script {path} is larger than the {fmt_bytes(max_bytes)} limit", script=ref.name
        )
    return data


def _mismatch(ref: ScriptRef, actual: str) -> IntegrityError:
    return IntegrityError(
        f"sha256 of {ref.uri} does not match its pin: expected {ref.sha256}, got {actual}; "
        "nothing was cached or run",
        script=ref.name,
    )


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=".part-")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        os.replace(tmp_name, path)
    except BaseException:
        _unlink(Path(tmp_name))
        raise


def _cached_ok(path: Path, expected: str) -> bool:
    # Re-hash: a cache file that was damaged or edited must not be trusted.
    if not path.is_file():
        return False
    if _sha256_file(path) == expected:
        return True
    _unlink(path)
    return False


def _index_lookup(index_path: Path, url: str, allow_private: Collection[str]) -> str | None:
    try:
        entry = json.loads(index_path.read_text("utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(entry, dict) or entry.get("url") != url:
        return None
    # Reused only under a policy at least as wide as the one it was fetched
    # under: what --allow-private let in is not served to a run without it.
    recorded = entry.get("allow_private")
    if not isinstance(recorded, list) or not set(map(str, recorded)) <= set(allow_private):
        return None
    sha = entry.get("sha256")
    return sha if isinstance(sha, str) else None


def fetch_script(
    ref: ScriptRef,
    *,
    nocache: bool,
    allow_private: Collection[str] = (),
    max_bytes: int = SCRIPT_MAX_BYTES,
) -> Path:
    """Return a local, verified copy of a script in the content cache.

    Remote scripts are cached by content (``sha256/<hex>.py``) with an index
    from URL to digest (``urls/<sha256 of url>.json``), so a later run
    reuses them without network unless ``nocache``. Local (file:) scripts
    are read every time. A pin that does not match refuses the script and
    caches nothing.
    """
    root = download_cache_dir() / "scripts"
    try:
        return _fetch_script(ref, root, nocache, allow_private, max_bytes)
    except OSError as exc:  # the cache is where every script runs from: full or read-only, the run cannot go on
        raise FetchError(f"cannot keep {ref.uri} in the script cache {root}: {exc.strerror or exc}"
                         f"{f' ({exc.filename})' if exc.filename else ''}; free space there or point "
                         "PIPCOOK_SANDBOX_CACHE at a writable directory", script=ref.name) from exc


def _fetch_script(ref: ScriptRef, root: Path, nocache: bool, allow_private: Collection[str], max_bytes: int) -> Path:
    by_sha = root / "sha256"
    index_path = root / "urls" / (hashlib.sha256(ref.uri.encode("utf-8")).hexdigest() + ".json")

    if ref.is_local:
        data = _read_local(ref, max_bytes)
        actual = hashlib.sha256(data).hexdigest()
        if ref.sha256 and actual != ref.sha256:
            raise _mismatch(ref, actual)
        # A snapshot, so the file verified is the file that runs even if the
        # original changes meanwhile.
        cached = by_sha / f"{actual}.py"
        if not _cached_ok(cached, actual):
            _write_atomic(cached, data)
        return cached

    if not nocache:
        if ref.sha256:
            cached = by_sha / f"{ref.sha256}.py"
            if _cached_ok(cached, ref.sha256):
                return cached
        else:
            known = _index_lookup(index_path, ref.uri, allow_private)
            if known and _cached_ok(by_sha / f"{known}.py", known):
                return by_sha / f"{known}.py"

    by_sha.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkstemp(dir=by_sha, prefix=".part-")[1])
    try:
        try:
            actual = download(ref.uri, tmp, allow_private=allow_private, max_bytes=max_bytes)
        except FetchError as exc:
            if exc.script is None:
                exc.script = ref.name
            raise
        if ref.sha256 and actual != ref.sha256:
            raise _mismatch(ref, actual)
        cached = by_sha / f"{actual}.py"
        os.replace(tmp, cached)
    finally:
        _unlink(tmp)
    entry = {
        "url": ref.uri,
        "sha256": actual,
        "allow_private": sorted(set(allow_private)),
        "fetched_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    _write_atomic(index_path, json.dumps(entry, indent=2).encode("utf-8"))
    return cached
