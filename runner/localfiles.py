"""Host files a pipeline names: only regular files under the directories it may use.

A pipeline on disk is as untrusted as one from a URL, yet the runner (often
root) reads the files it names and mounts them into a stage, which can send
them anywhere through `ctx.download`. So a local pipeline may name only
regular files under its own directory, after resolving every link; the
operator can add directories with `run --allow-path DIR`. Files of the
kernel's pseudo file systems (`/proc/self/environ` holds the runner's
environment), devices, fifos, sockets and directories are refused always,
even under an allowed directory.

The check is made twice: when the pipeline is parsed (so a bad pipeline is
refused before anything runs, naming the field), and when the file is
opened: the path is resolved, opened without following a last link and
without blocking (a fifo swapped in meanwhile cannot hang the runner), and
what was actually opened (its `/proc/self/fd` link and its `fstat`) is
checked again.
"""
from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from pathlib import Path

from .errors import Refused

RULE = ("a local pipeline may name only regular files under its own directory (links resolved); "
        "the operator can allow another directory with --allow-path DIR")
# Pseudo file systems: their "regular" files are the kernel's and the runner's own state.
_NEVER = (Path("/proc"), Path("/sys"), Path("/dev"))


def roots_of(*dirs: str | os.PathLike[str]) -> tuple[str, ...]:
    """Allowed directories, resolved (so a link to elsewhere allows elsewhere, not the link)."""
    return tuple(os.path.realpath(os.path.expanduser(d)) for d in dirs)


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a fifo"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "not a regular file"


def _inside(real: str, roots: Sequence[str]) -> bool:
    path = Path(real)
    return any(path == Path(r) or Path(r) in path.parents for r in roots)


def check(path: str | os.PathLike[str], roots: Sequence[str]) -> str:
    """The resolved path if `path` may be read under `roots`, else Refused.

    A path that does not exist is returned (resolved) if it would be inside:
    reading it then fails with "not found", which says more than a refusal."""
    real = os.path.realpath(path)
    if any(Path(real) == p or p in Path(real).parents for p in _NEVER):
        raise Refused(f"{real} is a file of the kernel's {Path(real).parts[1]} file system, never allowed")
    if not _inside(real, roots):
        where = " or ".join(roots) if roots else "no directory"
        raise Refused(f"{path} resolves to {real}, outside {where}")
    try:
        st = os.stat(real)
    except FileNotFoundError:
        return real
    except OSError as exc:
        raise Refused(f"cannot inspect {real}: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise Refused(f"{real} is {_kind(st.st_mode)}, not a regular file")
    return real


def open_confined(path: str | os.PathLike[str], roots: Sequence[str]) -> int:
    """A read-only descriptor of the regular file `path`, checked against `roots` (Refused,
    FileNotFoundError or another OSError otherwise). The caller closes it."""
    real = check(path, roots)
    fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        opened = os.readlink(f"/proc/self/fd/{fd}")  # what the kernel actually opened
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise Refused(f"{real} is {_kind(st.st_mode)}, not a regular file")
        if not _inside(opened, roots) or any(p == Path(opened) or p in Path(opened).parents for p in _NEVER):
            raise Refused(f"{path} was replaced while being opened and now leads to {opened}")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_confined(path: str | os.PathLike[str], roots: Sequence[str], max_bytes: int) -> bytes:
    """Up to `max_bytes + 1` bytes of `path` (the caller tells "too big" by the length)."""
    fd = open_confined(path, roots)
    with os.fdopen(fd, "rb") as f:
        return f.read(max_bytes + 1)


def copy_confined(path: str | os.PathLike[str], roots: Sequence[str], dest: Path) -> None:
    """Copy `path` to `dest` (created 0600: it is untrusted data)."""
    fd = open_confined(path, roots)
    with os.fdopen(fd, "rb") as src, open(os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as out:
        while chunk := src.read(1 << 20):
            out.write(chunk)
