"""No network from a stage: the host's loopback (v4, v6), its other addresses,
abstract unix sockets, well-known unix sockets and the metadata address reach
nothing.

The test opens real listeners on the host first (TCP and UDP on 127.0.0.1,
::1 and every other address of the host, an abstract unix socket in this
process), hands their addresses to the hostile stages, and afterwards checks
from the host side that not one connection or datagram arrived.
"""
from __future__ import annotations

import json
import socket
import subprocess
import threading

import pytest
from waiting import wait_until

from .attack import run_attack, token

pytestmark = pytest.mark.hostile

PROBE = r'''
import errno, json, os, socket, time

CFG = json.loads(__CFG__)


def attempt(kind, family, address, **extra):
    """'ok' if the packet or connection got out of the stage, else the errno name."""
    try:
        s = socket.socket(family, socket.SOCK_DGRAM if kind == "udp" else socket.SOCK_STREAM)
    except OSError as e:
        return "socket:" + errno.errorcode.get(e.errno, str(e.errno))
    s.settimeout(3)
    try:
        if kind == "udp":
            s.sendto(CFG["token"].encode(), address)
            return "sent"
        s.connect(address)
        s.sendall(CFG["token"].encode())
        return "ok"
    except socket.timeout:
        return "timeout"
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e.errno))
    finally:
        s.close()


def attack(stage):
    results = {}
    for name, (host, port) in CFG["tcp"].items():
        fam = socket.AF_INET6 if ":" in host else socket.AF_INET
        results["tcp " + name] = attempt("tcp", fam, (host, port))
    for name, (host, port) in CFG["udp"].items():
        fam = socket.AF_INET6 if ":" in host else socket.AF_INET
        results["udp " + name] = attempt("udp", fam, (host, port))
    results["tcp metadata 169.254.169.254:80"] = attempt("tcp", socket.AF_INET, ("169.254.169.254", 80))
    results["udp metadata 169.254.169.254:53"] = attempt("udp", socket.AF_INET, ("169.254.169.254", 53))
    results["abstract unix stream"] = attempt("tcp", socket.AF_UNIX, "\0" + CFG["abstract"])
    results["abstract unix dgram"] = attempt("udp", socket.AF_UNIX, "\0" + CFG["abstract_dgram"])
    for path in ("/var/run/docker.sock", "/run/docker.sock", "/run/dbus/system_bus_socket",
                 "/run/systemd/private", "/run/containerd/containerd.sock"):
        results["unix " + path] = attempt("tcp", socket.AF_UNIX, path)
    try:
        results["dns example.com"] = str(socket.getaddrinfo("example.com", 80))
    except OSError as e:
        results["dns example.com"] = type(e).__name__
    for fam_name in ("AF_NETLINK", "AF_PACKET"):
        try:
            socket.socket(getattr(socket, fam_name), socket.SOCK_RAW, 0).close()
            results["raw " + fam_name] = "ok"
        except OSError as e:
            results["raw " + fam_name] = errno.errorcode.get(e.errno, str(e.errno))
    with open("/proc/net/dev") as f:
        results["interfaces"] = sorted(l.split(":")[0].strip() for l in f.read().splitlines()[2:])
    print("REPORT", json.dumps(results), flush=True)


def datasource(options, ctx):
    from sandbox import sdk
    attack("datasource")
    return sdk.from_lists(train=[{"data": 1, "label": 0}], meta={"type": "general"})


def train(runtime, options, ctx):
    attack("model")
'''


class Listeners:
    """Real TCP/UDP/unix listeners on the host, counting whatever reaches them."""

    def __init__(self) -> None:
        self.hits: list[str] = []
        self.socks: list[socket.socket] = []
        self.tcp: dict[str, tuple[str, int]] = {}
        self.udp: dict[str, tuple[str, int]] = {}
        self.abstract = token("pcsb-hostile-abstract")
        self.abstract_dgram = token("pcsb-hostile-abstract-dgram")
        self._stop = threading.Event()

    def _add(self, kind: str, family: int, address, name: str) -> None:
        s = socket.socket(family, socket.SOCK_DGRAM if kind == "udp" else socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(address)
        if kind == "tcp":
            s.listen(16)
        s.settimeout(0.1)
        self.socks.append(s)
        if family != socket.AF_UNIX:
            (self.tcp if kind == "tcp" else self.udp)[name] = (address[0], s.getsockname()[1])
        threading.Thread(target=self._serve, args=(kind, s, name), daemon=True).start()

    def _serve(self, kind: str, s: socket.socket, name: str) -> None:
        while not self._stop.is_set():
            try:
                if kind == "tcp":
                    conn, peer = s.accept()
                    self.hits.append(f"{name}: connection from {peer}")
                    conn.close()
                else:
                    data, peer = s.recvfrom(4096)
                    self.hits.append(f"{name}: datagram {data[:40]!r} from {peer}")
            except (socket.timeout, OSError):
                continue

    def start(self) -> "Listeners":
        self._add("tcp", socket.AF_INET, ("127.0.0.1", 0), "127.0.0.1")
        self._add("tcp", socket.AF_INET6, ("::1", 0), "::1")
        self._add("udp", socket.AF_INET, ("127.0.0.1", 0), "127.0.0.1")
        self._add("udp", socket.AF_INET6, ("::1", 0), "::1")
        self._add("tcp", socket.AF_INET, ("0.0.0.0", 0), "any-v4")
        self._add("udp", socket.AF_INET, ("0.0.0.0", 0), "any-v4")
        self._add("tcp", socket.AF_UNIX, "\0" + self.abstract, "abstract")
        self._add("udp", socket.AF_UNIX, "\0" + self.abstract_dgram, "abstract-dgram")
        any_tcp, any_udp = self.tcp.pop("any-v4")[1], self.udp.pop("any-v4")[1]
        for addr in _host_addresses():
            self.tcp[addr] = (addr, any_tcp)
            self.udp[addr] = (addr, any_udp)
        return self

    def stop(self) -> None:
        self._stop.set()
        for s in self.socks:
            s.close()


def _host_addresses() -> list[str]:
    """The host's own non-loopback IPv4 addresses (eth0, docker0, ...)."""
    try:
        out = subprocess.run(["hostname", "-I"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [a for a in out.split() if ":" not in a and not a.startswith("127.")]


@pytest.fixture
def listeners():
    lst = Listeners().start()
    try:
        yield lst
    finally:
        lst.stop()


def _sanity_check_listeners(lst: Listeners) -> None:
    """The listeners do count what reaches them (from the host itself)."""
    for host, port in lst.tcp.values():
        with socket.create_connection((host, port), timeout=3):
            pass
    for host, port in lst.udp.values():
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.sendto(b"host", (host, port))
    with socket.socket(socket.AF_UNIX) as s:
        s.connect("\0" + lst.abstract)


def test_loopback_abstract_sockets_and_metadata_reach_nothing(tmp_path, isolation, listeners):
    cfg = {"tcp": listeners.tcp, "udp": listeners.udp, "abstract": listeners.abstract,
           "abstract_dgram": listeners.abstract_dgram, "token": token("pcsb-net")}
    script = PROBE.replace("__CFG__", repr(json.dumps(cfg)))
    attack = run_attack(tmp_path, isolation, datasource=script, dataflow=[], model=script)
    assert attack.returncode == 0, attack.describe()
    for stage in ("datasource", "model"):
        results = attack.reports(stage)
        assert results["interfaces"] == ["lo"], (stage, results)
        got_out = {k: v for k, v in results.items() if v == "ok"}
        assert not got_out, (stage, got_out)
        for name in listeners.tcp:
            assert results[f"tcp {name}"] != "ok", (stage, name, results)
        assert results["dns example.com"] in ("gaierror", "OSError"), results
        assert results["tcp metadata 169.254.169.254:80"] != "ok"
        assert results["abstract unix stream"] in ("ECONNREFUSED", "ENOENT", "socket:EAFNOSUPPORT"), results
    # Seen from the host: not one connection, not one datagram.
    assert listeners.hits == [], listeners.hits
    # ...while the listeners do count what reaches them.
    _sanity_check_listeners(listeners)
    expected = len(listeners.tcp) + len(listeners.udp) + 1
    wait_until(lambda: len(listeners.hits) >= expected, 5, f"{expected} hits on the sanity check's listeners")
    assert len(listeners.hits) == expected, listeners.hits
    assert not attack.leftovers()
