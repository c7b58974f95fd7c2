"""The worker's pinned dependencies and the Docker image tag they name.

The worker's imports (pyzmq, msgpack, numpy, pillow) are pinned to the versions
the runner itself uses, so the two ends of a boundary speak exactly the same
msgpack and numpy: bwrap stages get them from a site built with pip
(runner/workerenv.py), Docker stages from an image whose tag carries their
digest (runner/images.py builds it). A bottom-layer module: the docker backend
names its image with it without importing the image builder.
"""
from __future__ import annotations

import hashlib
import os
import sys

from pipcook_sandbox.sandbox.protocol import PROTOCOL_VERSION

REPOSITORY = "pipcook-sandbox-worker"
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


def deps_hash(reqs: list[str] | None = None) -> str:
    """The digest of the pins (`requirements()` by default): the worker site's and the image's name."""
    return hashlib.sha256(" ".join(requirements() if reqs is None else reqs).encode()).hexdigest()[:12]


def image_tag(cuda: bool = False) -> str:
    """The worker image these pins and this protocol need: pipcook-sandbox-worker:cpu-p1-<digest>."""
    return f"{REPOSITORY}:{'cuda' if cuda else 'cpu'}-p{PROTOCOL_VERSION}-{deps_hash()}"
