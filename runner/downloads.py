"""`ctx.download` on the host: fetched for a stage, bounded in time and bytes, cached.

Every download of a run

- has a total deadline (the stage's wall-clock limit, from the moment it was
  asked for), however slowly the server answers;
- stops as soon as its stage stops (`cancel(stage)`), or the run ends;
- counts against the run's one byte budget (`Limits.downloads`, by default
  the `--disk` size): what a run's downloads hand to its stages, cache hits
  included, never adds up to more.

The cache (`<cache>/downloads/<key>/blob`) is keyed by the URL and the network
policy it was fetched under and capped in size (`CACHE_CAP`, or
$PIPCOOK_SANDBOX_DOWNLOAD_CACHE_MAX in bytes): past the cap the least recently
used entries go. `pipcook-sandbox clean --cache` empties it.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import threading
import time
from collections.abc import Callable, Collection
from pathlib import Path

from . import fetch, workspace
from .errors import FetchError
from .units import fmt_bytes

IN_DOWNLOADS = "/pipcook/downloads"
CACHE_CAP = 2 << 30
CACHE_CAP_ENV = "PIPCOOK_SANDBOX_DOWNLOAD_CACHE_MAX"
_prune_lock = threading.Lock()


def cache_root() -> Path:
    # fetch.download_cache_dir(): a service gives each tenant its own
    return fetch.download_cache_dir() / "downloads"


def cache_cap() -> int:
    raw = os.environ.get(CACHE_CAP_ENV, "")
    return int(raw) if raw.isdigit() else CACHE_CAP


def _entries(root: Path) -> list[tuple[float, int, Path]]:
    """(last use, size, entry dir) of every cached download."""
    found = []
    with contextlib.suppress(OSError):
        for entry in root.iterdir():
            blob = entry / "blob"
            try:
                st = blob.stat()
            except OSError:
                continue
            found.append((st.st_mtime, st.st_size, entry))
    return found


def prune(cap: int | None = None, root: Path | None = None) -> list[Path]:
    """Remove the least recently used downloads until the cache holds at most `cap` bytes."""
    cap = cache_cap() if cap is None else cap
    root = cache_root() if root is None else root
    removed = []
    with _prune_lock:
        entries = sorted(_entries(root))
        total = sum(size for _, size, _ in entries)
        for _, size, entry in entries:
            if total <= cap:
                break
            shutil.rmtree(entry, ignore_errors=True)  # a live run keeps its hard link
            total -= size
            removed.append(entry)
    return removed


def clear(root: Path | None = None) -> tuple[int, int]:
    """Empty the download cache: (entries, bytes) removed."""
    root = cache_root() if root is None else root
    entries = _entries(root)
    shutil.rmtree(root, ignore_errors=True)
    return len(entries), sum(size for _, size, _ in entries)


class ByteBudget:
    """Bytes a run's downloads may still hand out; thread-safe."""

    def __init__(self, total: int) -> None:
        self.total, self.used = total, 0
        self._lock = threading.Lock()

    def take(self, n: int, url: str) -> None:
        with self._lock:
            if self.used + n > self.total:
                raise FetchError(f"download of {url} refused: the run's downloads would pass their budget of "
                                 f"{fmt_bytes(self.total)} (--downloads; {fmt_bytes(self.used)} already used)")
            self.used += n


def _safe_name(url: str, index: int) -> str:
    base_name = re.sub(r"[^A-Za-z0-9._-]", "_", os.path.basename(url.split("?")[0].split("#")[0]))[:80]
    return f"{index:03d}-{base_name or 'download'}"


class Downloads:
    """The downloader a run's control channel calls: `downloads(stage, url) -> path inside the stage`."""

    def __init__(self, state: Path, *, allow_private: Collection[str], max_bytes: int, budget: int,
                 timeout: float, nocache: bool, translate: Callable[[Path, str], str]) -> None:
        self.state, self.translate = state, translate
        self.allow_private, self.max_bytes, self.timeout, self.nocache = tuple(allow_private), max_bytes, timeout, nocache
        self.budget = ByteBudget(budget)
        self.count = 0
        self._lock = threading.Lock()
        self._cancelled: set[str] = set()
        self._all_cancelled = False

    def dir_for(self, stage: str) -> Path:
        d = self.state / f"dl-{stage}"
        d.mkdir(exist_ok=True)
        return d

    def cancel(self, stage: str | None = None) -> None:
        """Stop the downloads of `stage` (every stage: None) at their next chunk; refuse new ones."""
        with self._lock:
            if stage is None:
                self._all_cancelled = True
            else:
                self._cancelled.add(stage)

    def _check(self, stage: str, url: str) -> None:
        if self._all_cancelled or stage in self._cancelled:
            raise FetchError(f"download of {url} stopped: stage '{stage}' has stopped")

    def __call__(self, stage: str, url: str) -> str:
        self._check(stage, url)
        with self._lock:
            self.count += 1
            index = self.count
        # Keyed by the URL and the policy it was fetched under: what a host allowed
        # with --allow-private served is never handed to a run without that permission.
        allowed = "\0".join(sorted(set(self.allow_private)))
        key = hashlib.sha256((f"{url}\0{allowed}" if allowed else url).encode()).hexdigest()
        cached = cache_root() / key
        blob = cached / "blob"
        if self.nocache or not blob.is_file():
            cached.mkdir(parents=True, exist_ok=True)

            def on_chunk(n: int) -> None:
                self._check(stage, url)
                self.budget.take(n, url)

            fetch.download(url, blob, allow_private=self.allow_private, max_bytes=self.max_bytes,
                           deadline=time.monotonic() + self.timeout, on_chunk=on_chunk)
        else:
            self.budget.take(blob.stat().st_size, url)
            with contextlib.suppress(OSError):
                os.utime(blob)  # last use, for the LRU pruning
        name = _safe_name(url, index)
        target = self.dir_for(stage) / name
        try:
            os.link(blob, target)
        except OSError:
            shutil.copyfile(blob, target)
        # The download is private (mkstemp); the stage's uid must read it, no one else (workspace.restrict).
        gid = workspace.stage_group()
        if gid is not None:
            os.chown(target, -1, gid)
        os.chmod(target, 0o640 if gid is not None else 0o600)
        prune()  # after the link: the stage keeps its file even if its own entry is pruned
        return self.translate(target, f"{IN_DOWNLOADS}/{name}")
