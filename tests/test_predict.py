"""`pipcook-sandbox predict`: the real CLI on models trained once per module.

Parametrised over isolation: `none` runs everywhere; `bwrap` runs where the
bubblewrap backend is available (and must be, in CI).
"""
from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import pytest
from conftest import TINY, require_bwrap, run_cli, write_pipeline
from httpserver import http_server  # noqa: F401  (fixture)

pytestmark = pytest.mark.e2e

ISOLATIONS = ["none", "bwrap"]

# Echoes what predict() received, so the tests see exactly the samples of -s / -u.
ECHO_MODEL = '''
import hashlib, os

def train(runtime, options, ctx):
    with open(os.path.join(runtime.read_model(), "trained.txt"), "w") as f:
        f.write("yes")

def predict(runtime, options, ctx):
    try:
        open(os.path.join(runtime.read_model(), "written-by-predict"), "w").close()
        model_writable = True
    except OSError:
        model_writable = False
    out = []
    for s in runtime.dataset.predicted:
        data = s["data"]
        raw = data if isinstance(data, bytes) else data.encode()
        out.append({"type": type(data).__name__, "sha256": hashlib.sha256(raw).hexdigest(), "name": s.get("name"),
                    "label": s["label"], "task": ctx.task_type, "meta_ok": runtime.dataset.meta.get("note") == "kept",
                    "model_writable": model_writable})
    return out
'''

ECHO_DATASOURCE = '''
from sandbox import sdk

def datasource(options, ctx):
    return sdk.from_lists(train=[{"data": "x", "label": 0}], meta={"type": "general", "note": "kept"})
'''

NO_PREDICT_MODEL = '''
import os

def train(runtime, options, ctx):
    open(os.path.join(runtime.read_model(), "w.txt"), "w").write("1")
'''


def _isolation(request: pytest.FixtureRequest) -> str:
    if request.param == "bwrap":
        require_bwrap()
    return request.param


@pytest.fixture(scope="module", params=ISOLATIONS)
def tiny(request, tmp_path_factory) -> tuple[str, Path]:
    """The tiny pipeline, trained once per isolation: (isolation, workspace)."""
    isolation = _isolation(request)
    ws = tmp_path_factory.mktemp(f"tiny-{isolation}") / "ws"
    proc = run_cli("run", str(TINY / "pipeline.json"), "-o", str(ws), "--isolation", isolation)
    assert proc.returncode == 0, proc.stderr
    assert (ws / "model.zip").is_file()
    return isolation, ws


@pytest.fixture(scope="module", params=ISOLATIONS)
def echo(request, tmp_path_factory) -> tuple[str, Path]:
    isolation = _isolation(request)
    root = tmp_path_factory.mktemp(f"echo-{isolation}")
    pipeline = write_pipeline(root / "p", datasource=ECHO_DATASOURCE, dataflow=[], model=ECHO_MODEL)
    proc = run_cli("run", str(pipeline), "-o", str(root / "ws"), "--isolation", isolation)
    assert proc.returncode == 0, proc.stderr
    return isolation, root / "ws"


def _predict(isolation: str, model: str | Path, *args: str) -> dict:
    proc = run_cli("predict", str(model), "--isolation", isolation, *args, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    return json.loads(proc.stdout)


def _one_paragraph(stderr: str) -> str:
    """The error line of a failed command: exactly one, no traceback."""
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr
    return errors[0]


def _leftovers() -> set[str]:
    """predict's own temporary dirs (other pcsb-* dirs may belong to runs beside this test)."""
    return {p.name for pattern in ("pcsb-model-*", "pcsb-predict-*") for p in Path("/tmp").glob(pattern)}


def test_predict_from_workspace(tiny):
    isolation, ws = tiny
    before = _leftovers()
    out = _predict(isolation, ws, "-s", "1,2,3,4", "-s", "-1,-2,-3,-4")
    assert out["success"] is True
    assert [r["label"] for r in out["data"]] == ["pos", "neg"]
    assert out["data"][0]["score"] > 0 > out["data"][1]["score"]
    assert _leftovers() <= before  # temp model copies, workspaces and sockets all removed


def test_predict_from_model_dir_and_zip_agree(tiny):
    isolation, ws = tiny
    from_ws = _predict(isolation, ws, "-s", "0.5,0.1,-0.2,0.3")
    from_dir = _predict(isolation, ws / "model", "-s", "0.5,0.1,-0.2,0.3")
    from_zip = _predict(isolation, ws / "model.zip", "-s", "0.5,0.1,-0.2,0.3")
    assert from_ws == from_dir == from_zip
    assert from_zip["data"][0]["label"] in ("pos", "neg")


def test_predict_from_url(tiny, http_server):  # noqa: F811
    isolation, ws = tiny
    http_server.routes["/models/tiny.zip"] = (200, {"Content-Type": "application/zip"}, (ws / "model.zip").read_bytes())
    url = http_server.url("/models/tiny.zip")
    out = _predict(isolation, url, "--allow-private", "127.0.0.1", "-s", "1,1,1,1")
    assert out["data"][0]["label"] == "pos"
    # without the operator's consent, a loopback address is refused before anything runs
    proc = run_cli("predict", url, "--isolation", isolation, "-s", "1,1,1,1")
    assert proc.returncode == 1
    assert "127.0.0.1" in _one_paragraph(proc.stderr)
    assert http_server.hits["/models/tiny.zip"] == 1


def test_inputs_reach_predict_as_the_contract_says(echo, tmp_path):
    isolation, ws = echo
    blob = bytes(range(256)) * 3
    (tmp_path / "photo.bin").write_bytes(blob)
    (tmp_path / "note.txt").write_text("hello")
    out = _predict(isolation, ws, "-s", "first", "-u", str(tmp_path / "photo.bin"), "-s", "second",
                   "-u", str(tmp_path / "note.txt"))
    import hashlib

    data = out["data"]
    # strings first (in order), then files (in order); one sample each
    assert [d["type"] for d in data] == ["str", "str", "bytes", "bytes"]
    assert [d["name"] for d in data] == [None, None, "photo.bin", "note.txt"]
    assert data[0]["sha256"] == hashlib.sha256(b"first").hexdigest()
    assert data[1]["sha256"] == hashlib.sha256(b"second").hexdigest()
    assert data[2]["sha256"] == hashlib.sha256(blob).hexdigest()
    assert all(d["label"] is None and d["task"] == "predict" and d["meta_ok"] for d in data)
    if isolation != "none":
        assert not any(d["model_writable"] for d in data)  # the model dir is mounted read-only
        assert not (ws / "model" / "written-by-predict").exists()


def test_model_without_predict_is_one_paragraph(tmp_path):
    pipeline = write_pipeline(tmp_path / "p", model=NO_PREDICT_MODEL)
    assert run_cli("run", str(pipeline), "-o", str(tmp_path / "ws"), "--isolation", "none").returncode == 0
    proc = run_cli("predict", str(tmp_path / "ws"), "--isolation", "none", "-s", "1,2,3,4")
    assert proc.returncode == 1
    line = _one_paragraph(proc.stderr)
    assert "model.py has no function 'predict'" in line and "stage 'model'" in line
    assert proc.stdout == ""


def test_no_inputs_is_a_usage_error(tiny):
    isolation, ws = tiny
    proc = run_cli("predict", str(ws), "--isolation", isolation)
    assert proc.returncode == 2
    assert "no inputs" in proc.stderr and "-s STRING or -u FILE" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_missing_input_file_is_a_usage_error(tiny, tmp_path):
    isolation, ws = tiny
    proc = run_cli("predict", str(ws), "--isolation", isolation, "-u", str(tmp_path / "nope.png"))
    assert proc.returncode == 2
    assert "input file not found" in proc.stderr


def test_a_tampered_script_is_refused(tiny, tmp_path):
    """model/ is rewritten with pins at training: an edited script no longer matches and nothing runs."""
    isolation, ws = tiny
    model = tmp_path / "model"
    shutil.copytree(ws / "model", model)
    script = model / "scripts" / "model.py"
    script.write_text(script.read_text() + "\nimport os  # tampered\n")
    proc = run_cli("predict", str(model), "--isolation", isolation, "-s", "1,2,3,4")
    assert proc.returncode == 1
    assert "does not match its pin" in _one_paragraph(proc.stderr)


def test_a_model_may_not_name_host_files_or_remote_scripts(tiny, tmp_path):
    isolation, ws = tiny
    for bad, why in (("/etc/hostname#sha256=" + "0" * 64, "points outside the model"),
                     ("../../outside.py#sha256=" + "0" * 64, "points outside the model"),
                     ("https://example.com/model.py", "must be files inside the model"),
                     ("scripts/model.py", "has no #sha256= pin")):
        model = tmp_path / f"m{abs(hash(bad))}"
        shutil.copytree(ws / "model", model)
        doc = json.loads((model / "pipeline.json").read_text())
        doc["model"] = bad
        (model / "pipeline.json").write_text(json.dumps(doc))
        proc = run_cli("predict", str(model), "--isolation", isolation, "-s", "1,2,3,4")
        assert proc.returncode == 1, bad
        assert why in _one_paragraph(proc.stderr), (bad, proc.stderr)


def test_a_hostile_zip_is_refused(tiny, tmp_path):
    isolation, ws = tiny
    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(ws / "model.zip") as src, zipfile.ZipFile(evil, "w") as dst:
        for info in src.infolist():
            dst.writestr(info, src.read(info))
        dst.writestr("../escaped.txt", "gotcha")
    proc = run_cli("predict", str(evil), "--isolation", isolation, "-s", "1,2,3,4")
    assert proc.returncode == 1
    assert "escapes the target directory" in _one_paragraph(proc.stderr)
    assert not (tmp_path.parent / "escaped.txt").exists()

    linked = tmp_path / "link.zip"
    with zipfile.ZipFile(ws / "model.zip") as src, zipfile.ZipFile(linked, "w") as dst:
        for info in src.infolist():
            dst.writestr(info, src.read(info))
        link = zipfile.ZipInfo("weights-link")
        link.external_attr = (0o120777 << 16)  # a symlink entry
        dst.writestr(link, "/etc/shadow")
    proc = run_cli("predict", str(linked), "--isolation", isolation, "-s", "1,2,3,4")
    assert proc.returncode == 1
    assert "is not a regular file" in _one_paragraph(proc.stderr)


def test_a_workspace_whose_run_failed_says_so(tmp_path):
    for sub in ("model", "logs"):
        (tmp_path / sub).mkdir()
    (tmp_path / "metrics.jsonl").touch()
    (tmp_path / "pipeline.json").write_text((TINY / "pipeline.json").read_text())
    proc = run_cli("predict", str(tmp_path), "--isolation", "none", "-s", "1")
    assert proc.returncode == 1
    assert "has no trained model" in _one_paragraph(proc.stderr)


def test_render_escapes_terminal_controls_and_keeps_the_json_exact():
    """predict's stdout carries results a hostile model chose: C0/C1 controls, bidi
    overrides and line separators are JSON-escaped, other text stays readable."""
    from pipcook_sandbox.runner.predict import render

    hostile = ["\x1b]52;c;cHduZWQ=\x07\x1b[2J\r\x9b1m\x85", {"\u202elabel\u2066": "\u2028\u200b\ufeff"}, "猫 é"]
    out = render(hostile)
    assert all(ch == "\n" or ch.isprintable() for ch in out), repr(out)
    assert "\\u202e" in out and "\\u009b" in out and "猫 é" in out
    assert json.loads(out) == {"success": True, "data": hostile}
