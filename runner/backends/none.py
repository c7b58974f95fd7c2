"""No isolation: the stage is a plain child process with the runner's rights.

For trusted local development only (the CLI warns loudly). Paths are the
host's own, so the runner writes host paths into the stage config
(`translates_paths = False`), and a writable target is the host directory
itself (made if missing; no quota: nothing is confined here). Still: a clean
environment, its own process group killed as a whole, the wall-clock timeout
and the output cap.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

from . import base
from .output import capture, pipe_chunks

NAME = "none"


def probe() -> dict:
    return {"confinement": "none"}


def _worker_args(spec: base.StageSpec) -> list[str]:
    """The worker's boot line with the host paths of its package and its stage.json."""
    sources = {m.target: m.source for m in spec.mounts}
    lib = str(Path(sources[f"{base.IN_LIB}/sandbox"]).parent)
    config = str(sources[base.IN_STAGE_CONFIG])
    boot = base.BOOT.replace(repr(base.IN_LIB), repr(lib)).replace(repr(base.IN_STAGE_CONFIG), repr(config))
    return ["-I", "-S", "-c", boot]


class NoneHandle:
    def __init__(self, spec: base.StageSpec) -> None:
        self.name = spec.name
        argv = spec.argv if spec.argv is not None else _worker_args(spec)
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/tmp"),
               "LANG": "C.UTF-8", **spec.env}
        self._reason: str | None = None
        self._lock = threading.Lock()
        self.proc = subprocess.Popen([sys.executable, *argv], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True, cwd="/tmp")
        stdout = self.proc.stdout
        assert stdout is not None  # stdout=PIPE always gives one
        self._log = capture(pipe_chunks(stdout), spec.log_path, spec.limits.output,
                            lambda: self.terminate(base.REASON_OUTPUT))

    def poll(self) -> int | None:
        return self.proc.poll()

    def terminate(self, reason: str | None = None) -> None:
        with self._lock:
            if self.proc.poll() is None and self._reason is None:
                self._reason = reason
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def outcome(self) -> base.Outcome:
        return base.Outcome(self.proc.poll(), self._reason)

    def cleanup(self) -> None:
        self.terminate(base.REASON_CANCELLED)
        self.proc.wait()
        self._log.join(timeout=5)
        if self.proc.stdout:
            self.proc.stdout.close()


def start(spec: base.StageSpec) -> NoneHandle:
    for host_dir in spec.writable.values():  # the stage writes straight into them
        Path(host_dir).mkdir(parents=True, exist_ok=True)
    return NoneHandle(spec)


class NoneBackend(base.Backend):
    """No confinement: trusted local code only."""

    name = NAME
    translates_paths = False

    def start(self, spec: base.StageSpec) -> NoneHandle:
        return start(spec)

    def probe(self) -> dict:
        return probe()

    def clean_leftovers(self) -> list[str]:
        return []  # a stage is a child process: it dies with its process group
