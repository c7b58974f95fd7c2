"""Build a directory in the cache once, even with many runs starting at the same time.

Frameworks, the worker's site, mirror archives and converter tools all follow
the same rule: take a file lock next to the target, build into a staging
directory beside it, and move it into place with one rename, so a reader sees
either nothing or a finished build, never half of one.
"""
from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable

from .errors import PipcookError


def build_once(target: Path, done_marker: str, build: Callable[[Path], None], *, rebuild: bool = False) -> Path:
    """`target`, built by `build(staging_dir)` unless `target/done_marker` already exists."""
    if (target / done_marker).exists() and not rebuild:
        return target
    try:
        _build_locked(target, done_marker, build, rebuild)
    except OSError as exc:  # a full or read-only cache is the user's to fix: say where
        raise PipcookError(f"cannot build {target.name} in the cache {target.parent}: {exc.strerror or exc}"
                           f"{f' ({exc.filename})' if exc.filename else ''}; free space there or point "
                           "PIPCOOK_SANDBOX_CACHE (or XDG_CACHE_HOME) at a writable directory") from exc
    return target


def _build_locked(target: Path, done_marker: str, build: Callable[[Path], None], rebuild: bool) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(str(target) + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another run may be building it right now
        if (target / done_marker).exists() and not rebuild:
            return
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
        try:
            build(staging)
            if not (staging / done_marker).exists():
                raise PipcookError(f"building {target.name} did not produce {done_marker}")
            os.chmod(staging, 0o755)  # readable by the sandbox's uid
            if target.exists():
                shutil.rmtree(target)
            os.replace(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def pip_install(dest: Path, requirements: list[str], *, no_deps: bool = False, constraints: Path | None = None) -> str | None:
    """`pip install --target dest`; None on success, else the last lines pip printed."""
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
           "--no-warn-script-location", "--target", str(dest), *requirements]
    if no_deps:
        cmd.insert(4, "--no-deps")
    if constraints is not None:
        cmd += ["--constraint", str(constraints)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode == 0:
        return None
    return "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
