"""The worker's own small dependencies, for backends that use the host's Python.

The bwrap backend runs the host's interpreter with its site-packages hidden,
so the worker's imports (pyzmq, msgpack, numpy, pillow) come from a
directory built once with pip, pinned to the versions the runner itself uses
(the two ends of a boundary then speak exactly the same msgpack and numpy).
Docker images carry the same packages at the same path instead.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from .cachebuild import build_once, pip_install
from .errors import PipcookError
from .fetch import cache_dir
from .frameworkid import platform_tag, python_tag
from .workerpins import PACKAGES, deps_hash, requirements  # noqa: F401  (this module's API too)


def ensure_worker_site(log: Callable[[str], None] = print) -> Path:
    reqs = requirements()
    digest = deps_hash(reqs)
    target = cache_dir() / "worker-site" / f"{python_tag()}-{platform_tag()}-{digest}"

    def build(staging: Path) -> None:
        log(f"preparing the sandbox worker's dependencies ({', '.join(reqs)}), once")
        failure = pip_install(staging, reqs, no_deps=True)
        if failure:
            raise PipcookError(f"could not prepare the sandbox worker's dependencies: pip said:\n{failure}")
        (staging / ".complete").write_text("\n".join(reqs) + "\n")

    return build_once(target, ".complete", build)
