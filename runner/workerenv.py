"""The worker's own small dependencies, for backends that use the host's Python.

The bwrap backend runs the host's interpreter with its site-packages hidden,
so the worker's imports (pyzmq, msgpack, numpy, pillow) come from a
directory built once with pip, pinned to the versions the runner itself uses
(the two ends of a boundary then speak exactly the same msgpack and numpy).
Docker images carry the same packages at the same path instead.
"""
from __future__ import annotations

import fcntl
import hashlib
import importlib.metadata
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from .errors import PipcookError
from .fetch import cache_dir
from .frameworks import platform_tag, python_tag

PACKAGES = ("pyzmq", "msgpack", "numpy", "pillow")


def requirements() -> list[str]:
    pins = []
    for dist in PACKAGES:
        try:
            pins.append(f"{dist}=={importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            pins.append(dist)
    return pins


def ensure_worker_site(log=print) -> Path:
    reqs = requirements()
    digest = hashlib.sha256(" ".join(reqs).encode()).hexdigest()[:12]
    target = cache_dir() / "worker-site" / f"{python_tag()}-{platform_tag()}-{digest}"
    if (target / ".complete").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(str(target) + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / ".complete").is_file():
            return target
        log(f"preparing the sandbox worker's dependencies ({', '.join(reqs)}), once")
        staging = Path(tempfile.mkdtemp(prefix=".worker-site-", dir=target.parent))
        try:
            proc = subprocess.run(
                [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-deps",
                 "--no-warn-script-location", "--target", str(staging), *reqs],
                capture_output=True, text=True,
            )
            if proc.returncode != 0:
                tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
                raise PipcookError(f"could not prepare the sandbox worker's dependencies: pip said:\n{tail}")
            (staging / ".complete").write_text("\n".join(reqs) + "\n")
            os.chmod(staging, 0o755)
            if target.exists():
                shutil.rmtree(target)
            os.replace(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target
