"""`ctx` and `runtime`: what a script gets from the sandbox (docs/scripts.md).

Both talk to the runner over the stage's control socket. Runs in the sandbox.
"""
from __future__ import annotations

import math
import os
import shutil
import threading
import time
from types import SimpleNamespace
from typing import Any

import zmq

from . import extract as _extract
from .errors import DownloadError
from .protocol import CONTROL_CAPS, BoundaryTypeError, ProtocolError, pack, unpack
from .stageconfig import StageConfig


class ControlClient:
    """DEALER socket to the runner. Thread-safe: scripts may call from any thread."""

    def __init__(self, zctx: zmq.Context, endpoint: str) -> None:
        self._sock = zctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 2000)
        self._sock.setsockopt(zmq.MAXMSGSIZE, CONTROL_CAPS.max_frame)
        self._sock.connect(endpoint)
        self._lock = threading.RLock()
        self._replies: dict[int, dict] = {}
        self._next_id = 0
        self.stop_requested = False

    @property
    def socket(self) -> zmq.Socket:
        return self._sock

    def send(self, msg: dict) -> None:
        frames = pack(msg)
        if len(frames) != 1 or len(frames[0]) > CONTROL_CAPS.max_header:
            raise ValueError(f"{msg.get('op')} message is too large for the control channel (cap {CONTROL_CAPS.max_header} bytes)")
        with self._lock:
            self._sock.send(frames[0])

    def drain(self) -> None:
        """Handle whatever the runner sent, without blocking."""
        with self._lock:
            while self._sock.poll(0):
                self._dispatch(self._sock.recv_multipart())

    def request(self, msg: dict, timeout: float | None = None) -> dict:
        with self._lock:
            self._next_id += 1
            rid = self._next_id
            self.send({**msg, "id": rid})
            deadline = None if timeout is None else time.monotonic() + timeout
            while rid not in self._replies:
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"the runner did not answer {msg.get('op')} in {timeout:.0f} s")
                if self._sock.poll(500):
                    self._dispatch(self._sock.recv_multipart())
            return self._replies.pop(rid)

    def _dispatch(self, frames: list) -> None:
        try:
            msg = unpack(frames, CONTROL_CAPS)
        except ProtocolError:
            return
        if not isinstance(msg, dict):
            return
        if msg.get("op") == "stop":
            self.stop_requested = True
        elif isinstance(msg.get("id"), int):
            self._replies[msg["id"]] = msg

    def sync(self, timeout: float) -> bool:
        """Wait until the runner has read everything sent so far; False if it did not say so in time.

        A stage's last reports (done, error) sit in its socket's queue behind whatever it sent
        before (a burst of metrics, say); exiting with them queued loses them when the host is busy."""
        try:
            self.request({"op": "sync"}, timeout=timeout)
            return True
        except (TimeoutError, zmq.ZMQError):
            return False

    def close(self) -> None:
        self._sock.close()


class Context:
    """`ctx`: the workspace, the task type, downloads through the runner, extraction."""

    def __init__(self, control: ControlClient, config: StageConfig) -> None:
        self._control = control
        ws = config.workspace
        self.workspace = SimpleNamespace(
            data_dir=ws.get("data_dir"),
            cache_dir=ws.get("cache_dir"),
            model_dir=ws.get("model_dir"),
            framework_dir=ws.get("framework_dir"),
        )
        self.task_type = config.task_type
        self.stage = config.stage
        self._extract_limits = config.extract

    def download(self, url: str) -> str:
        """Have the runner fetch `url` (http/https only, public hosts only unless
        the operator allowed one) and return the path of the file it wrote."""
        if not isinstance(url, str) or len(url) > 8192:
            raise DownloadError("ctx.download takes a URL string")
        reply = self._control.request({"op": "download", "url": url})
        if not reply.get("ok"):
            raise DownloadError(f"download of {url} refused: {reply.get('message', 'no reason given')}")
        return str(reply["path"])

    def extract(self, path: str, dest: str | None = None) -> str:
        """Unpack a zip or tar archive safely; returns the directory."""
        if dest is None:
            base = self.workspace.cache_dir if self.workspace.cache_dir and os.access(self.workspace.cache_dir, os.W_OK) else "/tmp"
            stem = os.path.basename(path).split(".")[0] or "archive"
            dest = os.path.join(base, "extracted", stem)
        return _extract.extract(path, dest, **self._extract_limits)


class Runtime:
    """`runtime` for the model stage."""

    PROGRESS_INTERVAL = 0.1

    def __init__(self, control: ControlClient, dataset: Any, model_dir: str | None) -> None:
        self._control = control
        self.dataset = dataset
        self._model_dir = model_dir
        self._last_progress = 0.0

    def notify_progress(self, value: float, **extra: Any) -> None:
        value = float(value)
        if not math.isfinite(value):
            raise ValueError("progress must be a finite number between 0 and 100")
        value = min(100.0, max(0.0, value))
        now = time.monotonic()
        if value < 100.0 and now - self._last_progress < self.PROGRESS_INTERVAL:
            return  # the bar cannot show more than ~10 updates a second anyway
        self._last_progress = now
        extra = {str(k)[:64]: v for k, v in list(extra.items())[:16] if isinstance(v, (int, float, str, bool)) or v is None}
        self._control.send({"op": "progress", "value": value, "extra": extra})

    def log_metrics(self, step: int | None = None, **metrics: Any) -> None:
        clean: dict[str, float] = {}
        for key, value in metrics.items():
            try:
                clean[str(key)[:128]] = float(value)
            except (TypeError, ValueError):
                raise ValueError(f"metric {key!r} is not a number: {value!r}") from None
        if not clean:
            return  # nothing to record (the runner refuses an empty metrics message)
        if len(clean) > 256:
            raise ValueError(f"log_metrics takes at most 256 metrics per call, not {len(clean)}")
        self._control.send({"op": "metrics", "step": None if step is None else int(step), "metrics": clean})

    def save_model(self, path: str) -> str:
        """Copy a file or directory into the model directory (no-op if already there)."""
        if not self._model_dir:
            raise RuntimeError("this stage has no model directory")
        src = os.path.realpath(path)
        root = os.path.realpath(self._model_dir)
        if src == root or src.startswith(root + os.sep):
            return src
        target = os.path.join(root, os.path.basename(src.rstrip(os.sep)))
        if os.path.isdir(src):
            shutil.copytree(src, target, symlinks=True, dirs_exist_ok=True)
        else:
            shutil.copy2(src, target, follow_symlinks=False)
        return target

    def read_model(self) -> str:
        if not self._model_dir:
            raise RuntimeError("this stage has no model directory")
        return self._model_dir


def check_results(results: Any) -> list:
    """predict() must return a list of JSON-serialisable results."""
    import json

    if isinstance(results, tuple):
        results = list(results)
    if not isinstance(results, list):
        raise TypeError(f"predict() returned a {type(results).__name__}; it must return a list, one result per input")
    try:
        json.dumps(results, default=_json_default)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"predict() returned a result that is not JSON-serialisable: {exc}") from None
    return json.loads(json.dumps(results, default=_json_default))


def _json_default(obj: Any) -> Any:
    import numpy as np

    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray) and obj.dtype.kind in "biuf":
        return obj.tolist()
    raise TypeError(f"value of type {type(obj).__name__}")


__all__ = ["Context", "Runtime", "ControlClient", "DownloadError", "check_results", "BoundaryTypeError"]
