"""The bubblewrap backend: every stage in its own set of namespaces.

What a stage gets (and tests/test_bwrap_backend.py checks, one assertion each):

Namespaces and credentials
    --unshare-all --unshare-user: new user, mount, pid, net, ipc, uts and
    cgroup namespaces. --new-session (no TIOCSTI into the runner's tty),
    --die-with-parent (SIGKILL when the runner dies; not for a sandbox still
    waiting for its id handshake: see "Nothing outlives a stage"), --cap-drop ALL,
    --hostname pipcook, and bwrap's own no_new_privs.

    Which host uid the sandbox runs as matters: it is what the kernel checks
    on every file, sysctl and signal. bwrap started by root with
    --unshare-user maps the sandbox uid onto host uid 0, and a host-root
    process, even without capabilities, may write /proc/sys (core_pattern:
    code execution on the host; opening it for writing succeeded here from
    such a sandbox). So:

    - runner is root ("mapped" mode): bwrap --uid 0 --gid 0
      --userns-block-fd/--info-fd; the runner writes the new namespace's
      maps itself, `0 0 1` (bwrap's setup, which must read the base
      interpreter under /root) and `65534 65534 1`, denies setgroups, and the
      command is util-linux's setpriv (a tiny Python launcher where the
      host has none) that drops the bounding set, becomes
      uid/gid 65534 (clearing every capability) and execs python. The
      stage's processes are host uid 65534 (nobody), no capabilities in any
      set. --disable-userns cannot be combined with --userns-block-fd; the
      seccomp filter denies every way to a new user namespace instead.
      Everything mounted for the stage must be readable by host uid 65534
      (`sandbox_owner()`); `grant_access()` hands it the directories of
      writable mounts and makes unix sockets in mounted dirs connectable,
      and flags read-only sources it may not read.
    - runner is not root ("plain" mode): --uid 65534 --gid 65534
      --disable-userns; the stage is the runner's uid, as bwrap is meant to
      be used.

Filesystem (a fresh tmpfs root, remounted read-only at the end)
    /usr, /bin, /lib, /lib64, /sbin   read-only binds, or the same symlinks
                                      where the host has symlinks (merged /usr)
    /etc                              only generated passwd, group (nobody),
                                      hosts; and ld.so.cache, localtime.
                                      Never the host's /etc.
    <base prefix of python>           read-only at the same path, with an
                                      empty read-only tmpfs over its
                                      site-packages: no host packages
    /proc                             new procfs of the stage's pid namespace;
                                      /proc/sys read-only; kcore, keys,
                                      timer_list, sched_debug, ... masked
    /dev                              bwrap's minimal /dev (null, zero, full,
                                      random, urandom, tty, pts); with
                                      spec.gpu, only the GPU nodes this
                                      runner was given (gpus.py)
    /tmp, /dev/shm                    private tmpfs, mode 1777, --size
                                      limits.tmp each (memory-backed: counts
                                      against the memory limit)
    spec.mounts                       read-only unless Mount.writable
    spec.writable targets             read-write, subdirectories of the stage's
                                      disk-quota volume (quota.py), copied out
                                      at cleanup, links never followed
    cwd /tmp

System calls
    --seccomp FD with seccomp.bpf_program(): see seccomp.py.

Limits
    memory, pids, cpus: a per-stage cgroup (cgroups.py). bwrap is born in it:
    the process that becomes bwrap writes its own pid into every cgroup.procs
    of the stage before it execs bwrap, so no process of the sandbox ever
    exists outside the cgroup. In mapped mode that process is `sh -c`
    (ENTER_CGROUP) and the runner sets the rlimits of bwrap and the
    sandbox's first process (prlimit) during the id handshake, while the
    sandbox is still blocked and has forked nothing (`_confine`). In plain
    mode it is a small host-side wrapper (`python -I -S`, not /bin/sh,
    whose `ulimit -f` counts 512- or 1024-byte blocks depending on the
    shell) that also sets NOFILE=limits.nofile, FSIZE=limits.disk, CORE=0,
    and execs bwrap. Output: stdout+stderr are
    read by a thread into spec.log_path and cut at limits.output (output.py;
    the stage is then killed, REASON_OUTPUT). Processes: a fork the pids
    cgroup refused stops the stage at the next poll() (REASON_PIDS), so a
    fork bomb that retries forever ends at once. Wall time: the caller, with
    terminate(REASON_TIMEOUT) or `enforce_deadline`. Disk: the volume
    (ENOSPC), or a watcher that kills the stage where only the weaker
    "watch" quota is possible.

Nothing outlives a stage: terminate() SIGKILLs bwrap (its pid-1 reaper gets
PDEATHSIG, and the pid namespace dies with its pid 1) and every process of
the cgroup. Resources are recorded in `<state dir>/bwrap-<stage>-<hex>.json`
(the cgroup before bwrap starts) so that `clean_leftovers()` can undo them
after a runner crash. A runner SIGKILLed while a stage starts: bwrap dies
with it (--die-with-parent), but a sandbox's first process that bwrap has
cloned and that still waits for the id handshake does not (bwrap arms its
PDEATHSIG only later) and waits forever, reparented to init; it was born in
the stage's cgroup, so the next runner's `clean_leftovers()` kills it with
the rest (tests/test_killed_while_starting.py).

Call `start` from a thread that outlives the stage (the main thread, or a
long-lived worker): --die-with-parent fires when the *thread* that spawned
bwrap exits.
"""
from __future__ import annotations

import json
import logging
import os
import re
import resource
import secrets
import select
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterator

from pipcook_sandbox.runner import gpus
from pipcook_sandbox.runner.errors import PipcookError
from pipcook_sandbox.runner.statedir import new_state_dir
from pipcook_sandbox.runner.units import fmt_bytes

from . import base, cgroups, mountinfo, output, owner, quota, seccomp
from .base import (
    REASON_CANCELLED,
    REASON_DISK,
    REASON_MEMORY,
    REASON_MEMORY_SHARED,
    REASON_OUTPUT,
    REASON_PIDS,
    REASON_PROTOCOL,
    REASON_TIMEOUT,
    WORKER_ARGS,
    Limits,
    Outcome,
    StageSpec,
)

NAME = "bwrap"
log = logging.getLogger(__name__)

SANDBOX_UID, SANDBOX_GID = base.SANDBOX_UID, base.SANDBOX_GID
STATE_PREFIX = "pcsb-"
RECORD_PREFIX = "bwrap-"
SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib64", "/lib32", "/libx32")
HOST_ETC_FILES = ("/etc/ld.so.cache", "/etc/localtime")
# Docker's masked and read-only /proc paths (moby oci/defaults.go).
MASKED_PROC_FILES = ("kcore", "keys", "latency_stats", "timer_list", "timer_stats",
                     "sched_debug", "sysrq-trigger", "kpagecount", "kpageflags", "kpagecgroup")
MASKED_PROC_DIRS = ("acpi", "asound", "scsi")
READONLY_PROC = ("sys", "fs", "bus", "irq")
ENOSPC_TEXT = b"No space left on device"
START_TIMEOUT = 20.0
PIDS_CHECK_PERIOD = 0.25  # how often poll() looks for forks the pids cgroup refused

# Host side, before bwrap: enter the cgroup, set rlimits, drop supplementary
# groups, exec bwrap. A separate interpreter because these must happen in
# the process that becomes bwrap, before it forks, and preexec_fn is unsafe
# in a threaded runner.
WRAPPER = r"""
import json, os, resource, sys
try:
    cfg = json.loads(sys.argv[1])
    me = str(os.getpid()).encode()
    for f in cfg["procs"]:
        fd = os.open(f, os.O_WRONLY)
        try:
            os.write(fd, me)
        finally:
            os.close(fd)
    for name, value in cfg["rlimits"]:
        resource.setrlimit(getattr(resource, name), (value, value))
    if cfg["clear_groups"]:
        os.setgroups([])
    os.execv(cfg["bwrap"], [cfg["bwrap"]] + sys.argv[2:])
except BaseException as e:
    sys.stderr.write("pipcook-sandbox: cannot start the sandbox: %r\n" % (e,))
    sys.stderr.flush()
    os._exit(125)
"""

# Host side, mapped mode: the same first step without an interpreter. The process that becomes bwrap
# writes its own pid into every cgroup.procs file given (the count comes first), then execs bwrap, so
# bwrap and everything it ever forks are born in the stage's cgroup(s): a runner killed at any moment
# of the start leaves no process of the sandbox outside them (the sandbox's first process, once
# cloned, waits on bwrap's eventfd forever if bwrap dies before the id handshake), and the cgroup
# cleanup of the next runner (clean_leftovers) kills it. One fork+exec of sh (no startup cost to
# speak of); rlimits stay with the handshake (prlimit), as sh's `ulimit -f` counts blocks.
ENTER_CGROUP = ('n=$1; shift; while [ "$n" -gt 0 ]; do '
                'echo $$ >"$1" || { echo "pipcook-sandbox: cannot start the sandbox: cannot enter its cgroup $1" >&2; '
                'exit 125; }; n=$((n - 1)); shift; done; exec "$@"')

# Inside the sandbox, "mapped" mode: still uid 0 of the namespace (which is
# host root, for bwrap's setup) with CAP_SETUID/SETGID/SETPCAP only. Drop the
# bounding set, become 65534 (the kernel clears permitted, effective and
# ambient caps on that setuid), clear the inheritable set, exec python.
LAUNCHER = r"""
import os, sys
U, G = %d, %d
try:
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in range(64):
        libc.prctl(24, cap, 0, 0, 0)  # PR_CAPBSET_DROP; EINVAL past the last cap
except ImportError:
    libc = None
os.setgid(G)
os.setuid(U)
if libc is not None:
    hdr = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3
    data = (ctypes.c_uint32 * 6)()
    if libc.capset(hdr, data) != 0:
        sys.exit("pipcook-sandbox: capset failed")
if os.getresuid() != (U, U, U) or os.getresgid() != (G, G, G) or os.getgroups():
    sys.exit("pipcook-sandbox: could not drop to uid %%d" %% U)
os.execv(sys.argv[1], sys.argv[1:])
"""


# --- the host's tools --------------------------------------------------------


@dataclass(frozen=True)
class Features:
    bwrap: str | None
    version: tuple[int, ...]
    size: bool  # --size for --tmpfs (0.6)
    perms: bool  # --perms before --tmpfs/--dir (0.6)
    disable_userns: bool  # --disable-userns (0.8)


@lru_cache(maxsize=1)
def features() -> Features:
    path = shutil.which("bwrap") or ("/usr/bin/bwrap" if os.path.exists("/usr/bin/bwrap") else None)
    version: tuple[int, ...] = ()
    if path:
        try:
            out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10).stdout
            m = re.search(r"(\d+)\.(\d+)(?:\.(\d+))?", out)
            if m:
                version = tuple(int(x) for x in m.groups() if x is not None)
        except (OSError, subprocess.SubprocessError):
            path = None
    return Features(path, version, version >= (0, 6), version >= (0, 6), version >= (0, 8))


@dataclass(frozen=True)
class Interpreter:
    executable: Path  # the real binary, under prefix
    prefix: Path  # sys.base_prefix, resolved
    hidden: tuple[Path, ...]  # site-packages dirs to cover with an empty tmpfs


@lru_cache(maxsize=1)
def interpreter() -> Interpreter:
    """The host's base Python: the sandbox runs it at the same path, without
    any of the host's installed packages."""
    prefix = Path(os.path.realpath(sys.base_prefix))
    ver = f"{sys.version_info.major}.{sys.version_info.minor}"
    real = Path(os.path.realpath(sys.executable))
    candidates = [real] if prefix in real.parents else []
    candidates += [prefix / "bin" / f"python{ver}", prefix / "bin" / "python3"]
    exe = next((c for c in candidates if c.is_file() and os.access(c, os.X_OK)), None)
    if exe is None:
        raise PipcookError(f"the bwrap backend found no python{ver} binary under {prefix} to run stages with; "
                           "install that Python, or use --isolation docker")
    hidden = [prefix / "lib" / f"python{ver}" / "site-packages"]
    if prefix == Path("/usr"):  # distribution Pythons keep packages elsewhere too
        hidden += [Path("/usr/lib/python3/dist-packages"), Path(f"/usr/local/lib/python{ver}/dist-packages"),
                   Path(f"/usr/local/lib/python{ver}/site-packages"), Path(f"/usr/lib/python{ver}/site-packages")]
    return Interpreter(Path(os.path.realpath(exe)), prefix, tuple(h for h in hidden if h.is_dir()))


def uid_mode() -> str:
    """"mapped" where the runner is root (the stage becomes host uid 65534),
    else "plain" (the stage is the runner's own uid)."""
    return "mapped" if os.geteuid() == 0 else "plain"


def sandbox_owner(mode: str | None = None, chosen: tuple[int, int] | None = None) -> tuple[int, int]:
    """The host uid and gid a stage's processes run as: what must be able
    to read its mounts, write its volume and connect to its sockets.
    `chosen`: the stage's StageOptions.stage_owner."""
    if (mode or uid_mode()) == "mapped":
        return owner.resolve(chosen)  # 65534, or the tenant's uid (`run --stage-uid`)
    return os.getuid(), os.getgid()


def _readable_by(st: os.stat_result, owner: tuple[int, int], is_dir: bool) -> bool:
    """Whether uid/gid `owner` may read (and, for a directory, enter) what `st` describes: the
    runner gives stages their files as group `owner[1]` and keeps them from everyone else."""
    need = 0o5 if is_dir else 0o4
    if st.st_uid == owner[0]:
        return (st.st_mode >> 6) & need == need
    if st.st_gid == owner[1]:
        return (st.st_mode >> 3) & need == need
    return st.st_mode & need == need


def grant_access(spec: StageSpec, owner: tuple[int, int]) -> list[str]:
    """Mapped mode: let host uid 65534 use what the runner (root) prepared.
    A writable mount's directory becomes owned by it (its contents are left
    alone), and unix sockets directly inside a mounted directory become
    connectable (0666; their directory is private to the run). Returns
    warnings for read-only sources it may not be able to read."""
    warnings = []
    for m in spec.mounts:
        src = Path(m.source)
        try:
            st = os.lstat(src)
        except OSError:
            continue  # bwrap reports a missing source itself
        is_dir = stat.S_ISDIR(st.st_mode)
        if m.writable and is_dir and (st.st_uid, st.st_gid) != owner:
            os.chown(src, *owner)
        elif not m.writable and not _readable_by(st, owner, is_dir):
            warnings.append(f"{src} (mounted at {m.target}) is not world-readable: uid {owner[0]} may not read it")
        if is_dir:
            with os.scandir(src) as it:
                for entry in it:
                    mode = entry.stat(follow_symlinks=False).st_mode
                    if stat.S_ISSOCK(mode) and stat.S_IMODE(mode) != 0o666:
                        os.chmod(entry.path, 0o666)
    return warnings


# --- small helpers -------------------------------------------------------------


def fmt_seconds(s: float) -> str:
    return f"{s:g} s"


def _process_start(pid: int) -> int | None:
    """Start time of a process (clock ticks since boot), to tell a live
    runner from a recycled pid."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    try:
        return int(text.rsplit(")", 1)[1].split()[19])
    except (IndexError, ValueError):
        return None


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)[:80] or "stage"


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def _ancestors(target: str) -> list[str]:
    parts = Path(target).parts[1:-1]
    return ["/" + "/".join(parts[: i + 1]) for i in range(len(parts))]


# --- building the command line ---------------------------------------------------


class _Args:
    """bwrap arguments, with the directory bookkeeping bwrap needs: parents
    of a mount point are created 0755 (bwrap would copy the host's modes,
    e.g. 0700 for /root, and lock the sandbox user out)."""

    def __init__(self, feats: Features) -> None:
        self.argv: list[str] = []
        self.feats = feats
        self.made: set[str] = {"/"}

    def add(self, *args: str) -> None:
        self.argv += args

    def parents(self, target: str) -> None:
        for d in _ancestors(target):
            if d in self.made:
                continue
            self.made.add(d)
            if self.feats.perms:
                self.add("--perms", "0755")
            self.add("--dir", d)

    def mount(self, flag: str, source: str | Path, target: str | Path) -> None:
        target = str(target)
        self.parents(target)
        self.made.add(target)
        self.add(flag, str(source), target)

    def tmpfs(self, target: str, mode: str, size: int | None) -> None:
        self.parents(target)
        self.made.add(target)
        if self.feats.perms:
            self.add("--perms", mode)
        if size is not None and self.feats.size:
            self.add("--size", str(size))
        self.add("--tmpfs", target)


def _etc_files(etc: Path, chosen: tuple[int, int] | None = None) -> dict[str, Path]:
    etc.mkdir(mode=0o755, exist_ok=True)
    uid, gid = owner.resolve(chosen) if os.geteuid() == 0 else (SANDBOX_UID, SANDBOX_GID)
    files = {
        "passwd": "root:x:0:0:root:/root:/usr/sbin/nologin\n"
                  f"nobody:x:{uid}:{gid}:nobody:/tmp:/usr/sbin/nologin\n",
        "group": f"root:x:0:\nnogroup:x:{gid}:\n",
        "hosts": "127.0.0.1\tlocalhost pipcook\n::1\tlocalhost ip6-localhost ip6-loopback\n",
    }
    out = {}
    for name, text in files.items():
        p = etc / name
        p.write_text(text)
        os.chmod(p, 0o644)
        out[f"/etc/{name}"] = p
    return out


def _identity(a: _Args, mode: str, info_fd: int | None, block_fd: int | None) -> None:
    """Namespaces, uid/gid and capabilities."""
    a.add("--unshare-all", "--unshare-user")
    if mode == "mapped":
        a.add("--uid", "0", "--gid", "0", "--userns-block-fd", str(block_fd), "--info-fd", str(info_fd))
    else:
        a.add("--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_GID))
        if a.feats.disable_userns:
            a.add("--disable-userns")
    a.add("--die-with-parent", "--new-session", "--cap-drop", "ALL")
    if mode == "mapped":  # for the launcher's drop to 65534, gone before python starts
        a.add("--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID", "--cap-add", "CAP_SETPCAP")
    a.add("--hostname", "pipcook", "--clearenv")


def _environment(a: _Args, spec: StageSpec) -> None:
    env = {"PATH": "/usr/bin:/bin", "HOME": "/tmp", "LANG": "C.UTF-8"}
    env.update(spec.env)
    for k, v in env.items():
        a.add("--setenv", k, v)


def _system_files(a: _Args, etc: dict[str, Path]) -> None:
    """/usr and friends read-only, the generated /etc files, two host ones."""
    for d in SYSTEM_DIRS:
        if os.path.islink(d):
            a.add("--symlink", os.readlink(d), d)
            a.made.add(d)
        elif os.path.isdir(d):
            a.mount("--ro-bind", d, d)
    for target, source in etc.items():
        a.mount("--ro-bind", source, target)
    for f in HOST_ETC_FILES:
        if os.path.isfile(f) and not os.path.islink(f):
            a.mount("--ro-bind", f, f)


def _proc(a: _Args) -> None:
    """A new procfs with Docker's read-only and masked paths."""
    a.add("--proc", "/proc")
    a.made.add("/proc")
    for name in READONLY_PROC:
        if os.path.isdir(f"/proc/{name}"):
            a.add("--ro-bind", f"/proc/{name}", f"/proc/{name}")
    for name in MASKED_PROC_FILES:
        if os.path.exists(f"/proc/{name}"):
            a.add("--ro-bind", "/dev/null", f"/proc/{name}")
    for name in MASKED_PROC_DIRS:
        if os.path.isdir(f"/proc/{name}"):
            a.tmpfs(f"/proc/{name}", "0555", None)
            a.add("--remount-ro", f"/proc/{name}")


def _dev_and_tmp(a: _Args, spec: StageSpec) -> None:
    a.add("--dev", "/dev")
    a.made.add("/dev")
    if spec.gpu:
        # Only the GPUs this runner was given (a Slurm job's allocation), not every one of the host.
        for node in gpus.given().binds():
            a.add("--dev-bind", node, node)
    a.tmpfs("/tmp", "1777", spec.limits.tmp)
    a.tmpfs("/dev/shm", "1777", spec.limits.tmp)


def _interpreter(a: _Args, interp: Interpreter) -> None:
    """The base Python at its own path (unless a system dir holds it), its site-packages hidden."""
    if not any(interp.prefix == Path(d) or Path(d) in interp.prefix.parents
               for d in SYSTEM_DIRS if os.path.isdir(d) and not os.path.islink(d)):
        a.mount("--ro-bind", interp.prefix, interp.prefix)
    for h in interp.hidden:
        a.tmpfs(str(h), "0555", 4096)
        a.add("--remount-ro", str(h))


def _stage_mounts(a: _Args, spec: StageSpec, writable: dict[str, Path]) -> None:
    for m in spec.mounts:
        a.mount("--bind" if m.writable else "--ro-bind", m.source, m.target)
    for target, vdir in writable.items():
        a.mount("--bind", vdir, target)


def _command(spec: StageSpec, mode: str, interp: Interpreter) -> list[str]:
    """What bwrap runs. Mapped mode starts as uid 0 of the namespace and must
    drop to the stage's ids before Python runs: with setpriv (one small C
    program exec'd in place of a second interpreter) where the host has it,
    else the Python launcher."""
    py = str(interp.executable)
    args = list(spec.argv) if spec.argv is not None else list(WORKER_ARGS)
    if mode != "mapped":
        return [py, *args]
    uid, gid = owner.resolve(spec.options.stage_owner)
    tool = setpriv()
    if tool is not None:
        # --keep-groups: the wrapper cleared the supplementary groups on the host
        # (setgroups is denied inside); setpriv sets real, effective and saved ids,
        # clears the bounding and inheritable sets (and with them the ambient set);
        # setuid away from 0 and the exec leave no permitted or effective capability.
        return [tool, f"--reuid={uid}", f"--regid={gid}", "--keep-groups",
                "--bounding-set=-all", "--inh-caps=-all", "--", py, *args]
    return [py, "-I", "-S", "-c", LAUNCHER % (uid, gid), py, *args]


@lru_cache(maxsize=1)
def setpriv() -> str | None:
    """util-linux's setpriv, at a path inside the sandbox's read-only /usr (or /bin)."""
    for d in ("/usr/bin", "/bin"):
        path = os.path.join(d, "setpriv")
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    return None


def build_parts(spec: StageSpec, *, mode: str, etc: dict[str, Path], seccomp_fd: int,
                writable: dict[str, Path], info_fd: int | None = None, block_fd: int | None = None,
                feats: Features | None = None, interp: Interpreter | None = None) -> tuple[list[str], list[str]]:
    """(bwrap's options, the command it runs in the sandbox).
    `writable` maps each spec.writable target to its volume directory.

    The options name host paths (the workspace, the cache, the run's state
    dir). bwrap stays pid 1 of the stage's pid namespace, and the stage can
    read pid 1's /proc/1/cmdline, so the options are handed over through
    `--args FD` (`args_memfd`), never in argv; only the command, whose paths
    are the sandbox's own, stays there."""
    interp = interp or interpreter()
    a = _Args(feats or features())
    _identity(a, mode, info_fd, block_fd)
    _environment(a, spec)
    _system_files(a, etc)
    _proc(a)
    _dev_and_tmp(a, spec)
    _interpreter(a, interp)
    _stage_mounts(a, spec, writable)
    a.add("--remount-ro", "/")
    a.add("--chdir", "/tmp", "--seccomp", str(seccomp_fd))
    return a.argv, _command(spec, mode, interp)


def build_args(spec: StageSpec, **kwargs: Any) -> list[str]:
    """The bwrap argument list (without the bwrap binary itself): options, "--", command."""
    options, command = build_parts(spec, **kwargs)
    return [*options, "--", *command]


def args_memfd(options: list[str]) -> int:
    """A memfd holding `options` NUL-separated, as bwrap's --args FD reads them."""
    # Passed to the wrapper with pass_fds; bwrap reads it whole and closes it before the sandbox starts.
    fd = os.memfd_create("pipcook-bwrap-args", os.MFD_CLOEXEC)
    try:
        os.write(fd, b"".join(o.encode() + b"\0" for o in options))
        os.lseek(fd, 0, os.SEEK_SET)
    except BaseException:
        os.close(fd)
        raise
    return fd


# --- the running stage ---------------------------------------------------------------


class BwrapStage:
    """A running stage (base.StageHandle)."""

    def __init__(self, spec: StageSpec) -> None:
        self.name = spec.name
        self.spec = spec
        self.limits: Limits = spec.limits
        # Options uid_mode ("mapped"/"plain") and disk_quota ("loop"/"watch")
        # force the weaker variants, for tests and for hosts that need them.
        self.mode = spec.options.uid_mode or uid_mode()
        if self.mode not in base.UID_MODES:
            raise PipcookError(f"stage '{spec.name}': unknown uid mode {self.mode!r} "
                               f"(choose from {', '.join(base.UID_MODES)})")
        if self.mode == "mapped" and os.geteuid() != 0:
            raise PipcookError(f"stage '{spec.name}': uid mode 'mapped' needs a runner started as root; "
                               "run as root or choose the 'plain' mode")
        self.degraded: list[str] = []  # limits or walls that do not hold here
        self.skipped: list[str] = []  # what copy-out refused
        self.proc: subprocess.Popen | None = None
        self.cgroup: cgroups.Cgroup | None = None
        self._nproc: int | None = None  # RLIMIT_NPROC where no pids cgroup could be had
        self.volume: quota.Volume | None = None
        self.timeout_used: float | None = None
        self._reason: str | None = None
        self._outcome: Outcome | None = None
        self._saw_enospc = False
        self._pids_checked = 0.0
        self._lock = threading.RLock()
        self._cleaned = False
        self._threads: list[threading.Thread] = []
        self._pipe_r: int | None = None
        self._confine_cfg: dict = {}  # the cgroup files and rlimits of the stage's processes (_start)
        self._start_failure: str | None = None  # mapped mode: the id handshake failed (_handshake)
        self._own_state = spec.options.state_dir is None
        if spec.options.state_dir is None:
            # where `clean` looks for them (tempfile's choice, which skips a read-only /tmp)
            self.state_dir = new_state_dir(STATE_PREFIX, spec.run_id, parent=tempfile.gettempdir())
        else:
            self.state_dir = Path(spec.options.state_dir)
            self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        key = f"{_safe(spec.name)}-{secrets.token_hex(3)}"
        self.stage_dir = self.state_dir / key
        self.stage_dir.mkdir(mode=0o700)
        self.record_path = self.state_dir / f"{RECORD_PREFIX}{key}.json"
        self.record = {
            "runner_pid": os.getpid(),
            "runner_start": _process_start(os.getpid()),
            "run_id": spec.run_id,
            "stage": spec.name,
            "stage_dir": str(self.stage_dir),
            "own_state_dir": self._own_state,
            "cgroup": None,
        }
        _write_json(self.record_path, self.record)

    # -- StageHandle ----------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def poll(self) -> int | None:
        if self.proc is None:
            return -1
        code = self.proc.poll()
        if code is None and self.cgroup is not None:
            now = time.monotonic()
            if now - self._pids_checked >= PIDS_CHECK_PERIOD:
                self._pids_checked = now
                if self.cgroup.pids_exhausted():
                    # A fork bomb retries forever: a refused fork stops the stage now,
                    # not at its wall-clock limit (as the docker backend does).
                    self.terminate(REASON_PIDS)
        return code

    def wait(self, timeout: float | None = None) -> int | None:
        """Exit code, or None if still running after `timeout` seconds."""
        if self.proc is None:
            return -1
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def terminate(self, reason: str | None = None) -> None:
        with self._lock:
            if self.proc is not None and self.proc.poll() is None and reason and self._reason is None:
                self._reason = reason
            if self.proc is not None and self.proc.poll() is None:
                try:
                    # bwrap runs in a session of its own (start_new_session).
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
        # Outside the lock: the log thread may call terminate() meanwhile.
        if self.cgroup is not None:
            self.cgroup.kill_all()

    def outcome(self) -> Outcome:
        if self._outcome is not None:
            return self._outcome
        code = self.poll()
        if code is None:
            return Outcome(None, None, "still running")
        return self._compute_outcome(code)

    def _compute_outcome(self, code: int) -> Outcome:
        lim = self.limits
        killed = code in (-signal.SIGKILL, 128 + signal.SIGKILL)
        reason = self._reason
        shared_detail = ""
        if reason is None and code != 0 and self.cgroup is not None and self.cgroup.oom_killed(killed_by_sigkill=killed):
            reason = REASON_MEMORY
            peak, outer = self.cgroup.memory_peak(), cgroups.enclosing_memory_limit()
            if peak is not None and outer is not None and peak < lim.memory * 0.9:
                # Its own limit was never reached: the one above the runner (a batch job's) was.
                reason = REASON_MEMORY_SHARED
                shared_detail = (f"the stage peaked at {fmt_bytes(peak)} of its own {fmt_bytes(lim.memory)}; the limit "
                                 f"of {fmt_bytes(outer)} above the runner, shared by the runner and every stage, ran out")
        if reason is None and code != 0 and self.cgroup is not None and self.cgroup.pids_exhausted():
            reason = REASON_PIDS
        if reason is None and code != 0 and self.volume is not None and (
                self.volume.exceeded() or self._saw_enospc):
            reason = REASON_DISK
        details = {
            REASON_TIMEOUT: f"wall-clock limit {fmt_seconds(self.timeout_used or lim.timeout)}",
            REASON_MEMORY: f"memory limit {fmt_bytes(lim.memory)}",
            REASON_MEMORY_SHARED: shared_detail,
            REASON_PIDS: f"process limit {lim.pids}",
            REASON_DISK: f"disk quota {fmt_bytes(lim.disk)}",
            REASON_OUTPUT: f"output limit {fmt_bytes(lim.output)}",
            REASON_CANCELLED: "cancelled",
            REASON_PROTOCOL: "protocol error",
        }
        detail = details.get(reason, "") if reason else ""
        if code == 125 and reason is None:
            detail = "the sandbox could not start (see the stage log)"
        if self._start_failure is not None:
            detail = f"the sandbox could not start: {self._start_failure}"
        return Outcome(code, reason, detail)

    def cleanup(self) -> None:
        with self._lock:
            if self._cleaned:
                return
            self._cleaned = True
        errors: list[str] = []

        def step(what: str, fn: Callable[[], object]) -> None:
            try:
                fn()
            except Exception as e:  # keep going: every later step still matters
                errors.append(f"{what}: {e!r}")
                log.exception("cleanup of stage %s: %s failed", self.name, what)

        if self.proc is not None:
            if self.proc.poll() is None:
                self.terminate(REASON_CANCELLED)
            step("wait", self._reap)
        if self.cgroup is not None:
            step("kill", self.cgroup.kill_all)
        for t in self._threads:
            t.join(timeout=5)
        proc = self.proc
        if proc is not None and self._outcome is None:
            step("outcome", lambda: setattr(self, "_outcome", self._compute_outcome(proc.returncode)))
        if self.volume is not None:
            if self.spec.writable:
                step("copy out", self._copy_out)
            step("unmount", self.volume.destroy)
        cgroup, pipe_r = self.cgroup, self._pipe_r
        if cgroup is not None:
            def remove_cgroup() -> None:
                if not cgroup.remove():
                    errors.append("cgroup busy")
            step("cgroup", remove_cgroup)
        if pipe_r is not None:
            step("close", lambda: os.close(pipe_r))
            self._pipe_r = None
        if not errors:
            step("state", self._remove_state)
        else:
            log.error("stage %s left resources behind (see %s): %s", self.name, self.record_path, errors)

    def _reap(self) -> None:
        if self.proc is None:
            return
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def _copy_out(self) -> None:
        if self.volume is None:
            return
        subs = {target: f"w{i}" for i, target in enumerate(self.spec.writable)}
        self.skipped = self.volume.copy_out({subs[t]: host for t, host in self.spec.writable.items()})

    def _remove_state(self) -> None:
        if any(quota.mounted(p) for p in _mounts_below(self.stage_dir)):
            raise OSError(f"mounts remain below {self.stage_dir}")
        shutil.rmtree(self.stage_dir, ignore_errors=True)
        self.record_path.unlink(missing_ok=True)
        if self._own_state:
            shutil.rmtree(self.state_dir, ignore_errors=True)

    # -- threads ------------------------------------------------------------------

    def _chunks(self, fd: int) -> Iterator[bytes]:
        """The stage's output, noting on the way whether it reported ENOSPC
        (a hint for the "disk" reason when free space is not conclusive)."""
        tail = b""
        while True:
            try:
                chunk = os.read(fd, 1 << 16)
            except OSError:
                return
            if not chunk:
                return
            if ENOSPC_TEXT in tail + chunk:
                self._saw_enospc = True
            tail = chunk[-len(ENOSPC_TEXT):]
            yield chunk

    def _watch_disk(self) -> None:
        """The weaker quota: kill the stage once the watched volume is over."""
        while self.proc is not None and self.proc.poll() is None:
            if self.volume is not None and self.volume.exceeded():
                self.terminate(REASON_DISK)
                return
            time.sleep(quota.WATCH_PERIOD)

    # -- starting ------------------------------------------------------------------

    def _save(self, **changes: Any) -> None:
        self.record.update(changes)
        _write_json(self.record_path, self.record)

    def _start(self) -> None:
        spec, lim = self.spec, self.limits
        feats = features()
        if feats.bwrap is None:
            raise PipcookError("bubblewrap (bwrap) is not installed, so stages cannot be confined with "
                               "--isolation bwrap: install it (apt-get install bubblewrap) or use --isolation docker")
        if not feats.size:
            self.degraded.append(f"bwrap {feats.version} has no --size: /tmp is capped only by memory")
        owner = sandbox_owner(self.mode, spec.options.stage_owner)

        writable: dict[str, Path] = {}
        if self.mode == "plain" and os.geteuid() == 0:
            self.degraded.append("stage runs as host uid 0 (no capabilities, /proc/sys read-only): "
                                 "mapped mode is stronger")
        if spec.writable:
            subs = [f"w{i}" for i in range(len(spec.writable))]
            self.volume = quota.create_volume(self.stage_dir / "vol", lim.disk, subs, owner=owner,
                                              kind=spec.options.disk_quota)
            if self.volume.kind != "loop":
                self.degraded.append(f"disk quota is a watched directory (weaker): {self.volume.note}")
            writable = {t: self.volume.path(s) for t, s in zip(spec.writable, subs)}

        cg_name = _safe(f"{spec.run_id}-{spec.name}")
        self.cgroup = cgroups.create(cg_name, memory=lim.memory, pids=lim.pids, cpus=lim.cpus)
        missing = list(cgroups.CONTROLLERS) if self.cgroup is None else list(self.cgroup.missing)
        if self.cgroup is not None:
            self._save(cgroup={"name": self.cgroup.name, "version": self.cgroup.version,
                               "dirs": {k: str(v) for k, v in self.cgroup.dirs.items()}})
        nproc = None
        if "pids" in missing and os.geteuid() != 0:
            # Not root (a batch job's user without a delegated pids cgroup): the kernel does enforce
            # RLIMIT_NPROC, per user, so bound this user's tasks at what it has now plus the stage's share.
            nproc = cgroups.user_tasks(os.geteuid()) + lim.pids
        if missing:
            why = "no writable cgroup" if self.cgroup is None else f"not delegated to uid {os.geteuid()}"
            self.degraded.append(f"per-stage cgroup limits NOT enforced: {', '.join(missing)} ({why}); "
                                 f"what holds instead: {cgroups.what_holds(missing, nproc)}")
        self._nproc = nproc
        if self.mode == "mapped":
            self.degraded += grant_access(spec, owner)
        for d in self.degraded:
            log.warning("stage %s: %s", spec.name, d)

        etc = _etc_files(self.stage_dir / "etc", spec.options.stage_owner)
        sc_fd = os.memfd_create(SECCOMP_MEMFD, os.MFD_CLOEXEC)
        info_r = info_w = block_r = block_w = None
        pipe_r, pipe_w = os.pipe()
        child_fds = [sc_fd, pipe_w]
        try:
            os.write(sc_fd, seccomp.bpf_program())
            os.lseek(sc_fd, 0, os.SEEK_SET)
            if self.mode == "mapped":
                info_r, info_w = os.pipe()
                block_r, block_w = os.pipe()
                child_fds += [info_w, block_r]
            options, command = build_parts(spec, mode=self.mode, etc=etc, seccomp_fd=sc_fd, writable=writable,
                                           info_fd=info_w, block_fd=block_r, feats=feats)
            args_fd = args_memfd(options)
            child_fds.append(args_fd)
            argv = ["--args", str(args_fd), "--", *command]
            cfg = {
                "procs": [str(p) for p in (self.cgroup.procs_files if self.cgroup else [])],
                "rlimits": [["RLIMIT_NOFILE", lim.nofile], ["RLIMIT_FSIZE", lim.disk], ["RLIMIT_CORE", 0]]
                           + ([["RLIMIT_NPROC", self._nproc]] if self._nproc else []),
                "clear_groups": os.geteuid() == 0,
                "bwrap": feats.bwrap,
            }
            # Mapped mode needs no interpreter: bwrap enters the cgroup before its exec (ENTER_CGROUP),
            # the handshake sets the rlimits of bwrap and its sandbox's first process before the sandbox
            # may go on (_confine), and Popen clears the supplementary groups. Plain mode needs the
            # wrapper (an interpreter: setrlimit before the exec).
            direct = self.mode == "mapped"
            self._confine_cfg = cfg
            self.proc = subprocess.Popen(
                _launch(cfg, argv) if direct else [sys.executable, "-I", "-S", "-c", WRAPPER, json.dumps(cfg), *argv],
                stdin=subprocess.DEVNULL, stdout=pipe_w, stderr=pipe_w,
                pass_fds=[sc_fd, args_fd] + ([info_w, block_r] if info_w is not None and block_r is not None else []),
                start_new_session=True, env={"PATH": "/usr/bin:/bin"}, cwd="/",
                extra_groups=[] if direct else None,
            )
            self._save(bwrap_pid=self.proc.pid)
        except BaseException:
            for fd in (pipe_r, info_r, block_w):
                if fd is not None:
                    os.close(fd)
            raise
        finally:
            for fd in child_fds:
                os.close(fd)
        self._pipe_r = pipe_r
        self._threads.append(output.capture(self._chunks(pipe_r), output.as_target(spec.log_path), lim.output,
                                            lambda: self.terminate(REASON_OUTPUT)))
        if self.mode == "mapped" and info_r is not None and block_w is not None:
            # The handshake (bwrap clones the namespaces, then the runner writes the maps) ends in a
            # thread, so the runner starts the next stage's sandbox meanwhile. Nothing of the stage
            # runs before it ends: bwrap waits on block_w; a failure kills the stage (_start_failure).
            t = threading.Thread(target=self._handshake, args=(info_r, block_w), name=f"ids-{spec.name}",
                                 daemon=True)
            t.start()
            self._threads.append(t)
        if self.volume is not None and self.volume.kind == "watch":
            w = threading.Thread(target=self._watch_disk, name=f"disk-{spec.name}", daemon=True)
            w.start()
            self._threads.append(w)

    def _confine(self, pids: list[int]) -> None:
        """Mapped mode: the rlimits the wrapper sets in plain mode, from outside. bwrap and the
        sandbox's first process (blocked on block_w, nothing forked yet) get them, so everything the
        stage ever forks is limited. Both were born in the stage's cgroup (ENTER_CGROUP)."""
        cfg = self._confine_cfg
        try:
            for pid in pids:
                for name, value in cfg["rlimits"]:
                    resource.prlimit(pid, getattr(resource, name), (value, value))
        except OSError as e:
            raise PipcookError(f"stage '{self.name}': could not put the sandbox into its cgroup and limits: {e}") from None

    def _handshake(self, info_r: int, block_w: int) -> None:
        try:
            self._map_ids(info_r, block_w)
        except Exception as e:  # the stage is stopped; its outcome says why (set before the kill)
            self._start_failure = str(e)
            log.error("stage %s: the sandbox could not start: %s", self.name, e)
            self.terminate(REASON_CANCELLED)
        finally:
            os.close(info_r)
            os.close(block_w)

    def _map_ids(self, info_r: int, block_w: int) -> None:
        """Mapped mode: bwrap has cloned the namespaces and waits for us to
        write the user namespace's maps (--info-fd/--userns-block-fd)."""
        data = b""
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise PipcookError(f"stage '{self.name}': bwrap did not report its sandbox pid within "
                                   f"{START_TIMEOUT:g} s; the host may be overloaded (see `pipcook-sandbox doctor`)")
            ready, _, _ = select.select([info_r], [], [], min(left, 0.5))
            if not ready:
                continue
            chunk = os.read(info_r, 4096)
            if not chunk:
                break
            data += chunk
        if not data:
            return  # bwrap failed before cloning; its message is in the log
        child = int(json.loads(data)["child-pid"])
        self._confine([self.proc.pid, child] if self.proc is not None else [child])
        uid, gid = owner.resolve(self.spec.options.stage_owner)
        maps = f"0 0 1\n{uid} {uid} 1\n"
        gmaps = f"0 0 1\n{gid} {gid} 1\n"
        try:
            Path(f"/proc/{child}/uid_map").write_text(maps)
            Path(f"/proc/{child}/setgroups").write_text("deny\n")
            Path(f"/proc/{child}/gid_map").write_text(gmaps)
        except OSError as e:
            raise PipcookError(f"stage '{self.name}': the kernel refused the sandbox's uid/gid maps: {e}") from None
        try:
            os.write(block_w, b"1")
        except BrokenPipeError:
            pass  # bwrap is gone already (killed meanwhile): its exit is the outcome


def _launch(cfg: dict, argv: list[str]) -> list[str]:
    """Mapped mode's command line: bwrap itself, behind ENTER_CGROUP where there are cgroups to enter
    (and a shell to do it; else the interpreter wrapper, which enters them the same way)."""
    procs, bwrap = cfg["procs"], cfg["bwrap"]
    if not procs:
        return [bwrap, *argv]
    sh = shutil.which("sh", path="/bin:/usr/bin")
    if sh is None:
        return [sys.executable, "-I", "-S", "-c", WRAPPER, json.dumps(cfg), *argv]
    return [sh, "-c", ENTER_CGROUP, "sh", str(len(procs)), *procs, bwrap, *argv]


def start(spec: StageSpec) -> BwrapStage:
    """Start a stage in a new sandbox. On a failure to set it up, everything
    already created is released and the error raised."""
    stage = BwrapStage(spec)
    try:
        stage._start()
    except BaseException:
        stage.cleanup()
        raise
    return stage


def enforce_deadline(handle: base.StageHandle, timeout: float, poll_interval: float = 0.05) -> Outcome:
    """Wait for the stage at most `timeout` seconds, then terminate it with
    REASON_TIMEOUT. Returns its outcome."""
    if hasattr(handle, "timeout_used"):
        handle.timeout_used = timeout
    deadline = time.monotonic() + timeout
    while handle.poll() is None:
        if time.monotonic() >= deadline:
            handle.terminate(REASON_TIMEOUT)
            break
        time.sleep(poll_interval)
    end = time.monotonic() + 10
    while handle.poll() is None and time.monotonic() < end:
        time.sleep(poll_interval)
    return handle.outcome()


class BwrapBackend(base.Backend):
    """Bubblewrap: namespaces, seccomp, cgroups and quota volumes, no daemon."""

    name = NAME
    can_boot_warm = True  # spec.env reaches bwrap as --setenv in its memfd arguments

    def start(self, spec: StageSpec) -> BwrapStage:
        return start(spec)

    def probe(self) -> dict:
        return probe()

    def clean_leftovers(self) -> list[str]:
        return clean_leftovers()


# --- doctor and clean ------------------------------------------------------------


PROBE_CODE = r"""
import errno, os, socket
print("uid", os.getuid())
print("pids", len([p for p in os.listdir("/proc") if p.isdigit()]))
print("ifaces", " ".join(sorted(l.split(":")[0].strip() for l in open("/proc/net/dev").read().splitlines()[2:])))
try:
    socket.socket(socket.AF_INET)
    print("inet allowed")
except OSError as e:
    print("inet", errno.errorcode.get(e.errno))
"""


def probe() -> dict:
    """What works here, by starting one real sandbox (for `doctor`). The
    keys `bwrap`, `userns`, `seccomp`, `pid_namespace`, `network_namespace`
    must be true before untrusted code may run; `<key>_why` explains a
    false one."""
    feats = features()
    info: dict = {
        "bwrap": feats.bwrap,
        "version": ".".join(map(str, feats.version)) or None,
        "userns": False,
        "seccomp": False,
        "pid_namespace": False,
        "network_namespace": False,
        "uid_mode": uid_mode(),
        "sandbox_uid": sandbox_owner()[0],
        "tmpfs_size": feats.size,
        "nested_userns": ("denied by --disable-userns and seccomp"
                          if feats.disable_userns and uid_mode() == "plain" else "denied by seccomp"),
        "cgroups": cgroups.available()["version"],
        "cgroup_limits": ", ".join(cgroups.available()["controllers"]) or None,
        "disk_quota": quota.probe()["kind"],
    }
    if feats.bwrap is None:
        info["bwrap_why"] = "bubblewrap is not installed (apt-get install bubblewrap)"
        return info
    try:
        info["interpreter"] = str(interpreter().executable)
    except RuntimeError as e:
        info["userns_why"] = str(e)
        return info
    tmp = Path(tempfile.mkdtemp(prefix="pipcook-probe-"))
    text = ""
    try:
        spec = StageSpec(run_id=cgroups.new_run_id(), name="probe", mounts=[],
                         limits=Limits(memory=256 << 20, pids=32, timeout=30),
                         log_path=tmp / "probe.log", argv=["-I", "-S", "-c", PROBE_CODE])
        stage = start(spec)
        try:
            out = enforce_deadline(stage, 30)
        finally:
            stage.cleanup()
        text = (tmp / "probe.log").read_text(errors="replace")
        info["userns"] = out.exit_code == 0 and f"uid {sandbox_owner()[0] if uid_mode() == 'mapped' else SANDBOX_UID}\n" in text
        info["seccomp"] = "inet EAFNOSUPPORT" in text
        m = re.search(r"^pids (\d+)$", text, re.M)
        info["pid_namespace"] = m is not None and int(m.group(1)) <= 3
        info["network_namespace"] = "ifaces lo\n" in text
        if stage.degraded:
            info["degraded"] = "; ".join(stage.degraded)
    except Exception as e:
        text = f"{type(e).__name__}: {e}"
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for key in ("userns", "seccomp", "pid_namespace", "network_namespace"):
        if not info[key]:
            info[f"{key}_why"] = f"the probe sandbox did not show it: {text.strip()[-300:]}"
    return info


def _mounts_below(root: Path) -> list[Path]:
    """Mount points at or below root, deepest first."""
    return mountinfo.points_below(root)


def _runner_alive(record: dict) -> bool:
    pid = record.get("runner_pid")
    if not isinstance(pid, int) or not cgroups.pid_alive(pid):
        return False
    start = record.get("runner_start")
    return start is None or _process_start(pid) == start


def _records(state_dir: Path) -> list[tuple[Path, dict]]:
    """JSON files of a state dir that name a runner pid: this backend's
    stage records and the orchestrator's run.json."""
    found = []
    for path in sorted(state_dir.glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and "runner_pid" in data:
            found.append((path, data))
    return found


def clean_leftovers(roots: list[Path] | None = None) -> list[str]:
    """Remove what runs of dead runners left: their stages' processes and
    cgroups, mounts (quota volumes), loop images and state dirs. Looks at
    `<tmp>/pcsb-*` and at `roots` (state dirs passed in spec.options). A
    state dir is touched only when every runner pid recorded in it is dead;
    one without any record is left alone. Returns what was removed."""
    removed: list[str] = []
    dirs = sorted(Path(tempfile.gettempdir()).glob(STATE_PREFIX + "*")) + [Path(r) for r in roots or []]
    for d in dirs:
        if not d.is_dir() or d.is_symlink():
            continue
        records = _records(d)
        if not records or any(_runner_alive(r) for _, r in records):
            continue
        removed += _clean_state_dir(d, records)
    removed += _kill_orphaned_sandboxes()
    removed += cgroups.remove_leftovers()
    return removed


SECCOMP_MEMFD = "pipcook-seccomp"  # the name of the filter's memfd, which every stage's bwrap holds


def _kill_orphaned_sandboxes() -> list[str]:
    """bwrap processes of stages whose runner died while bwrap was starting them. Killed between its
    clone and its id handshake, bwrap leaves the sandbox's first process waiting forever on an eventfd,
    reparented to init. Since bwrap is born in the stage's cgroup (ENTER_CGROUP, WRAPPER), the cgroup
    cleanup kills it; this stays for the two cases where no cgroup leads to it: a stage that got no
    cgroup at all (an unprivileged runner without delegation) and the orphans of runners older than
    that (they moved bwrap into the cgroup only at the handshake). It is known by what it holds: the
    seccomp filter's memfd, which no other program has. A stage of a live runner is never its init's
    child (its parent is the runner or the stage's outer bwrap)."""
    killed: list[str] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.path.basename(os.readlink(entry / "exe")) != "bwrap" or _ppid(entry) != 1:
                continue
            if not any(os.readlink(fd).startswith("/memfd:" + SECCOMP_MEMFD) for fd in (entry / "fd").iterdir()):
                continue
            os.kill(int(entry.name), signal.SIGKILL)
        except (OSError, ValueError):
            continue  # gone meanwhile, or not ours to read
        killed.append(f"orphaned sandbox process {entry.name} (its runner died while starting it)")
    return killed


def _ppid(proc_dir: Path) -> int:
    for line in (proc_dir / "status").read_text().splitlines():
        if line.startswith("PPid:"):
            return int(line.split()[1])
    return -1


def _clean_state_dir(d: Path, records: list[tuple[Path, dict]]) -> list[str]:
    removed: list[str] = []
    for _, record in records:
        cg = record.get("cgroup")
        if cg:
            # No pid is signalled from a record (it may have been recycled):
            # the cgroup holds exactly the stage's processes.
            group = cgroups.from_dirs(cg["name"], cg["version"], cg["dirs"])
            group.kill_all()
            if group.remove():
                removed += [str(p) for p in group.all_dirs()]
    for mp in _mounts_below(d):
        if quota.unmount(mp):
            removed.append(f"mount {mp}")
    if _mounts_below(d):
        return removed  # never delete below a live mount
    for img in d.rglob("disk.img"):
        if quota.destroy_leftover(None, img):
            removed.append(str(img))
    if d.name.startswith(STATE_PREFIX):
        shutil.rmtree(d, ignore_errors=True)
        removed.append(str(d))
    else:  # a caller's own state dir: only what this backend put there
        for path, record in records:
            stage_dir = Path(record.get("stage_dir", ""))
            if stage_dir.is_absolute() and d in stage_dir.parents:
                shutil.rmtree(stage_dir, ignore_errors=True)
                removed.append(str(stage_dir))
            if path.name.startswith(RECORD_PREFIX):
                path.unlink(missing_ok=True)
    return removed
