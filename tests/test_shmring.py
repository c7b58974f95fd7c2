"""The shared-memory ring beside each boundary (sandbox/shmring.py): its
allocator, the checks the receiver makes on a hostile sender's descriptor
and references, the recycling of receive buffers, and a RemotePool that
streams big arrays through it (or falls back to frames)."""
from __future__ import annotations

import fcntl
import os
import random
import shutil
import tempfile
import threading

import msgpack
import numpy as np
import pytest
import zmq

from pipcook_sandbox.sandbox import boundary, sdk, shmring
from pipcook_sandbox.sandbox.protocol import EXT_ARRAY_RING, ProtocolError, pack, unpack

pytestmark = [pytest.mark.timeout(60), pytest.mark.skipif(not shmring.supported(), reason="no memfd / seals")]


def reader_for(ring: shmring.Ring) -> shmring.Reader:
    fd = ring.reader_fd()
    try:
        return shmring.Reader(fd)
    finally:
        os.close(fd)


def ring_message(meta: list) -> list:
    """A message whose header holds one raw EXT_ARRAY_RING reference with `meta`."""
    return [msgpack.packb({"x": msgpack.ExtType(EXT_ARRAY_RING, msgpack.packb(meta))})]


# ------------------------------------------------------------------ round trips


def test_big_arrays_go_through_the_ring_and_arrive_as_private_copies():
    ring = shmring.Ring(8 << 20)
    reader = reader_for(ring)
    arrs = [np.arange(100_000, dtype=np.float32), np.ones((300, 300), np.uint8), np.arange(10, dtype=np.int64)]
    writer = ring.reserve()
    frames = pack({"a": arrs}, writer)
    assert len(frames) == 1  # both big arrays in the ring, the small one inline
    assert writer.cursor > writer.start and ring.commit(writer) is not None
    got = unpack(frames, ring=reader)["a"]
    for g, a in zip(got, arrs):
        assert g.dtype == a.dtype and g.shape == a.shape and np.array_equal(g, a)
    ring.buf[:] = 7  # the sender scribbles over the ring afterwards
    assert np.array_equal(got[0], arrs[0]) and np.array_equal(got[1], arrs[1])
    got[0][0] = 42.0  # private and writable
    assert got[0][0] == 42.0


def test_arrays_that_do_not_fit_fall_back_to_frames():
    ring = shmring.Ring(1 << 20)
    reader = reader_for(ring)
    arrs = [np.full(400_000, i, np.uint8) for i in range(4)]  # 1.6 MB: the ring holds two
    writer = ring.reserve()
    frames = pack(arrs, writer)
    assert len(frames) == 3
    got = unpack(frames, ring=reader)
    assert all(np.array_equal(g, a) for g, a in zip(got, arrs))


def test_receive_buffers_are_recycled_only_when_nothing_refers_to_them():
    ring = shmring.Ring(1 << 20)
    reader = reader_for(ring)
    ring.buf[:1000] = 1
    a = reader.copy_out(0, 200_000)
    addr = a.ctypes.data
    view = a.view(np.float32)[10:]
    del a
    b = reader.copy_out(0, 200_000)
    assert b.ctypes.data != addr  # `view` still holds the first buffer
    del view
    c = reader.copy_out(0, 200_000)
    assert c.ctypes.data == addr  # now free: reused
    mv = memoryview(c)
    del c
    d = reader.copy_out(0, 200_000)
    assert d.ctypes.data not in (addr,)  # a memoryview holds it too
    del mv, b, d


# ------------------------------------------------------------------ the allocator


def test_allocator_never_hands_out_live_space_and_wraps():
    rng = random.Random(1)
    ring = shmring.Ring(4 << 20)
    live: list = []
    wraps = 0
    for step in range(3000):
        if live and (rng.random() < 0.5 or len(live) > 6):
            block = live.pop(0) if rng.random() < 0.8 else live.pop(rng.randrange(len(live)))
            ring.release(block)
            continue
        writer = ring.reserve()
        if writer is None:
            continue
        size = rng.choice([100, 70_000, 300_000, 1 << 20])
        if writer.put(np.zeros(size, np.uint8)) is None:
            continue
        block = ring.commit(writer)
        for other in live:
            assert block.end <= other.start or other.end <= block.start, (step, block.start, block.end)
        assert 0 <= block.start < block.end <= ring.size
        wraps += bool(live) and block.start < live[-1].start
        live.append(block)
    assert wraps > 10


# ------------------------------------------------------------------ a hostile sender


@pytest.mark.parametrize("meta", [
    ["<f4", [10], -1],
    ["<f4", [10], (1 << 20) - 39],
    ["<f4", [1 << 40], 0],
    ["|u1", [1 << 31, 1 << 31], 0],
    ["<f4", [10], "0"],
    ["<f4", [10]],
    ["O", [1], 0],
    ["<f4", [-1], 0],
])
def test_bad_ring_references_are_protocol_errors(meta):
    ring = shmring.Ring(1 << 20)
    reader = reader_for(ring)
    with pytest.raises(ProtocolError):
        unpack(ring_message(meta), ring=reader)


def test_a_ring_reference_without_a_ring_is_a_protocol_error():
    with pytest.raises(ProtocolError, match="no ring"):
        unpack(ring_message(["<f4", [10], 0]))


def test_ring_arrays_count_against_the_caps():
    from pipcook_sandbox.sandbox.protocol import Caps

    ring = shmring.Ring(1 << 20)
    reader = reader_for(ring)
    with pytest.raises(ProtocolError):
        unpack(ring_message(["|u1", [500_000], 0]), Caps(max_frame=100_000), ring=reader)
    with pytest.raises(ProtocolError):
        unpack([msgpack.packb([msgpack.ExtType(EXT_ARRAY_RING, msgpack.packb(["|u1", [400_000], 0]))] * 3)],
               Caps(max_total=1_000_000), ring=reader)


def test_reader_refuses_descriptors_that_could_shrink_or_are_not_memory():
    fd = os.memfd_create("unsealed", os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, 1 << 20)
    with pytest.raises(OSError, match="sealed"):
        shmring.Reader(fd)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_GROW)  # growing sealed, shrinking not
    with pytest.raises(OSError, match="sealed"):
        shmring.Reader(fd)
    os.close(fd)
    r, w = os.pipe()
    with pytest.raises(OSError):
        shmring.Reader(r)
    os.close(r), os.close(w)
    with tempfile.TemporaryFile() as f:
        f.truncate(1 << 20)
        with pytest.raises(OSError):
            shmring.Reader(f.fileno())  # a regular file has no seals: F_GET_SEALS fails
    fd = os.memfd_create("empty", os.MFD_ALLOW_SEALING)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, shmring.SEALS)
    with pytest.raises(OSError, match="ring of 0 bytes"):
        shmring.Reader(fd)
    os.close(fd)


def test_the_readers_descriptor_is_read_only():
    ring = shmring.Ring(1 << 20)
    fd = ring.reader_fd()
    try:
        assert fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY
        with pytest.raises(OSError):
            os.write(fd, b"x")
    finally:
        os.close(fd)


# ------------------------------------------------------------------ through a boundary


@pytest.fixture
def ipc_dir():
    d = tempfile.mkdtemp(prefix="pst", dir="/tmp")
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def zctx():
    ctx = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


def served(zctx, ipc_dir, pool):
    server = boundary.PoolServer(zctx, f"ipc://{ipc_dir}/pool.sock", pool)
    stop = threading.Event()
    thread = threading.Thread(target=boundary.serve_until, args=(server, stop.is_set), daemon=True)
    thread.start()

    def close():
        stop.set()
        thread.join(10)
        server.close()

    return server, thread, close


def tensors(n, size):
    return [{"data": np.full(size, i % 251, np.uint8), "label": i} for i in range(n)]


@pytest.mark.parametrize("size", [70_000, 1 << 20, 9 << 20])
def test_remote_pool_streams_big_arrays_through_the_ring(zctx, ipc_dir, size):
    n = 40 if size < (8 << 20) else 12
    pool = sdk.from_lists(train=tensors(n, size), test=tensors(5, size))
    server, thread, close = served(zctx, ipc_dir, pool)
    client = boundary.RemotePool(zctx, f"ipc://{ipc_dir}/pool.sock", "up", alive=thread.is_alive)
    try:
        assert client._ring is not None
        for epoch in range(2):  # a second pass reuses ring space and receive buffers
            got = [(s["label"], int(s["data"][0]), s["data"].nbytes) for s in client.train]
            assert got == [(i, i % 251, size) for i in range(n)]
        assert len(server.rings) == 1 and next(iter(server.rings.values())).last_used >= size
        client.train.seek(n // 2)
        held = client.train.next_batch(3)
        client.train.shuffle(3)
        order = [s["label"] for s in client.train]
        expected = list(range(n))
        random.Random(3).shuffle(expected)
        assert order == expected
        assert [int(s["data"][0]) for s in held] == [(n // 2 + k) % 251 for k in range(3)]  # still intact
        assert [s["label"] for s in client.test] == list(range(5))
    finally:
        client.close()
        close()


def test_ring_off_means_frames_and_the_same_samples(zctx, ipc_dir, monkeypatch):
    monkeypatch.setattr(boundary, "RING_BYTES", 0)
    pool = sdk.from_lists(train=tensors(10, 1 << 20))
    server, thread, close = served(zctx, ipc_dir, pool)
    client = boundary.RemotePool(zctx, f"ipc://{ipc_dir}/pool.sock", "up", alive=thread.is_alive)
    try:
        assert client._ring is None and server.ring_listener is None
        assert [int(s["data"][-1]) for s in client.train] == list(range(10))
    finally:
        client.close()
        close()
    assert not os.path.exists(f"{ipc_dir}/pool.sock.ring")


def test_wrong_tokens_and_hostile_ring_connections_change_nothing(zctx, ipc_dir):
    import socket

    pool = sdk.from_lists(train=tensors(6, 1 << 20))
    server, thread, close = served(zctx, ipc_dir, pool)
    try:
        for _ in range(shmring.MAX_RINGS + 3):  # connect, take nothing, go away
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(f"{ipc_dir}/pool.sock.ring")
            s.close()
        dealer = zctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.connect(f"ipc://{ipc_dir}/pool.sock")
        dealer.send_multipart(pack({"op": "ring", "token": b"\0" * 16}))
        dealer.send_multipart(pack({"op": "meta"}))
        assert dealer.poll(10_000)
        assert unpack(dealer.recv_multipart())["ring"] is True
        dealer.close()
        assert not server.rings and len(server.ring_listener.pending) <= shmring.MAX_RINGS
        client = boundary.RemotePool(zctx, f"ipc://{ipc_dir}/pool.sock", "up", alive=thread.is_alive)
        assert client._ring is not None
        assert [s["label"] for s in client.train] == list(range(6))
        client.close()
    finally:
        close()


def test_a_sender_pointing_outside_the_ring_is_an_upstream_error(zctx, ipc_dir):
    pool = sdk.from_lists(train=tensors(4, 1 << 20))

    class Liar(boundary.PoolServer):
        def _pack(self, msg, split):
            if msg.get("op") == "batch":
                return ring_message(["|u1", [1 << 20], shmring.DEFAULT_RING - 10])
            return super()._pack(msg, split)

    server = Liar(zctx, f"ipc://{ipc_dir}/pool.sock", pool)
    stop = threading.Event()
    thread = threading.Thread(target=boundary.serve_until, args=(server, stop.is_set), daemon=True)
    thread.start()
    client = boundary.RemotePool(zctx, f"ipc://{ipc_dir}/pool.sock", "up", alive=thread.is_alive)
    try:
        assert client._ring is not None
        with pytest.raises(boundary.UpstreamError, match="outside"):
            client.train.next()
    finally:
        client.close()
        stop.set()
        thread.join(10)
        server.close()
