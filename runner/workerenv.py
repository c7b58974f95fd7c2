"""The worker's own small dependencies, for backends that use the host's Python.

The bwrap backend runs the host's interpreter with its site-packages hidden,
so the worker's imports (pyzmq, msgpack, numpy, pillow) come from a
directory built once with pip, pinned to the versions the runner itself uses
(the two ends of a boundary then speak exactly the same msgpack and numpy).
Docker images carry the same packages at the same path instead.
"""
from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

from .cachebuild import build_once, pip_install
from .errors import PipcookError
from .fetch import cache_dir
from .frameworkid import platform_tag, python_tag

PACKAGES = ("pyzmq", "msgpack", "numpy", "pillow")


def _dist_info_version(dist: str) -> str | None:
    """The version in the name of `dist`'s .dist-info directory, first on sys.path (as
    importlib.metadata finds it), or None. Every bwrap run asks: importing importlib.metadata just
    for this cost ~0.04 s of CPU per run; it is still the fallback (egg-info, odd layouts)."""
    def canonical(name: str) -> str:
        return name.lower().replace("-", "_").replace(".", "_")

    want = canonical(dist)
    for entry in sys.path:
        try:
            names = os.listdir(entry or ".")
        except OSError:
            continue
        for name in names:
            project, _, version = name[:-len(".dist-info")].rpartition("-")
            if name.endswith(".dist-info") and version and canonical(project) == want:
                return version
    return None


def requirements() -> list[str]:
    pins = []
    for dist in PACKAGES:
        found = _dist_info_version(dist)
        if found is None:
            import importlib.metadata

            try:
                found = importlib.metadata.version(dist)
            except importlib.metadata.PackageNotFoundError:
                pins.append(dist)
                continue
        pins.append(f"{dist}=={found}")
    return pins


def ensure_worker_site(log=print) -> Path:
    reqs = requirements()
    digest = hashlib.sha256(" ".join(reqs).encode()).hexdigest()[:12]
    target = cache_dir() / "worker-site" / f"{python_tag()}-{platform_tag()}-{digest}"

    def build(staging: Path) -> None:
        log(f"preparing the sandbox worker's dependencies ({', '.join(reqs)}), once")
        failure = pip_install(staging, reqs, no_deps=True)
        if failure:
            raise PipcookError(f"could not prepare the sandbox worker's dependencies: pip said:\n{failure}")
        (staging / ".complete").write_text("\n".join(reqs) + "\n")

    return build_once(target, ".complete", build)
