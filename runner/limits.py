"""Per-stage limits from the command line, with the defaults the README states."""
from __future__ import annotations

import os
import re
from collections.abc import Callable

from pipcook_sandbox.runner.backends.base import Limits

from .errors import UsageError
from .units import fmt_bytes

# Below these a stage cannot even start Python with the worker's imports (measured: the worker alone
# peaks near 40 MiB), so a smaller value is refused up front instead of failing obscurely later.
MIN_MEMORY = 64 << 20
MIN_DISK = 16 << 20
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str, what: str) -> int:
    """'512m', '2g', '1.5G', '4096' (bytes) -> bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgtb]?)(?:i?b)?\s*", str(text).lower())
    if not m:
        raise UsageError(f"{what} {text!r} is not a size like 512m or 2g")
    value = int(float(m.group(1)) * _UNITS[m.group(2)])
    if value <= 0:
        raise UsageError(f"{what} must be positive")
    return value


def defaults() -> Limits:
    """Memory 4g, all CPUs, 256 processes, 10g of disk, 1 hour, per stage."""
    return Limits(cpus=float(os.cpu_count() or 1))


def from_options(memory: str | None, cpus: float | None, pids: int | None, disk: str | None,
                 timeout: float | None, warn: Callable[[str], None] | None = None,
                 downloads: str | None = None) -> Limits:
    """Limits from the command-line values; a bad one is a UsageError (exit 2). `--cpus` above the
    host's cores is capped to them, with a warning through `warn`."""
    limits = defaults()
    changes: dict = {}
    if memory is not None:
        changes["memory"] = parse_size(memory, "--memory")
        if changes["memory"] < MIN_MEMORY:
            raise UsageError(f"--memory {memory} is below the minimum of {fmt_bytes(MIN_MEMORY)}: a stage needs that "
                             "much to start Python and the worker")
    if cpus is not None:
        if cpus <= 0:
            raise UsageError("--cpus must be positive")
        host = os.cpu_count() or 1
        if cpus > host:
            if warn is not None:
                warn(f"warning: --cpus {cpus:g} is more than the {host} core(s) of this host; each stage gets "
                     f"at most {host}")
            cpus = float(host)
        changes["cpus"] = float(cpus)
    if pids is not None:
        if pids < 8:
            raise UsageError("--pids must be at least 8 (Python and its threads need a few)")
        changes["pids"] = int(pids)
    if disk is not None:
        changes["disk"] = parse_size(disk, "--disk")
        if changes["disk"] < MIN_DISK:
            raise UsageError(f"--disk {disk} is below the minimum of {fmt_bytes(MIN_DISK)}")
    if timeout is not None:
        if timeout <= 0:
            raise UsageError("--timeout must be positive")
        changes["timeout"] = float(timeout)
    if downloads is not None:
        changes["downloads"] = parse_size(downloads, "--downloads")
    limits = limits.replace(**changes)
    # /tmp is memory-backed: never let it claim more than half the memory limit
    return limits.replace(tmp=min(limits.tmp, limits.memory // 2))
