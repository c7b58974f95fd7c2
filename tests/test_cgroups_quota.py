"""Real cgroups and real loop-mounted quota volumes (root on Linux)."""
from __future__ import annotations

import os
import secrets
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from waiting import wait_until

from pipcook_sandbox.runner.backends import cgroups, quota

ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="real cgroups and loop mounts need root")


def unique() -> str:
    return f"{cgroups.new_run_id()}-t{secrets.token_hex(2)}"


def spawn_in(cg: cgroups.Cgroup, code: str) -> subprocess.Popen:
    """A python process that enters `cg` before running `code` (as the bwrap
    backend's wrapper does before exec)."""
    enter = "import os\nfor f in %r:\n    open(f, 'w').write(str(os.getpid()))\n" % [str(p) for p in cg.procs_files]
    return subprocess.Popen([sys.executable, "-I", "-S", "-c", enter + code],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


@pytest.fixture
def cg_factory():
    made: list[cgroups.Cgroup] = []

    def make(**kw) -> cgroups.Cgroup:
        cg = cgroups.create(unique(), **{"memory": 128 << 20, "pids": 32, "cpus": 1.0, **kw})
        assert cg is not None, cgroups.available()
        made.append(cg)
        return cg

    yield make
    for cg in made:
        cg.kill_all()
        cg.remove()


# --- cgroups -------------------------------------------------------------------


def test_available_describes_this_host() -> None:
    info = cgroups.available()
    assert set(info) >= {"version", "v1", "v2", "controllers", "degraded"}
    if ROOT:
        assert info["version"] in (1, 2)


@needs_root
def test_limits_are_written(cg_factory) -> None:
    cg = cg_factory(memory=200 << 20, pids=17, cpus=0.5)
    assert not cg.missing, cg
    if cg.version == 1:
        assert int((cg.dirs["memory"] / "memory.limit_in_bytes").read_text()) == 200 << 20
        memsw = cg.dirs["memory"] / "memory.memsw.limit_in_bytes"
        if memsw.exists():
            assert int(memsw.read_text()) == 200 << 20
        assert (cg.dirs["pids"] / "pids.max").read_text().strip() == "17"
        assert int((cg.dirs["cpu"] / "cpu.cfs_quota_us").read_text()) == 50_000
    else:
        d = cg.dirs[""]
        assert int((d / "memory.max").read_text()) == 200 << 20
        assert (d / "pids.max").read_text().strip() == "17"
        assert (d / "cpu.max").read_text().split()[0] == "50000"


def _weight(d: Path, version: int) -> int:
    return int((d / cgroups.WEIGHT_FILE[version]).read_text())


@needs_root
def test_cpu_weight_follows_the_cpus_granted(cg_factory) -> None:
    """A stage weighs as many ordinary tasks as it has CPUs; the shared parent
    as the sum of its stages, so on a busy host the stages are not squeezed
    into one task's share together."""
    two = cg_factory(cpus=2.0)
    if "cpu" in two.missing:
        pytest.skip("no cpu controller here")
    v = two.version
    d2 = two.dirs["cpu"] if v == 1 else two.dirs[""]
    per = cgroups.WEIGHT_PER_CPU[v]
    assert _weight(d2, v) == 2 * per
    half = cg_factory(cpus=0.5)
    dh = half.dirs["cpu"] if v == 1 else half.dirs[""]
    assert _weight(dh, v) == per  # never below one task's weight
    parent = d2.parent
    siblings = sum(_weight(c, v) for c in parent.iterdir() if c.is_dir())
    assert _weight(parent, v) == siblings >= 3 * per
    half.kill_all()
    assert half.remove()
    if parent.exists():  # the parent follows its stages down again
        assert _weight(parent, v) == sum(_weight(c, v) for c in parent.iterdir() if c.is_dir())
        assert _weight(parent, v) < siblings


@needs_root
def test_oom_is_detected(cg_factory) -> None:
    cg = cg_factory(memory=128 << 20)
    p = spawn_in(cg, "x = []\nwhile True:\n    x.append(b'x' * (16 << 20))\n")
    p.communicate(timeout=60)
    assert p.returncode == -9
    assert cg.oom_killed(killed_by_sigkill=True)
    peak = cg.memory_peak()
    assert peak is None or peak >= 100 << 20
    assert not cg.pids_exhausted()


@needs_root
def test_pids_limit_holds_and_is_reported(cg_factory) -> None:
    cg = cg_factory(pids=8)
    p = spawn_in(cg, (
        "import os, sys, time\n"
        "for i in range(50):\n"
        "    try:\n"
        "        if os.fork() == 0:\n"
        "            os.closerange(0, 3); time.sleep(30); os._exit(0)\n"
        "    except OSError:\n"
        "        print('blocked at', i); sys.exit(3)\n"))
    out, _ = p.communicate(timeout=60)
    assert p.returncode == 3, out
    assert cg.pids_exhausted()
    assert 1 <= len(cg.pids()) <= 8
    assert cg.kill_all() and not cg.pids()
    assert cg.remove()
    assert not any(d.exists() for d in cg.all_dirs())


@needs_root
def test_kill_all_and_remove(cg_factory) -> None:
    cg = cg_factory()
    p = spawn_in(cg, "import os, time\nos.fork(); os.fork()\ntime.sleep(60)\n")
    wait_until(lambda: len(cg.pids()) >= 4, 10, "the four processes in the cgroup")
    assert len(cg.pids()) == 4
    assert cg.kill_all()
    p.wait(timeout=10)
    assert cg.remove()
    assert cg.remove()  # idempotent


def _v2_root() -> Path | None:
    m = cgroups._v2_mount()
    return m.path if m is not None and os.access(m.path, os.W_OK) else None


@needs_root
@pytest.mark.skipif(_v2_root() is None, reason="no writable cgroup v2 hierarchy")
def test_v2_group_kill_and_remove() -> None:
    cg = cgroups.create(unique(), memory=64 << 20, pids=16, cpus=1.0, version=2)
    assert cg is not None and cg.version == 2
    try:
        # On a hybrid host the v2 tree holds no controllers: the limits are
        # named as missing, never silently assumed.
        have = cgroups._v2_controllers(cg.dirs[""].parent.parent)
        assert set(cg.missing) >= {c for c in cgroups.CONTROLLERS if c not in have}
        p = spawn_in(cg, "import os, time\nos.fork()\ntime.sleep(60)\n")
        wait_until(lambda: len(cg.pids()) >= 2, 10, "the two processes in the cgroup")
        assert len(cg.pids()) == 2
        assert cg.kill_all()
        p.wait(timeout=10)
        assert p.returncode == -9
    finally:
        cg.kill_all()
        assert cg.remove()


@needs_root
@pytest.mark.skipif(_v2_root() is None, reason="no writable cgroup v2 hierarchy")
def test_v2_runner_moves_into_a_leaf_to_delegate() -> None:
    """The no-internal-process rule: a runner living in a cgroup that must
    delegate controllers moves into `<own>/pipcook-runner`. Exercised with
    whatever domain controller the v2 tree has (hugetlb on hybrid hosts)."""
    root = _v2_root()
    ctrl = next(iter((root / "cgroup.controllers").read_text().split()), None)
    if ctrl is None:
        pytest.skip("no controller on the v2 hierarchy to delegate")
    enabled_here = ctrl not in (root / "cgroup.subtree_control").read_text().split()
    if enabled_here:
        (root / "cgroup.subtree_control").write_text("+" + ctrl)
    box = root / f"pcsb-test-{secrets.token_hex(3)}"
    box.mkdir()
    child = None
    try:
        code = (
            "import os, sys\n"
            "from pathlib import Path\n"
            f"open({str(box / 'cgroup.procs')!r}, 'w').write(str(os.getpid()))\n"
            "from pipcook_sandbox.runner.backends import cgroups\n"
            f"parent, failed = cgroups.prepare_v2_parent(Path({str(box)!r}), [{ctrl!r}])\n"
            "print('failed', failed)\n"
            "print('cgroup', open('/proc/self/cgroup').read().strip().splitlines()[-1])\n"
            "sys.stdout.flush()\n"
            "sys.stdin.read()\n")
        child = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True, cwd=Path(__file__).parent.parent)
        lines = [child.stdout.readline() for _ in range(2)]
        assert lines[0].strip() == "failed []", lines
        assert lines[1].strip().endswith(f"/{box.name}/{cgroups.LEAF_NAME}"), lines
        assert ctrl in (box / "cgroup.subtree_control").read_text().split()
        assert (box / cgroups.ROOT_NAME).is_dir()
        assert ctrl in (box / cgroups.ROOT_NAME / "cgroup.controllers").read_text().split()
    finally:
        if child is not None:
            child.kill()
            child.wait()
        for d in (box / cgroups.ROOT_NAME, box / cgroups.LEAF_NAME, box):
            for _ in range(50):
                try:
                    d.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.05)
        if enabled_here:
            (root / "cgroup.subtree_control").write_text("-" + ctrl)


def test_runner_pid_from_names() -> None:
    assert cgroups.runner_pid("1234-abcdef-model") == 1234
    assert cgroups.runner_pid("20261122-031536-pid77-abc123-datasource") == 77
    assert cgroups.runner_pid(cgroups.new_run_id(4321) + "-model") == 4321
    assert cgroups.runner_pid("datasource") is None
    assert cgroups.runner_pid("20261122-031536-abc") is None  # a date is not a pid


@needs_root
def test_leftovers_of_dead_runners_only() -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    gone = cgroups.create(f"{dead.pid}-{secrets.token_hex(3)}-model", memory=64 << 20, pids=8, cpus=1.0)
    live = cgroups.create(f"{os.getpid()}-{secrets.token_hex(3)}-model", memory=64 << 20, pids=8, cpus=1.0)
    assert gone is not None and live is not None
    try:
        names = {cg.name for cg in cgroups.leftovers(lambda pid: pid != dead.pid)}
        assert gone.name in names and live.name not in names
        removed = cgroups.remove_leftovers(lambda pid: pid != dead.pid)
        assert all(str(d) in removed for d in gone.all_dirs())
        assert not any(d.exists() for d in gone.all_dirs())
        assert all(d.exists() for d in live.all_dirs())
    finally:
        for cg in (gone, live):
            cg.kill_all()
            cg.remove()


# --- quota volumes -------------------------------------------------------------------


def mounts_below(path: Path) -> list[str]:
    return [l for l in Path("/proc/self/mountinfo").read_text().splitlines() if str(path) in l]


def loops_of(image: Path) -> str:
    return subprocess.run(["losetup", "-j", str(image)], capture_output=True, text=True).stdout


@needs_root
def test_loop_volume_holds_and_is_removed(tmp_path: Path) -> None:
    vol = quota.create_volume(tmp_path / "v", 32 << 20, ["data", "model"], owner=(65534, 65534))
    try:
        assert vol.kind == "loop" and mounts_below(vol.mountpoint)
        st = os.stat(vol.path("data"))
        assert (st.st_uid, st.st_gid) == (65534, 65534)
        assert not vol.exceeded()
        with pytest.raises(OSError) as err:
            with open(vol.path("data") / "big", "wb") as f:
                for _ in range(64):
                    f.write(b"x" * (1 << 20))
        assert err.value.errno == 28  # ENOSPC: the kernel holds the quota
        assert os.path.getsize(vol.path("data") / "big") <= 32 << 20
        assert vol.exceeded()
    finally:
        vol.destroy()
    assert not mounts_below(vol.mountpoint)
    assert not vol.image.exists() and not loops_of(vol.image)
    vol.destroy()  # idempotent


def test_watch_volume_notices_overuse(tmp_path: Path) -> None:
    vol = quota.create_volume(tmp_path / "w", 8 << 20, ["out"], kind="watch")
    try:
        assert vol.kind == "watch"
        (vol.path("out") / "a").write_bytes(b"x" * (4 << 20))
        wait_until(lambda: vol.usage() >= 4 << 20, 5, "the watcher to measure the first 4 MiB")
        assert not vol.exceeded()
        (vol.path("out") / "b").write_bytes(b"x" * (6 << 20))
        wait_until(vol.exceeded, 5, "the watcher to see the volume over its quota")
    finally:
        vol.destroy()
    assert not vol.mountpoint.exists()


@pytest.mark.parametrize("kind", ["loop", "watch"])
def test_copy_out_never_follows_links(tmp_path: Path, kind: str) -> None:
    if kind == "loop" and not quota.loop_supported()[0]:
        pytest.skip(quota.loop_supported()[1])
    vol = quota.create_volume(tmp_path / "v", 16 << 20, ["out"], kind=kind)
    secret = tmp_path / "secret"
    secret.write_text("host secret")
    target = tmp_path / "host-out"
    target.mkdir()
    # A link already in the target must be replaced, never written through.
    os.symlink(secret, target / "model.bin")
    os.symlink(tmp_path, target / "sub")
    try:
        out = vol.path("out")
        (out / "model.bin").write_bytes(b"weights")
        os.symlink("/etc/passwd", out / "passwd-link")
        os.symlink(str(secret), out / "secret-link")
        os.mkfifo(out / "fifo")
        (out / "sub").mkdir()
        (out / "sub" / "x").write_text("x")
        (out / "nested").mkdir()
        (out / "nested" / "deep.txt").write_text("deep")
        (out / "tool").write_text("#!/bin/sh\n")
        os.chmod(out / "tool", 0o4777)  # set-uid, world-writable: never on the host
        skipped = vol.copy_out({"out": target})
    finally:
        vol.destroy()
    assert sorted(skipped) == ["out/fifo", "out/passwd-link", "out/secret-link", "out/sub"]
    assert (target / "model.bin").read_bytes() == b"weights"
    assert not (target / "model.bin").is_symlink()
    assert secret.read_text() == "host secret"
    assert not os.path.lexists(target / "passwd-link") and not os.path.lexists(target / "secret-link")
    assert not (tmp_path / "x").exists()  # nothing went through the planted dir link
    assert (target / "nested" / "deep.txt").read_text() == "deep"
    assert stat.S_IMODE(os.stat(target / "tool").st_mode) == 0o755


def test_copy_out_is_capped_at_the_quota(tmp_path: Path) -> None:
    vol = quota.create_volume(tmp_path / "w", 8 << 20, ["out"], kind="watch")
    try:
        with open(vol.path("out") / "sparse", "wb") as f:
            f.truncate(1 << 40)  # 1 TiB apparent, nothing allocated
        (vol.path("out") / "small").write_bytes(b"ok")
        skipped = vol.copy_out({"out": tmp_path / "host"})
    finally:
        vol.destroy()
    assert skipped == ["out/sparse"]
    assert (tmp_path / "host" / "small").read_bytes() == b"ok"
    assert not (tmp_path / "host" / "sparse").exists()


def test_bad_subdir_names_refused(tmp_path: Path) -> None:
    for bad in ("", "..", "a/b"):
        with pytest.raises(ValueError):
            quota.create_volume(tmp_path / "v", 8 << 20, [bad], kind="watch")


@needs_root
def test_parent_is_removed_with_the_last_stage() -> None:
    """<own cgroup>/pipcook-sandbox goes when its last stage does: a directory left in a
    batch job's cgroup stops the scheduler (Slurm) removing that job's cgroup."""
    first = cgroups.create(unique(), memory=128 << 20, pids=32, cpus=1.0)
    second = cgroups.create(unique(), memory=128 << 20, pids=32, cpus=1.0)
    assert first is not None and second is not None, cgroups.available()
    parents = {d.parent for d in first.all_dirs()}
    assert all(p.name == cgroups.ROOT_NAME for p in parents)
    assert first.remove()
    assert all(p.is_dir() for p in parents)  # the second stage still lives there
    assert second.remove()
    for p in parents:
        # Gone, unless a concurrent run (another test, another user of this host) has a stage there now.
        assert not p.exists() or any(c.is_dir() for c in p.iterdir()), p


@needs_root
def test_a_removed_parent_is_made_again() -> None:
    """A runner whose parent directory vanished (another run's last stage left) still gets its cgroup."""
    probe = cgroups.create(unique(), memory=128 << 20, pids=32, cpus=1.0)
    assert probe is not None
    assert probe.remove()
    again = cgroups.create(unique(), memory=128 << 20, pids=32, cpus=1.0)
    try:
        assert again is not None and not again.missing
    finally:
        assert again is not None and again.remove()


@needs_root
def test_volumes_made_together_are_all_there_and_separate(tmp_path: Path) -> None:
    vols = quota.create_volumes([(tmp_path / f"v{i}", (16 + i) << 20, ["out", f"sub{i}"]) for i in range(4)])
    try:
        assert [v.base for v in vols] == [tmp_path / f"v{i}" for i in range(4)]  # in the order asked
        assert all(v.kind == "loop" and mounts_below(v.mountpoint) for v in vols)
        assert len({os.stat(v.mountpoint).st_dev for v in vols}) == 4  # four file systems, four quotas
        assert [v.size for v in vols] == [(16 + i) << 20 for i in range(4)]
        assert all(v.path(f"sub{i}").is_dir() for i, v in enumerate(vols))
    finally:
        for v in vols:
            v.destroy()
    assert not any(mounts_below(v.mountpoint) or loops_of(v.image) for v in vols)


@needs_root
def test_one_volume_failing_leaves_none_of_the_others_behind(tmp_path: Path) -> None:
    wanted = [(tmp_path / f"v{i}", 16 << 20, ["out"] if i != 2 else ["../out"]) for i in range(4)]  # v2 is refused
    with pytest.raises(ValueError, match="subdirectory"):
        quota.create_volumes(wanted)
    for i in (0, 1, 3):
        base = tmp_path / f"v{i}"
        assert base.is_dir()  # it was made, then destroyed
        assert not mounts_below(base) and not (base / "disk.img").exists() and not loops_of(base / "disk.img")


@needs_root
def test_volumes_destroyed_together_are_all_gone(tmp_path: Path) -> None:
    vols = quota.create_volumes([(tmp_path / f"v{i}", 16 << 20, ["out"]) for i in range(3)])
    vols.append(quota.create_volume(tmp_path / "w", 8 << 20, ["out"], kind="watch"))
    quota.destroy_volumes(vols)
    for v in vols[:3]:
        assert not mounts_below(v.mountpoint) and not v.image.exists() and not loops_of(v.image)
    assert not vols[3].mountpoint.exists()
    quota.destroy_volumes(vols)  # idempotent, as destroy()


@needs_root
def test_a_runs_cgroups_without_a_handle_are_removed() -> None:
    """A stage interrupted while being started (scancel's SIGTERM) has no handle; the run's end removes it."""
    run_id = f"{os.getpid()}-{secrets.token_hex(3)}"
    orphan = cgroups.create(f"{run_id}-dataflow-1", memory=128 << 20, pids=32, cpus=1.0)
    other = cgroups.create(unique(), memory=128 << 20, pids=32, cpus=1.0)
    assert orphan is not None and other is not None
    try:
        removed = cgroups.remove_run(run_id)
        assert removed and all(f"{run_id}-dataflow-1" in r for r in removed)
        assert not any(d.exists() for d in orphan.all_dirs())
        assert all(d.exists() for d in other.all_dirs())  # another run's stays
    finally:
        assert other.remove()


SIGTERM_DURING_CREATE = """
import os, signal, sys, threading
from pathlib import Path
from pipcook_sandbox.runner.backends import quota

base = Path(sys.argv[1])
def term(signum, frame):
    raise SystemExit(143)
signal.signal(signal.SIGTERM, term)

def send_when_one_is_mounted():
    # as a server's SIGTERM reaches a warm runner while its run's volumes are being made
    while not any(str(base) in line for line in open("/proc/mounts")):
        threading.Event().wait(0.005)
    os.kill(os.getpid(), signal.SIGTERM)
threading.Thread(target=send_when_one_is_mounted, daemon=True).start()
quota.create_volumes([(base / f"v{i}", 8 << 20, ["out"]) for i in range(4)], owner=(65534, 65534))
print("NOT INTERRUPTED")
"""


@needs_root
def test_volumes_being_made_when_sigterm_arrives_are_all_removed(tmp_path: Path) -> None:
    base = tmp_path / "vols"
    base.mkdir()
    r = subprocess.run([sys.executable, "-c", SIGTERM_DURING_CREATE, str(base)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 143, (r.stdout, r.stderr)
    assert "NOT INTERRUPTED" not in r.stdout
    mounted = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines() if str(base) in line]
    for path in mounted:  # a failure here must not leave them to other tests (umount -l frees the loop device)
        subprocess.run(["umount", "-l", path], check=False)
    assert mounted == [], mounted


def _bound_to(device: str) -> str:
    """The backing file of loop `device` (/dev/loopN) now; "" when it is free."""
    try:
        return Path(f"/sys/block/{Path(device).name}/loop/backing_file").read_text().strip()
    except OSError:
        return ""


@needs_root
def test_destroy_frees_each_volumes_loop_device(tmp_path: Path) -> None:
    """The end of a run unmounts with umount2(2) and finds loop devices in sysfs (no umount/losetup
    processes): every volume's loop device is free afterwards, not just unlisted by `losetup -j`."""
    vols = quota.create_volumes([(tmp_path / f"v{i}", 16 << 20, ["out"]) for i in range(4)])
    devices = {v.image: quota._loops_of(v.image) for v in vols}
    assert all(len(d) == 1 and _bound_to(d[0]) == str(img) for img, d in devices.items()), devices
    quota.destroy_volumes(vols)
    for img, (device,) in devices.items():
        assert not _bound_to(device).startswith(str(img)), (device, _bound_to(device))
        assert not img.exists() and not mounts_below(img.parent)


@needs_root
def test_a_busy_volume_is_unmounted_lazily_and_its_loop_device_freed_when_let_go(tmp_path: Path) -> None:
    """A file still open on the volume (a stage's process the kernel has not reaped yet, say): destroy()
    detaches the mount at once; the loop device goes as soon as the last user lets go."""
    vol = quota.create_volume(tmp_path / "v", 16 << 20, ["out"])
    (device,) = quota._loops_of(vol.image)
    held = open(vol.path("out") / "held", "w")
    try:
        vol.destroy()
        assert not mounts_below(vol.mountpoint) and not vol.image.exists()
    finally:
        held.close()
    wait_until(lambda: not _bound_to(device).startswith(str(vol.image)), timeout=10, what="the loop device freed")
