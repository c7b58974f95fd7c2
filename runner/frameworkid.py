"""What names a framework build: the `Framework` a run mounts and the id of its build
(name, version, Python, platform, CUDA).

Both `frameworks` (which builds one locally) and `mirror` (which fetches one prebuilt)
need these; they live here so that neither imports the other's module to get them.
"""
from __future__ import annotations

import platform
import sys
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Framework:
    name: str
    version: str
    dir: Path  # holds framework.json, initialize.py (optional), site/

    @property
    def site(self) -> Path:
        return self.dir / "site"

    @property
    def initialize(self) -> str | None:
        return "initialize.py" if (self.dir / "initialize.py").is_file() else None


def python_tag() -> str:
    """py311: the Python a framework was built for."""
    return f"py{sys.version_info.major}{sys.version_info.minor}"


def platform_tag() -> str:
    """linux-x86_64: the platform a framework was built for."""
    machine = platform.machine().lower()
    return f"{sys.platform}-{ {'amd64': 'x86_64', 'arm64': 'aarch64'}.get(machine, machine) }"


def build_id(name: str, version: str, cuda: bool) -> str:
    """The cache folder name of a build: tensorflow@2.21-py311-linux-x86_64[-cuda]."""
    return f"{name}@{version}-{python_tag()}-{platform_tag()}{'-cuda' if cuda else ''}"
