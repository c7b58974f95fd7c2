"""Every backend implements the one interface (runner/backends/base.py) fully.

Registered by name, a subclass of the abstract `Backend`, capabilities as typed
attributes; `StageSpec.writable` honoured by each: what a stage writes under a
writable target lands in the host directory it maps to.
"""
from __future__ import annotations

import textwrap
import time
from pathlib import Path

import pytest

from pipcook_sandbox.runner.backends import BACKENDS, UnknownBackend, get_backend
from pipcook_sandbox.runner.backends.base import Backend, Limits, StageOptions, StageSpec
from pipcook_sandbox.runner.errors import PipcookError

from conftest import require_bwrap, require_docker

SMALL = Limits(memory=256 << 20, cpus=1.0, pids=64, disk=32 << 20, timeout=60, nofile=256, output=1 << 20,
               tmp=8 << 20)


def test_every_registered_backend_is_a_full_backend():
    assert set(BACKENDS) == {"bwrap", "docker", "none"}
    for name in BACKENDS:
        backend = get_backend(name)
        assert isinstance(backend, Backend) and backend.name == name
        assert isinstance(backend.translates_paths, bool) and isinstance(backend.image_has_site, bool)
    assert get_backend("none").translates_paths is False and get_backend("docker").image_has_site is True


def test_an_unknown_isolation_is_a_one_paragraph_error():
    with pytest.raises(PipcookError, match="unknown isolation 'lxc' \\(choose from bwrap, docker, none\\)"):
        get_backend("lxc")
    assert issubclass(UnknownBackend, PipcookError)


def test_the_interface_cannot_be_half_implemented():
    class Half(Backend):
        name = "half"

        def start(self, spec):  # probe and clean_leftovers missing
            raise NotImplementedError

    with pytest.raises(TypeError, match="abstract"):
        Half()  # type: ignore[abstract]


WRITE = """
import os, sys
target = sys.argv[1]
with open(os.path.join(target, "result.txt"), "w") as f:
    f.write("written in the stage")
"""


@pytest.mark.parametrize("name", ["bwrap", "docker", "none"])
def test_writable_targets_are_honoured_by_every_backend(tmp_path: Path, name: str):
    if name == "bwrap":
        require_bwrap()
    elif name == "docker":
        require_docker()
    backend = get_backend(name)
    host_out = tmp_path / "out"
    target = "/workspace/out"
    inside = target if backend.translates_paths else str(host_out)
    spec = StageSpec(run_id=f"iface{name}", name="writer", mounts=[], limits=SMALL, log_path=tmp_path / "w.log",
                     writable={target: host_out}, argv=["-I", "-S", "-c", textwrap.dedent(WRITE), inside],
                     options=StageOptions(state_dir=tmp_path / "state"))
    (tmp_path / "state").mkdir()
    handle = backend.start(spec)
    try:
        deadline = time.monotonic() + 60
        while handle.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert handle.poll() == 0, spec.log_path.read_text(errors="replace")
    finally:
        handle.cleanup()
    assert (host_out / "result.txt").read_text() == "written in the stage"
