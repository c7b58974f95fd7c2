"""A pool streamed across a boundary (sandbox/boundary.py): a PoolServer in a
thread, a RemotePool over ipc:// pulling from it with a credit window, and
raw DEALER sockets playing a hostile or broken downstream stage."""
from __future__ import annotations

import contextlib
import shutil
import tempfile
import threading
from collections.abc import Iterator

import numpy as np
import pytest
import zmq
from waiting import wait_until

from pipcook_sandbox.sandbox import boundary, sdk
from pipcook_sandbox.sandbox.boundary import MAX_CREDIT, PoolServer, RemotePool, SampleError, UpstreamError, serve_until
from pipcook_sandbox.sandbox.protocol import pack, unpack

pytestmark = pytest.mark.timeout(60)

WAIT = 10.0  # seconds: upper bound for anything to arrive; never reached when things work


@pytest.fixture
def ipc_dir():
    # ipc:// paths must stay under 107 characters: pytest's tmp_path can be longer
    d = tempfile.mkdtemp(prefix="pbt", dir="/tmp")
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def zctx():
    ctx = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


def samples(n, width=3, tag="s"):
    return [{"data": np.arange(i, i + width, dtype=np.int32), "label": i % 5, "name": f"{tag}{i}"} for i in range(n)]


def same_samples(got, expected):
    assert len(got) == len(expected)
    for i, (g, e) in enumerate(zip(got, expected)):
        assert g["label"] == e["label"] and g["name"] == e["name"], (i, g, e)
        assert g["data"].dtype == e["data"].dtype and np.array_equal(g["data"], e["data"]), i


class CountingServer(PoolServer):
    """A PoolServer that counts the batches it sends and the credits it gets back."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.lock = threading.RLock()
        self.batches = 0
        self.credits = 0
        self.max_outstanding = 0
        self.max_credit = 0

    def _handle(self, peer, msg):
        with self.lock:
            super()._handle(peer, msg)
            if msg.get("op") == "open":
                self.batches = self.credits = 0
            elif msg.get("op") == "credit":
                self.credits += msg["n"]
            self.max_credit = max([self.max_credit] + [s.credit for s in self.streams.values()])

    def _pack(self, msg, split):
        frames = super()._pack(msg, split)
        self.batches += 1
        self.max_outstanding = max(self.max_outstanding, self.batches - self.credits)
        return frames

    def produce_one(self):
        with self.lock:
            super().produce_one()


class Served:
    """`pool` served by a PoolServer driven by serve_until in a thread."""

    def __init__(self, zctx, ipc_dir, pool, server_cls=PoolServer):
        self.zctx = zctx
        self.endpoint = f"ipc://{ipc_dir}/pool.sock"
        self.server = server_cls(zctx, self.endpoint, pool, where="datasource")
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.clients: list = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        try:
            serve_until(self.server, self.stop.is_set)
        except BaseException as exc:  # the worker would report this as the stage's failure
            self.error = exc

    def client(self, window=4) -> RemotePool:
        pool = RemotePool(self.zctx, self.endpoint, "datasource", window=window, alive=self.thread.is_alive)
        self.clients.append(pool)
        return pool

    def dealer(self) -> zmq.Socket:
        sock = self.zctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(self.endpoint)
        self.clients.append(sock)
        return sock

    def close(self):
        self.stop.set()
        self.thread.join(WAIT)
        for c in self.clients:
            c.close()
        self.server.close()


@pytest.fixture
def serve(zctx, ipc_dir):
    served = []

    def start(pool, server_cls=PoolServer):
        s = Served(zctx, ipc_dir, pool, server_cls)
        served.append(s)
        return s

    yield start
    for s in served:
        s.close()
        assert not s.thread.is_alive()


@pytest.fixture
def small_batches(monkeypatch):
    """~256-byte batches (a few samples each) so that a few hundred samples take many batches."""
    monkeypatch.setattr(boundary, "TARGET_BATCH_BYTES", 256)


def request(sock, msg, timeout=WAIT):
    sock.send_multipart(pack(msg))
    return reply(sock, timeout)


def reply(sock, timeout=WAIT):
    assert sock.poll(int(timeout * 1000)), "no reply"
    return unpack(sock.recv_multipart())


# ------------------------------------------------------------------ reading


def test_all_samples_arrive_in_order_across_many_batches(serve, small_batches):
    data = samples(1500)
    s = serve(sdk.from_lists(train=data), CountingServer)
    remote = s.client()
    got = []
    while True:
        batch = remote.train.next_batch(37)
        if not batch:
            break
        assert len(batch) <= 37
        got.extend(batch)
    same_samples(got, data)
    assert s.server.batches > 50  # really many batches, not one big one
    assert remote.train.next() is None


def test_len_meta_and_sizes(serve):
    pool = sdk.from_lists(train=samples(10), test=samples(3), predicted=[],
                          meta={"type": "image", "categories": ["a", "b"], "dimension": {"x": 2}})
    remote = serve(pool).client()
    assert len(remote.train) == 10 and len(remote.test) == 3 and len(remote.predicted) == 0
    assert remote.valid is None
    assert remote.meta["type"] == "image"
    assert remote.meta["categories"] == ["a", "b"]
    assert remote.meta["dimension"] == {"x": 2}
    assert remote.meta["size"] == {"train": 10, "test": 3, "valid": 0, "predicted": 0}
    assert remote.predicted.next() is None and remote.predicted.next_batch(0) == []


def test_meta_of_a_script_pool_without_size_gets_sizes_from_its_datasets(serve):
    class ScriptPool:  # a pool a script wrote itself, importing nothing of ours
        meta = {"type": "general"}
        train = sdk.ListDataset(samples(4))
        test = valid = predicted = None

    remote = serve(ScriptPool()).client()
    assert remote.meta["size"] == {"train": 4, "test": 0, "valid": 0, "predicted": 0}
    same_samples(list(remote.train), samples(4))


def test_seek_back_and_forward_mid_stream(serve, small_batches):
    data = samples(300)
    remote = serve(sdk.from_lists(train=data)).client(window=2)
    ds = remote.train
    same_samples(ds.next_batch(5), data[:5])
    assert ds.tell() == 5
    ds.seek(200)  # forward, past what was prefetched
    same_samples([ds.next()], [data[200]])
    same_samples(ds.next_batch(3), data[201:204])
    ds.seek(3)  # back
    assert ds.tell() == 3
    same_samples(ds.next_batch(4), data[3:7])
    ds.seek(6)  # back by one, inside the buffer's past
    same_samples([ds.next()], [data[6]])
    ds.seek(-10)
    assert ds.tell() == 0
    same_samples([ds.next()], [data[0]])
    ds.seek(10**9)
    assert ds.tell() == 300 and ds.next() is None
    ds.seek(299)
    same_samples(ds.next_batch(0), data[299:])
    assert ds.next() is None


def test_next_at_end_is_none_and_next_batch_zero_gives_the_rest(serve, small_batches):
    data = samples(120)
    ds = serve(sdk.from_lists(train=data)).client().train
    same_samples([ds.next() for _ in range(10)], data[:10])
    same_samples(ds.next_batch(0), data[10:])
    assert ds.next() is None
    assert ds.next() is None
    assert ds.next_batch(5) == [] and ds.next_batch(0) == [] and ds.next_batch(-1) == []
    ds.seek(100)
    same_samples(ds.next_batch(-3), data[100:])
    # iteration restarts from the start, every time
    same_samples(list(ds), data)
    same_samples(list(ds), data)


def test_shuffle_is_deterministic_and_matches_list_dataset(serve, small_batches):
    data = samples(200)
    remote = serve(sdk.from_lists(train=data)).client()
    local = sdk.ListDataset(data)

    remote.train.shuffle(1234)
    local.shuffle(1234)
    remote_order = [s["name"] for s in remote.train]
    local_order = [s["name"] for s in local]
    assert remote_order == local_order
    assert remote_order != [s["name"] for s in data]
    assert sorted(remote_order) == sorted(s["name"] for s in data)

    remote.train.shuffle(1234)  # same seed, same order
    assert [s["name"] for s in remote.train] == remote_order
    remote.train.shuffle(99)
    assert [s["name"] for s in remote.train] != remote_order


def test_shuffle_mid_stream_behaves_like_a_local_dataset(serve, small_batches):
    data = samples(150)
    remote = serve(sdk.from_lists(train=data)).client(window=3).train
    local = sdk.ListDataset(data)
    for ds in (remote, local):
        ds.next_batch(40)
        ds.shuffle(7)
    same_samples(remote.next_batch(0), local.next_batch(0))


def test_two_splits_read_interleaved(serve, small_batches):
    train, test = samples(400, tag="train"), samples(250, width=5, tag="test")
    remote = serve(sdk.from_lists(train=train, test=test)).client(window=2)
    got_train, got_test = [], []
    while True:
        a = remote.train.next_batch(7)
        b = remote.test.next()
        got_train += a
        got_test += [b] if b is not None else []
        if not a and b is None:
            break
    same_samples(got_train, train)
    same_samples(got_test, test)


def test_big_tensors_cross_one_per_batch(serve):
    data = [{"data": np.full((1024, 1024), i, dtype=np.float32), "label": i} for i in range(12)]  # 4 MiB each
    s = serve(sdk.from_lists(train=data), CountingServer)
    got = s.client(window=2).train.next_batch(0)
    assert [g["label"] for g in got] == list(range(12))
    for g in got:
        assert g["data"].shape == (1024, 1024) and g["data"].dtype == np.float32
        assert float(g["data"][0, 0]) == g["label"] and float(g["data"][-1, -1]) == g["label"]
    assert s.server.batches == 5  # the first batch has 8 samples, then the byte target makes it one each


# ------------------------------------------------------------------ transforms


def test_transform_over_a_remote_pool_is_lazy(serve, small_batches):
    data = samples(100)
    remote = serve(sdk.from_lists(train=data, test=samples(5), meta={"type": "table"})).client()
    calls = []

    def double(sample):
        calls.append(sample["name"])
        return {**sample, "label": sample["label"] * 2}

    pool = remote.transform(double, meta_fn=lambda m: {**m, "categories": [0, 2, 4, 6, 8]})
    assert calls == []
    assert len(pool.train) == 100 and len(pool.test) == 5 and pool.valid is None
    assert pool.meta["categories"] == [0, 2, 4, 6, 8] and pool.meta["type"] == "table"
    assert pool.meta["size"]["train"] == 100
    assert calls == []  # nothing read yet: nothing transformed, whatever was prefetched
    first = pool.train.next_batch(3)
    assert calls == ["s0", "s1", "s2"]
    assert [s["label"] for s in first] == [0, 2, 4]
    rest = pool.train.next_batch(0)
    assert len(calls) == 100 and [s["label"] for s in rest] == [d["label"] * 2 for d in data[3:]]
    assert pool.train.next() is None


def test_transform_served_by_the_upstream_stage(serve, small_batches):
    data = samples(64)
    pool = sdk.from_lists(train=data).transform(lambda s: {**s, "data": s["data"] * 10})
    got = serve(pool).client().train.next_batch(0)
    assert [g["name"] for g in got] == [d["name"] for d in data]
    assert all(np.array_equal(g["data"], d["data"] * 10) for g, d in zip(got, data))


def open_stream(zctx, server, endpoint, split="train", credit=2, gen=1, pos=0):
    dealer = zctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(endpoint)
    dealer.send_multipart(pack({"op": "open", "split": split, "gen": gen, "pos": pos, "credit": credit}))
    assert server.sock.poll(int(WAIT * 1000))
    server.handle_incoming()
    return dealer


def test_upstream_exception_in_a_transform_propagates_on_the_server_side(zctx, ipc_dir):
    def boom(sample):
        if sample["label"] == 3:
            raise ValueError("bad sample 3")
        return sample

    endpoint = f"ipc://{ipc_dir}/up.sock"
    server = PoolServer(zctx, endpoint, sdk.from_lists(train=samples(10)).transform(boom))
    try:
        dealer = open_stream(zctx, server, endpoint)
        assert server.has_work()
        with pytest.raises(ValueError, match="bad sample 3"):
            server.produce_one()
        dealer.close()
    finally:
        server.close()


def test_upstream_failure_reaches_the_downstream_as_upstream_error(serve):
    def boom(sample):
        raise RuntimeError("dataflow crashed")

    s = serve(sdk.from_lists(train=samples(5)).transform(boom))
    remote = s.client()
    with pytest.raises(UpstreamError, match="datasource"):
        remote.train.next()
    assert isinstance(s.error, RuntimeError)


def test_unsupported_sample_type_is_a_sample_error_naming_split_and_type(zctx, ipc_dir):
    endpoint = f"ipc://{ipc_dir}/up.sock"
    bad = samples(3) + [{"data": {1, 2, 3}, "label": 0}]
    server = PoolServer(zctx, endpoint, sdk.from_lists(train=samples(2), test=bad))
    try:
        dealer = open_stream(zctx, server, endpoint, split="test", credit=4)
        with pytest.raises(SampleError) as info:
            server.produce_one()
        message = str(info.value)
        assert "'test' split" in message and "set" in message and "['data']" in message
        dealer.close()
    finally:
        server.close()


def test_unsupported_value_in_meta_is_a_sample_error(serve):
    s = serve(sdk.from_lists(train=samples(2), meta={"type": "image", "bad": object()}))
    with pytest.raises(UpstreamError):
        s.client()
    assert isinstance(s.error, SampleError) and "meta" in str(s.error)


# ------------------------------------------------------------------ flow control


def test_credit_window_is_exact_with_a_raw_client(zctx, ipc_dir, small_batches):
    endpoint = f"ipc://{ipc_dir}/up.sock"
    server = PoolServer(zctx, endpoint, sdk.from_lists(train=samples(500)))
    try:
        dealer = open_stream(zctx, server, endpoint, credit=3)
        sent = 0
        while server.has_work():
            server.produce_one()
            sent += 1
        assert sent == 3 and server.streams["train"].credit == 0
        received = [reply(dealer) for _ in range(3)]
        assert [m["op"] for m in received] == ["batch"] * 3 and all(m["gen"] == 1 for m in received)

        def grant(n, gen=1):
            dealer.send_multipart(pack({"op": "credit", "split": "train", "gen": gen, "n": n}))
            assert server.sock.poll(int(WAIT * 1000))
            server.handle_incoming()

        grant(2, gen=0)  # a stale generation: ignored
        grant(-5)  # negative: ignored
        assert not server.has_work()
        grant(2)
        assert server.streams["train"].credit == 2
        grant(10**6)  # capped
        assert server.streams["train"].credit == MAX_CREDIT
        dealer.close()
        dealer = open_stream(zctx, server, endpoint, credit=10**9, gen=2)
        assert server.streams["train"].credit == MAX_CREDIT
        dealer.close()
    finally:
        server.close()


def test_slow_consumer_keeps_at_most_window_batches_outstanding(serve, small_batches):
    data = samples(400)
    window = 3
    s = serve(sdk.from_lists(train=data), CountingServer)
    remote = s.client(window=window)
    first = remote.train.next()
    same_samples([first], data[:1])
    server = s.server

    def settled():  # the client returned one credit and the server has spent it
        with server.lock:
            return server.credits == 1 and not server.has_work()

    wait_until(settled, WAIT, "the server to use up its credit", interval=0.002)
    with server.lock:
        assert server.batches == window + 1  # not the whole dataset
        assert server.streams["train"].credit == 0
        total_batches_needed = server.batches
    got = [first]
    while True:  # one sample at a time: the slowest consumer
        sample = remote.train.next()
        if sample is None:
            break
        got.append(sample)
    same_samples(got, data)
    assert server.batches > total_batches_needed * 10
    assert 1 <= server.max_outstanding <= window
    assert server.max_credit <= window


# ------------------------------------------------------------------ hostile requests


def test_malformed_requests_get_an_error_and_the_server_keeps_serving(serve, small_batches):
    data = samples(80)
    s = serve(sdk.from_lists(train=data, test=samples(4)))
    dealer = s.dealer()
    bad = [
        [b"\xc1"],
        [b""],
        [b"\x91" * 5000 + b"\x90"],
        pack([1, 2, 3]),
        pack("meta"),
        pack({"no": "op"}),
        pack({"op": 5}),
        pack({"op": "frobnicate"}),
        pack({"op": "meta", "pad": list(range(100))}),  # over the request's item cap
        pack({"op": "open", "split": "bogus", "gen": 1, "pos": 0, "credit": 2}),
        pack({"op": "open", "split": "valid", "gen": 1, "pos": 0, "credit": 2}),  # a split the pool lacks
        pack({"op": "open", "split": ["train"], "gen": 1, "pos": 0, "credit": 2}),
        pack({"op": "open", "split": "train", "gen": "1", "pos": 0, "credit": 2}),
        pack({"op": "open", "split": "train", "gen": 1, "pos": 0.5, "credit": 2}),
        pack({"op": "credit", "split": "train", "gen": 1}),
        pack({"op": "shuffle", "split": "train", "req": 1, "seed": "x"}),
        pack({"op": "shuffle", "split": "train", "req": None}),
        pack({"op": np.zeros(3)}),
    ]
    for frames in bad:
        dealer.send_multipart(frames)
        answer = reply(dealer)
        assert answer["op"] == "error" and "bad request" in answer["message"], (frames[0][:20], answer)
    # well-formed but harmless requests are accepted silently; the same peer still gets answers
    dealer.send_multipart(pack({"op": "credit", "split": "train", "gen": 99, "n": 5}))
    dealer.send_multipart([pack({"op": "meta"})[0], b"an extra frame"])  # not a well-formed request: ignored
    assert request(dealer, {"op": "meta"})["op"] == "meta"
    assert request(dealer, {"op": "shuffle", "split": "predicted", "req": 7}) == {"op": "ack", "req": 7}
    assert s.thread.is_alive() and s.error is None
    # and a well-behaved client reads everything
    remote = s.client()
    same_samples(remote.train.next_batch(0), data)


def test_oversized_request_drops_only_that_peer(serve):
    data = samples(20)
    s = serve(sdk.from_lists(train=data))
    huge = s.dealer()
    huge.send_multipart([b"\x00" * (boundary.REQUEST_CAPS.max_frame + 1024)])  # ZeroMQ drops this connection
    huge.send_multipart([b"\x00" * (1 << 20)])
    remote = s.client()
    same_samples(remote.train.next_batch(0), data)
    assert s.thread.is_alive() and s.error is None


@contextlib.contextmanager
def fake_upstream(zctx, ipc_dir, replies: list[list[bytes]]) -> Iterator[tuple[str, threading.Thread]]:
    """A ROUTER at an ipc endpoint that answers every request with `replies` (each a multipart message),
    for the downstream RemotePool to meet; yields the endpoint and the thread answering."""
    endpoint = f"ipc://{ipc_dir}/fake.sock"
    router = zctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.bind(endpoint)
    stop = threading.Event()

    def answer():
        while not stop.is_set():
            if router.poll(50):
                peer, _ = router.recv_multipart()
                for reply in replies:
                    router.send_multipart([peer, *reply])

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    try:
        yield endpoint, thread
    finally:
        stop.set()
        thread.join(WAIT)
        router.close()


def test_a_hostile_upstream_reply_is_an_upstream_error(zctx, ipc_dir):
    with fake_upstream(zctx, ipc_dir, [[b"\xc1garbage"]]) as (endpoint, thread):
        with pytest.raises(UpstreamError, match="malformed"):
            RemotePool(zctx, endpoint, "evil", alive=thread.is_alive)


@pytest.mark.parametrize("split", [["train"], {"a": 1}], ids=["list", "map"])
@pytest.mark.parametrize("op", ["end", "batch"])
def test_an_upstream_message_naming_an_unhashable_split_is_ignored(zctx, ipc_dir, op, split):
    # A split must be a string; a list or a map (unhashable) used to reach a dict lookup and
    # crash the downstream worker with a TypeError instead of naming no dataset.
    replies = [pack({"op": op, "split": split, "gen": 0, "samples": []}),
               pack({"op": "meta", "meta": {"k": 1}, "sizes": {"train": 2}})]
    with fake_upstream(zctx, ipc_dir, replies) as (endpoint, thread):
        remote = RemotePool(zctx, endpoint, "odd", alive=thread.is_alive)
        assert remote.meta == {"k": 1} and len(remote.train) == 2 and remote.test is None
        remote.close()
