"""Warm sandboxes: booted before their stage is known, claimed by exactly one stage, then destroyed.

A `WarmSandbox` is a normal stage sandbox (the backend's own `start`, the
same mounts, cgroup limits, seccomp filter and uid as a cold stage) whose
worker runs `sandbox/warmboot.py`: it imports what every stage needs and
blocks on a claim FIFO in the stage's control directory. `claim()` writes
the stage's StageConfig there, with the secret token the sandbox got in its
environment at boot, and from then on the sandbox is that stage's and no
one else's. docs/warm.md has the design; in short:

- everything that shapes a sandbox is its `WarmKey` (backend, the stage's
  host uid, limits, GPU, site dirs and every mount, which name the run's and
  tenant's directories); `claim` refuses a key that differs, and `WarmPool`
  hands out only sandboxes of the asked key;
- a sandbox is claimed at most once (`claim` on a claimed one raises, the
  pool forgets it when it hands it out) and never returned to a pool;
- one that died before its claim, or whose FIFO is no longer the one the
  runner made, is discarded (terminated and cleaned up), never used;
- the limits are in force from boot (the backend starts the worker inside
  its cgroup), so no instruction of a script ever runs outside them.
"""
from __future__ import annotations

import collections
import dataclasses
import errno
import fcntl
import json
import os
import secrets
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipcook_sandbox.runner.backends import base, owner
from pipcook_sandbox.runner.backends.base import Backend, Limits, Mount, StageSpec
from pipcook_sandbox.sandbox.stageconfig import StageConfig

from .errors import PipcookError

ENV_TOKEN = "PIPCOOK_CLAIM_TOKEN"  # sandbox/warmboot.py reads (and removes) it
CLAIM_NAME = "claim"  # the FIFO, in the stage's control directory
WARM_BOOT = (
    "import sys; sys.path.insert(0, %r); "
    "from sandbox.warmboot import boot; sys.exit(boot(%r, %r, %r))"
)
# How long a claim waits for the worker to finish its imports and open the FIFO. A worker's boot
# takes ~0.2 CPU s; this only bounds a sandbox that hangs (then it is discarded).
READY_TIMEOUT = 60.0
READY_POLL = 0.005


class WarmError(PipcookError):
    """A warm sandbox that cannot be used for this claim (the caller starts the stage cold)."""


@dataclass(frozen=True)
class WarmKey:
    """Everything that shapes a sandbox at boot; two claims share a sandbox's kind only if all are equal."""

    backend: str
    stage_owner: tuple[int, int]  # the host uid and gid the sandbox actually runs as (a root runner's)
    limits: Limits
    gpu: bool
    site_dirs: tuple[str, ...]  # the framework's site, then the worker's: imported from at boot
    mounts: tuple[Mount, ...]  # every directory the sandbox sees, the tenant's and the run's

    @classmethod
    def of(cls, backend: Backend, spec: StageSpec, site_dirs: list[str]) -> "WarmKey":
        # The uid the backend will really use: the stage's own, else the process default (owner.resolve),
        # so that two runs for two tenants never share a key, however the uid was chosen.
        return cls(backend.name, owner.resolve(spec.options.stage_owner), spec.limits, spec.gpu, tuple(site_dirs),
                   tuple(spec.mounts))


def can_boot_warm(backend: Backend) -> bool:
    """Whether `backend` keeps a claim secret and its mounts fixed at boot (bwrap)."""
    return backend.can_boot_warm


class WarmSandbox:
    """One sandbox booted for a key, waiting for its one claim."""

    def __init__(self, backend: Backend, spec: StageSpec, key: WarmKey, fifo: Path, inside: str) -> None:
        self.backend, self.key, self.fifo = backend, key, fifo
        self.token = secrets.token_hex(32)
        self.claimed = False
        self.booted_at = time.monotonic()
        self._ready_fd: int | None = None  # the FIFO, opened by wait_ready, kept for the claim
        self._make_fifo(spec)
        argv = ["-I", "-S", "-c", WARM_BOOT % (base.IN_LIB, inside, list(key.site_dirs), str(spec.limits.cpus))]
        self.spec = dataclasses.replace(spec, argv=argv, env={**spec.env, ENV_TOKEN: self.token})
        self.handle: Any = backend.start(self.spec)

    def _make_fifo(self, spec: StageSpec) -> None:
        os.mkfifo(self.fifo, 0o600)
        if os.geteuid() == 0:  # the stage's uid reads it (as its group); no one but the runner writes it
            os.chown(self.fifo, 0, owner.resolve(spec.options.stage_owner)[1])
            os.chmod(self.fifo, 0o640)
        self._ino = os.lstat(self.fifo).st_ino

    @classmethod
    def boot(cls, backend: Backend, spec: StageSpec, site_dirs: list[str], ctl_dir: Path) -> "WarmSandbox":
        """Boot a sandbox for `spec` (its mounts include `ctl_dir` at IN_IPC/control); not yet any stage's."""
        if not can_boot_warm(backend):
            raise WarmError(f"the {backend.name} backend starts stages cold only")
        inside = f"{base.IN_IPC}/control/{CLAIM_NAME}" if backend.translates_paths else str(ctl_dir / CLAIM_NAME)
        return cls(backend, spec, WarmKey.of(backend, spec, site_dirs), ctl_dir / CLAIM_NAME, inside)

    def alive(self) -> bool:
        return not self.claimed and self.handle.poll() is None

    def claim(self, key: WarmKey, config: StageConfig, timeout: float = READY_TIMEOUT) -> Any:
        """Hand this sandbox to the stage `config`; its StageHandle. Once only; WarmError if it cannot be."""
        if self.claimed:
            raise WarmError("this warm sandbox was already claimed by a stage; a sandbox serves one stage only")
        self.claimed = True  # whatever happens next, never again
        if key != self.key:
            raise WarmError("this warm sandbox was prepared for another key (tenant, limits or mounts)")
        fd = self._ready_fd if self._ready_fd is not None else self._open_ready(timeout)
        self._ready_fd = None  # from here on this claim's: closed below, whatever happens
        try:
            os.set_blocking(fd, True)
            data = json.dumps({"token": self.token, "config": json.loads(config.to_json())}).encode()
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        except BrokenPipeError:
            raise WarmError("the warm sandbox stopped reading its claim") from None
        finally:
            os.close(fd)
        return self.handle

    def wait_ready(self, deadline: float) -> None:
        """Block until the worker waits on its FIFO (its imports done), until `deadline` (monotonic) at
        most; the FIFO stays open for `claim` (the worker reads on until it is closed). WarmError if not."""
        if self._ready_fd is None and not self.claimed:
            self._ready_fd = self._open_ready(max(0.0, deadline - time.monotonic()))

    def _open_ready(self, timeout: float) -> int:
        """The FIFO opened for writing once the worker reads it (its imports done)."""
        deadline = time.monotonic() + timeout
        while True:
            st = os.lstat(self.fifo)
            if not stat.S_ISFIFO(st.st_mode) or st.st_ino != self._ino:
                raise WarmError("the warm sandbox's claim FIFO was replaced")
            try:
                fd = os.open(self.fifo, os.O_WRONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
            except OSError as exc:
                if exc.errno != errno.ENXIO:  # ENXIO: no reader yet (still importing)
                    raise
            else:
                if os.fstat(fd).st_ino == self._ino:
                    fcntl.fcntl(fd, fcntl.F_SETFD, fcntl.FD_CLOEXEC)
                    return fd
                os.close(fd)
                raise WarmError("the warm sandbox's claim FIFO was replaced")
            if self.handle.poll() is not None:
                raise WarmError(f"the warm sandbox ended before its claim (exit code {self.handle.poll()})")
            if time.monotonic() > deadline:
                raise WarmError(f"the warm sandbox was not ready within {timeout:.0f} s")
            time.sleep(READY_POLL)  # polls a condition (the reader's open), bounded by the deadline

    def discard(self) -> None:
        """Destroy the sandbox (unclaimed, dead or tampered with). Idempotent."""
        self.claimed = True
        if self._ready_fd is not None:
            os.close(self._ready_fd)
            self._ready_fd = None
        try:
            self.handle.terminate(base.REASON_CANCELLED)
        finally:
            self.handle.cleanup()


class WarmPool:
    """Warm sandboxes by key: `take` hands each out once, only for its own key; dead ones are discarded.

    `cap`: most sandboxes kept per key; `max_idle`: seconds an unclaimed sandbox is kept (`expire`)."""

    def __init__(self, cap: int = 4, max_idle: float = 300.0) -> None:
        self.cap, self.max_idle = cap, max_idle
        self._by_key: dict[WarmKey, collections.deque[WarmSandbox]] = collections.defaultdict(collections.deque)

    def add(self, sandbox: WarmSandbox) -> bool:
        """Keep `sandbox` for a later claim of its key; False (and it is discarded) past the cap."""
        queue = self._by_key[sandbox.key]
        if sandbox.claimed or len(queue) >= self.cap:
            sandbox.discard()
            return False
        queue.append(sandbox)
        return True

    def take(self, key: WarmKey) -> WarmSandbox | None:
        """A live unclaimed sandbox of exactly `key`, removed from the pool; None if there is none."""
        queue = self._by_key.get(key)
        while queue:
            sandbox = queue.popleft()
            if sandbox.alive():
                return sandbox
            sandbox.discard()  # died (or was tampered with) before its claim: never used
        return None

    def size(self, key: WarmKey | None = None) -> int:
        if key is not None:
            return len(self._by_key.get(key, ()))
        return sum(len(q) for q in self._by_key.values())

    def expire(self, now: float | None = None) -> int:
        """Discard sandboxes idle longer than max_idle; how many."""
        now = time.monotonic() if now is None else now
        gone = 0
        for queue in self._by_key.values():
            for sandbox in [s for s in queue if now - s.booted_at > self.max_idle]:
                queue.remove(sandbox)
                sandbox.discard()
                gone += 1
        return gone

    def close(self) -> None:
        """Discard every sandbox still waiting."""
        for queue in self._by_key.values():
            while queue:
                queue.popleft().discard()
        self._by_key.clear()
