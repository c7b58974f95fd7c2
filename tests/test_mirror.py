"""Frameworks from a mirror (`-m URL`) and from a framework URL: verified, unpacked safely, cached."""
from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

import pytest
from conftest import require_bwrap, run_cli, write_pipeline
from httpserver import http_server  # noqa: F401  (fixture)

from pipcook_sandbox.runner import mirror
from pipcook_sandbox.runner.frameworks import python_tag

MODEL_USING_FRAMEWORK = '''
import os
import tinyfw

def train(runtime, options, ctx):
    runtime.log_metrics(answer=tinyfw.ANSWER, initialized=float(os.environ.get("TINYFW_INIT", "0")))
'''


def _fake_framework(root: Path, name: str = "tinyfw", version: str = "1.0") -> Path:
    fw = root / "built"
    (fw / "site" / "tinyfw").mkdir(parents=True)
    (fw / "site" / "tinyfw" / "__init__.py").write_text("ANSWER = 42\n")
    (fw / "initialize.py").write_text("import os\ndef initialize(options):\n    os.environ['TINYFW_INIT'] = '1'\n")
    (fw / "framework.json").write_text(json.dumps({"name": name, "version": version, "python": python_tag()}))
    return fw


def _serve(http_server, mirror_dir: Path) -> None:
    for path in mirror_dir.rglob("*"):
        if path.is_file():
            http_server.routes["/" + path.relative_to(mirror_dir).as_posix()] = (200, {}, path.read_bytes())


def test_pack_writes_archive_and_index(tmp_path):
    archive = mirror.pack(_fake_framework(tmp_path), tmp_path / "mirror", "tinyfw", "1.0", cuda=False)
    assert archive.parent.name == python_tag() and archive.name.startswith("tinyfw@1.0-linux-")
    index = json.loads((archive.parent / "index.json").read_text())
    assert index["archives"][archive.name]["sha256"] == hashlib.sha256(archive.read_bytes()).hexdigest()
    with zipfile.ZipFile(archive) as zf:
        assert {"framework.json", "initialize.py", "site/tinyfw/__init__.py"} <= set(zf.namelist())


def test_run_with_mirror_fetches_once_and_mounts_the_framework(tmp_path, http_server):
    require_bwrap()
    mirror.pack(_fake_framework(tmp_path), tmp_path / "mirror", "tinyfw", "1.0", cuda=False)
    _serve(http_server, tmp_path / "mirror")
    pipeline = write_pipeline(tmp_path / "p", dataflow=[], model=MODEL_USING_FRAMEWORK,
                              extra={"options": {"framework": "tinyfw@1.0"}})
    env = {"PIPCOOK_SANDBOX_CACHE": str(tmp_path / "cache")}
    url = http_server.url("")
    proc = run_cli("run", str(pipeline), "-m", url, "--allow-private", "127.0.0.1", "-o", str(tmp_path / "ws"), env=env)
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((tmp_path / "ws" / "metrics.jsonl").read_text().splitlines()[0])
    assert metrics["answer"] == 42 and metrics["initialized"] == 1.0
    zips = [p for p in http_server.hits if p.endswith(".zip")]
    assert len(zips) == 1 and http_server.hits[zips[0]] == 1
    again = run_cli("run", str(pipeline), "-m", url, "--allow-private", "127.0.0.1", "-o", str(tmp_path / "ws2"), env=env)
    assert again.returncode == 0, again.stderr
    assert http_server.hits[zips[0]] == 1  # cached: no second download


def test_mirror_archive_with_wrong_digest_is_refused(tmp_path, http_server):
    archive = mirror.pack(_fake_framework(tmp_path), tmp_path / "mirror", "tinyfw", "1.0", cuda=False)
    archive.write_bytes(archive.read_bytes() + b"tampered")
    _serve(http_server, tmp_path / "mirror")
    pipeline = write_pipeline(tmp_path / "p", dataflow=[], model=MODEL_USING_FRAMEWORK,
                              extra={"options": {"framework": "tinyfw@1.0"}})
    proc = run_cli("run", str(pipeline), "-m", http_server.url(""), "--allow-private", "127.0.0.1",
                   "-o", str(tmp_path / "ws"), env={"PIPCOOK_SANDBOX_CACHE": str(tmp_path / "cache")})
    assert proc.returncode == 1
    assert "sha256" in proc.stderr and "refused" in proc.stderr
    assert not (tmp_path / "ws" / "logs" / "model.log").exists()


def test_framework_url_with_pin_and_hostile_archive(tmp_path, http_server):
    require_bwrap()
    archive = mirror.pack(_fake_framework(tmp_path), tmp_path / "mirror", "tinyfw", "1.0", cuda=False)
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    http_server.routes["/fw.zip"] = (200, {}, archive.read_bytes())
    env = {"PIPCOOK_SANDBOX_CACHE": str(tmp_path / "cache")}
    pipeline = write_pipeline(tmp_path / "p", dataflow=[], model=MODEL_USING_FRAMEWORK,
                              extra={"options": {"framework": http_server.url(f"/fw.zip#sha256={digest}")}})
    proc = run_cli("run", str(pipeline), "--allow-private", "127.0.0.1", "-o", str(tmp_path / "ws"), env=env)
    assert proc.returncode == 0, proc.stderr
    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as zf:
        zf.writestr("framework.json", "{}")
        zf.writestr("../../escaped.txt", "owned")
    http_server.routes["/evil.zip"] = (200, {}, evil.read_bytes())
    pipeline = write_pipeline(tmp_path / "q", dataflow=[], model=MODEL_USING_FRAMEWORK,
                              extra={"options": {"framework": http_server.url("/evil.zip")}})
    proc = run_cli("run", str(pipeline), "--allow-private", "127.0.0.1", "-o", str(tmp_path / "ws2"), env=env)
    assert proc.returncode == 1 and "framework archive refused" in proc.stderr
    assert not list(tmp_path.rglob("escaped.txt"))
