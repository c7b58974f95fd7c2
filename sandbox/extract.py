"""Safe unpacking of zip and tar archives for `ctx.extract`.

Archives come from hostile sources. Only regular files and directories are
written; an entry with an absolute path, a `..` component, a link, a device
or a fifo is refused, and so is a path through anything already in the
target that is not a directory (a symlink planted there earlier). Sizes are
counted as bytes are actually written (a zip header may lie about them), so
a zip bomb stops at `max_bytes`. Runs inside
the sandbox, where the disk quota holds anyway; these limits give a clear
error first.
"""
from __future__ import annotations

import os
import stat
import tarfile
import zipfile
from typing import IO

from .errors import ExtractError

CHUNK = 1 << 20


def _safe_target(dest: str, name: str) -> str:
    name = name.replace("\\", "/")
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        raise ExtractError(f"archive entry {name!r} has an absolute path")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts):
        raise ExtractError(f"archive entry {name!r} escapes the target directory")
    if not parts:
        raise ExtractError(f"archive entry {name!r} has an empty name")
    return os.path.join(dest, *parts)


def _dirs(dest: str, path: str) -> None:
    """Make the directories from dest down to path, never passing through
    something already there that is not a directory (a planted symlink would
    lead the writes outside dest)."""
    current = dest
    for part in os.path.relpath(path, dest).split(os.sep):
        if part in ("", "."):
            continue
        current = os.path.join(current, part)
        try:
            st = os.lstat(current)
        except FileNotFoundError:
            os.mkdir(current, 0o755)
            continue
        if not stat.S_ISDIR(st.st_mode):
            raise ExtractError(f"archive path {os.path.relpath(current, dest)!r} is already there and is not a "
                               "directory (a link?); nothing is written through it")


def _write(stream: IO[bytes], dest: str, target: str, budget: list[int], max_bytes: int) -> None:
    _dirs(dest, os.path.dirname(target))
    # O_NOFOLLOW | O_EXCL: never write through a link that something planted
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "wb") as out:
        while True:
            chunk = stream.read(CHUNK)
            if not chunk:
                return
            budget[0] += len(chunk)
            if budget[0] > max_bytes:
                raise ExtractError(f"archive expands past {max_bytes} bytes (zip bomb?)")
            out.write(chunk)


def extract(path: str, dest: str, max_bytes: int = 4 << 30, max_files: int = 100_000) -> str:
    os.makedirs(dest, exist_ok=True)
    budget = [0]
    count = 0
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                count += 1
                if count > max_files:
                    raise ExtractError(f"archive has more than {max_files} entries")
                mode = info.external_attr >> 16
                target = _safe_target(dest, info.filename)
                if info.is_dir():
                    _dirs(dest, target)
                    continue
                if stat.S_IFMT(mode) and not stat.S_ISREG(mode):  # zipfile.writestr sets permission bits only
                    raise ExtractError(f"archive entry {info.filename!r} is not a regular file")
                with zf.open(info) as src:
                    _write(src, dest, target, budget, max_bytes)
        return dest
    if tarfile.is_tarfile(path):
        with tarfile.open(path) as tf:
            for member in tf:
                count += 1
                if count > max_files:
                    raise ExtractError(f"archive has more than {max_files} entries")
                target = _safe_target(dest, member.name)
                if member.isdir():
                    _dirs(dest, target)
                elif member.isreg():
                    member_src = tf.extractfile(member)
                    if member_src is None:
                        raise ExtractError(f"archive entry {member.name!r} cannot be read")
                    with member_src:
                        _write(member_src, dest, target, budget, max_bytes)
                else:
                    raise ExtractError(f"archive entry {member.name!r} is a link or special file")
        return dest
    raise ExtractError(f"{os.path.basename(path)!r} is neither a zip nor a tar archive")
