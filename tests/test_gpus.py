"""--gpu gives the model stage only the GPUs this runner was given (runner/gpus.py).

Fake GPUs are character devices made with mknod (major 195, NVIDIA's): opening
one fails with ENXIO (no driver), which the devices cgroup does not cause, so
they count as allowed; CUDA_VISIBLE_DEVICES then narrows them as Slurm's does.
The devices-cgroup half (EPERM for a GPU of another job) is tested inside a
real Slurm job in tests/test_slurm.py."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import require_bwrap, run_cli, write_pipeline
from pipcook_sandbox.runner import gpus

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="mknod of fake GPU devices needs root")

# The model stage reports which fake GPU nodes it can see, and which it can open.
GPU_MODEL = '''
import errno, json, os

def train(runtime, options, ctx):
    seen = sorted(n for n in os.listdir("/dev") if "fakegpu" in n)
    with open(os.path.join(runtime.read_model(), "gpus.json"), "w") as f:
        json.dump(seen, f)
'''


@pytest.fixture
def fake_gpus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    made = []
    for n in range(3):
        path = tmp_path / f"fakegpu{n}"
        os.mknod(path, 0o666 | 0o020000, os.makedev(195, n))
        made.append(str(path))
    monkeypatch.setenv("PIPCOOK_SANDBOX_GPU_DEVICES", str(tmp_path / "fakegpu*"))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    return made


@needs_root
def test_every_gpu_without_an_allocation(fake_gpus: list[str]) -> None:
    got = gpus.given()
    assert list(got.devices) == fake_gpus
    assert got.all_given


@needs_root
@pytest.mark.parametrize(("visible", "expect"), [("1", [1]), ("2,0", [2, 0]), ("", []), ("0,-1,2", [0]),
                                                  ("NoDevFiles", []), ("7", [])])
def test_cuda_visible_devices_narrows(fake_gpus: list[str], monkeypatch: pytest.MonkeyPatch,
                                      visible: str, expect: list[int]) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    got = gpus.given()
    assert list(got.devices) == [fake_gpus[i] for i in expect]
    assert not got.all_given
    assert "/dev/dri" not in got.binds()


@needs_root
def test_uuids_are_not_guessed(fake_gpus: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-8f2c1a52-0000-0000-0000-000000000000")
    got = gpus.given()
    assert list(got.devices) == fake_gpus
    assert "UUID" in got.why


def test_docker_device_ids_follow_the_minor_numbers() -> None:
    subset = gpus.GpuSet(devices=("/dev/null",), shared=(), all_given=False, why="")
    assert gpus.docker_device_ids(subset) == [str(os.minor(os.stat("/dev/null").st_rdev))]
    assert gpus.docker_device_ids(gpus.GpuSet(devices=(), shared=(), all_given=True, why="")) is None


@needs_root
def test_model_stage_sees_only_the_given_gpu(tmp_path: Path) -> None:
    require_bwrap()
    pipeline = write_pipeline(tmp_path / "p", model=GPU_MODEL)
    # bwrap binds each node at its own path, so the fakes live in /dev, named for this test.
    tag = f"pcsbtest{os.getpid()}"
    devs = [Path(f"/dev/{tag}-fakegpu{n}") for n in range(3)]
    for n, dev in enumerate(devs):
        os.mknod(dev, 0o666 | 0o020000, os.makedev(195, n))
    env = {"PIPCOOK_SANDBOX_GPU_DEVICES": f"/dev/{tag}-fakegpu*", "CUDA_VISIBLE_DEVICES": "1"}
    try:
        done = run_cli("run", str(pipeline), "-o", str(tmp_path / "ws"), "--gpu", env=env, timeout=300)
    finally:
        for dev in devs:
            dev.unlink()
    assert done.returncode == 0, done.stderr
    seen = json.loads((tmp_path / "ws" / "model" / "gpus.json").read_text())
    assert seen == [f"{tag}-fakegpu1"]
    assert f"/dev/{tag}-fakegpu1" in done.stderr  # the log says which GPU the stage got, and why


@needs_root
def test_gpu_refused_when_none_was_given(tmp_path: Path) -> None:
    pipeline = write_pipeline(tmp_path / "p", model=GPU_MODEL)
    dev = Path(f"/dev/pcsbtest{os.getpid()}-fakegpu0")
    os.mknod(dev, 0o666 | 0o020000, os.makedev(195, 0))
    try:
        done = run_cli("run", str(pipeline), "-o", str(tmp_path / "ws"), "--gpu", timeout=120,
                       env={"PIPCOOK_SANDBOX_GPU_DEVICES": str(dev), "CUDA_VISIBLE_DEVICES": ""})
    finally:
        dev.unlink()
    assert done.returncode != 0
    assert "given none of the host's GPUs" in done.stderr
    assert "Traceback" not in done.stderr
