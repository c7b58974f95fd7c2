"""The workspace a run writes (docs/cli.md):

    DIR/pipeline.json  scripts/  framework/  data/  cache/  model/  logs/  metrics.jsonl

The runner creates it, never reuses a non-empty one (a mistyped -o must not
clobber a previous run), and keeps it whatever happens, so a failed run can
be inspected. `run --force` replaces one, but only one this runner created:
the root holds a marker whose tag is an HMAC, under a key only the host
user can read, of the directory's device, inode and path. A stage cannot
forge it (it never sees the key), a copied or moved directory no longer
matches it, and a link is never followed.

It holds what untrusted scripts wrote and what the pipeline named, so it is
private: the root 0700, nothing below it readable by others (`restrict`).
The stages still read their scripts and, for predict, the model: their
uid is not the runner's when the runner is root (65534, bwrap's mapped mode
and Docker), so below the root, directories are 0750 and files 0640 with
the stages' group. A stage sees a mounted file or directory through the
mount itself, never through the 0700 root.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import hmac
import json
import os
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import PipcookError

SUBDIRS = ("scripts", "framework", "data", "cache", "model", "logs")
MARKER = ".pipcook-sandbox-workspace"


@dataclass(frozen=True)
class Workspace:
    root: Path

    def __getattr__(self, name: str) -> Path:
        if name in SUBDIRS:
            return self.root / name
        raise AttributeError(name)

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def pipeline(self) -> Path:
        return self.root / "pipeline.json"


def default_dir() -> Path:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path.cwd() / f"pipcook-output-{stamp}"


def _key() -> bytes:
    """The host user's secret for workspace markers (created once, mode 0600, never mounted in a stage)."""
    # The user's state dir, or a private temp one where the job's user has no writable home.
    from .cachedir import state_dir

    path = state_dir() / "workspace.key"
    try:
        return bytes.fromhex(path.read_text().strip())
    except (OSError, ValueError):
        pass
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))
    try:
        os.link(tmp, path)  # first writer wins; a racing runner reads the same key
    except FileExistsError:
        pass
    finally:
        os.unlink(tmp)
    return bytes.fromhex(path.read_text().strip())


def _tag(root: Path) -> str:
    st = os.stat(root, follow_symlinks=False)
    return hmac.new(_key(), f"{st.st_dev}:{st.st_ino}:{os.path.realpath(root)}".encode(), hashlib.sha256).hexdigest()


def created_by_us(root: Path) -> bool:
    """True only for a real directory (not a link) whose marker this host user's runner wrote for it."""
    try:
        if root.is_symlink() or not root.is_dir():
            return False
        fd = os.open(root / MARKER, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return False
    with os.fdopen(fd, "rb") as f:
        if not os.path.isfile(f"/proc/self/fd/{f.fileno()}"):
            return False
        try:
            data = json.loads(f.read(4096))
        except ValueError:
            return False
    tag = data.get("tag") if isinstance(data, dict) else None
    return isinstance(tag, str) and hmac.compare_digest(tag, _tag(root))


def create(root: Path | None, force: bool = False) -> Workspace:
    root = Path(root) if root else default_dir()
    root = Path(os.path.abspath(root))
    if root.is_symlink():
        raise PipcookError(f"output directory {root} is a symbolic link; name a real directory with -o "
                           "(--force never replaces what a link points to)")
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        if not force:
            raise PipcookError(f"output directory {root} already exists and is not empty; choose another with -o, "
                               "or pass --force to replace it if it is a workspace of an earlier run")
        if not created_by_us(root):
            raise PipcookError(f"output directory {root} was not created by pipcook-sandbox (it holds no valid "
                               f"{MARKER} marker), so --force will not replace it; choose another with -o")
        try:
            shutil.rmtree(root)
        except OSError as exc:
            raise PipcookError(f"--force could not remove the earlier workspace {root}: {exc}") from None
    try:
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(root, 0o700)  # an empty dir the operator made may be 0755
        for sub in SUBDIRS:
            (root / sub).mkdir(exist_ok=True)
        (root / "metrics.jsonl").touch()
        write_json(root / MARKER, {"created_by": "pipcook-sandbox", "tag": _tag(root)})
        restrict(root)
    except OSError as exc:
        raise PipcookError(f"cannot create the workspace {root}: {exc.strerror}") from None
    return Workspace(root)


def stage_group() -> int | None:
    """The group that must read what stages are given (65534, or the operator's --stage-uid group),
    or None where stages are the runner's uid."""
    if os.geteuid() != 0:
        return None
    from .backends import owner

    return owner.stage_ids()[1]


def restrict(root: Path) -> None:
    """Make `root` 0700 and everything below it unreadable by others: directories 0750 and files
    0640 with the stages' group (runner is root), else 0700 and 0600. Links are not followed
    (the runner never puts one in a workspace; a stage's are never copied out)."""
    gid = stage_group()
    dir_mode, file_mode = (0o750, 0o640) if gid is not None else (0o700, 0o600)

    def fix(path: str, mode: int) -> None:
        try:
            if gid is not None:
                os.lchown(path, -1, gid)
            os.chmod(path, mode)
        except FileNotFoundError:
            pass  # removed meanwhile (a temporary file of the run)

    os.chmod(root, 0o700)
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in dirnames:
            full = os.path.join(dirpath, name)
            if not os.path.islink(full):
                fix(full, dir_mode)
        for name in filenames:
            full = os.path.join(dirpath, name)
            if not os.path.islink(full):
                fix(full, file_mode)


def write_json(path: Path, data: Any) -> None:
    """Write atomically; a stage-planted file or dir of that name is replaced, never followed."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, default=str)
        f.write("\n")
    if path.is_dir() and not path.is_symlink():
        import shutil

        shutil.rmtree(path)
    os.replace(tmp, path)
