"""Where the runner keeps its cache (scripts, frameworks, the worker's site dir).

PIPCOOK_SANDBOX_CACHE, else $XDG_CACHE_HOME/pipcook-sandbox, else the
platform's user cache (~/.cache/pipcook-sandbox). A batch job's user often
has no writable home (a service account, a read-only or absent /home on a
compute node): then the cache falls back to a private directory under the
job's temp dir ($SLURM_TMPDIR, $TMPDIR, else /tmp) named
`pipcook-sandbox-<uid>`, with a one-line notice, instead of crashing.

The runner's state dir (the key of workspace markers) falls back the same way,
to `<that dir>/state`.

The fallback lives in a directory other users can write, so it is trusted
only if this process's uid owns it, it is a real directory (not a link) and
nobody else may write it: otherwise another user could have planted scripts
or a framework for this one to run.
"""
from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

import platformdirs

from pipcook_sandbox.runner.errors import PipcookError

_chosen: dict[Path, Path] = {}  # the preferred path -> what was used, so the notice is said once


def preferred() -> Path:
    override = os.environ.get("PIPCOOK_SANDBOX_CACHE")
    if override:
        return Path(override).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg and os.path.isabs(xdg):
        # platformdirs only honours this on Linux; honour it everywhere.
        return Path(xdg) / "pipcook-sandbox"
    return Path(platformdirs.user_cache_dir("pipcook-sandbox", appauthor=False))


def _usable(path: Path) -> str | None:
    """None when `path` exists (or could be made) and is writable; else why not."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return f"{exc.strerror or exc} ({exc.filename or path})"
    if not os.access(path, os.W_OK | os.X_OK):
        return f"not writable by uid {os.geteuid()}"
    return None


def temp_root() -> Path:
    for var in ("SLURM_TMPDIR", "TMPDIR"):
        value = os.environ.get(var)
        if value and os.path.isabs(value) and os.path.isdir(value):
            return Path(value)
    return Path("/tmp")


def private_temp_cache() -> Path:
    """`<temp>/pipcook-sandbox-<uid>`, made 0700, refused if someone else made it first."""
    uid = os.geteuid()
    path = temp_root() / f"pipcook-sandbox-{uid}"
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except OSError as exc:
        raise PipcookError(f"no usable cache directory: the fallback {path} cannot be made "
                           f"({exc.strerror}); set PIPCOOK_SANDBOX_CACHE to a writable directory") from None
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != uid or st.st_mode & 0o022:
        raise PipcookError(f"refusing the cache fallback {path}: it is not a directory owned by uid {uid} that only "
                           "it may write (another user may have made it); set PIPCOOK_SANDBOX_CACHE instead")
    return path


def cache_dir() -> Path:
    """The cache root to use now (see the module docstring)."""
    return _usable_or_fallback(preferred(), "", operator_set=bool(os.environ.get("PIPCOOK_SANDBOX_CACHE")),
                               what="cache", keep="set PIPCOOK_SANDBOX_CACHE to keep a cache between runs")


def state_dir() -> Path:
    """Where the runner keeps its own small state (the workspace-marker key): the platform's user
    state dir (~/.local/state/pipcook-sandbox), or without a writable home `<fallback>/state`; a
    key made there lasts as long as that temp dir, so `--force` may not recognise a workspace of
    an earlier job (it then refuses, never deletes)."""
    return _usable_or_fallback(Path(platformdirs.user_state_dir("pipcook-sandbox")), "state", operator_set=False,
                               what="state dir", keep="give the job's user a writable home to keep it")


def _usable_or_fallback(want: Path, sub: str, *, operator_set: bool, what: str, keep: str) -> Path:
    if want in _chosen:
        return _chosen[want]
    why = _usable(want)
    if why is None:
        _chosen[want] = want
        return want
    if operator_set:
        # The operator named it: a silent fallback would hide their mistake.
        raise PipcookError(f"the cache directory PIPCOOK_SANDBOX_CACHE={want} is unusable: {why}")
    fallback = private_temp_cache() / sub if sub else private_temp_cache()
    fallback.mkdir(mode=0o700, exist_ok=True)
    print(f"pipcook-sandbox: notice: {what} {want} is unusable ({why}); using {fallback} for this run ({keep})",
          file=sys.stderr, flush=True)
    _chosen[want] = fallback
    return fallback
