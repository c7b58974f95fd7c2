"""The one /proc/self/mountinfo parser (runner/backends/mountinfo.py): paths with the characters the
kernel escapes (space, tab, newline, backslash as \\040 \\011 \\012 \\134) are found, in text and on real
mounts, by everyone who asks (quota's `mounted`/`unmount`, bwrap's leftover check, images' cleanup)."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from pipcook_sandbox.runner.backends import mountinfo, quota

ODD = "a b\tc\nd\\e"  # every character mountinfo escapes
ESCAPED = "a\\040b\\011c\\012d\\134e"


def test_escaped_paths_are_unescaped_once() -> None:
    text = (f"36 35 98:0 /sub\\040dir /mnt/{ESCAPED} rw,noatime shared:1 master:2 - ext4 /dev/sda1 rw,errors=continue\n"
            "37 35 0:30 / /sys/fs/cgroup/memory rw,nosuid - cgroup cgroup rw,memory\n"
            "38 35 0:31 / /mnt/literal\\134040 rw - tmpfs tmpfs rw\n"
            "garbage line\n")
    mounts = mountinfo.parse(text)
    assert [m.point for m in mounts] == [f"/mnt/{ODD}", "/sys/fs/cgroup/memory", "/mnt/literal\\040"]
    assert mounts[0].root == "/sub dir" and mounts[0].fstype == "ext4"
    assert mounts[1].fstype == "cgroup" and "memory" in mounts[1].super_options
    # "\134040" is a backslash followed by "040": undone once, it must not become a space
    assert mountinfo.unescape("x\\134040") == "x\\040"


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_real_mount_on_a_path_with_every_escaped_character(tmp_path: Path) -> None:
    target = tmp_path / ODD
    target.mkdir()
    inner = target / "in ner"
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(target)], check=True)
    try:
        inner.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(inner)], check=True)
        assert mountinfo.is_mount_point(target) and quota.mounted(target) and quota.mounted(inner)
        assert mountinfo.points_below(tmp_path) == [inner, target]  # deepest first
        assert not mountinfo.is_mount_point(tmp_path)
        assert quota.unmount(inner) and not quota.mounted(inner)
    finally:
        for path in (inner, target):
            subprocess.run(["umount", "-l", str(path)], capture_output=True)
    assert mountinfo.points_below(tmp_path) == []
