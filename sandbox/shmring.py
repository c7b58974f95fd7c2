"""A shared-memory ring beside each boundary, for the bytes of big arrays.

Why: through a socket every byte is copied twice by the kernel, in pieces
of a socket buffer, and ZeroMQ gives the receiver each big message in
freshly allocated memory (page faults: on the 2-vCPU VM a fresh 64 MiB
buffer costs three times a warm copy), and each frame of 64 KiB or more
costs a round trip through pyzmq's garbage-collector thread. Here the
sender copies an array once into a ring of shared memory and the receiver
copies it once out into memory it owns, recycled when the previous tensor
of that size is no longer referenced. bench/RESULTS.md has the figures.

Setup, per client of a PoolServer:

    client                                  server (the upstream stage)
    connect <endpoint path>.ring   ----->   accept (in its poll loop)
                                   <-----   16-byte token + a read-only fd of
                                            a memfd, sealed against shrinking
                                            and growing (SCM_RIGHTS)
    check the fd, mmap it PROT_READ
    {op: ring, token} on ZeroMQ    ----->   this peer's batches may now name
                                            ring offsets (EXT_ARRAY_RING)

The unix socket sits next to the ZeroMQ socket in the boundary's ipc
directory, the only directory both sandboxes share; the client derives its
path from its own endpoint (never from anything the server says).

Safety (either side may be hostile):
- the receiver maps only a memfd that carries F_SEAL_SHRINK and
  F_SEAL_GROW (F_GET_SEALS), so the sender can never truncate it under the
  mapping (SIGBUS); the size comes from fstat and is capped at MAX_RING;
- every reference is checked against the mapping's size before a byte is
  read (protocol.unpack); the bytes are copied into private memory first,
  so a sender that keeps writing can change what it sent, never what the
  receiver already holds;
- the receiver's descriptor is read-only (reopened through /proc/self/fd)
  and mapped PROT_READ; the server never reads the ring;
- a server keeps at most MAX_RINGS rings (pages are allocated only when
  written) and only sends one fd per connection, without blocking;
- anything unexpected during setup leaves the boundary on plain frames.

Only the standard library and numpy: runs inside the sandbox.
"""
from __future__ import annotations

import collections
import fcntl
import mmap
import os
import secrets
import socket
import stat
import sys
from typing import Any

import numpy as np

DEFAULT_RING = 256 << 20
MAX_RING = 1 << 30
MAX_RINGS = 4
ALIGN = 64
SOFT_WRAP = 32 << 20  # past this offset, wrap to the start when it has room: keeps small streams' footprint small
TOKEN_BYTES = 16
SEALS = getattr(fcntl, "F_SEAL_SHRINK", 0x0002) | getattr(fcntl, "F_SEAL_GROW", 0x0004)
POOL_MIN = 64 << 10  # receive buffers this big are recycled
POOL_BYTES = 512 << 20  # free buffers kept at most (they count against the stage's memory limit)


def ring_path(endpoint: str) -> str | None:
    """The ring's unix socket for a ZeroMQ ipc:// endpoint, or None for other transports."""
    if not endpoint.startswith("ipc://"):
        return None
    path = endpoint[len("ipc://"):] + ".ring"
    return path if len(path.encode()) < 108 else None


def supported() -> bool:
    return hasattr(os, "memfd_create") and hasattr(fcntl, "F_ADD_SEALS") and hasattr(socket, "send_fds")


# ----------------------------------------------------------------- sender


class _Block:
    __slots__ = ("start", "end", "freed")

    def __init__(self, start: int, end: int) -> None:
        self.start, self.end, self.freed = start, end, False


class Writer:
    """A reservation in a ring that the encoder fills with array bytes, in order."""

    def __init__(self, ring: "Ring", start: int, end: int) -> None:
        self.ring, self.start, self.end, self.cursor = ring, start, end, start

    def put(self, arr: np.ndarray) -> int | None:
        """Copy `arr` (C-contiguous) into the ring; its offset, or None when it does not fit."""
        off = -(-self.cursor // ALIGN) * ALIGN
        n = arr.nbytes
        buf = self.ring.buf
        if buf is None or off + n > self.end:  # a closed ring holds nothing: the array goes as a frame
            return None
        np.copyto(buf[off:off + n], arr.reshape(-1).view(np.uint8))
        self.cursor = off + n
        return off

    def put_stack(self, arrays: list) -> int | None:
        """Copy same-dtype, same-shape arrays next to each other, as one array of shape (N, *shape)."""
        first = arrays[0]
        off = -(-self.cursor // ALIGN) * ALIGN
        n = first.nbytes * len(arrays)
        buf = self.ring.buf
        if buf is None or off + n > self.end:
            return None
        np.stack(arrays, out=buf[off:off + n].view(first.dtype).reshape(len(arrays), *first.shape))
        self.cursor = off + n
        return off


class Ring:
    """The sender's side: a sealed memfd, mapped read-write, with a FIFO allocator."""

    def __init__(self, size: int = DEFAULT_RING) -> None:
        self.size = size
        fd = os.memfd_create("pipcook-ring", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, size)  # EFBIG under a small RLIMIT_FSIZE: the caller falls back to frames
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS | fcntl.F_SEAL_SEAL)
            self.map = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd
        self.buf: np.ndarray | None = np.frombuffer(self.map, np.uint8)  # None once closed
        self.blocks: collections.deque[_Block] = collections.deque()
        self.last_used = 0

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self.buf = None  # the mapping goes when nothing refers to it any more

    def reader_fd(self) -> int:
        """A new read-only descriptor of the ring (for the peer); the caller closes it."""
        try:
            return os.open(f"/proc/self/fd/{self.fd}", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:  # no /proc: the peer maps PROT_READ anyway
            return os.dup(self.fd)

    def reserve(self) -> Writer | None:
        """The largest sensible free region, to fill with one message's arrays."""
        if self.buf is None:
            return None
        if not self.blocks:
            return Writer(self, 0, self.size)
        first, last = self.blocks[0], self.blocks[-1]
        want = max(self.last_used, 1 << 20)
        if last.start < first.start:  # wrapped: the newest block sits before the oldest
            start, end = last.end, first.start
        else:
            head, front = last.end, first.start
            if front >= want and (head >= SOFT_WRAP or self.size - head < want):
                start, end = 0, front
            else:
                start, end = head, self.size
        return Writer(self, start, end) if end - start >= ALIGN else None

    def commit(self, writer: Writer) -> _Block | None:
        used = writer.cursor - writer.start
        if used <= 0:
            return None
        self.last_used = used
        block = _Block(writer.start, writer.cursor)
        self.blocks.append(block)
        return block

    def release(self, block: _Block) -> None:
        block.freed = True
        while self.blocks and self.blocks[0].freed:
            self.blocks.popleft()


class Listener:
    """The server's unix socket that hands out rings; polled with the ZeroMQ socket."""

    def __init__(self, path: str, size: int = DEFAULT_RING) -> None:
        self.path, self.size = path, size
        if os.path.lexists(path) and stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)  # ours from an earlier server in this dir (zmq steals ipc paths alike)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(path)
        self.sock.listen(8)
        self.sock.setblocking(False)
        self.pending: collections.OrderedDict[bytes, Ring] = collections.OrderedDict()

    def fileno(self) -> int:
        return self.sock.fileno()

    def accept(self) -> None:
        """Answer waiting connections (a few per call: a flood must not hold the serve loop) with a
        token and a ring each; never blocks, never raises."""
        for _ in range(MAX_RINGS * 2):
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            try:
                conn.setblocking(False)
                ring = Ring(self.size)
            except OSError:
                conn.close()
                continue
            token = secrets.token_bytes(TOKEN_BYTES)
            rfd = ring.reader_fd()
            try:
                socket.send_fds(conn, [token], [rfd])
            except OSError:
                ring.close()
                continue
            finally:
                os.close(rfd)
                conn.close()
            self.pending[token] = ring
            while len(self.pending) > MAX_RINGS:
                self.pending.popitem(last=False)[1].close()

    def claim(self, token: Any) -> Ring | None:
        return self.pending.pop(token, None) if isinstance(token, bytes) else None

    def close(self) -> None:
        self.sock.close()
        try:
            if stat.S_ISSOCK(os.lstat(self.path).st_mode):
                os.unlink(self.path)
        except OSError:
            pass
        for ring in self.pending.values():
            ring.close()
        self.pending.clear()


# ----------------------------------------------------------------- receiver


class Reader:
    """The receiver's side: the sender's ring mapped read-only, and recycled buffers to copy into."""

    def __init__(self, fd: int) -> None:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError("ring descriptor is not a memory file")
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)  # EINVAL for anything but a memfd / shmem file
        if seals & SEALS != SEALS:
            raise OSError("ring is not sealed against shrinking and growing")
        if not 0 < st.st_size <= MAX_RING:
            raise OSError(f"ring of {st.st_size} bytes")
        self.size = st.st_size
        self.map = mmap.mmap(fd, self.size, mmap.MAP_SHARED, mmap.PROT_READ)
        self.view: np.ndarray | None = np.frombuffer(self.map, np.uint8)  # None once closed
        self._pool: dict[int, collections.deque] = {}
        self._pooled = 0

    def copy_out(self, offset: int, nbytes: int) -> np.ndarray:
        """Private, writable uint8 copy of ring[offset:offset+nbytes]; the caller checked the bounds."""
        if not (0 <= offset and offset + nbytes <= self.size):  # protocol.unpack checks first; belt and braces
            raise ValueError("ring reference out of bounds")
        view = self.view
        if view is None:
            raise ValueError("ring reference after the ring was closed")
        out = self._take(nbytes)
        np.copyto(out, view[offset:offset + nbytes])
        return out

    def _take(self, nbytes: int) -> np.ndarray:
        """A uint8 buffer of `nbytes` to copy into: a recycled one when one of that size is free.

        Fresh memory costs page faults on every first touch (a fresh 64 MiB buffer is about three
        times slower to fill than a warm one on the 2-vCPU VM; malloc hands 150 KB-4 MiB blocks back
        to the kernel and faults them in again), so buffers are kept per size and reused. A pooled
        buffer is free when nothing but the pool refers to it: every array made from it (views,
        reshapes, memoryviews of those) holds a reference to it through `.base`. References while
        checking: the deque, the local name, getrefcount's argument."""
        if nbytes < POOL_MIN:
            return np.empty(nbytes, np.uint8)
        q = self._pool.get(nbytes)
        if q:
            for _ in range(min(len(q), 4)):  # the least recently handed out come first
                buf = q[0]
                q.rotate(-1)
                if sys.getrefcount(buf) <= 3:
                    return buf
                del buf
        buf = np.empty(nbytes, np.uint8)
        if self._pooled + nbytes > POOL_BYTES:
            self._drop_free()
        if self._pooled + nbytes <= POOL_BYTES:
            self._pool.setdefault(nbytes, collections.deque()).append(buf)
            self._pooled += nbytes
        return buf

    def _drop_free(self) -> None:
        for size in list(self._pool):
            q = self._pool[size]
            keep: collections.deque = collections.deque()
            while q:
                b = q.popleft()
                if sys.getrefcount(b) > 2:  # b and the argument: anything more holds it
                    keep.append(b)
                else:
                    self._pooled -= size
                del b
            if keep:
                self._pool[size] = keep
            else:
                del self._pool[size]

    def close(self) -> None:
        self.view = None
        self._pool = {}
        try:
            self.map.close()
        except BufferError:  # arrays still export it: the mapping goes with the last of them
            pass


def connect(path: str, timeout: float = 5.0) -> tuple[Reader, bytes] | None:
    """Ask the server at `path` for a ring: (reader, token), or None (use frames)."""
    fds: list[int] = []
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(path)
            msg, fds, _flags, _addr = socket.recv_fds(s, TOKEN_BYTES + 1, 1)
        if len(msg) != TOKEN_BYTES or len(fds) != 1:
            return None
        return Reader(fds[0]), msg
    except (OSError, ValueError):
        return None
    finally:
        for fd in fds:
            os.close(fd)
