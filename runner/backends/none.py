"""No isolation: the stage is a plain child process with the runner's rights.

For trusted local development only (the CLI warns loudly). Paths are the
host's own, so the orchestrator writes host paths into the stage config
(`TRANSLATES_PATHS = False`). Still: a clean environment, its own process
group killed as a whole, the wall-clock timeout and the output cap.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading

from . import base
from .output import capture, pipe_chunks

NAME = "none"
TRANSLATES_PATHS = False


def probe() -> dict:
    return {"confinement": "none"}


class NoneHandle:
    def __init__(self, spec: base.StageSpec) -> None:
        self.name = spec.name
        sources = {m.target: m.source for m in spec.mounts}
        lib = str(sources[f"{base.IN_LIB}/sandbox"].parent)
        config = str(sources[base.IN_STAGE_CONFIG])
        boot = base.BOOT.replace(repr(base.IN_LIB), repr(lib)).replace(repr(base.IN_STAGE_CONFIG), repr(config))
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/tmp"),
               "LANG": "C.UTF-8", **spec.env}
        self._reason: str | None = None
        self._lock = threading.Lock()
        self.proc = subprocess.Popen([sys.executable, "-I", "-S", "-c", boot], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True, cwd="/tmp")
        self._log = capture(pipe_chunks(self.proc.stdout), spec.log_path, spec.limits.output,
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
    return NoneHandle(spec)
