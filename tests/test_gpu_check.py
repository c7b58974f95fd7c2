"""bench/gpu_check.sh on a machine without an NVIDIA GPU: it refuses at once and says why.

(Its GPU path needs a GPU; bench/RESULTS.md holds its output where one was used.)
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import REPO

SCRIPT = REPO / "bench" / "gpu_check.sh"


def _run(path: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=60, check=False,
                          env={**os.environ, "PATH": path})


@pytest.fixture
def no_gpu_here() -> None:
    if shutil.which("nvidia-smi") or list(Path("/dev").glob("nvidia[0-9]*")):
        pytest.skip("this machine has an NVIDIA driver or GPU: run bench/gpu_check.sh itself")


def test_without_a_driver_it_refuses_before_running_anything(no_gpu_here):
    proc = _run(os.environ["PATH"])
    assert proc.returncode == 2
    assert "no NVIDIA GPU here: nvidia-smi is not installed" in proc.stderr and "nothing was run" in proc.stderr
    assert proc.stdout == ""


def test_a_driver_without_a_device_node_is_refused_too(no_gpu_here, tmp_path):
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\necho 'GPU 0: Fake (UUID: GPU-0)'\n")
    fake.chmod(0o755)
    proc = _run(f"{tmp_path}:{os.environ['PATH']}")
    assert proc.returncode == 2
    assert "no NVIDIA GPU here: no /dev/nvidia0 device node" in proc.stderr
