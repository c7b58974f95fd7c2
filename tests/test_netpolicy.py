"""The network policy: every spelling of a non-public address is refused."""

from __future__ import annotations

import socket

import pytest

from pipcook_sandbox.runner.errors import FetchError, PolicyError
from pipcook_sandbox.runner.netpolicy import check_url, resolve_and_check

FORBIDDEN_HOSTS = [
    "127.0.0.1",
    "127.1",
    "2130706433",
    "0x7f000001",
    "0177.0.0.1",
    "127.0.0.1.",
    "[::1]",
    "0.0.0.0",
    "0",
    "[::]",
    "localhost",
    "169.254.169.254",
    "100.64.0.1",
    "10.1.2.3",
    "172.16.0.1",
    "192.168.1.1",
    "224.0.0.1",
    "255.255.255.255",
    "[fd00::1]",
    "[fe80::1]",
    "[::ffff:127.0.0.1]",
    "[::ffff:169.254.169.254]",
    "[64:ff9b::a9fe:a9fe]",  # NAT64 form of 169.254.169.254
    "[2002:7f00:1::]",  # 6to4 form of 127.0.0.1
    "[ff02::1]",
]


@pytest.mark.parametrize("host", FORBIDDEN_HOSTS)
def test_non_public_hosts_are_refused(host: str) -> None:
    with pytest.raises(PolicyError):
        resolve_and_check(host, 80, ())
    # check_url refuses literals on sight; names wait for resolution.
    if host != "localhost":
        with pytest.raises(PolicyError):
            check_url(f"http://{host}/x", ())


def test_literals_are_judged_without_dns(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_dns(*args: object, **kwargs: object) -> None:
        raise AssertionError("DNS was asked about a literal address")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    assert resolve_and_check("93.184.216.34", 443, ()) == ["93.184.216.34"]
    assert resolve_and_check("[2606:2800:220:1:248:1893:25c8:1946]", 443, ()) == [
        "2606:2800:220:1:248:1893:25c8:1946"
    ]
    check_url("https://93.184.216.34/file.zip", ())
    with pytest.raises(PolicyError):
        resolve_and_check("0x7f000001", 80, ())


def test_a_name_with_any_private_address_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    def fake(host: str, port: int, *args: object, **kwargs: object) -> list:
        assert host == "mixed.example"
        return [
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.216.34", port)),
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.0.0.5", port)),
        ]

    monkeypatch.setattr(socket, "getaddrinfo", fake)
    with pytest.raises(PolicyError, match="10.0.0.5"):
        resolve_and_check("mixed.example", 80, ())


def test_a_public_name_returns_its_vetted_addresses(monkeypatch: pytest.MonkeyPatch) -> None:
    def fake(host: str, port: int, *args: object, **kwargs: object) -> list:
        return [
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.216.34", port)),
            (socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("2606:2800:220:1::1", port, 0, 0)),
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.216.34", port)),
        ]

    monkeypatch.setattr(socket, "getaddrinfo", fake)
    assert resolve_and_check("example.com", 443, ()) == ["93.184.216.34", "2606:2800:220:1::1"]


def test_unresolvable_name_is_a_fetch_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: object, **kwargs: object) -> None:
        raise socket.gaierror(-2, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", fail)
    with pytest.raises(FetchError, match="could not resolve"):
        resolve_and_check("nothing.invalid", 80, ())


def test_allow_private_lets_the_named_host_through() -> None:
    assert resolve_and_check("127.0.0.1", 80, {"127.0.0.1"}) == ["127.0.0.1"]
    check_url("http://127.0.0.1:8000/x", {"127.0.0.1"})
    # Another spelling of the same address is the same address.
    assert resolve_and_check("127.1", 80, {"127.0.0.1"}) == ["127.0.0.1"]
    assert resolve_and_check("[::1]", 80, {"::1"}) == ["::1"]
    assert "127.0.0.1" in resolve_and_check("localhost", 80, {"localhost"})


def test_allow_private_is_not_a_blanket_pass() -> None:
    with pytest.raises(PolicyError):
        resolve_and_check("127.0.0.2", 80, {"127.0.0.1"})
    with pytest.raises(PolicyError):
        resolve_and_check("169.254.169.254", 80, {"127.0.0.1"})


@pytest.mark.parametrize(
    "url, words",
    [
        ("ftp://example.com/x", "only http and https"),
        ("file:///etc/passwd", "only http and https"),
        ("gopher://example.com/", "only http and https"),
        ("example.com/x", "only http and https"),
        ("http:///x", "no host"),
        ("http://user:pw@example.com/x", "credentials"),
        ("http://user@example.com/x", "credentials"),
        ("http://example.com:99999/x", "(?i)port"),
    ],
)
def test_check_url_refuses(url: str, words: str) -> None:
    with pytest.raises(PolicyError, match=words):
        check_url(url, ())


def test_check_url_accepts_public_urls() -> None:
    check_url("https://example.com/a/b.py?x=1", ())
    check_url("HTTP://Example.COM:8080/", ())
