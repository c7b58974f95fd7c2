"""The runner's end of each stage's control channel.

One ROUTER socket per stage, each bound in a directory that only that stage
sees, so a stage cannot speak for another. Every message is hostile input:
caps on frame size and count before decoding, msgpack limits while decoding,
then a per-op check of every field. A stage that breaks the protocol is
recorded (and failed by the orchestrator); the runner itself never raises on
what a stage sends.

Events go to the orchestrator through a queue; downloads (`ctx.download`) run
in a few daemon threads and their replies are sent from the polling thread,
the only thread that touches the sockets. Daemon threads, because a download
stuck on a hostile server must never keep the runner's process alive after
its verdict (the downloader's own deadline and cancellation end it sooner).
"""
from __future__ import annotations

import math
import os
import queue
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import zmq

from pipcook_sandbox.sandbox.protocol import CONTROL_CAPS, ProtocolError, pack, unpack

# The escaping lives in runner/inert.py, the one place for text bound for a terminal.
from .inert import json_shown, shown  # noqa: F401  (re-exported: callers use control.shown)

MAX_VIOLATIONS_LOGGED = 5
# ZeroMQ queues received messages per connection, counted in messages (up to
# the 2 MiB cap each), before the runner reads them. Few messages per queue
# and few connections per stage bound what a flooding stage can make the
# runner hold: a worker needs one connection; past MAX_CONNECTIONS the stage
# is in violation and its socket is closed at once, freeing every queue.
RCVHWM = 4
MAX_CONNECTIONS = 4
# Decoded messages waiting for the orchestrator. Past this many, the control
# thread stops reading (ZeroMQ's queues then push back on the stages), so
# a flood never outpaces a main thread that falls behind: at most this many
# messages of up to 2 MiB are held in the runner.
MAX_PENDING_EVENTS = 32
# Downloads run at once per run; more wait their turn.
DOWNLOAD_THREADS = 4
# How long `close` waits for downloads to notice they were cancelled (and
# remove their partial files) before leaving them to die with the process.
DOWNLOAD_JOIN = 2.0
# Progress notes are only ever shown, cut to a line; nothing longer is kept.
PROGRESS_TEXT_MAX = 1000


@dataclass
class Event:
    stage: str
    op: str
    data: dict = field(default_factory=dict)


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _progress(msg: dict) -> dict:
    if not _finite(msg.get("value")):
        raise ProtocolError("progress value is not a finite number")
    extra = msg.get("extra") or {}
    if not isinstance(extra, dict) or len(extra) > 16:
        raise ProtocolError("progress extra is not a small map")
    return {"op": "progress", "value": min(100.0, max(0.0, float(msg["value"]))),
            "extra": {str(k)[:64]: v[:PROGRESS_TEXT_MAX] if isinstance(v, str) else v
                      for k, v in extra.items() if v is None or isinstance(v, (bool, int, float, str))}}


def _metrics(msg: dict) -> dict:
    metrics, step = msg.get("metrics"), msg.get("step")
    if not isinstance(metrics, dict) or not 0 < len(metrics) <= 256:
        raise ProtocolError("metrics is not a map of 1 to 256 entries")
    if step is not None and (not isinstance(step, int) or isinstance(step, bool)):
        raise ProtocolError("metrics step is not an integer")
    clean = {}
    for k, v in metrics.items():
        if not isinstance(k, str) or len(k) > 128 or not (_finite(v) or isinstance(v, float)):
            raise ProtocolError("metrics must map short names to numbers")
        clean[k] = float(v) if math.isfinite(v) else None
    return {"op": "metrics", "step": step, "metrics": clean}


def _moved(msg: dict) -> dict:
    samples = msg.get("samples")
    if not isinstance(samples, int) or isinstance(samples, bool) or samples < 0:
        raise ProtocolError("moved needs a non-negative integer count of samples")
    return {"op": "moved", "samples": samples}


def validate(msg: Any) -> dict:
    """The message if it is well-formed for its op, else ProtocolError."""
    if not isinstance(msg, dict) or not isinstance(msg.get("op"), str):
        raise ProtocolError("message is not a map with a string 'op'")
    op = msg["op"]
    if op in ("hello", "done", "serving"):
        return msg
    if op == "progress":
        return _progress(msg)
    if op == "metrics":
        return _metrics(msg)
    if op == "moved":  # how many samples a serving stage has sent so far (the live display)
        return _moved(msg)
    if op == "sync":
        if not isinstance(msg.get("id"), int) or isinstance(msg["id"], bool):
            raise ProtocolError("sync needs an integer id")
        return {"op": op, "id": msg["id"]}
    if op == "download":
        if not isinstance(msg.get("id"), int) or not isinstance(msg.get("url"), str) or len(msg["url"]) > 8192:
            raise ProtocolError("download needs an integer id and a URL string")
        return msg
    if op == "error":
        if not isinstance(msg.get("message"), str):
            raise ProtocolError("error without a message")
        return {"op": op, "kind": str(msg.get("kind", "script"))[:32], "message": shown(msg["message"], 8000),
                "traceback": shown(str(msg.get("traceback") or "")[-100_000:], 100_000)}
    if op == "meta":
        if not isinstance(msg.get("meta"), dict):
            raise ProtocolError("meta is not a map")
        return msg
    if op == "result":
        if not isinstance(msg.get("data"), list):
            raise ProtocolError("result data is not a list")
        return msg
    raise ProtocolError(f"unknown op {op!r}")


def _monitor_event(frames: list[bytes]) -> int:
    """The event id of a ZeroMQ monitor message (16-bit id, 32-bit value; then the endpoint), or 0.

    pyzmq's zmq.utils.monitor decodes the same two frames but imports zmq.asyncio (asyncio) with
    it: 0.05 s of CPU on every run's start, for six bytes."""
    if len(frames) != 2 or len(frames[0]) != 6:
        return 0
    return int(struct.unpack("=Hi", frames[0])[0])


# How an accepted or dropped connection moves a stage's count; every other monitor event leaves it
_CONNECTION_DELTA: dict[int, int] = {zmq.EVENT_ACCEPTED: 1, zmq.EVENT_DISCONNECTED: -1}


class ControlServer:
    def __init__(self, downloader: Callable[[str, str], str]) -> None:
        """`downloader(stage, url) -> path inside the sandbox`, raising with a plain message."""
        self._zctx = zmq.Context()
        self._socks: dict[zmq.Socket, str] = {}
        self._monitors: dict[zmq.Socket, zmq.Socket] = {}  # connection events -> the stage's socket
        self._downloader = downloader
        self.events: "queue.Queue[Event]" = queue.Queue()
        self._replies: "queue.Queue[tuple[str, bytes, dict]]" = queue.Queue()
        self._jobs: "queue.Queue[tuple[str, bytes, dict] | None]" = queue.Queue()
        self._workers: list[threading.Thread] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.violations: dict[str, list[str]] = {}
        # Wakes the polling thread for a reply or a stop queued by another thread (a download's answer,
        # the run's stop of its serving stages, close()): without it they waited for the poll's 50 ms
        # timeout, at the end of every run twice. The lock keeps close() from closing the fd between a
        # late writer's check and its write (a download worker may outlive close()'s join): that write
        # would land in whatever file reused the number.
        self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._wake_lock = threading.Lock()

    def add_stage(self, stage: str, endpoint: str) -> None:
        sock = self._zctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.MAXMSGSIZE, CONTROL_CAPS.max_frame)
        sock.setsockopt(zmq.RCVHWM, RCVHWM)
        sock.setsockopt(zmq.SNDHWM, 100)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 0)
        self._monitors[sock.get_monitor_socket(zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED)] = sock
        sock.bind(endpoint)
        self._socks[sock] = stage

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="control", daemon=True)
        self._thread.start()

    def send_stop(self, stage: str) -> None:
        self.send(stage, {"op": "stop"})

    def send(self, stage: str, msg: dict) -> None:
        """Send `msg` to every peer of `stage` (from the polling thread, the only one on the sockets)."""
        self._replies.put((stage, b"*", msg))
        self._wake_up()

    def _wake_up(self) -> None:
        with self._wake_lock:
            if self._wake < 0:  # closed: the run is over, nothing is sent any more
                return
            try:
                os.eventfd_write(self._wake, 1)
            except BlockingIOError:  # the counter is full: the thread is woken already
                pass

    def _download_worker(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None or self._stop.is_set():
                return
            self._download(*job)

    def _loop(self) -> None:
        poller = zmq.Poller()
        for sock in [*self._socks, *self._monitors]:
            poller.register(sock, zmq.POLLIN)
        poller.register(self._wake, zmq.POLLIN)
        peers: dict[str, set[bytes]] = {stage: set() for stage in self._socks.values()}
        by_stage = {stage: sock for sock, stage in self._socks.items()}
        connections = {stage: 0 for stage in self._socks.values()}
        while not self._stop.is_set():
            held = False  # a socket left unread because the orchestrator is behind
            for sock, _ in poller.poll(50):
                if sock == self._wake:
                    self._woken()
                    continue
                if sock in self._monitors:
                    self._connections(sock, connections, poller)
                    continue
                if sock.closed:
                    continue
                stage = self._socks[sock]
                for _ in range(100):  # bounded: a flooding stage cannot starve the others
                    if self.events.qsize() >= MAX_PENDING_EVENTS:
                        held = True  # let ZeroMQ hold the rest
                        break
                    try:
                        frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    if len(frames) < 2:
                        continue
                    peer = frames[0].bytes
                    try:
                        msg = validate(unpack(frames[1:], CONTROL_CAPS))
                    except ProtocolError as exc:
                        self._violation(stage, str(exc))
                        continue
                    peers[stage].add(peer)
                    if msg["op"] == "download":
                        self._submit(stage, peer, msg)
                    elif msg["op"] == "sync":
                        # Everything this peer sent before is in `events` now: the stage may exit
                        # knowing its last reports (done, error) were not lost in its socket.
                        self._replies.put((stage, peer, {"op": "sync", "id": msg["id"]}))
                    else:
                        self.events.put(Event(stage, msg["op"], msg))
            self._send_replies(by_stage, peers)
            if held:
                time.sleep(0.002)  # the held sockets are still readable: poll() would not wait
        for monitor in self._monitors:
            monitor.close(linger=0)
        for sock in self._socks:
            sock.close(linger=0)

    def _woken(self) -> None:
        try:
            os.eventfd_read(self._wake)  # resets it; what woke the thread is in the queues
        except BlockingIOError:
            pass

    def _send_replies(self, by_stage: dict[str, zmq.Socket], peers: dict[str, set[bytes]]) -> None:
        """Every queued reply, to its peer (b"*": every peer of the stage)."""
        while True:
            try:
                stage, peer, reply = self._replies.get_nowait()
            except queue.Empty:
                return
            sock = by_stage[stage]
            for target in peers[stage] if peer == b"*" else [peer]:
                try:
                    sock.send_multipart([target, *pack(reply)], zmq.NOBLOCK)
                except zmq.ZMQError:
                    pass  # the stage is gone or not reading: its problem

    def _connections(self, monitor: zmq.Socket, counts: dict[str, int], poller: zmq.Poller) -> None:
        """Count a stage's connections; cut a stage that opens too many."""
        sock = self._monitors[monitor]
        stage = self._socks[sock]
        while True:
            try:
                event = _monitor_event(monitor.recv_multipart(zmq.NOBLOCK))
            except zmq.Again:
                return
            counts[stage] += _CONNECTION_DELTA.get(event, 0)
            if counts[stage] > MAX_CONNECTIONS and not sock.closed:
                self._violation(stage, f"opened more than {MAX_CONNECTIONS} connections to its control socket")
                poller.unregister(sock)
                poller.unregister(monitor)
                sock.disable_monitor()
                monitor.close(linger=0)
                sock.close(linger=0)  # every queue of every connection goes with it
                return

    def _violation(self, stage: str, why: str) -> None:
        why = shown(why, 500)
        seen = self.violations.setdefault(stage, [])
        if len(seen) < MAX_VIOLATIONS_LOGGED:
            seen.append(why)
        if len(seen) == 1:
            self.events.put(Event(stage, "violation", {"message": why}))

    def _submit(self, stage: str, peer: bytes, msg: dict) -> None:
        if len(self._workers) < DOWNLOAD_THREADS:
            worker = threading.Thread(target=self._download_worker, name="download", daemon=True)
            worker.start()
            self._workers.append(worker)
        self._jobs.put((stage, peer, msg))

    def _download(self, stage: str, peer: bytes, msg: dict) -> None:
        try:
            path = self._downloader(stage, msg["url"])
            reply = {"op": "download", "id": msg["id"], "ok": True, "path": path}
        except Exception as exc:  # a refusal or a failed fetch: the script hears why
            reply = {"op": "download", "id": msg["id"], "ok": False, "message": str(exc)[:2000]}
        self.events.put(Event(stage, "downloaded", {"url": shown(msg["url"], 2000), "ok": reply["ok"],
                                                     "message": shown(reply.get("message", ""), 2000)}))
        self._replies.put((stage, peer, reply))
        self._wake_up()

    def close(self) -> None:
        self._stop.set()
        self._wake_up()
        if self._thread is not None:
            self._thread.join(timeout=5)
        for _ in self._workers:
            self._jobs.put(None)
        deadline = time.monotonic() + DOWNLOAD_JOIN
        for worker in self._workers:
            worker.join(timeout=max(0.0, deadline - time.monotonic()))
        self._zctx.term()
        with self._wake_lock:
            if self._wake >= 0 and (self._thread is None or not self._thread.is_alive()):
                os.close(self._wake)
                self._wake = -1
