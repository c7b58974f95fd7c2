"""The addresses assigned to this host's own interfaces, read when asked.

`ctx.download` refuses loopback and private ranges, but a host may also hold
public addresses: a service listening on 0.0.0.0 answers there too. The
network policy asks this module at every check (interfaces come and go; the
files are small), so an address added after the runner started counts.

IPv4: every `/32 host LOCAL` entry of /proc/net/fib_trie (primary and
secondary addresses of every interface, the kernel's own list); IPv6:
/proc/net/if_inet6. Where those cannot be read, the primary IPv4 address of
each interface by ioctl (SIOCGIFADDR).
"""
from __future__ import annotations

import fcntl
import ipaddress
import socket
import struct
from pathlib import Path

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

FIB_TRIE = Path("/proc/net/fib_trie")
IF_INET6 = Path("/proc/net/if_inet6")
_SIOCGIFADDR = 0x8915


def _from_fib_trie(text: str) -> set[IPAddress]:
    found: set[IPAddress] = set()
    last: str | None = None
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("|-- "):
            last = stripped[4:]
        elif stripped.startswith("/32 host LOCAL") and last is not None:
            try:
                found.add(ipaddress.IPv4Address(last))
            except ValueError:
                pass
    return found


def _from_if_inet6(text: str) -> set[IPAddress]:
    found: set[IPAddress] = set()
    for line in text.splitlines():
        fields = line.split()
        if fields and len(fields[0]) == 32:
            try:
                found.add(ipaddress.IPv6Address(int(fields[0], 16)))
            except ValueError:
                pass
    return found


def _by_ioctl() -> set[IPAddress]:
    found: set[IPAddress] = set()
    try:
        names = [name for _index, name in socket.if_nameindex()]
    except OSError:
        return found
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for name in names:
            try:
                raw = fcntl.ioctl(sock.fileno(), _SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
            except OSError:
                continue  # no IPv4 address on it
            found.add(ipaddress.IPv4Address(raw[20:24]))
    return found


def host_addresses() -> frozenset[IPAddress]:
    """Every address of this host's interfaces (IPv4 and IPv6), as of now."""
    found: set[IPAddress] = set()
    try:
        found |= _from_fib_trie(FIB_TRIE.read_text())
    except OSError:
        found |= _by_ioctl()
    try:
        found |= _from_if_inet6(IF_INET6.read_text())
    except OSError:
        pass
    return frozenset(found)
