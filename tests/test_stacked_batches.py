"""Stacked batches across a boundary (sandbox/boundary.py `stacked`): the
arrays that every sample of a batch holds under one key, with one dtype and
shape, cross as ONE array (one ring reference) and the receiver puts row i
back into sample i. And a hostile upstream that lies in a stacked batch:
each lie is an UpstreamError naming a malformed message, never a crash or a
sample with the wrong data."""
from __future__ import annotations

import shutil
import tempfile
import threading

import msgpack
import numpy as np
import pytest
import zmq
from pipcook_sandbox.sandbox import boundary, sdk, shmring
from pipcook_sandbox.sandbox.protocol import EXT_ARRAY_RING, pack

pytestmark = pytest.mark.timeout(60)

WAIT = 10.0


@pytest.fixture
def ipc_dir():
    d = tempfile.mkdtemp(prefix="psk", dir="/tmp")
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def zctx():
    ctx = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


class Recording(boundary.PoolServer):
    """A PoolServer that keeps every batch message it packs (before packing)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.sent: list[dict] = []

    def _pack(self, msg, split):
        if msg.get("op") == "batch":
            self.sent.append(msg)
        return super()._pack(msg, split)


def start(zctx, ipc_dir, pool, cls=Recording):
    server = cls(zctx, f"ipc://{ipc_dir}/pool.sock", pool)
    stop = threading.Event()
    thread = threading.Thread(target=boundary.serve_until, args=(server, stop.is_set), daemon=True)
    thread.start()
    client = boundary.RemotePool(zctx, f"ipc://{ipc_dir}/pool.sock", "up", alive=thread.is_alive)

    def close():
        client.close()
        stop.set()
        thread.join(WAIT)
        server.close()

    return server, client, close


def images(n, shape=(224, 224, 3)):
    return [{"data": np.full(shape, i % 251, np.uint8), "label": i, "name": f"img{i}"} for i in range(n)]


# ------------------------------------------------------------------ round trips


def test_same_shaped_arrays_cross_as_one_stacked_array_and_come_back_per_sample(zctx, ipc_dir):
    data = images(70)
    server, client, close = start(zctx, ipc_dir, sdk.from_lists(train=data))
    try:
        assert client._ring is not None
        got = client.train.next_batch(0)
        assert [(s["label"], s["name"], int(s["data"][5, 5, 1]), s["data"].shape) for s in got] == \
            [(i, f"img{i}", i % 251, (224, 224, 3)) for i in range(70)]
        assert all(list(s) == ["data", "label", "name"] for s in got)  # key order as sent
        assert server.sent and all(set(m["stacked"]) == {"data"} and all(s["data"] is None for s in m["samples"])
                                   for m in server.sent if len(m["samples"]) > 1)
        # the pool's own samples are untouched by the sender's placeholders
        assert all(isinstance(s["data"], np.ndarray) for s in data)
        # the rows of one batch share one private buffer: writable, and the sender's ring cannot reach it
        first = got[0]["data"]
        assert first.base is not None and got[1]["data"].base is first.base
        for ring in server.rings.values():
            ring.buf[:] = 9
        assert int(got[3]["data"][0, 0, 0]) == 3
        first[0, 0, 0] = 200
        assert int(first[0, 0, 0]) == 200 and int(got[1]["data"][0, 0, 0]) == 1
    finally:
        close()


def test_batches_that_cannot_be_stacked_cross_sample_by_sample(zctx, ipc_dir):
    mixed = [
        {"data": np.zeros((4, 4), np.float32), "label": 0},
        {"data": np.zeros((4, 5), np.float32), "label": 1},  # another shape
        {"data": np.zeros((4, 4), np.float64), "label": 2},  # another dtype
        {"data": None, "label": 3},  # no array
        {"label": 4},  # no key
        [np.zeros(3, np.int8)],  # not a dict
    ]
    server, client, close = start(zctx, ipc_dir, sdk.from_lists(train=mixed))
    try:
        got = client.train.next_batch(0)
        assert [np.asarray(s["data"]).shape if isinstance(s, dict) and "data" in s else None for s in got] == \
            [(4, 4), (4, 5), (4, 4), (), None, None]
        assert got[2]["data"].dtype == np.float64 and got[3]["data"] is None and got[4] == {"label": 4}
        assert isinstance(got[5], list) and got[5][0].dtype == np.int8
        assert all("stacked" not in m for m in server.sent)
    finally:
        close()


def test_only_the_keys_every_sample_shares_are_stacked(zctx, ipc_dir):
    rows = [{"x": np.full(3, i, np.int64), "y": np.zeros(i + 1, np.int8), "z": np.ones(2, np.float32)} for i in range(6)]
    server, client, close = start(zctx, ipc_dir, sdk.from_lists(train=rows))
    try:
        got = client.train.next_batch(0)
        assert [int(s["x"][0]) for s in got] == list(range(6)) and [s["y"].shape for s in got] == [(i + 1,) for i in range(6)]
        assert all(s["z"].dtype == np.float32 for s in got)
        assert all(set(m["stacked"]) == {"x", "z"} for m in server.sent if len(m["samples"]) > 1)
    finally:
        close()


def test_without_a_ring_a_stacked_batch_goes_as_one_frame(zctx, ipc_dir, monkeypatch):
    monkeypatch.setattr(boundary, "RING_BYTES", 0)
    server, client, close = start(zctx, ipc_dir, sdk.from_lists(train=images(40, (64, 64, 3))))
    try:
        assert client._ring is None
        assert [int(s["data"][1, 2, 0]) for s in client.train] == list(range(40))
        assert any("stacked" in m for m in server.sent)
    finally:
        close()


def test_a_column_too_big_to_stack_crosses_array_by_array(zctx, ipc_dir, monkeypatch):
    monkeypatch.setattr(boundary, "STACK_MAX_BYTES", 1 << 20)
    server, client, close = start(zctx, ipc_dir, sdk.from_lists(train=images(12, (600, 600))))  # 360 KB each
    try:
        assert [int(s["data"][0, 0]) for s in client.train] == list(range(12))
        assert server.sent and all("stacked" not in m for m in server.sent)
    finally:
        close()


def test_held_rows_keep_their_batch_buffer_and_a_second_epoch_reuses_free_ones(zctx, ipc_dir):
    _server, client, close = start(zctx, ipc_dir, sdk.from_lists(train=images(60, (128, 128, 3))))
    try:
        kept = [s["data"] for s in client.train][::20]  # one row of some batches stays referenced
        again = [int(s["data"][7, 7, 2]) for s in client.train]
        assert again == list(range(60))
        assert [int(k[0, 0, 0]) for k in kept] == [0, 20, 40]
    finally:
        close()


# ------------------------------------------------------------------ a hostile upstream


def ring_ref(dtype, shape, offset):
    return msgpack.ExtType(EXT_ARRAY_RING, msgpack.packb([dtype, shape, offset]))


def lie_frames(kind: str, msg: dict) -> list:
    """The frames of a batch message `msg` with one lie in its stacked part."""
    n = len(msg["samples"])
    holes = [{"data": None, "label": s["label"]} for s in msg["samples"]]
    rows = np.zeros((n, 8), np.uint8)
    body = {"op": "batch", "split": msg["split"], "gen": msg["gen"]}
    if kind == "not-a-map":
        body.update(samples=holes, stacked=[rows])
    elif kind == "not-an-array":
        body.update(samples=holes, stacked={"data": 7})
    elif kind == "zero-dimensional":
        body.update(samples=holes, stacked={"data": np.array(5, np.int64)})
    elif kind == "too-few-rows":
        body.update(samples=holes, stacked={"data": rows[:-1]})
    elif kind == "too-many-rows":
        body.update(samples=holes, stacked={"data": np.zeros((n + 1, 8), np.uint8)})
    elif kind == "no-place":
        body.update(samples=[{"label": 0}] + holes[1:], stacked={"data": rows})
    elif kind == "place-taken":
        body.update(samples=[{"data": 3, "label": 0}] + holes[1:], stacked={"data": rows})
    elif kind == "sample-not-a-map":
        body.update(samples=[[None]] + holes[1:], stacked={"data": rows})
    elif kind == "key-not-a-string":
        body.update(samples=[{1: None} for _ in holes], stacked={1: rows})
    elif kind == "no-samples":
        body.update(stacked={"data": rows})
    elif kind == "ring-out-of-range":
        body.update(samples=holes, stacked={"data": ring_ref("|u1", [n, 1 << 20], shmring.DEFAULT_RING - (1 << 20))})
    elif kind == "ring-negative-offset":
        body.update(samples=holes, stacked={"data": ring_ref("|u1", [n, 64], -64)})
    elif kind == "shape-overflows":
        body.update(samples=holes, stacked={"data": ring_ref("<f8", [n, 1 << 62, 1 << 62], 0)})
    elif kind == "shape-negative":
        body.update(samples=holes, stacked={"data": ring_ref("|u1", [n, -1], 0)})
    elif kind == "object-dtype":
        body.update(samples=holes, stacked={"data": ring_ref("O", [n, 1], 0)})
    else:
        raise AssertionError(kind)
    return pack(body)


LIES = ["not-a-map", "not-an-array", "zero-dimensional", "too-few-rows", "too-many-rows", "no-place", "place-taken",
        "sample-not-a-map", "key-not-a-string", "no-samples", "ring-out-of-range", "ring-negative-offset",
        "shape-overflows", "shape-negative", "object-dtype"]


@pytest.mark.parametrize("kind", LIES)
def test_a_lying_stacked_batch_is_an_upstream_error(zctx, ipc_dir, kind):
    class Liar(boundary.PoolServer):
        def _pack(self, msg, split):
            if msg.get("op") == "batch":
                return lie_frames(kind, msg)
            return super()._pack(msg, split)

    pool = sdk.from_lists(train=[{"data": np.zeros(8, np.uint8), "label": i} for i in range(6)])
    _server, client, close = start(zctx, ipc_dir, pool, cls=Liar)
    try:
        assert client._ring is not None
        with pytest.raises(boundary.UpstreamError, match="malformed"):
            client.train.next_batch(0)
    finally:
        close()
