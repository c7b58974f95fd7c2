"""Network policy for everything the runner fetches.

Scripts, frameworks and ``ctx.download`` requests made on behalf of sandboxed
scripts all pass through here. Only http(s) is allowed, and no address on the
host's loopback, a private network, link-local (the cloud metadata address)
or any other non-public range, nor any address of the host's own interfaces
(read at each check, runner.hostaddrs), unless the operator named the host
with --allow-private.

The check is only sound if the caller then connects to the very addresses
returned by :func:`resolve_and_check`; resolving the name a second time would
let a DNS server answer differently (rebinding). ``runner.fetch`` does that.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Collection
from urllib.parse import urlsplit

from pipcook_sandbox.runner.errors import FetchError, PolicyError
from pipcook_sandbox.runner.hostaddrs import host_addresses

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

ALLOWED_SCHEMES = ("http", "https")

# Spelled out rather than trusting ipaddress.is_global alone: its tables have
# changed between Python releases (3.11 still calls 224.0.0.1 and 2002::/16
# global), and a gap here is a hole into the host's network.
_BLOCKED_V4 = [
    ipaddress.ip_network(n)
    for n in (
        "0.0.0.0/8",  # "this network"; 0.0.0.0 reaches the local host
        "10.0.0.0/8",
        "100.64.0.0/10",  # carrier-grade NAT: private in practice
        "127.0.0.0/8",
        "169.254.0.0/16",  # link-local, cloud metadata (169.254.169.254)
        "172.16.0.0/12",
        "192.0.0.0/24",
        "192.0.2.0/24",
        "192.88.99.0/24",  # 6to4 relay anycast
        "192.168.0.0/16",
        "198.18.0.0/15",
        "198.51.100.0/24",
        "203.0.113.0/24",
        "224.0.0.0/4",  # multicast
        "240.0.0.0/4",  # reserved, includes 255.255.255.255
    )
]
_BLOCKED_V6 = [
    ipaddress.ip_network(n)
    for n in (
        "::/96",  # unspecified, loopback, deprecated IPv4-compatible forms
        "::ffff:0:0/96",  # IPv4-mapped (checked via the mapped address too)
        "64:ff9b:1::/48",  # local-use NAT64
        "100::/64",  # discard
        "2001::/23",  # IETF protocol assignments, Teredo
        "2001:db8::/32",  # documentation
        "fc00::/7",  # unique local
        "fe80::/10",  # link-local
        "fec0::/10",  # old site-local
        "ff00::/8",  # multicast
    )
]
_HEX_PART = re.compile(r"0[xX][0-9a-fA-F]*")
_OCT_PART = re.compile(r"0[0-7]*")
_DEC_PART = re.compile(r"[1-9][0-9]*")

_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_SIX_TO_FOUR = ipaddress.ip_network("2002::/16")


def _normalize_host(host: str) -> str:
    host = host.strip().lower()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host.rstrip(".")


def _parse_ipv4_loose(host: str) -> ipaddress.IPv4Address | None:
    """Parse an IPv4 literal the way inet_aton and browsers do.

    ``127.1``, ``2130706433``, ``0x7f000001`` and ``0177.0.0.1`` all mean
    127.0.0.1 to the C resolver, so they must mean it here too.
    """
    parts = host.split(".")
    if not 1 <= len(parts) <= 4:
        return None
    values: list[int] = []
    for part in parts:
        # Strict digits only: int() alone would also take "+1", " 1", "1_0".
        if _HEX_PART.fullmatch(part):
            values.append(int(part[2:] or "0", 16))
        elif _OCT_PART.fullmatch(part):
            values.append(int(part, 8))
        elif _DEC_PART.fullmatch(part):
            values.append(int(part, 10))
        else:
            return None
    # The last part fills all the remaining bytes (a.b.c.d, a.b.cd, a.bcd, abcd).
    *head, last = values
    if any(v > 255 for v in head) or last >= 256 ** (4 - len(head)):
        return None
    number = 0
    for v in head:
        number = (number << 8) | v
    number = (number << (8 * (4 - len(head)))) | last
    return ipaddress.IPv4Address(number)


def parse_ip_literal(host: str) -> IPAddress | None:
    """The address a host string names literally, in any spelling, or None."""
    host = _normalize_host(host)
    if ":" in host:
        try:
            # A zone id (fe80::1%eth0) does not change which range it is in.
            return ipaddress.IPv6Address(host.split("%", 1)[0])
        except ValueError:
            return None
    return _parse_ipv4_loose(host) if host else None


def _embedded_v4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def is_forbidden(ip: IPAddress) -> bool:
    """True for any address that is not plainly a public unicast address."""
    if isinstance(ip, ipaddress.IPv6Address):
        inner = _embedded_v4(ip)
        if inner is not None and is_forbidden(inner):
            return True
        blocked = _BLOCKED_V6
    else:
        blocked = _BLOCKED_V4
    if any(ip in net for net in blocked):
        return True
    return (
        ip.is_loopback
        or ip.is_private
        or ip.is_link_local
        or ip.is_unspecified
        or ip.is_multicast
        or ip.is_reserved
        or not ip.is_global
    )


def is_own(ip: IPAddress) -> bool:
    """True for an address of one of this host's interfaces (IPv4-mapped and
    NAT64/6to4 spellings of one too): public or not, it reaches the host."""
    own = host_addresses()
    if ip in own:
        return True
    return isinstance(ip, ipaddress.IPv6Address) and _embedded_v4(ip) in own


def refused(ip: IPAddress) -> bool:
    """What `ctx.download` and every fetch refuse without --allow-private."""
    return is_forbidden(ip) or is_own(ip)


def _allowed_set(allow_private: Collection[str]) -> set[str]:
    allowed = set()
    for entry in allow_private:
        allowed.add(_normalize_host(entry))
        ip = parse_ip_literal(entry)
        if ip is not None:
            allowed.add(str(ip))
    return allowed


def _refuse(host: str, ip: IPAddress) -> PolicyError:
    shown = host if _normalize_host(host) == str(ip) else f"{host} ({ip})"
    what = ("an address of this host's own interfaces" if not is_forbidden(ip) else
            "a loopback, private, link-local or otherwise non-public address")
    return PolicyError(f"refused to connect to {shown}: it is {what}; use --allow-private HOST to allow it")


def check_url(url: str, allow_private: Collection[str] = ()) -> None:
    """Refuse a URL that is not plain http(s) to a named host.

    Literal addresses are judged here already, without any DNS lookup;
    names are judged by :func:`resolve_and_check` when connecting.
    """
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise PolicyError(f"refused URL {url!r}: it is malformed ({exc})") from None
    scheme = parts.scheme.lower()
    if scheme not in ALLOWED_SCHEMES:
        shown = f"'{scheme}:'" if scheme else "no scheme"
        raise PolicyError(f"refused URL {url!r}: only http and https may be fetched, not {shown}")
    if not parts.hostname:
        raise PolicyError(f"refused URL {url!r}: it names no host")
    if parts.username is not None or parts.password is not None:
        raise PolicyError(
            f"refused URL for host {parts.hostname}: credentials in URLs are not allowed"
        )
    if port is not None and not 0 < port < 65536:
        raise PolicyError(f"refused URL {url!r}: port {port} is out of range")
    ip = parse_ip_literal(parts.hostname)
    if ip is not None and refused(ip):
        allowed = _allowed_set(allow_private)
        if _normalize_host(parts.hostname) not in allowed and str(ip) not in allowed:
            raise _refuse(parts.hostname, ip)


def resolve_and_check(host: str, port: int, allow_private: Collection[str] = ()) -> list[str]:
    """Resolve ``host`` and return its addresses, all of them vetted.

    If ANY address is forbidden the whole host is refused: a name that
    resolves to both a public and a private address is an attack, not a
    mirror. Allowed hosts (as written, or by resolved IP) pass.
    """
    allowed = _allowed_set(allow_private)
    name = _normalize_host(host)
    if not name:
        raise PolicyError("refused: the URL names no host")
    literal = parse_ip_literal(name)
    if literal is not None:
        # Never ask DNS about a literal: the answer is the literal itself.
        if refused(literal) and name not in allowed and str(literal) not in allowed:
            raise _refuse(host, literal)
        return [str(literal)]
    try:
        infos = socket.getaddrinfo(name, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise FetchError(f"could not resolve host {host!r}: {reason}") from None
    vetted: list[str] = []
    for _family, _type, _proto, _canon, sockaddr in infos:
        ip = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
        if refused(ip) and name not in allowed and str(ip) not in allowed:
            raise _refuse(host, ip)
        if str(ip) not in vetted:
            vetted.append(str(ip))
    if not vetted:
        raise FetchError(f"could not resolve host {host!r}: no addresses")
    return vetted
