"""Prebuilt framework archives: from a mirror (`-m URL`) or a framework URL.

A mirror is a plain directory served over http(s) (or a local path) with the
layout that `pipcook-sandbox framework build NAME@VERSION -o DIR` writes:

    DIR/py311/index.json                          {"archives": {"<file>": {"sha256": "<hex>"}}}
    DIR/py311/tensorflow@2.21-linux-x86_64.zip       framework.json, initialize.py, site/...
    DIR/py311/tensorflow@2.21-linux-x86_64-cuda.zip

An archive is used only if its sha256 matches the mirror's index (or the
pin of a framework URL, `...zip#sha256=HEX`); it is unpacked with the same
safe extractor the sandbox uses (no links, no `..`, size and count caps) and
cached like a local build, so a second run touches no network.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Callable, Collection
from urllib.parse import urlsplit

from pipcook_sandbox.sandbox import extract as safe_extract

from . import fetch, localfiles
from .cachebuild import build_once
from .errors import FrameworkError, IntegrityError
from .frameworkid import Framework, build_id, platform_tag, python_tag

MAX_ARCHIVE = 8 << 30
MAX_UNPACKED = 16 << 30
MAX_FILES = 200_000


def archive_name(name: str, version: str, cuda: bool) -> str:
    return f"{name}@{version}-{platform_tag()}{'-cuda' if cuda else ''}.zip"


def _is_remote(location: str) -> bool:
    return urlsplit(location).scheme in ("http", "https")


def _local_path(location: str) -> Path:
    parts = urlsplit(location)
    return Path(parts.path if parts.scheme == "file" else location)


def _get(location: str, dest: Path, allow_private: Collection[str], roots: tuple[str, ...] | None = None) -> str:
    """Copy or download `location` to `dest`; sha256 of what arrived.

    `roots`: where a local `location` may be, when a pipeline named it (see
    runner.localfiles); None for the operator's own `-m MIRROR` path."""
    if _is_remote(location):
        return fetch.download(location, dest, allow_private=allow_private, max_bytes=MAX_ARCHIVE, timeout=120)
    src = _local_path(location)
    if roots is not None:
        try:
            localfiles.copy_confined(src, roots, dest)
        except localfiles.Refused as exc:
            raise FrameworkError(f"framework archive {location} refused: {exc}; {localfiles.RULE}") from None
        except FileNotFoundError:
            raise FrameworkError(f"framework archive {location} not found") from None
        return _sha256(dest)
    if not src.is_file():
        raise FrameworkError(f"framework archive {location} not found")
    shutil.copyfile(src, dest)
    return _sha256(dest)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _install(target: Path, fetch_archive: Callable[[Path], None], expect: tuple[str, str] | None) -> Framework:
    """Fetch (verified by `fetch_archive`), unpack safely, and move into `target`, once, under a lock."""

    def build(staging: Path) -> None:
        archive = staging.parent / f"{staging.name}.zip"
        try:
            fetch_archive(archive)
            try:
                safe_extract.extract(str(archive), str(staging), max_bytes=MAX_UNPACKED, max_files=MAX_FILES)
            except safe_extract.ExtractError as exc:
                raise FrameworkError(f"framework archive refused: {exc}") from None
        finally:
            archive.unlink(missing_ok=True)
        _check_layout(staging, expect)

    build_once(target, "framework.json", build)
    record = json.loads((target / "framework.json").read_text())
    return Framework(str(record.get("name")), str(record.get("version")), target)


def _check_layout(root: Path, expect: tuple[str, str] | None) -> None:
    try:
        record = json.loads((root / "framework.json").read_text())
    except (OSError, ValueError):
        raise FrameworkError("framework archive has no readable framework.json at its top level") from None
    if not (root / "site").is_dir():
        raise FrameworkError("framework archive has no site/ directory")
    if expect and (record.get("name"), record.get("version")) != expect:
        raise FrameworkError(
            f"framework archive holds {record.get('name')}@{record.get('version')}, not {expect[0]}@{expect[1]}")
    if record.get("python") not in (None, python_tag()):
        raise FrameworkError(f"framework archive was built for {record.get('python')}, this runner is {python_tag()}")


def from_mirror(mirror: str, name: str, version: str, *, cuda: bool = False,
                allow_private: Collection[str] = (), log: Callable[[str], None] = print) -> Framework:
    target = fetch.cache_dir() / "frameworks" / build_id(name, version, cuda)
    if (target / "framework.json").is_file():
        return Framework(name, version, target)
    base = mirror.rstrip("/") + f"/{python_tag()}"
    file = archive_name(name, version, cuda)
    index_loc = f"{base}/index.json"
    with tempfile.TemporaryDirectory() as tmp:
        index_path = Path(tmp) / "index.json"
        _get(index_loc, index_path, allow_private)
        try:
            index = json.loads(index_path.read_text())
            expected = index["archives"][file]["sha256"].lower()
        except (ValueError, KeyError, TypeError, AttributeError):
            raise FrameworkError(f"mirror {mirror} lists no {file} in {index_loc}") from None

    def fetch_archive(dest: Path) -> None:
        log(f"fetching framework {name}@{version} from {mirror}")
        actual = _get(f"{base}/{file}", dest, allow_private)
        if actual != expected:
            raise IntegrityError(f"framework archive {file} from {mirror} has sha256 {actual}, "
                                 f"but the mirror's index lists {expected}; refused")

    return _install(target, fetch_archive, (name, version))


def from_url(location: str, pin: str | None, *, nocache: bool = False, allow_private: Collection[str] = (),
             log: Callable[[str], None] = print, roots: tuple[str, ...] = ()) -> Framework:
    """A framework named by URL or path in `options.framework`, cached by URL (and pin).
    A local archive must be a regular file under `roots` (runner.localfiles).

    An unpinned archive is cached also by the policy it was fetched under, as
    scripts and `ctx.download` are: what `--allow-private` let in is never
    served to a run without that permission. A pinned one is its content."""
    policy = "" if pin else "\0".join(sorted(set(allow_private)))
    key = hashlib.sha256(f"{location}#{pin or ''}\0{policy}".encode()).hexdigest()[:16]
    target = fetch.cache_dir() / "frameworks" / f"url-{key}-{python_tag()}"
    if nocache and target.exists():
        shutil.rmtree(target)

    def fetch_archive(dest: Path) -> None:
        log(f"fetching framework archive {location}")
        actual = _get(location, dest, allow_private, roots)
        if pin and actual != pin.lower():
            raise IntegrityError(f"framework archive {location} has sha256 {actual}, but the pipeline pins {pin}; refused")

    return _install(target, fetch_archive, None)


def pack(framework_dir: Path, out_dir: Path, name: str, version: str, cuda: bool) -> Path:
    """Zip a built framework into a mirror directory and record it in the index."""
    folder = Path(out_dir) / python_tag()
    folder.mkdir(parents=True, exist_ok=True)
    archive = folder / archive_name(name, version, cuda)
    tmp = archive.with_name(f".{archive.name}.tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        for dirpath, dirnames, filenames in os.walk(framework_dir):
            dirnames.sort()
            for fname in sorted(filenames):
                full = Path(dirpath) / fname
                if full.is_symlink() or not full.is_file():
                    continue
                zf.write(full, full.relative_to(framework_dir).as_posix())
    os.replace(tmp, archive)
    index_path = folder / "index.json"
    index = json.loads(index_path.read_text()) if index_path.is_file() else {"archives": {}}
    index.setdefault("archives", {})[archive.name] = {"sha256": _sha256(archive), "size": archive.stat().st_size}
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return archive
