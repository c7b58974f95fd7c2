"""How sizes are named to users: the one byte formatter of the host side.

A bottom-layer module (it imports nothing from the package), so the backends,
the limits and the messages of every command name a size the same way.
"""
from __future__ import annotations

_UNITS = (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10))


def fmt_bytes(n: float) -> str:
    """512 bytes, 64 KiB, 1.5 GiB: whole units without decimals, others to one decimal."""
    for unit, size in _UNITS:
        if abs(n) >= size:
            value = n / size
            return f"{value:.0f} {unit}" if value == int(value) else f"{value:.1f} {unit}"
    return f"{n:.0f} bytes"
