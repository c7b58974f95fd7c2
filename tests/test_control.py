"""The runner's control server (runner/control.py): per-op validation, and a
real ControlServer driven by raw DEALER sockets playing well-behaved and
hostile stages."""
from __future__ import annotations

import queue
import shutil
import struct
import tempfile
import threading
import time

import pytest
import zmq
from waiting import holds_for, wait_until

from pipcook_sandbox.runner.control import (MAX_PENDING_EVENTS, MAX_VIOLATIONS_LOGGED, PROGRESS_TEXT_MAX, ControlServer, Event,
                            json_shown, shown, validate)
from pipcook_sandbox.sandbox.protocol import CONTROL_CAPS, ProtocolError, pack, unpack

pytestmark = pytest.mark.timeout(60)

WAIT = 10.0


# ------------------------------------------------------------------ validate


GOOD = [
    {"op": "hello"},
    {"op": "hello", "pid": 12, "anything": [1, 2]},
    {"op": "done"},
    {"op": "serving"},
    {"op": "progress", "value": 0},
    {"op": "progress", "value": 42.5, "extra": {"epoch": 1, "loss": 0.25, "phase": "train", "ok": True, "none": None}},
    {"op": "metrics", "metrics": {"loss": 0.5, "acc": 1}},
    {"op": "metrics", "step": 3, "metrics": {"loss": 0.1}},
    {"op": "download", "id": 1, "url": "https://example.com/data.zip"},
    {"op": "error", "message": "boom"},
    {"op": "error", "message": "boom", "kind": "limit", "traceback": "Traceback ..."},
    {"op": "meta", "meta": {"type": "image", "size": {"train": 1}}},
    {"op": "result", "data": [1, "two", {"three": 3}]},
    {"op": "result", "data": []},
    {"op": "sync", "id": 3},
    {"op": "moved", "samples": 0},
    {"op": "moved", "samples": 12510},
]


@pytest.mark.parametrize("msg", GOOD, ids=lambda m: m["op"])
def test_validate_accepts_good_messages(msg):
    out = validate(msg)
    assert out["op"] == msg["op"]


def test_validate_normalises_progress():
    assert validate({"op": "progress", "value": 150})["value"] == 100.0
    assert validate({"op": "progress", "value": -3})["value"] == 0.0
    out = validate({"op": "progress", "value": 10, "extra": {"k" * 100: 1, 5: "int key", "nested": [1], "d": {"x": 1}}})
    assert out == {"op": "progress", "value": 10.0, "extra": {"k" * 64: 1, "5": "int key"}}
    assert validate({"op": "progress", "value": 1})["extra"] == {}


def test_validate_normalises_metrics_and_errors():
    out = validate({"op": "metrics", "step": None, "metrics": {"loss": float("nan"), "lr": float("inf"), "n": 3}})
    assert out == {"op": "metrics", "step": None, "metrics": {"loss": None, "lr": None, "n": 3.0}}
    out = validate({"op": "error", "message": "m" * 10_000, "kind": "k" * 100, "traceback": "t" * 200_000})
    assert len(out["message"]) == 8000 and out["kind"] == "k" * 32 and len(out["traceback"]) == 100_000
    assert validate({"op": "error", "message": "x"})["kind"] == "script"


BAD = [
    {"op": "moved"},
    {"op": "moved", "samples": -1},
    {"op": "moved", "samples": "12"},
    {"op": "moved", "samples": True},
    {"op": "moved", "samples": 1.5},
    None,
    [],
    "progress",
    {},
    {"op": 1},
    {"op": None},
    {"op": b"progress"},
    {"op": "frobnicate"},
    {"op": "PROGRESS", "value": 1},
    {"op": "progress"},
    {"op": "progress", "value": float("nan")},
    {"op": "progress", "value": float("inf")},
    {"op": "progress", "value": -float("inf")},
    {"op": "progress", "value": "50"},
    {"op": "progress", "value": True},
    {"op": "progress", "value": None},
    {"op": "progress", "value": [50]},
    {"op": "progress", "value": 1, "extra": [1, 2]},
    {"op": "progress", "value": 1, "extra": "text"},
    {"op": "progress", "value": 1, "extra": {f"k{i}": i for i in range(17)}},
    {"op": "metrics"},
    {"op": "metrics", "metrics": {}},
    {"op": "metrics", "metrics": [("loss", 1.0)]},
    {"op": "metrics", "metrics": {f"m{i}": 1.0 for i in range(257)}},
    {"op": "metrics", "metrics": {1: 1.0}},
    {"op": "metrics", "metrics": {"x" * 129: 1.0}},
    {"op": "metrics", "metrics": {"loss": "0.5"}},
    {"op": "metrics", "metrics": {"loss": True}},
    {"op": "metrics", "metrics": {"loss": None}},
    {"op": "metrics", "metrics": {"loss": [1.0]}},
    {"op": "metrics", "step": "3", "metrics": {"loss": 1.0}},
    {"op": "metrics", "step": 1.5, "metrics": {"loss": 1.0}},
    {"op": "metrics", "step": True, "metrics": {"loss": 1.0}},
    {"op": "download", "url": "https://x/y"},
    {"op": "download", "id": "1", "url": "https://x/y"},
    {"op": "download", "id": 1.0, "url": "https://x/y"},
    {"op": "download", "id": 1},
    {"op": "download", "id": 1, "url": b"https://x/y"},
    {"op": "download", "id": 1, "url": "https://x/" + "a" * 8192},
    {"op": "error"},
    {"op": "error", "message": None},
    {"op": "error", "message": ["boom"]},
    {"op": "meta"},
    {"op": "meta", "meta": [1]},
    {"op": "result"},
    {"op": "result", "data": {"a": 1}},
    {"op": "result", "data": "text"},
    {"op": "sync"},
    {"op": "sync", "id": True},
    {"op": "sync", "id": "1"},
]


@pytest.mark.parametrize("msg", BAD, ids=lambda m: repr(m)[:50])
def test_validate_refuses_malformed_messages(msg):
    with pytest.raises(ProtocolError):
        validate(msg)


# ------------------------------------------------------------------ text from a stage, on a terminal


def _unprintable_by_unicode() -> list[str]:
    import unicodedata

    return [chr(c) for c in range(0x110000)
            if unicodedata.category(chr(c)) in ("Cc", "Cf", "Zl", "Zp") and chr(c) not in "\n\t"]


def test_shown_escapes_every_control_and_format_character_unicode_knows():
    hidden = _unprintable_by_unicode()
    assert "\U000e0041" in hidden and "\u202e" in hidden  # tag characters and bidi overrides among them
    text = "".join(hidden)
    out = shown(text, len(text))
    assert not any(ch in out for ch in hidden), [hex(ord(ch)) for ch in hidden if ch in out][:10]
    assert out.isascii() and "\\U000e0041" in out and "\\u202e" in out


def test_shown_keeps_newlines_tabs_and_readable_text():
    assert shown("猫 é\tb\nc 🐈", 100) == "猫 é\tb\nc 🐈"
    assert shown("abcdef", 3) == "abc"


def test_json_shown_is_exact_json_with_every_hidden_character_escaped():
    import json

    hidden = _unprintable_by_unicode()
    value = {"label": "".join(hidden) + "猫 🐈", "lone": "\ud800x"}
    out = json_shown(value, indent=None)
    assert json.loads(out) == value
    assert not any(ch in out for ch in hidden) and "\ud800" not in out
    assert "\\udb40\\udc41" in out  # U+E0041 as the surrogate pair JSON spells it
    assert "猫 🐈" in out  # readable text stays readable


# ------------------------------------------------------------------ a real server


class Downloads:
    def __init__(self):
        self.calls = []

    def __call__(self, stage, url):
        self.calls.append((stage, url))
        if "private" in url:
            raise PermissionError(f"refused: {url} resolves to a private address")
        return f"/sandbox/downloads/{stage}/{url.rsplit('/', 1)[-1]}"


@pytest.fixture
def control():
    d = tempfile.mkdtemp(prefix="pct", dir="/tmp")  # ipc:// paths must stay under 107 characters
    downloads = Downloads()
    server = ControlServer(downloads)
    endpoints = {stage: f"ipc://{d}/{stage}.sock" for stage in ("model", "datasource")}
    for stage, endpoint in endpoints.items():
        server.add_stage(stage, endpoint)
    server.start()
    zctx = zmq.Context()
    sockets = []

    def dealer(stage="model"):
        sock = zctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(endpoints[stage])
        sockets.append(sock)
        return sock

    server.dealer = dealer
    server.endpoints = endpoints
    server.downloads = downloads
    yield server
    alive = server._thread.is_alive()
    server.close()
    for s in sockets:
        s.close()
    zctx.term()
    shutil.rmtree(d, ignore_errors=True)
    assert alive, "the control thread died"
    assert not server._thread.is_alive()


def send(sock, msg):
    frames = pack(msg)
    assert len(frames) == 1
    sock.send(frames[0])


def next_event(server, timeout=WAIT) -> Event:
    return server.events.get(timeout=timeout)


def drain(server) -> list[Event]:
    out = []
    while True:
        try:
            out.append(server.events.get_nowait())
        except queue.Empty:
            return out


def recv(sock, timeout=WAIT):
    assert sock.poll(int(timeout * 1000)), "no reply from the control server"
    return unpack(sock.recv_multipart(), CONTROL_CAPS)


def test_progress_metrics_and_error_events_arrive(control):
    sock = control.dealer()
    send(sock, {"op": "hello"})
    send(sock, {"op": "progress", "value": 42.5, "extra": {"epoch": 2}})
    send(sock, {"op": "metrics", "step": 7, "metrics": {"loss": 0.25, "acc": float("nan")}})
    send(sock, {"op": "error", "message": "model exploded", "kind": "script", "traceback": "tb"})
    send(sock, {"op": "result", "data": [{"label": "cat"}]})
    send(sock, {"op": "done"})
    events = [next_event(control) for _ in range(6)]
    assert all(e.stage == "model" for e in events)
    assert [e.op for e in events] == ["hello", "progress", "metrics", "error", "result", "done"]
    assert events[1].data == {"op": "progress", "value": 42.5, "extra": {"epoch": 2}}
    assert events[2].data == {"op": "metrics", "step": 7, "metrics": {"loss": 0.25, "acc": None}}
    assert events[3].data["message"] == "model exploded" and events[3].data["traceback"] == "tb"
    assert events[4].data["data"] == [{"label": "cat"}]
    assert control.violations == {}


def test_sync_returns_only_after_the_runner_has_read_everything_sent_before(control):
    """A stage's last reports must not die in its socket queue when it exits right after a burst."""
    from pipcook_sandbox.sandbox.context import ControlClient

    taken, stop = [], threading.Event()

    def orchestrator():  # takes events as the real one does, a little slowly
        while not stop.is_set():
            try:
                taken.append(control.events.get(timeout=0.05))
            except queue.Empty:
                continue
            time.sleep(0.0002)

    consumer = threading.Thread(target=orchestrator, daemon=True)
    consumer.start()
    zctx = zmq.Context()
    client = ControlClient(zctx, control.endpoints["model"])
    try:
        for step in range(2000):  # far past the runner's receive queue (RCVHWM) and one loop turn
            client.send({"op": "metrics", "step": step, "metrics": {"loss": step / 2000}})
        client.send({"op": "done"})
        assert client.sync(timeout=WAIT)
        stop.set()
        consumer.join()
        events = taken + drain(control)  # no waiting: sync means they are all there already
        assert [e.data["step"] for e in events if e.op == "metrics"] == list(range(2000))
        assert events[-1].op == "done"
        assert all(e.op != "sync" for e in events)  # answered by the control loop, never an event
    finally:
        stop.set()
        client.close()
        zctx.destroy(linger=0)


def test_a_flood_waits_in_zeromq_not_in_the_runners_memory(control):
    """The orchestrator may be slow to take events: the control thread then
    stops reading, so the stage's messages wait in bounded ZeroMQ queues, none is lost."""
    sock = control.dealer()
    for i in range(300):
        send(sock, {"op": "progress", "value": i % 100, "extra": {"i": i}})
    # The control thread reads until the queue is full, then stops reading; were it unbounded the
    # queue would go on to hold all 300.
    wait_until(lambda: control.events.qsize() >= MAX_PENDING_EVENTS, WAIT, "the control thread to fill its queue")
    holds_for(lambda: control.events.qsize() <= MAX_PENDING_EVENTS, 1.0, "the bound on the event queue")
    got = [next_event(control).data["extra"]["i"] for _ in range(300)]
    assert got == list(range(300))


def test_progress_notes_are_cut_on_arrival():
    msg = validate({"op": "progress", "value": 1, "extra": {"note": "p" * (1 << 20), "n": 3}})
    assert msg["extra"] == {"note": "p" * PROGRESS_TEXT_MAX, "n": 3}


def test_sync_gives_up_when_nobody_answers(tmp_path):
    from pipcook_sandbox.sandbox.context import ControlClient

    zctx = zmq.Context()
    client = ControlClient(zctx, f"ipc://{tmp_path}/nobody.sock")
    try:
        started = time.monotonic()
        assert client.sync(timeout=0.3) is False
        assert time.monotonic() - started < 5
    finally:
        client.close()
        zctx.destroy(linger=0)


def test_events_are_attributed_to_the_stage_whose_socket_they_came_from(control):
    a, b = control.dealer("model"), control.dealer("datasource")
    send(b, {"op": "progress", "value": 1})
    assert next_event(control).stage == "datasource"
    send(a, {"op": "progress", "value": 2})
    e = next_event(control)
    assert e.stage == "model" and e.data["value"] == 2.0


def test_hostile_messages_give_a_single_violation_and_the_server_keeps_working(control):
    evil = control.dealer()
    send(evil, {"op": "hello"})
    assert next_event(control).op == "hello"
    inner = b"\xdd" + struct.pack(">I", 65535) + b"\x90" * 65535
    bomb = b"\xdc" + struct.pack(">H", 31) + inner * 31  # ~2 MB: two million empty lists
    assert len(bomb) <= CONTROL_CAPS.max_frame
    evil.send(b"\xc1\xc1 garbage")
    evil.send_multipart([pack({"op": "done"})[0], b"a second frame"])
    evil.send(bomb)
    evil.send(b"\x91" * 100_000)  # deeply nested
    send(evil, {"op": "frobnicate"})
    send(evil, {"op": "progress", "value": float("nan")})
    wait_until(lambda: len(control.violations.get("model", [])) == MAX_VIOLATIONS_LOGGED, WAIT, "the violations to be recorded")
    # the bomb is refused while decoding, not after building it
    assert any("lists and maps" in why for why in control.violations["model"])
    events = drain(control)
    assert [e.op for e in events] == ["violation"]
    assert events[0].stage == "model" and "undecodable" in events[0].data["message"]

    # an oversized frame: ZeroMQ drops that connection; the server stays up
    huge = control.dealer()
    huge.send(b"\x00" * (CONTROL_CAPS.max_frame + 4096))
    huge.send(b"\x00" * (CONTROL_CAPS.max_frame * 2))

    fresh = control.dealer()
    send(fresh, {"op": "progress", "value": 99})
    e = next_event(control)
    assert (e.stage, e.op, e.data["value"]) == ("model", "progress", 99.0)
    send(fresh, {"op": "download", "id": 5, "url": "https://example.com/ok.bin"})
    assert recv(fresh) == {"op": "download", "id": 5, "ok": True, "path": "/sandbox/downloads/model/ok.bin"}
    assert control._thread.is_alive()
    assert [e.op for e in drain(control)] in (["downloaded"], [])
    assert len(control.violations["model"]) == MAX_VIOLATIONS_LOGGED  # the log is bounded


def test_a_violation_of_one_stage_does_not_affect_another(control):
    control.dealer("datasource").send(b"\xc1")
    e = next_event(control)
    assert (e.stage, e.op) == ("datasource", "violation")
    send(control.dealer("model"), {"op": "done"})
    e = next_event(control)
    assert (e.stage, e.op) == ("model", "done")
    assert "model" not in control.violations


def test_download_requests_are_answered_through_the_downloader(control):
    sock = control.dealer()
    send(sock, {"op": "download", "id": 11, "url": "https://example.com/data/flowers.zip"})
    ok = recv(sock)
    assert ok == {"op": "download", "id": 11, "ok": True, "path": "/sandbox/downloads/model/flowers.zip"}
    send(sock, {"op": "download", "id": 12, "url": "http://private.lan/secret"})
    refused = recv(sock)
    assert refused["op"] == "download" and refused["id"] == 12 and refused["ok"] is False
    assert "private address" in refused["message"] and "path" not in refused
    assert control.downloads.calls == [("model", "https://example.com/data/flowers.zip"), ("model", "http://private.lan/secret")]
    events = [next_event(control), next_event(control)]
    assert [(e.op, e.data["ok"]) for e in events] == [("downloaded", True), ("downloaded", False)]


def test_concurrent_downloads_are_matched_by_id(control):
    sock = control.dealer()
    for i in range(20):
        url = f"http://private.lan/{i}" if i % 3 == 0 else f"https://example.com/f{i}"
        send(sock, {"op": "download", "id": 100 + i, "url": url})
    replies = {r["id"]: r for r in (recv(sock) for _ in range(20))}
    assert sorted(replies) == list(range(100, 120))
    for i in range(20):
        r = replies[100 + i]
        assert r["ok"] is (i % 3 != 0)
        if r["ok"]:
            assert r["path"] == f"/sandbox/downloads/model/f{i}"


def test_replies_go_only_to_the_peer_that_asked(control):
    asker, other = control.dealer(), control.dealer()
    send(other, {"op": "hello"})
    assert next_event(control).op == "hello"
    send(asker, {"op": "download", "id": 1, "url": "https://example.com/x"})
    assert recv(asker)["id"] == 1
    assert not other.poll(100)


def test_stop_reaches_every_peer_of_the_stage(control):
    a, b = control.dealer(), control.dealer()
    send(a, {"op": "hello"})
    send(b, {"op": "hello"})
    next_event(control), next_event(control)
    control.send_stop("model")
    assert recv(a) == {"op": "stop"} and recv(b) == {"op": "stop"}


def test_hostile_download_request_fields_are_a_violation_not_a_call(control):
    sock = control.dealer()
    send(sock, {"op": "download", "id": "1", "url": "https://example.com/x"})
    e = next_event(control)
    assert e.op == "violation" and control.downloads.calls == []
    assert not sock.poll(100)


def test_a_message_near_the_control_cap_still_decodes():
    msg = {"op": "result", "data": ["x" * (CONTROL_CAPS.max_header - 200)]}
    frames = pack(msg)
    assert len(frames) == 1 and len(frames[0]) <= CONTROL_CAPS.max_frame
    assert validate(unpack(frames, CONTROL_CAPS))["data"] == ["x" * (CONTROL_CAPS.max_header - 200)]


# ------------------------------------------------------------------ the stage side agrees with validate


class RecordingControl:
    def __init__(self):
        self.sent = []

    def send(self, msg):
        self.sent.append(msg)


def test_what_runtime_sends_is_always_accepted_by_the_runner():
    from pipcook_sandbox.sandbox.context import Runtime

    control = RecordingControl()
    runtime = Runtime(control, dataset=None, model_dir=None)
    runtime.PROGRESS_INTERVAL = 0
    runtime.notify_progress(50, epoch=1, **{f"k{i}": i for i in range(30)}, obj=object())
    runtime.notify_progress(1e9)
    runtime.notify_progress(-5)
    runtime.log_metrics(step=3, loss=0.5, acc=float("nan"), **{"m" * 300: 1})
    runtime.log_metrics(**{f"m{i}": i for i in range(256)})
    runtime.log_metrics()  # nothing to record: nothing sent (an empty metrics map would be a violation)
    runtime.log_metrics(step=1)
    with pytest.raises(ValueError, match="256"):
        runtime.log_metrics(**{f"m{i}": i for i in range(257)})
    with pytest.raises(ValueError):
        runtime.notify_progress(float("nan"))
    with pytest.raises(ValueError):
        runtime.log_metrics(loss="high")
    assert [m["op"] for m in control.sent] == ["progress"] * 3 + ["metrics"] * 2
    for msg in control.sent:
        assert validate(unpack(pack(msg), CONTROL_CAPS))["op"] == msg["op"]
