"""Frameworks: the heavy dependencies a pipeline names, built once, mounted read-only.

`options.framework: "tensorflow@2.21"` resolves, through
`frameworks/<name>/framework.json`, to a directory in the user's cache:

    <cache>/frameworks/tensorflow@2.21-py311-linux-x86_64[-cuda]/
        framework.json   what was built, with the exact versions installed
        initialize.py    the hook run in each sandbox before the script
        site/            `pip install --target` of the requirements

It is built with pip on first use (under a file lock, so concurrent runs
build it once) and reused afterwards. Prebuilt archives from a mirror and
framework URLs are handled by `runner.mirror`.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Collection

from . import mirror as mirror_mod
from .cachebuild import build_once, pip_install
from .errors import FrameworkError
from .fetch import cache_dir
from .frameworkid import Framework, build_id, platform_tag, python_tag  # noqa: F401  (this module's API too)

DEFINITIONS = Path(__file__).resolve().parent.parent / "frameworks"
NAME_RE = re.compile(r"^([A-Za-z0-9_.-]+)@([A-Za-z0-9_.+-]+)$")


def definition(name: str, version: str) -> tuple[dict, dict, Path]:
    """(framework.json, the version's entry, its folder) or FrameworkError."""
    folder = DEFINITIONS / name
    try:
        spec = json.loads((folder / "framework.json").read_text())
    except FileNotFoundError:
        known = sorted(p.name for p in DEFINITIONS.iterdir() if (p / "framework.json").is_file())
        raise FrameworkError(f"unknown framework {name!r} (known: {', '.join(known) or 'none'})") from None
    entry = spec.get("versions", {}).get(version)
    if entry is None:
        raise FrameworkError(
            f"framework {name} has no version {version!r} (known: {', '.join(sorted(spec.get('versions', {})))})"
        )
    pyver = f"{sys.version_info.major}.{sys.version_info.minor}"
    if entry.get("python") and pyver not in entry["python"]:
        raise FrameworkError(f"framework {name}@{version} supports Python {', '.join(entry['python'])}, not {pyver}")
    return spec, entry, folder


def resolve(spec: str | None, *, cuda: bool = False, rebuild: bool = False, log: Callable[[str], None] = print,
            mirror: str | None = None, url_ref: Any = None, nocache: bool = False,
            allow_private: Collection[str] = ()) -> Framework | None:
    """The framework for `spec`: `NAME@VERSION` built locally or taken from `mirror`,
    or the archive at `url_ref` (a spec.ScriptRef) when the pipeline names a URL."""
    if not spec:
        return None
    if url_ref is not None:
        return mirror_mod.from_url(url_ref.uri, url_ref.sha256, nocache=nocache, allow_private=allow_private, log=log,
                                   roots=url_ref.roots)
    m = NAME_RE.match(spec)
    if not m:
        raise FrameworkError(f"framework {spec!r} is not NAME@VERSION or a URL of a framework archive")
    name, version = m.groups()
    target = cache_dir() / "frameworks" / build_id(name, version, cuda)
    if (target / "framework.json").is_file() and not rebuild:
        return Framework(name, version, target)
    if mirror:
        return mirror_mod.from_mirror(mirror, name, version, cuda=cuda, allow_private=allow_private, log=log)
    meta, entry, folder = definition(name, version)
    build_once(target, "framework.json",
               lambda staging: build(name, version, meta, entry, folder, staging, cuda=cuda, log=log, into=target),
               rebuild=rebuild)
    return Framework(name, version, target)


def build(name: str, version: str, meta: dict, entry: dict, folder: Path, staging: Path, *, cuda: bool,
          log: Callable[[str], None] = print, into: Path | None = None) -> None:
    """pip-install the framework into `staging` (build_once moves it into place)."""
    requirements = entry["cuda" if cuda else "cpu"]
    log(f"building framework {name}@{version}{' (CUDA)' if cuda else ''}: pip install {' '.join(requirements)} "
        f"(once; cached in {(into or staging).parent})")
    pyver = f"{sys.version_info.major}.{sys.version_info.minor}"
    constraints = entry.get("constraints", {}).get(pyver)
    failure = pip_install(staging / "site", requirements,
                          constraints=folder / constraints if constraints and not cuda else None)
    if failure:
        raise FrameworkError(f"building framework {name}@{version} failed: pip said:\n{failure}")
    frozen = subprocess.run(
        [sys.executable, "-m", "pip", "list", "--path", str(staging / "site"), "--format", "freeze"],
        capture_output=True, text=True,
    ).stdout.split()
    if meta.get("initialize"):
        shutil.copy2(folder / meta["initialize"], staging / "initialize.py")
    record = {"name": name, "version": version, "cuda": cuda, "python": python_tag(),
              "platform": platform_tag(), "requirements": requirements, "installed": frozen}
    # written last: its presence marks a complete build
    (staging / "framework.json").write_text(json.dumps(record, indent=2))
