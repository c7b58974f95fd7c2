"""/proc/self/mountinfo, parsed in one place.

A line is `ID PARENT MAJ:MIN ROOT MOUNT-POINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE SUPER-OPTIONS`
(proc(5)). The kernel writes a space, tab, newline or backslash inside a path as
an octal escape (`\\040`, `\\011`, `\\012`, `\\134`), so a path is unescaped once,
here, before anyone compares it: a directory with a space in its name is still
found, and no escape is undone twice.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

PROC_MOUNTINFO = Path("/proc/self/mountinfo")
_OCTAL = re.compile(r"\\([0-7]{3})")


@dataclass(frozen=True)
class Mount:
    root: str  # the path inside the mounted filesystem (for cgroups: the hierarchy path)
    point: str  # where it is mounted, unescaped
    fstype: str
    super_options: frozenset[str]  # the filesystem's options (cgroup v1: its controllers)


def unescape(field: str) -> str:
    """A mountinfo path field with its octal escapes undone (`\\040` -> space)."""
    return _OCTAL.sub(lambda m: chr(int(m.group(1), 8)), field)


def parse(text: str) -> list[Mount]:
    """Every well-formed line of a mountinfo text; others are skipped."""
    found = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        lf, rf = left.split(), right.split()
        if not sep or len(lf) < 6 or len(rf) < 3:
            continue
        found.append(Mount(unescape(lf[3]), unescape(lf[4]), rf[0], frozenset(rf[2].split(","))))
    return found


def mounts(path: Path = PROC_MOUNTINFO) -> list[Mount]:
    """This mount namespace's mounts; none if the file cannot be read."""
    try:
        return parse(path.read_text())
    except OSError:
        return []


def points_below(root: Path | str) -> list[Path]:
    """Mount points at or below `root`, deepest first (the order to unmount them in)."""
    top = str(root).rstrip("/") or "/"
    prefix = top if top.endswith("/") else top + "/"
    found = {Path(m.point) for m in mounts() if m.point == top or m.point.startswith(prefix)}
    return sorted(found, key=lambda p: len(p.parts), reverse=True)


def is_mount_point(path: Path | str) -> bool:
    """Is `path` a mount point in this mount namespace?"""
    target = str(path)
    return any(m.point == target for m in mounts())
