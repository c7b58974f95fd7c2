"""Hostile values never crash the runner, and `predict` and `serve` always answer JSON.

Nesting a thousand levels deep (in a stage's meta or results, in a model's
meta.json or pipeline.json, in a pipeline file) used to end in "internal
error ... RecursionError"; NaN in a prediction made `predict` print text no
JSON parser reads and `serve` answer 500 with a traceback in its log; bytes
in results crashed `predict`. Each is now refused with one paragraph naming
the stage or the file. The handling is the runner's own, after the
sandbox: one backend (bwrap) is enough.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx
import pytest
from conftest import run_cli, write_pipeline

from .attack import assert_contained_failure, limit_args, run_attack
from .conftest import require_backend

pytestmark = pytest.mark.hostile
# These runs must succeed (or fail for the attack's reason) on a busy shared host: a long stage timeout.
SLOW_HOST = limit_args(timeout="120")

DEPTH = 1000  # past Python's recursion limit once walked, within msgpack's own (1024)

MODEL = r'''
import os

import msgpack

DEEP = b"\x91" * __DEPTH__ + b"\xc0"  # [[[...[null]...]]], written by hand: msgpack's packer stops at 512


def _send_raw_and_finish(runtime, op, body):
    head = b"\x82" + msgpack.packb("op") + msgpack.packb(op) + msgpack.packb("data" if op == "result" else "meta")
    runtime._control.socket.send(head + body)
    runtime._control.send({"op": "done"})
    runtime._control.request({"op": "sync"}, timeout=10)
    os._exit(0)  # before the worker sends an honest answer after ours


def train(runtime, options, ctx):
    with open(os.path.join(runtime.read_model(), "w.txt"), "w") as f:
        f.write("1")
    if options.get("deep_meta"):
        runtime._control.socket.send(b"\x82" + msgpack.packb("op") + msgpack.packb("meta")
                                     + msgpack.packb("meta") + b"\x81" + msgpack.packb("k") + DEEP)


def predict(runtime, options, ctx):
    out = []
    for s in runtime.dataset.predicted:
        d = s["data"]
        if d == "nan":
            out.append({"score": float("nan")})
        elif d == "inf":
            out.append({"score": float("-inf")})
        elif d == "bytes":
            _send_raw_and_finish(runtime, "result", b"\x91" + msgpack.packb(b"\x00\x01", use_bin_type=True))
        elif d == "deep":
            _send_raw_and_finish(runtime, "result", b"\x91" + DEEP)
        else:
            out.append({"echo": d})
    return out
'''.replace("__DEPTH__", str(DEPTH))


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A model (dir) whose predict() answers hostile values on request."""
    require_backend("bwrap")
    root = tmp_path_factory.mktemp("values")
    pipeline = write_pipeline(root / "p", dataflow=[], model=MODEL)  # inputs reach predict() as sent
    proc = run_cli("run", str(pipeline), "-o", str(root / "ws"), *limit_args(timeout="120"), timeout=300)
    assert proc.returncode == 0, proc.stderr
    return root / "ws" / "model"


def _predict(model: Path, value: str):
    return run_cli("predict", str(model), "-s", value, *limit_args(timeout="120"), timeout=300)


def _one_paragraph_error(proc, *words: str) -> str:
    assert proc.returncode == 1, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert errors, proc.stderr
    assert "Traceback" not in proc.stderr and "internal error" not in proc.stderr, proc.stderr
    for word in words:
        assert word in errors[-1], proc.stderr
    return errors[-1]


def _stdout_is_json_or_empty(proc) -> None:
    if proc.stdout.strip():
        json.loads(proc.stdout, parse_constant=lambda name: pytest.fail(f"predict printed {name}"))


def test_predict_never_prints_nan(trained):
    proc = _predict(trained, "nan")
    _stdout_is_json_or_empty(proc)
    _one_paragraph_error(proc, "stage 'model'", "data[0].score", "nan")


def test_predict_never_prints_infinity(trained):
    proc = _predict(trained, "inf")
    _stdout_is_json_or_empty(proc)
    _one_paragraph_error(proc, "stage 'model'", "data[0].score")


def test_bytes_in_results_are_refused(trained):
    proc = _predict(trained, "bytes")
    _stdout_is_json_or_empty(proc)
    _one_paragraph_error(proc, "stage 'model'", "bytes")


def test_deeply_nested_results_are_refused(trained):
    proc = _predict(trained, "deep")
    _stdout_is_json_or_empty(proc)
    _one_paragraph_error(proc, "stage 'model'", "nested deeper")


def test_an_honest_prediction_still_prints(trained):
    proc = _predict(trained, "hello")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"success": True, "data": [{"echo": "hello"}]}


def test_a_deep_meta_from_a_stage_is_refused(tmp_path):
    require_backend("bwrap")
    attack = run_attack(tmp_path, "bwrap", model=MODEL, query={"model": "?deep_meta=1"}, limits=SLOW_HOST)
    assert_contained_failure(attack, "model", "nested deeper")


def test_a_deeply_nested_pipeline_file_is_refused(tmp_path):
    pipeline = write_pipeline(tmp_path / "p")
    text = pipeline.read_text()
    deep = "[" * 100_000 + "]" * 100_000
    pipeline.write_text(text[:-1] + f', "deep": {deep}}}')
    proc = run_cli("run", str(pipeline), "-o", str(tmp_path / "ws"), timeout=120)
    _one_paragraph_error(proc, str(pipeline), "nested deeper")


@pytest.mark.parametrize("name", ["meta.json", "pipeline.json"])
def test_a_deeply_nested_file_in_a_model_is_refused(trained, tmp_path, name):
    model = tmp_path / "model"
    shutil.copytree(trained, model)
    (model / name).write_text("[" * 100_000 + "]" * 100_000)
    proc = _predict(model, "hello")
    _stdout_is_json_or_empty(proc)
    _one_paragraph_error(proc, name)


def test_serve_answers_json_for_nan_and_logs_no_traceback(trained, tmp_path):
    from test_serve import serving

    with serving(trained, "bwrap", *limit_args(timeout="120"), tmp=tmp_path) as server:
        response = httpx.post(f"{server.url}/predict", json={"inputs": ["nan"]}, timeout=60)
        assert 400 <= response.status_code < 600, response.text
        body = response.json()  # JSON, whatever happened
        assert body["success"] is False and "data[0].score" in body["message"], body
        again = httpx.post(f"{server.url}/predict", json={"inputs": ["ok"]}, timeout=60)
        assert again.status_code == 200 and again.json()["data"] == [{"echo": "ok"}], again.text
    assert "Traceback" not in server.log.read_text()


def test_predict_output_holds_no_raw_terminal_controls(trained):
    """What predict() returns is printed as JSON with every control character escaped (inert)."""
    from .test_terminal_escapes import PAYLOAD, assert_inert

    proc = _predict(trained, PAYLOAD)
    assert proc.returncode == 0, proc.stderr
    assert_inert(proc.stdout)
    assert json.loads(proc.stdout)["data"] == [{"echo": PAYLOAD}]  # escaped, not altered
