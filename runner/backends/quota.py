"""A disk quota that holds for a stage's writable directories.

RLIMIT_FSIZE caps one file, not the total, so the writable directories of a
stage live on a volume of their own:

- "loop" (root, loop devices, mkfs.ext4): a sparse ext4 image of exactly the
  quota, without journal or reserved blocks, mounted
  `loop,nosuid,nodev,noexec,noatime,nodelalloc` on a host directory
  (nodelalloc: blocks are allocated at write(), so ENOSPC comes there and
  never later at writeback). A write past the quota fails with ENOSPC inside
  the sandbox; the kernel enforces it. ext4's own metadata takes a few
  percent of the image, so slightly less than the quota is usable.
- "watch" (the fallback where loop mounts are impossible, e.g. an
  unprivileged runner): a plain directory measured every 0.2 s by a thread
  (os.scandir, links never followed). WEAKER: nothing stops a write as it
  happens; the stage can overshoot by whatever it writes in 0.2 s before
  `exceeded()` turns True and the caller kills it. The caller should also
  set RLIMIT_FSIZE to the quota so no single file outgrows it.

Everything the stage wrote is hostile to host code. `copy_out` copies only
regular files and directories, opening every entry relative to its parent's
descriptor with O_NOFOLLOW, so no symlink is followed or recreated (the
Judge0 CVE-2024-28185 class). Symlinks, device nodes, fifos and sockets are
skipped and logged; set-id and group/world-write bits are dropped; the total
copied is capped at the quota (a sparse file cannot balloon on the host).
"""
from __future__ import annotations

import ctypes
import logging
import os
import shutil
import stat
import subprocess
import threading
import time
from pathlib import Path

from pipcook_sandbox.runner.errors import PipcookError
from pipcook_sandbox.runner.units import fmt_bytes

from . import mountinfo

log = logging.getLogger(__name__)

# Below this much free space a volume counts as full. Not just "0": ext4
# fails a large write() whole when it does not fit, so after an ENOSPC the
# free space can be up to one write's size (measured: 609 KiB left after a
# failed 1 MiB write on a 32 MiB volume). 2 MiB covers the usual buffered
# writes (the backend also looks for ENOSPC in the stage's output for the
# rest); at most 1/8 of a small volume, at least 64 KiB.
MIN_FREE = 64 << 10
FULL_MARGIN = 2 << 20
ENTRY_COST = 4096  # what a file or directory costs at least, in usage and copy-out
MIN_IMAGE = 4 << 20  # ext4 wants some room for its own metadata
MAX_DEPTH = 128  # deeper trees are not copied out (and would exhaust fds)
WATCH_PERIOD = 0.2
MNT_DETACH = 2  # umount2(2): lazy, for a mount still busy
LOOP_SYSFS = "/sys/block"
AUTOCLEAR_WAIT = 0.1  # how long an unmounted volume's loop device may take to free itself before losetup -d




def sandbox_owner() -> tuple[int, int]:
    """Who writes a stage's volume by default: a root runner runs stages as
    host uid/gid 65534 (bwrap "mapped" mode, or a container user), any other
    runner as itself."""
    if os.geteuid() == 0:
        from .owner import stage_ids

        return stage_ids()  # 65534, or the tenant's uid under `run --stage-uid`
    return os.getuid(), os.getgid()


def _run(argv: list[str], timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)


def mounted(path: Path) -> bool:
    """Is `path` a mount point in this mount namespace?"""
    return mountinfo.is_mount_point(path)


def _umount2(path: Path, flags: int) -> None:
    """The umount2(2) system call itself: the end of every run unmounts a volume per writable stage and
    per boundary, and a `umount` process each (plus its libmount bookkeeping) was most of that cost."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.umount2(os.fsencode(path), flags) != 0:
        err = ctypes.get_errno()
        log.debug("umount2 %s (flags %d): %s", path, flags, os.strerror(err))


def unmount(path: Path) -> bool:
    """Unmount `path` (lazily if busy); True when it is no longer mounted."""
    for flags in (0, MNT_DETACH):
        if not mounted(path):
            return True
        _umount2(path, flags)
    if mounted(path):  # the system call failed where the tool may not (no ctypes, a stale utab): last resort
        _run(["umount", "-l", str(path)])
    return not mounted(path)


def _loops_of(image: Path) -> list[str]:
    """The loop devices bound to `image`, from sysfs (no `losetup -j` process: this runs for every volume
    of every run). The kernel keeps the backing file's absolute, resolved path there."""
    want = os.path.realpath(image)
    found: list[str] = []
    try:
        names = [n for n in os.listdir(LOOP_SYSFS) if n.startswith("loop")]
    except OSError:
        return found
    for name in names:
        try:  # only a bound loop device has a backing file (a glob stat()ed every entry: 3x the cost)
            with open(f"{LOOP_SYSFS}/{name}/loop/backing_file", encoding="utf-8", errors="surrogateescape") as f:
                backing = f.read().rstrip("\n")
        except OSError:
            continue
        if backing == want:
            found.append(f"/dev/{name}")
    return found


def _detach_loops(image: Path) -> None:
    """`mount -o loop` sets autoclear, so the unmount frees the loop device (synchronously on the kernels
    measured; a short wait covers one that does it a moment later), but a loop device still bound to the
    image (e.g. after a lazy unmount) is detached here explicitly."""
    deadline = time.monotonic() + AUTOCLEAR_WAIT
    while (loops := _loops_of(image)) and time.monotonic() < deadline:
        time.sleep(0.005)
    if loops and shutil.which("losetup") is not None:
        for dev in loops:
            _run(["losetup", "-d", dev])


def loop_supported() -> tuple[bool, str]:
    """Can this process make loop volumes? (answer, reason if not)"""
    if os.geteuid() != 0:
        return False, "not root: loop mounts need CAP_SYS_ADMIN"
    for tool in ("mkfs.ext4", "mount", "umount"):
        if shutil.which(tool) is None:
            return False, f"{tool} not found"
    if not Path("/dev/loop-control").exists():
        return False, "no /dev/loop-control"
    return True, ""


def probe() -> dict:
    ok, why = loop_supported()
    return {"kind": "loop" if ok else "watch", "reason": why or None}


class Volume:
    """The writable directories of one stage, on one quota."""

    def __init__(self, kind: str, base: Path, root: Path, size: int, subdirs: list[str],
                 image: Path | None = None, note: str = "") -> None:
        self.kind = kind  # "loop" or "watch"
        self.base = base
        self.mountpoint = root  # the volume's root directory (a mount point for "loop")
        self.size = size
        self.subdirs = list(subdirs)
        self.image = image
        self.note = note  # why the weaker kind was used, if it was
        self._usage = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._destroyed = False

    def path(self, sub: str) -> Path:
        if sub not in self.subdirs:
            raise KeyError(f"{sub!r} is not a subdirectory of this volume")
        return self.mountpoint / sub

    # -- usage ----------------------------------------------------------------

    def usage(self) -> int:
        if self.kind == "loop":
            try:
                st = os.statvfs(self.mountpoint)
            except OSError:
                return 0
            return max(0, (st.f_blocks - st.f_bfree) * st.f_frsize)
        return self._usage

    def exceeded(self) -> bool:
        """Is the quota used up? For "loop": free space below 2 MiB (1/8 of
        a volume under 16 MiB, at least 64 KiB), or no inodes left: the
        stage's writes are failing with ENOSPC."""
        if self._destroyed:
            return False
        if self.kind == "loop":
            try:
                st = os.statvfs(self.mountpoint)
            except OSError:
                return False
            threshold = max(MIN_FREE, min(FULL_MARGIN, self.size // 8))
            return st.f_bavail * st.f_frsize < threshold or st.f_favail == 0
        return self._usage > self.size

    def _watch(self) -> None:
        while not self._stop.wait(WATCH_PERIOD):
            self._usage = measure(self.mountpoint, stop_above=self.size)

    # -- results ----------------------------------------------------------------

    def copy_out(self, mapping: dict[str, Path]) -> list[str]:
        """Copy each subdirectory's regular files and directories into the host
        directory it maps to (merged over what is there: files replaced,
        nothing deleted). Returns the skipped paths, relative to the volume."""
        skipped: list[str] = []
        budget = [self.size]
        for sub, target in mapping.items():
            target = Path(target)
            target.mkdir(parents=True, exist_ok=True)
            src_fd = _open_dir(self.path(sub))
            dst_fd = _open_dir(target)
            try:
                _copy_tree(src_fd, dst_fd, sub, 0, budget, skipped)
            finally:
                os.close(src_fd)
                os.close(dst_fd)
        for entry in skipped:
            log.warning("not copied out of the sandbox: %s", entry)
        return [entry.split(" (", 1)[0] for entry in skipped]

    def destroy(self) -> None:
        """Unmount and delete the image (loop), or delete the directory
        (watch). Idempotent."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.kind == "loop":
            if not unmount(self.mountpoint):
                log.error("could not unmount %s", self.mountpoint)
                return  # never delete below a mount we could not remove
            if self.image is not None:
                _detach_loops(self.image)
                self.image.unlink(missing_ok=True)
            try:
                self.mountpoint.rmdir()
            except FileNotFoundError:
                pass
        else:
            # rmtree does not follow symlinks (fd-based on Linux).
            shutil.rmtree(self.mountpoint, ignore_errors=True)
        self._destroyed = True


def measure(root: Path, stop_above: int | None = None) -> int:
    """Bytes used below root: per entry the larger of its apparent and its
    allocated size, at least ENTRY_COST. Links are never followed."""
    total = 0
    stack = [str(root)]
    while stack:
        try:
            it = os.scandir(stack.pop())
        except OSError:
            continue
        with it:
            for entry in it:
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                total += max(ENTRY_COST, st.st_size, st.st_blocks * 512)
                if stat.S_ISDIR(st.st_mode):
                    stack.append(entry.path)
                if stop_above is not None and total > stop_above:
                    return total
    return total


def _open_dir(path: str | Path, dir_fd: int | None = None) -> int:
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)


def _copy_tree(src_fd: int, dst_fd: int, rel: str, depth: int, budget: list[int], skipped: list[str]) -> None:
    with os.scandir(src_fd) as it:
        names = sorted(e.name for e in it)
    for name in names:
        where = f"{rel}/{name}"
        try:
            st = os.stat(name, dir_fd=src_fd, follow_symlinks=False)
        except OSError as e:
            skipped.append(f"{where} (unreadable: {e.strerror})")
            continue
        cost = max(ENTRY_COST, st.st_size) if stat.S_ISREG(st.st_mode) else ENTRY_COST
        if stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode):
            if cost > budget[0]:
                skipped.append(f"{where} (over the disk quota)")
                continue
            budget[0] -= cost
        if stat.S_ISDIR(st.st_mode):
            if depth >= MAX_DEPTH:
                skipped.append(f"{where} (nested deeper than {MAX_DEPTH})")
                continue
            _copy_dir(src_fd, dst_fd, name, where, depth, budget, skipped)
        elif stat.S_ISREG(st.st_mode):
            _copy_file(src_fd, dst_fd, name, where, st, skipped)
        else:
            kind = ("symlink" if stat.S_ISLNK(st.st_mode) else "fifo" if stat.S_ISFIFO(st.st_mode)
                    else "socket" if stat.S_ISSOCK(st.st_mode) else "device node")
            skipped.append(f"{where} ({kind})")


def _copy_dir(src_fd: int, dst_fd: int, name: str, where: str, depth: int,
              budget: list[int], skipped: list[str]) -> None:
    try:
        child_src = _open_dir(name, dir_fd=src_fd)
    except OSError as e:
        skipped.append(f"{where} (unreadable: {e.strerror})")
        return
    try:
        try:
            os.mkdir(name, 0o755, dir_fd=dst_fd)
        except FileExistsError:
            pass
        try:
            # O_NOFOLLOW: an existing symlink in the target is not entered.
            child_dst = _open_dir(name, dir_fd=dst_fd)
        except OSError as e:
            skipped.append(f"{where} (target exists and is not a directory: {e.strerror})")
            return
        try:
            _copy_tree(child_src, child_dst, where, depth + 1, budget, skipped)
        finally:
            os.close(child_dst)
    finally:
        os.close(child_src)


def _copy_file(src_fd: int, dst_fd: int, name: str, where: str, st: os.stat_result, skipped: list[str]) -> None:
    try:
        fin = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=src_fd)
    except OSError as e:
        skipped.append(f"{where} (unreadable: {e.strerror})")
        return
    try:
        now = os.fstat(fin)
        if not stat.S_ISREG(now.st_mode) or now.st_ino != st.st_ino:
            skipped.append(f"{where} (changed while copying)")
            return
        try:
            os.unlink(name, dir_fd=dst_fd)  # replace, never write through, what is there
        except FileNotFoundError:
            pass
        except OSError as e:
            skipped.append(f"{where} (target cannot be replaced: {e.strerror})")
            return
        mode = 0o755 if st.st_mode & 0o100 else 0o644  # no set-id, no group/world write
        fout = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode,
                       dir_fd=dst_fd)
        try:
            remaining = st.st_size  # never more than measured, even if it grew
            while remaining > 0:
                chunk = os.read(fin, min(remaining, 1 << 20))
                if not chunk:
                    break
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fout, view):]
                remaining -= len(chunk)
        finally:
            os.close(fout)
    finally:
        os.close(fin)


def create_volume(base: Path, size: int, subdirs: list[str], *,
                  owner: tuple[int, int] | None = None, kind: str | None = None) -> Volume:
    """A volume of `size` bytes below `base` (a private directory of the
    caller) holding `subdirs`, owned by `owner` (uid, gid; default:
    `sandbox_owner()`) so the sandbox user can write. `kind` forces "loop" or
    "watch"; by default loop where possible, else watch."""
    for sub in subdirs:
        if not sub or "/" in sub or sub in (".", ".."):
            raise ValueError(f"bad volume subdirectory {sub!r}")
    base = Path(base)
    uid, gid = owner if owner is not None else sandbox_owner()
    note = ""
    try:
        base.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _cannot(base, size, e) from e
    if kind in (None, "loop"):
        ok, why = loop_supported()
        if ok:
            try:
                return _create_loop(base, size, subdirs, uid, gid)
            except (OSError, subprocess.SubprocessError) as e:
                why = f"loop volume failed: {e}"
        if kind == "loop":
            raise OSError(f"cannot make a loop volume: {why}")
        note = why
        log.warning("disk quota falls back to a watched directory (weaker): %s", why)
    root = base / "vol"
    try:
        root.mkdir()
        _make_subdirs(root, subdirs, uid, gid)
    except OSError as e:
        shutil.rmtree(root, ignore_errors=True)
        raise _cannot(base, size, e, note) from e
    vol = Volume("watch", base, root, size, subdirs, note=note)
    vol._thread = threading.Thread(target=vol._watch, name=f"quota-watch-{base.name}", daemon=True)
    vol._thread.start()
    return vol


def _cannot(base: Path, size: int, exc: OSError, loop_note: str = "") -> PipcookError:
    """The one-paragraph error for a volume neither kind could be made of (a full or read-only
    filesystem under the run's state directory, say)."""
    tried = f" (a loop volume first: {loop_note})" if loop_note else ""
    return PipcookError(f"cannot make the {fmt_bytes(size)} disk-quota volume (--disk) for a stage's writable "
                        f"directories under {base}{tried}: {exc.strerror or exc}; free space (and inodes) on that "
                        "filesystem or make it writable")


def create_volumes(wanted: list[tuple[Path, int, list[str]]], owner: tuple[int, int] | None = None) -> list[Volume]:
    """`create_volume(base, size, subdirs)` for each of `wanted`, at the same time; in that order.

    Each loop volume is a mkfs.ext4 and a mount (two processes, ~40 ms on an idle 2-vCPU host, far
    more on a busy one), and a run makes one per writable stage and one per boundary: made one after
    another they were a visible part of a short run's start. If any fails, the others are destroyed
    and the first error is raised: nothing is left mounted. `owner`: as for create_volume."""
    if len(wanted) <= 1:
        return [create_volume(*w, owner=owner) for w in wanted]
    import concurrent.futures

    interrupted: BaseException | None = None
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(len(wanted), 4), thread_name_prefix="volume") as pool:
        futures = [pool.submit(create_volume, *w, owner=owner) for w in wanted]
        try:
            concurrent.futures.wait(futures)
        except BaseException as exc:  # SIGTERM (a warm runner's SystemExit) or Ctrl-C meanwhile: the threads
            interrupted = exc  # still finish their volumes (the pool waits for them), and those must go too
    failed = interrupted or next((f.exception() for f in futures if f.exception() is not None), None)
    if failed is not None:
        for f in futures:
            if f.exception() is None:
                f.result().destroy()
        raise failed
    return [f.result() for f in futures]


def destroy_volumes(vols: list[Volume]) -> None:
    """`destroy()` every volume of `vols`, at the same time (umount and losetup, three processes per
    loop volume, at the end of every run); then raise the first error, if any."""
    if len(vols) <= 1:
        for vol in vols:
            vol.destroy()
        return
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(max_workers=min(len(vols), 4), thread_name_prefix="volume") as pool:
        futures = [pool.submit(vol.destroy) for vol in vols]
        concurrent.futures.wait(futures)
    failed = next((f.exception() for f in futures if f.exception() is not None), None)
    if failed is not None:
        raise failed


def _make_subdirs(root: Path, subdirs: list[str], uid: int, gid: int) -> None:
    for sub in subdirs:
        p = root / sub
        p.mkdir(mode=0o755)
        if (uid, gid) != (os.getuid(), os.getgid()):
            os.chown(p, uid, gid)
    if (uid, gid) != (os.getuid(), os.getgid()):
        os.chown(root, uid, gid)


def _create_loop(base: Path, size: int, subdirs: list[str], uid: int, gid: int) -> Volume:
    image = base / "disk.img"
    mnt = base / "mnt"
    free = shutil.disk_usage(base).free
    if free < size:
        log.warning("only %d bytes free under %s for a %d-byte sparse quota image", free, base, size)
    fd = os.open(image, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, max(size, MIN_IMAGE))  # sparse: costs nothing until written
    finally:
        os.close(fd)
    try:
        res = _run(["mkfs.ext4", "-q", "-F", "-O", "^has_journal", "-m", "0",
                    "-E", f"root_owner={uid}:{gid}", str(image)])
        if res.returncode != 0:
            raise OSError(f"mkfs.ext4: {res.stderr.strip() or res.returncode}")
        mnt.mkdir(mode=0o700)
        res = _run(["mount", "-t", "ext4", "-o", "loop,nosuid,nodev,noexec,noatime,nodelalloc", str(image), str(mnt)])
        if res.returncode != 0:
            raise OSError(f"mount: {res.stderr.strip() or res.returncode}")
        lost = mnt / "lost+found"
        if lost.is_dir():
            lost.rmdir()  # one less thing in the quota, and nothing to copy
        _make_subdirs(mnt, subdirs, uid, gid)
        os.chmod(mnt, 0o755)
    except BaseException:
        if mnt.exists():
            unmount(mnt)
            _detach_loops(image)
            try:
                mnt.rmdir()
            except OSError:
                pass
        image.unlink(missing_ok=True)
        raise
    return Volume("loop", base, mnt, size, subdirs, image=image)


def destroy_leftover(mountpoint: Path | None, image: Path | None) -> bool:
    """Remove a volume recorded by a runner that died (for `clean`)."""
    ok = True
    if mountpoint is not None and mounted(mountpoint):
        ok = unmount(mountpoint)
    if ok and image is not None:
        _detach_loops(image)
        image.unlink(missing_ok=True)
    return ok
