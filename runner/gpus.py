"""Which GPU device nodes a `--gpu` stage may have: the ones this process was given.

A batch scheduler gives a job some of a node's GPUs. Slurm (ConstrainDevices=yes)
denies the others in the job's devices cgroup and sets CUDA_VISIBLE_DEVICES to
indexes among those it allowed; without device constraint it sets only
CUDA_VISIBLE_DEVICES. So a stage gets:

  the per-GPU nodes (/dev/nvidia0, /dev/nvidia1, ...; PIPCOOK_SANDBOX_GPU_DEVICES
  may name another glob, e.g. for tests with fake devices)
  - minus those the devices cgroup denies (opening one gives EPERM; a node the
    cgroup allows opens, or fails with another errno such as ENXIO)
  - then, when CUDA_VISIBLE_DEVICES lists indexes, only those indexes of what
    remains (in minor-number order, which is gres.conf's File= order)
plus the shared control nodes (/dev/nvidiactl, /dev/nvidia-uvm, ...), and
/dev/dri only when every GPU is given (its render nodes are per GPU).
"""
from __future__ import annotations

import errno
import glob
import os
import re
from dataclasses import dataclass

DEFAULT_GLOB = "/dev/nvidia[0-9]*"
CONTROL_NODES = ("/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools", "/dev/nvidia-modeset")
CONTROL_DIRS = ("/dev/nvidia-caps",)


@dataclass(frozen=True)
class GpuSet:
    devices: tuple[str, ...]  # per-GPU nodes the stage gets
    shared: tuple[str, ...]  # control nodes and dirs every GPU user needs
    all_given: bool  # every GPU of the host (so /dev/dri may be given too)
    why: str  # how the set was chosen, for the log

    def binds(self) -> list[str]:
        extra = ["/dev/dri"] if self.all_given and os.path.isdir("/dev/dri") else []
        return [*self.devices, *self.shared, *extra]


def _minor(path: str) -> int:
    try:
        return os.minor(os.stat(path).st_rdev)
    except OSError:
        digits = re.findall(r"\d+", path)
        return int(digits[-1]) if digits else 0


def candidates() -> list[str]:
    pattern = os.environ.get("PIPCOOK_SANDBOX_GPU_DEVICES") or DEFAULT_GLOB
    return sorted(glob.glob(pattern), key=_minor)


def cgroup_allows(path: str) -> bool:
    """False when the devices cgroup denies `path` (EPERM on open). Opening a GPU
    node without using it is what nvidia-smi does; O_NONBLOCK keeps it from waiting."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        return exc.errno != errno.EPERM
    os.close(fd)
    return True


def _visible_indexes() -> list[int] | None:
    """CUDA_VISIBLE_DEVICES as indexes; None when unset or not indexes (UUIDs)."""
    text = os.environ.get("CUDA_VISIBLE_DEVICES")
    if text is None:
        return None
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items or items == ["NoDevFiles"]:
        return []
    indexes = []
    for item in items:
        if not re.fullmatch(r"-?\d+", item):
            return None
        if int(item) < 0:  # CUDA stops at the first invalid index
            break
        indexes.append(int(item))
    return indexes


def given() -> GpuSet:
    """The GPUs this process may hand to a stage (see the module docstring)."""
    every = candidates()
    allowed = [d for d in every if cgroup_allows(d)]
    why = f"{len(allowed)} of {len(every)} GPU device(s) allowed by the devices cgroup"
    picked = allowed
    indexes = _visible_indexes()
    if indexes is not None:
        picked = [allowed[i] for i in dict.fromkeys(indexes) if i < len(allowed)]
        why += f", CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r} selects {len(picked)}"
    elif os.environ.get("CUDA_VISIBLE_DEVICES"):
        why += " (CUDA_VISIBLE_DEVICES names UUIDs: not narrowed further)"
    shared = [p for p in CONTROL_NODES if os.path.exists(p)] + [p for p in CONTROL_DIRS if os.path.isdir(p)]
    return GpuSet(tuple(picked), tuple(shared), all_given=bool(every) and picked == every, why=why)


def docker_device_ids(gpus: GpuSet) -> list[str] | None:
    """Device ids for Docker's DeviceRequest (NVIDIA's index = the node's minor number),
    or None for "all" when every GPU is given."""
    if gpus.all_given:
        return None
    return [str(_minor(d)) for d in gpus.devices]
