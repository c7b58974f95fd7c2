"""A pool served across a sandbox boundary, and the proxy that pulls from it.

The downstream stage (client, DEALER) opens a stream per split at a position
and grants the upstream stage (server, ROUTER) a few credits; each batch the
server sends spends one, each batch the client receives returns one. So the
upstream works ahead by at most `window` batches (the overlap that makes
stages run in parallel) and memory stays bounded whatever the dataset size.
A seek or shuffle starts a new stream generation; batches of an old one are
dropped on arrival.

Batches are sized by bytes, not samples: the server aims at TARGET_BATCH_BYTES
so 100-byte samples go thousands to a message and 64 MiB tensors one each.

Arrays of 64 KiB or more travel through a shared-memory ring when the
client mapped one (sandbox/shmring.py: set up once per client beside the
ZeroMQ socket, the bytes copied in by the server and out by the client);
a batch's ring space is reused once the client returned its credit, which
it does only after copying the batch out. Without a ring, or when it is
full, arrays go as frames. PIPCOOK_RING_BYTES=0 turns the ring off.

When every sample of a batch holds an array of one dtype and shape under the
same key (a batch of images, of feature vectors), that key's arrays go as ONE
array of shape (N, *shape) in `stacked: {key: array}` and each sample carries
None in its place; the receiver puts row i back into sample i, a view into
one private buffer per batch (which therefore lives as long as any of its
rows is referenced).

Messages client -> server: {op: meta} | {op: ring, token} |
{op: open, split, gen, pos, credit} | {op: credit, split, gen, n} |
{op: shuffle, split, seed, req}
Messages server -> client: {op: meta, meta, sizes, ring?} | {op: batch, split,
gen, samples, stacked?} | {op: end, split, gen} | {op: ack, req} | {op: error, message}
"""
from __future__ import annotations

import collections
import os
import threading
import time
from typing import Any, Callable

import numpy as np
import zmq

from . import sdk, shmring
from .errors import SampleError, UpstreamError
from .protocol import (
    ALLOWED_KINDS,
    DATA_CAPS,
    ArrayStack,
    BoundaryTypeError,
    Caps,
    ProtocolError,
    check_message,
    pack,
    unpack,
)

SPLITS = sdk.SPLITS
TARGET_BATCH_BYTES = 4 << 20
MAX_BATCH_SAMPLES = 4096
SLOW_START = 8
DEFAULT_WINDOW = 4
MAX_CREDIT = 64
try:
    RING_BYTES = max(0, min(int(os.environ.get("PIPCOOK_RING_BYTES", shmring.DEFAULT_RING)), shmring.MAX_RING))
except ValueError:
    RING_BYTES = shmring.DEFAULT_RING
STACK_MAX_BYTES = 64 << 20  # a stacked column stays far below the caps' max_frame whatever the batch
REQUEST_CAPS = Caps(max_header=64 << 10, max_frame=64 << 10, max_frames=1, max_total=64 << 10, max_items=64)


def _set_caps(sock: zmq.Socket, caps: Caps) -> None:
    sock.setsockopt(zmq.MAXMSGSIZE, caps.max_frame if caps.max_frame < (1 << 62) else -1)
    sock.setsockopt(zmq.LINGER, 0)


# ----------------------------------------------------------------- server


class _Stream:
    __slots__ = ("peer", "gen", "pos", "credit", "done", "blocks", "sent")

    def __init__(self, peer: bytes, gen: int, pos: int, credit: int) -> None:
        self.peer, self.gen, self.pos, self.credit, self.done = peer, gen, pos, credit, False
        self.sent = 0  # batches sent on this stream: the first ones are small (slow start)
        self.blocks: collections.deque = collections.deque()  # ring block (or None) of each uncredited batch

    def release(self, n: int | None = None) -> None:
        """Give back the ring space of the `n` oldest uncredited batches (all with None)."""
        for _ in range(len(self.blocks) if n is None else min(n, len(self.blocks))):
            entry = self.blocks.popleft()
            if entry is not None:
                entry[0].release(entry[1])


class PoolServer:
    """Serves `pool` on a ROUTER socket; driven by the worker's poll loop."""

    def __init__(self, zctx: zmq.Context, endpoint: str, pool: Any, where: str = "pool") -> None:
        self.pool = pool
        self.where = where
        self.sock = zctx.socket(zmq.ROUTER)
        _set_caps(self.sock, REQUEST_CAPS)
        self.sock.setsockopt(zmq.SNDHWM, 2 * MAX_CREDIT)
        self.sock.bind(endpoint)
        self.streams: dict[str, _Stream] = {}
        self.batch_size: dict[str, int] = {}
        self.samples_sent = 0  # all splits, all epochs: what the live display shows as samples moved
        self._rr = 0
        self.ring_listener: shmring.Listener | None = None
        self.rings: collections.OrderedDict[bytes, shmring.Ring] = collections.OrderedDict()  # by peer
        self._writer: shmring.Writer | None = None
        path = shmring.ring_path(endpoint)
        if RING_BYTES and path and shmring.supported():
            try:
                self.ring_listener = shmring.Listener(path, RING_BYTES)
            except OSError:
                self.ring_listener = None  # frames only

    def close(self) -> None:
        self.sock.close(linger=0)
        if self.ring_listener is not None:
            self.ring_listener.close()
        for ring in self.rings.values():
            ring.close()
        self.rings.clear()

    def has_work(self) -> bool:
        return any(s.credit > 0 and not s.done for s in self.streams.values())

    def handle_incoming(self) -> None:
        """Answer every request waiting on the socket, without blocking."""
        while True:
            try:
                frames = self.sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            if len(frames) != 2:
                continue  # not from a well-behaved DEALER: ignore, never crash
            peer = frames[0].bytes
            try:
                self._handle(peer, unpack(frames[1:], REQUEST_CAPS))
            except ProtocolError as exc:
                self._send(peer, {"op": "error", "message": f"bad request: {exc}"})

    def _handle(self, peer: bytes, msg: Any) -> None:
        check_message(msg, {"op": str})
        op = msg["op"]
        if op == "meta":
            meta = dict(getattr(self.pool, "meta", None) or {})
            sizes = {}
            for split in SPLITS:
                ds = getattr(self.pool, split, None)
                sizes[split] = None if ds is None else len(ds)
            meta["size"] = {k: (v or 0) for k, v in sizes.items()}
            reply: dict[str, Any] = {"op": "meta", "meta": meta, "sizes": sizes}
            if self.ring_listener is not None:
                reply["ring"] = True
            self._send(peer, reply, what="the pool's meta")
            return
        if op == "ring":
            check_message(msg, {"token": bytes})
            ring = self.ring_listener.claim(msg["token"]) if self.ring_listener is not None else None
            if ring is not None:
                old_ring = self.rings.pop(peer, None)
                if old_ring is not None:
                    old_ring.close()
                self.rings[peer] = ring
                while len(self.rings) > shmring.MAX_RINGS:
                    self.rings.popitem(last=False)[1].close()
            return
        if op == "shuffle":
            check_message(msg, {"split": str, "req": int}, {"seed": int})
            ds = self._dataset(msg["split"])
            if ds is not None:
                ds.shuffle(msg.get("seed"))
            self._send(peer, {"op": "ack", "req": msg["req"]})
            return
        if op == "open":
            check_message(msg, {"split": str, "gen": int, "pos": int, "credit": int})
            if self._dataset(msg["split"]) is None:
                raise ProtocolError(f"no split {msg['split']!r}")
            old_stream = self.streams.get(msg["split"])
            if old_stream is not None:
                old_stream.release()  # its batches in flight are dropped on arrival, unread
            self.streams[msg["split"]] = _Stream(peer, msg["gen"], max(0, msg["pos"]), min(MAX_CREDIT, max(0, msg["credit"])))
            return
        if op == "credit":
            check_message(msg, {"split": str, "gen": int, "n": int})
            stream = self.streams.get(msg["split"])
            if stream is not None and stream.gen == msg["gen"]:
                stream.credit = min(MAX_CREDIT, stream.credit + max(0, msg["n"]))
                stream.release(max(0, msg["n"]))  # the client copied those batches out of the ring
            return
        raise ProtocolError(f"unknown op {op!r}")

    def _dataset(self, split: str) -> Any:
        return getattr(self.pool, split, None) if split in SPLITS else None

    def produce_one(self) -> None:
        """Send one batch on one stream that has credit (round robin)."""
        ready = [name for name, s in self.streams.items() if s.credit > 0 and not s.done]
        if not ready:
            return
        self._rr = (self._rr + 1) % len(ready)
        split = ready[self._rr]
        stream = self.streams[split]
        ds = self._dataset(split)
        tell = getattr(ds, "tell", None)
        if tell is None or tell() != stream.pos:
            ds.seek(stream.pos)
        # Slow start: 8, 16, 32, ... samples, up to the size that gives TARGET_BATCH_BYTES. A stream
        # (re)opens at every epoch (shuffle, seek to 0); a slow dataflow that made its first batch a
        # full 4 MiB one would keep the model waiting for all of it before it could start.
        n = min(self.batch_size.get(split, SLOW_START), SLOW_START << min(stream.sent, 16))
        samples = ds.next_batch(n)  # user code: exceptions propagate to the worker
        if not samples:
            stream.done = True
            self._send(stream.peer, {"op": "end", "split": split, "gen": stream.gen})
            return
        ring = self.rings.get(stream.peer)
        self._writer = ring.reserve() if ring is not None else None
        msg = {"op": "batch", "split": split, "gen": stream.gen, "samples": samples}
        stacked = _stack_columns(samples)
        if stacked is not None:
            msg["samples"], msg["stacked"] = stacked
        try:
            frames = self._pack(msg, split)
        finally:
            writer, self._writer = self._writer, None
        size = sum(len(f) if isinstance(f, bytes) else f.nbytes for f in frames)
        block = None
        if writer is not None and ring is not None:  # a writer comes only from this peer's ring
            size += writer.cursor - writer.start
            block = ring.commit(writer)
        stream.blocks.append(None if block is None else (ring, block))
        per_sample = max(1, size // len(samples))
        self.batch_size[split] = max(1, min(MAX_BATCH_SAMPLES, TARGET_BATCH_BYTES // per_sample))
        stream.pos += len(samples)
        self.samples_sent += len(samples)
        stream.sent += 1
        stream.credit -= 1
        self.sock.send_multipart([stream.peer, *frames], copy=False)

    def _pack(self, msg: dict, split: str) -> list:
        try:
            return pack(msg, self._writer)
        except BoundaryTypeError as exc:
            where = exc.where.replace("sample", "", 1)
            raise SampleError(
                f"a sample of the {split!r} split{' at ' + where if where else ''} is of type {exc.type_name}, "
                "which cannot cross a sandbox boundary (allowed: None, bool, int, float, str, bytes, lists, dicts, numpy arrays)"
            ) from None

    def _send(self, peer: bytes, msg: dict, what: str = "a reply") -> None:
        try:
            frames = pack(msg)
        except BoundaryTypeError as exc:
            raise SampleError(f"{what} holds a value of type {exc.type_name}, which cannot cross a sandbox boundary") from None
        self.sock.send_multipart([peer, *frames], copy=False)


def _stack_columns(samples: list) -> tuple[list, dict] | None:
    """(samples with None in place of each stacked array, {key: ArrayStack}), or None.

    A key is stacked when every sample of the batch is a dict holding, under that (str) key, a numpy
    array of the same dtype and shape: images, feature vectors, tensors. The receiver puts row i of
    the stacked array back into sample i (`_unstack`). Checked on the first sample first, so batches
    of samples without arrays (text, tables) cost one look at one dict."""
    if len(samples) < 2 or type(samples[0]) is not dict:
        return None
    keys = [(k, v.dtype, v.shape) for k, v in samples[0].items()
            if type(k) is str and type(v) is np.ndarray and v.dtype.kind in ALLOWED_KINDS]
    if not keys:
        return None
    columns: dict[str, ArrayStack] = {}
    for key, dtype, shape in keys:
        column = []
        for sample in samples:
            arr = sample.get(key) if type(sample) is dict else None
            if type(arr) is not np.ndarray or arr.dtype != dtype or arr.shape != shape:
                break
            column.append(arr)
        else:
            if column[0].nbytes * len(column) <= STACK_MAX_BYTES:
                columns[key] = ArrayStack(column)
    if not columns:
        return None
    holes = dict.fromkeys(columns)
    return [{**sample, **holes} for sample in samples], columns


def _unstack(samples: list, stacked: Any) -> None:
    """Put row i of each stacked array into sample i, where the sender left None; ProtocolError otherwise."""
    if not isinstance(stacked, dict):
        raise ProtocolError("a batch's stacked columns are not a map")
    for key, arr in stacked.items():
        if type(key) is not str or not isinstance(arr, np.ndarray) or arr.ndim < 1 or arr.shape[0] != len(samples):
            raise ProtocolError(f"stacked column {str(key)[:50]!r} is not an array of one row per sample")
        for sample in samples:
            if not isinstance(sample, dict) or key not in sample or sample[key] is not None:
                raise ProtocolError(f"stacked column {key[:50]!r} has no place in every sample of its batch")
        for sample, row in zip(samples, arr):
            sample[key] = row


# ----------------------------------------------------------------- client


class RemoteDataset:
    """A Dataset whose samples come from the stage before, streamed ahead."""

    def __init__(self, pool: "RemotePool", split: str, size: int) -> None:
        self._pool, self._split, self._size = pool, split, size
        self._pos = 0  # index of the next sample next() returns
        self._gen = 0
        self._buf: collections.deque = collections.deque()
        self._open = False
        self._ended = False
        self._owed = 0  # batches received whose credit is not yet returned

    def __len__(self) -> int:
        return self._size

    def __repr__(self) -> str:
        return f"<RemoteDataset {self._split} len={self._size} pos={self._pos}>"

    def tell(self) -> int:
        return self._pos

    def _reset(self) -> None:
        self._gen += 1
        self._owed = 0
        self._buf.clear()
        self._open = False
        self._ended = False

    def seek(self, pos: int) -> None:
        pos = max(0, min(int(pos), self._size))
        if pos != self._pos or self._ended and not self._buf and pos < self._size:
            self._pos = pos
            self._reset()

    def shuffle(self, seed: int | None = None) -> None:
        self._pool._request({"op": "shuffle", "split": self._split, "seed": seed})
        self._reset()

    def _fill(self) -> None:
        with self._pool._lock:
            if not self._open:
                self._open = True
                self._pool._send({"op": "open", "split": self._split, "gen": self._gen, "pos": self._pos, "credit": self._pool.window})
            while not self._buf and not self._ended:
                self._pool._receive_one()

    def _on_batch(self, gen: int, samples: list) -> None:
        if gen != self._gen or not self._open:
            return
        self._buf.extend(samples)
        # Credits go back in groups of half the window (one message instead of several; each costs a
        # wake-up of both ZeroMQ I/O threads): the server never runs dry, it always holds at least
        # window - (owed < window / 2) credits once the client caught up.
        self._owed += 1
        if self._owed >= self._pool._credit_every:
            self._pool._send({"op": "credit", "split": self._split, "gen": gen, "n": self._owed})
            self._owed = 0

    def _on_end(self, gen: int) -> None:
        if gen == self._gen:
            self._ended = True

    def next(self) -> Any:
        if not self._buf:
            self._fill()
            if not self._buf:
                return None
        self._pos += 1
        return self._buf.popleft()

    def next_batch(self, n: int) -> list:
        out: list = []
        while n <= 0 or len(out) < n:
            if not self._buf:
                self._fill()
                if not self._buf:
                    break
            take = len(self._buf) if n <= 0 else min(n - len(out), len(self._buf))
            out.extend(self._buf.popleft() for _ in range(take))
            self._pos += take
        return out

    def __iter__(self):
        self.seek(0)
        while True:
            batch = self.next_batch(256)
            if not batch:
                return
            yield from batch


class RemotePool:
    """The pool a stage receives from the stage before it."""

    def __init__(self, zctx: zmq.Context, endpoint: str, upstream: str, window: int = DEFAULT_WINDOW,
                 caps: Caps = DATA_CAPS, alive: Callable[[], bool] | None = None) -> None:
        self.upstream = upstream
        self.window = window
        self._credit_every = max(1, window // 2)
        self._caps = caps
        self._alive = alive
        self._lock = threading.RLock()
        self._sock = zctx.socket(zmq.DEALER)
        _set_caps(self._sock, caps)
        self._sock.setsockopt(zmq.RCVHWM, 2 * MAX_CREDIT)
        self._sock.connect(endpoint)
        self._req = 0
        self._acks: set[int] = set()
        self._meta_reply: dict | None = None
        self._datasets: dict[str, RemoteDataset] = {}
        self._ring: shmring.Reader | None = None
        self.meta: dict = {}
        with self._lock:
            self._send({"op": "meta"})
            while self._meta_reply is None:
                self._receive_one()
        reply = self._meta_reply
        path = shmring.ring_path(endpoint)
        if reply.get("ring") is True and RING_BYTES and path and shmring.supported():
            got = shmring.connect(path)  # the server answers from its poll loop; None: frames only
            if got is not None:
                self._ring, token = got
                with self._lock:
                    self._send({"op": "ring", "token": token})
        self.meta = reply["meta"] if isinstance(reply.get("meta"), dict) else {}
        sizes = reply.get("sizes") if isinstance(reply.get("sizes"), dict) else {}
        for split in SPLITS:
            size = sizes.get(split)
            ds = RemoteDataset(self, split, size) if isinstance(size, int) and size >= 0 else None
            setattr(self, split, ds)
            if ds is not None:
                self._datasets[split] = ds

    def transform(self, fn: Callable[[Any], Any], meta_fn: Callable[[dict], dict] | None = None) -> sdk.DatasetPool:
        return sdk.transform(self, fn, meta_fn)

    def close(self) -> None:
        self._sock.close(linger=0)
        if self._ring is not None:
            self._ring.close()
            self._ring = None

    def __repr__(self) -> str:
        return f"<RemotePool from {self.upstream} size={self.meta.get('size')}>"

    # -- socket plumbing (callers hold self._lock)
    def _send(self, msg: dict) -> None:
        self._sock.send_multipart(pack(msg), copy=False)

    def _request(self, msg: dict) -> None:
        with self._lock:
            self._req += 1
            req = self._req
            self._send({**msg, "req": req})
            while req not in self._acks:
                self._receive_one()
            self._acks.discard(req)

    def _receive_one(self) -> None:
        while not self._sock.poll(1000):
            if self._alive is not None and not self._alive():
                raise UpstreamError(f"stopped while waiting for stage {self.upstream!r}")
        frames = self._sock.recv_multipart(copy=False)
        try:
            msg = check_message(unpack(frames, self._caps, self._ring), {"op": str})
            op = msg["op"]
            if op == "batch" and msg.get("stacked") is not None:
                if not isinstance(msg.get("samples"), list):
                    raise ProtocolError("a batch with stacked columns but no list of samples")
                _unstack(msg["samples"], msg["stacked"])
        except ProtocolError as exc:
            raise UpstreamError(f"stage {self.upstream!r} sent a malformed message: {exc}") from None
        # A split that is not a string (a list, a map: unhashable) names no dataset, as an unknown one
        split = msg.get("split")
        ds = self._datasets.get(split) if isinstance(split, str) else None
        if op == "batch":
            samples = msg.get("samples")
            if ds is not None and isinstance(samples, list) and isinstance(msg.get("gen"), int):
                ds._on_batch(msg["gen"], samples)
        elif op == "end":
            if ds is not None and isinstance(msg.get("gen"), int):
                ds._on_end(msg["gen"])
        elif op == "meta":
            self._meta_reply = msg
        elif op == "ack" and isinstance(msg.get("req"), int):
            self._acks.add(msg["req"])
        elif op == "error":
            raise UpstreamError(f"stage {self.upstream!r} refused a request: {str(msg.get('message'))[:500]}")


def serve_until(server: PoolServer, should_stop: Callable[[], bool], extra: zmq.Socket | None = None,
                on_extra: Callable[[], None] | None = None, on_tick: Callable[[], None] | None = None,
                tick: float = 0.5) -> None:
    """Drive `server` until `should_stop()`; `extra` (the control socket) is polled too; `on_tick` is
    called at most every `tick` seconds (the worker reports samples moved with it)."""
    next_tick = time.monotonic()  # the first report at once, then one per tick
    poller = zmq.Poller()
    poller.register(server.sock, zmq.POLLIN)
    listener = server.ring_listener
    if listener is not None:
        poller.register(listener.fileno(), zmq.POLLIN)
    if extra is not None:
        poller.register(extra, zmq.POLLIN)
    while not should_stop():
        busy = server.has_work()
        events = dict(poller.poll(0 if busy else 200))
        if listener is not None and listener.fileno() in events:
            listener.accept()
        if server.sock in events:
            server.handle_incoming()
        if extra is not None and extra in events and on_extra is not None:
            on_extra()
        if server.has_work():
            server.produce_one()
        if on_tick is not None and time.monotonic() >= next_tick:
            next_tick = time.monotonic()  # the first report at once, then one per tick
            on_tick()
