"""The code that parses a model's files for an artifact processor runs in the run's sandbox.

Processors are trusted, model files are not (a model script wrote them), so
`runner.artifacts.confined` runs the conversion like a stage. Each test is one
thing the conversion code tries, as hostile model content would make it do.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import require_bwrap, require_docker
from pipcook_sandbox.runner.artifacts import ArtifactError, confined
from pipcook_sandbox.runner.backends.base import Limits

PROBE = r'''
import json, os, socket, sys
model, out = sys.argv[1:3]
seen = {"uid": os.getuid(), "model": sorted(os.listdir(model)), "home": os.path.isdir("/root"),
        "secret": os.path.exists(sys.argv[3])}
try:
    socket.create_connection(("127.0.0.1", 22), timeout=2)
    seen["tcp"] = "connected"
except OSError as exc:
    seen["tcp"] = type(exc).__name__
try:
    open(sys.argv[3] + ".planted", "w").write("x")
    seen["wrote_host"] = True
except OSError:
    seen["wrote_host"] = False
os.symlink("/etc/passwd", os.path.join(out, "link.json"))
with open(os.path.join(out, "seen.json"), "w") as f:
    json.dump(seen, f)
'''


def job(tmp_path: Path, code: str, args: list[str], timeout: float = 120) -> confined.Job:
    model = tmp_path / "copy"
    model.mkdir(exist_ok=True)
    (model / "model.keras").write_bytes(b"not really a model")
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    return confined.Job("probe", code, args, model, [], out, timeout)


@pytest.fixture
def secret(tmp_path: Path) -> Path:
    path = tmp_path / "host-secret.txt"
    path.write_text("s3cret")
    return path


@pytest.mark.parametrize("isolation", ["bwrap", pytest.param("docker", marks=pytest.mark.docker)])
def test_conversion_sees_only_its_model_copy_and_no_network(tmp_path, secret, isolation):
    require_bwrap() if isolation == "bwrap" else require_docker()
    j = job(tmp_path, PROBE, ["{model}", "{out}", str(secret)])
    confined.run(j, isolation, Limits(timeout=60))
    seen = json.loads((j.out / "seen.json").read_text())
    assert seen["model"] == ["model.keras"]
    assert seen["uid"] != 0 or not seen["home"]
    assert seen["secret"] is False and seen["wrote_host"] is False
    assert seen["tcp"] != "connected"
    assert not Path(str(secret) + ".planted").exists()
    assert not (j.out / "link.json").exists() and not (j.out / "link.json").is_symlink()  # links never copied out


def test_a_conversion_that_never_ends_is_stopped_and_named(tmp_path):
    require_bwrap()
    j = job(tmp_path, "while True:\n    pass\n", [], timeout=3)
    with pytest.raises(ArtifactError) as info:
        confined.run(j, "bwrap", Limits(timeout=3))
    assert "'probe'" in str(info.value) and "longer than 3 s" in str(info.value)
    assert not [d for d in Path("/tmp").glob("pcsb-*") if (d / "run.json").is_file()
                and json.loads((d / "run.json").read_text()).get("runner_pid") == __import__("os").getpid()]


def test_a_failing_conversion_names_processor_and_cause(tmp_path):
    require_bwrap()
    j = job(tmp_path, "raise ValueError('bad layer config')\n", [])
    with pytest.raises(ArtifactError) as info:
        confined.run(j, "bwrap", Limits(timeout=60))
    assert "artifact processor 'probe': the conversion failed: ValueError: bad layer config" in str(info.value)


def test_a_conversion_that_fills_memory_is_named(tmp_path):
    require_bwrap()
    j = job(tmp_path, "x = bytearray(2 << 30)\nx[::4096] = b'x' * len(x[::4096])\n", [])
    with pytest.raises(ArtifactError) as info:
        confined.run(j, "bwrap", Limits(timeout=60, memory=256 << 20, tmp=64 << 20))
    message = str(info.value)
    assert "'probe'" in message and ("memory" in message or "MemoryError" in message)
