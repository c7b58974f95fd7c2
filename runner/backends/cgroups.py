"""Per-stage cgroups: the memory, process-count and CPU limits of a sandbox,
and the handle that kills every process of a stage at once.

Layout: `<runner's own cgroup>/pipcook-sandbox/<run_id>-<stage>`.

- cgroup v2 (one hierarchy): one directory. The runner's own cgroup must
  delegate memory/pids/cpu to its children, and the kernel allows that only
  while it holds no processes itself ("no internal processes"), so when
  enabling them fails with EBUSY the processes of the runner's cgroup move
  into a leaf `<own>/pipcook-runner` first (what container init systems do;
  under systemd, give the runner's unit Delegate=yes so systemd leaves
  that subtree alone).
  Limits: memory.max, memory.swap.max=0, memory.oom.group=1, pids.max,
  cpu.max. Killing uses cgroup.kill (Linux 5.14+).
- cgroup v1: one directory per controller (memory, pids, cpu), each under
  the runner's own path in that hierarchy. Limits: memory.limit_in_bytes
  and memory.memsw.limit_in_bytes when swap accounting exists (so no swap),
  pids.max, cpu.cfs_quota_us/cfs_period_us. Killing is SIGKILL to every
  listed pid until the cgroup is empty (bounded).

Where nothing is writable (an unprivileged runner without delegation),
`create` returns None and the caller must say that memory, process and CPU
limits are not enforced; `available()` tells `doctor` why.

The sandbox must be born in the cgroup: the process that becomes bwrap
writes its own pid into every file of `Cgroup.procs_files` before its exec
(bwrap.ENTER_CGROUP, bwrap.WRAPPER), so a runner killed at any moment leaves
no process of a stage outside its cgroup, where the cleanup finds it.

Run ids carry the runner's pid, as a leading `<pid>-` (the orchestrator's
`<pid>-<hex>`) or a `pid<N>` token (`new_run_id()`), so `leftovers()` can
tell the cgroups of a dead runner from those of a live one.
"""
from __future__ import annotations

import errno
import os
import re
import secrets
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import mountinfo

ROOT_NAME = "pipcook-sandbox"
LEAF_NAME = "pipcook-runner"
CONTROLLERS = ("memory", "pids", "cpu")
CPU_PERIOD_US = 100_000
# The scheduler weight of one ordinary (nice 0) task: v1 cpu.shares, v2 cpu.weight.
# A stage's group weighs as many tasks as the CPUs it was granted, and the shared
# pipcook-sandbox parent as the sum of its stages: at the default weight, all the
# stages together competed like one process against every task of a busy host.
WEIGHT_FILE = {1: "cpu.shares", 2: "cpu.weight"}
WEIGHT_PER_CPU = {1: 1024, 2: 100}
WEIGHT_RANGE = {1: (2, 262_144), 2: (1, 10_000)}

PROC_CGROUP = Path("/proc/self/cgroup")
PROC_MOUNTINFO = mountinfo.PROC_MOUNTINFO


# --- small file helpers ----------------------------------------------------


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def _write(path: Path, value: str) -> None:
    """One write() call: cgroup files take a value per write."""
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def _keyed(path: Path, key: str) -> int | None:
    """A value from a flat-keyed file like memory.events ("oom_kill 3")."""
    text = _read(path)
    if text is None:
        return None
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] == key:
            try:
                return int(parts[1])
            except ValueError:
                return None
    return None


def _int(path: Path) -> int | None:
    text = _read(path)
    try:
        return int(text.strip()) if text is not None else None
    except ValueError:
        return None


# --- discovering hierarchies -------------------------------------------------


@dataclass(frozen=True)
class _Mount:
    path: Path
    root: str  # the hierarchy path mounted there
    fstype: str
    options: frozenset[str]


def _mounts() -> list[_Mount]:
    found = []
    for m in mountinfo.mounts(PROC_MOUNTINFO):
        if m.fstype in ("cgroup", "cgroup2"):
            found.append(_Mount(Path(m.point), m.root, m.fstype, m.super_options))
    return found


def _own_paths() -> dict[str, str]:
    """Controller (or "" for v2) -> this process's cgroup path."""
    paths = {}
    for line in (_read(PROC_CGROUP) or "").splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        if parts[1] == "":
            paths[""] = parts[2]
        for ctrl in parts[1].split(","):
            if ctrl:
                paths[ctrl] = parts[2]
    return paths


def _under(mount: _Mount, cgpath: str) -> Path:
    """The directory of hierarchy path `cgpath` below `mount`."""
    rel = cgpath
    if mount.root != "/" and (cgpath == mount.root or cgpath.startswith(mount.root + "/")):
        rel = cgpath[len(mount.root):]
    candidate = mount.path / rel.lstrip("/")
    return candidate if candidate.is_dir() else mount.path


def _v2_mount() -> _Mount | None:
    return next((m for m in _mounts() if m.fstype == "cgroup2"), None)


def _v1_mount(controller: str) -> _Mount | None:
    return next((m for m in _mounts() if m.fstype == "cgroup" and controller in m.options), None)


def _v2_base() -> Path | None:
    mount = _v2_mount()
    own = _own_paths().get("")
    if mount is None or own is None:
        return None
    base = _under(mount, own)
    # A runner that was moved into the leaf by an earlier call still
    # creates its stages beside the leaf, not below it.
    if base.name == LEAF_NAME:
        base = base.parent
    return base


def _v1_base(controller: str) -> Path | None:
    mount = _v1_mount(controller)
    own = _own_paths().get(controller)
    if mount is None or own is None:
        return None
    return _under(mount, own)


def _v2_controllers(base: Path) -> list[str]:
    have = (_read(base / "cgroup.controllers") or "").split()
    return [c for c in CONTROLLERS if c in have]


def _v1_controllers() -> list[str]:
    return [c for c in CONTROLLERS if (b := _v1_base(c)) is not None and os.access(b, os.W_OK)]


# --- the handle -------------------------------------------------------------


@dataclass
class Cgroup:
    name: str
    version: int  # 1 or 2
    dirs: dict[str, Path]  # controller -> directory ("" holds the v2 dir)
    missing: list[str] = field(default_factory=list)  # limits NOT enforced

    @property
    def procs_files(self) -> list[Path]:
        return [d / "cgroup.procs" for d in self.all_dirs()]

    def all_dirs(self) -> list[Path]:
        seen: list[Path] = []
        for d in self.dirs.values():
            if d not in seen:
                seen.append(d)
        return seen

    def _dir(self, controller: str) -> Path | None:
        return self.dirs.get(controller) if self.version == 1 else self.dirs.get("")

    def pids(self) -> set[int]:
        found: set[int] = set()
        for f in self.procs_files:
            for tok in (_read(f) or "").split():
                found.add(int(tok))
        return found

    def oom_killed(self, killed_by_sigkill: bool = False) -> bool:
        """Did the kernel's OOM killer act in this cgroup? On v1 a hit of the
        limit (failcnt) counts only together with a SIGKILL exit, since
        reclaim alone also bumps failcnt."""
        d = self._dir("memory")
        if d is None or "memory" in self.missing:
            return False
        if self.version == 2:
            return (_keyed(d / "memory.events", "oom_kill") or 0) > 0
        if (_keyed(d / "memory.oom_control", "oom_kill") or 0) > 0:
            return True
        return killed_by_sigkill and (_int(d / "memory.failcnt") or 0) > 0

    def pids_exhausted(self) -> bool:
        d = self._dir("pids")
        if d is None or "pids" in self.missing:
            return False
        return (_keyed(d / "pids.events", "max") or 0) > 0

    def memory_peak(self) -> int | None:
        d = self._dir("memory")
        if d is None or "memory" in self.missing:
            return None
        return _int(d / ("memory.peak" if self.version == 2 else "memory.max_usage_in_bytes"))

    def kill_all(self, timeout: float = 5.0) -> bool:
        """SIGKILL every process in the cgroup; True once it is empty."""
        deadline = time.monotonic() + timeout
        if self.version == 2 and (self.dirs[""] / "cgroup.kill").exists():
            try:
                _write(self.dirs[""] / "cgroup.kill", "1")
            except OSError:
                pass
        while True:
            pids = self.pids()
            if not pids:
                return True
            if time.monotonic() > deadline:
                return False
            # Repeated passes catch children forked while we read the list;
            # pids.max bounds how many there can be.
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            time.sleep(0.02)

    def remove(self, timeout: float = 2.0) -> bool:
        """rmdir the stage's directories; True when all are gone. Retries
        briefly: a just-killed process leaves the cgroup asynchronously."""
        deadline = time.monotonic() + timeout
        remaining = [d for d in self.all_dirs() if d.exists()]
        while remaining:
            for d in list(remaining):
                try:
                    d.rmdir()
                    remaining.remove(d)
                except FileNotFoundError:
                    remaining.remove(d)
                except OSError:
                    pass
            if not remaining or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        if not remaining:
            for d in self.all_dirs():
                if not remove_parent_if_empty(d.parent) and d == self._dir("cpu"):
                    weigh_parent(d.parent, self.version)
        return not remaining


def remove_parent_if_empty(parent: Path) -> bool:
    """rmdir `<own cgroup>/pipcook-sandbox` once its last stage is gone: a
    directory left in a cgroup that a batch system (Slurm) made for a job
    stops it removing that job's cgroup. Another runner's stage inside makes
    the rmdir fail (EBUSY/ENOTEMPTY), which is fine: the last one out removes
    it; a runner creating a stage at that moment makes it again (`_mkdir_parent`)."""
    if parent.name != ROOT_NAME:
        return False
    try:
        parent.rmdir()
        return True
    except FileNotFoundError:
        return True
    except OSError:
        return False


# --- creating ----------------------------------------------------------------


def _enable(cgdir: Path, controllers: list[str]) -> list[str]:
    """Enable controllers for cgdir's children; returns those that failed."""
    have = set((_read(cgdir / "cgroup.subtree_control") or "").split())
    failed = []
    for c in controllers:
        if c in have:
            continue
        try:
            _write(cgdir / "cgroup.subtree_control", "+" + c)
        except OSError:
            failed.append(c)
    return failed


def _evacuate(base: Path) -> None:
    """Move every process of `base` into the leaf `base/pipcook-runner`, so
    that `base` may delegate controllers (cgroup v2's no-internal-process
    rule). Processes that cannot move (kernel threads) are left."""
    leaf = base / LEAF_NAME
    leaf.mkdir(exist_ok=True)
    for _ in range(3):  # processes may fork while we move them
        pids = (_read(base / "cgroup.procs") or "").split()
        if not pids:
            return
        for pid in pids:
            try:
                _write(leaf / "cgroup.procs", pid)
            except OSError:
                pass


def prepare_v2_parent(base: Path, controllers: list[str]) -> tuple[Path, list[str]]:
    """Make `base/pipcook-sandbox` with `controllers` delegated to its
    children; returns it and the controllers that could not be enabled."""
    failed = _enable(base, controllers)
    if failed:
        _evacuate(base)
        failed = _enable(base, failed)
    parent = base / ROOT_NAME
    parent.mkdir(exist_ok=True)
    ok = [c for c in controllers if c not in failed]
    failed += _enable(parent, ok)
    return parent, failed


def _create_v2(name: str, memory: int, pids: int, cpus: float) -> Cgroup | None:
    base = _v2_base()
    if base is None or not os.access(base, os.W_OK):
        return None
    wanted = _v2_controllers(base)
    try:
        for attempt in range(3):
            parent, failed = prepare_v2_parent(base, wanted)
            try:
                d = parent / name
                d.mkdir()
                break
            except FileNotFoundError:  # the last stage of another run removed the parent just now
                if attempt == 2:
                    raise
    except OSError:
        return None
    cg = Cgroup(name, 2, {"": d}, missing=[c for c in CONTROLLERS if c not in wanted] + failed)
    settings = {
        "memory": [("memory.max", str(memory)), ("memory.swap.max", "0"), ("memory.oom.group", "1")],
        "pids": [("pids.max", str(pids))],
        "cpu": [("cpu.max", f"{max(1000, int(cpus * CPU_PERIOD_US))} {CPU_PERIOD_US}"),
                ("cpu.weight", cpu_weight(2, cpus))],
    }
    _apply(cg, d, settings, optional={"memory.swap.max", "memory.oom.group", "cpu.weight"})
    if "cpu" not in cg.missing:
        weigh_parent(parent, 2)
    return cg


def _mkdir_stage(parent: Path, name: str, exist_ok: bool = False) -> Path:
    """mkdir parent/name, making parent first; another runner's last stage may
    remove an empty parent between the two mkdirs (remove_parent_if_empty)."""
    for attempt in range(3):
        parent.mkdir(exist_ok=True)
        try:
            (parent / name).mkdir(exist_ok=exist_ok)
            return parent / name
        except FileNotFoundError:
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


def _create_v1(name: str, memory: int, pids: int, cpus: float) -> Cgroup | None:
    dirs: dict[str, Path] = {}
    missing: list[str] = []
    for c in CONTROLLERS:
        base = _v1_base(c)
        try:
            if base is None:
                raise OSError(errno.ENOENT, "no hierarchy")
            d = _mkdir_stage(base / ROOT_NAME, name, exist_ok=True)
            dirs[c] = d
        except OSError:
            missing.append(c)
    if not dirs:
        return None
    cg = Cgroup(name, 1, dirs, missing=missing)
    quota = max(1000, int(cpus * CPU_PERIOD_US))
    settings = {
        # limit_in_bytes first: memsw may never be below it.
        "memory": [("memory.limit_in_bytes", str(memory)),
                   ("memory.memsw.limit_in_bytes", str(memory)),
                   ("memory.swappiness", "0")],
        "pids": [("pids.max", str(pids))],
        "cpu": [("cpu.cfs_period_us", str(CPU_PERIOD_US)), ("cpu.cfs_quota_us", str(quota)),
                ("cpu.shares", cpu_weight(1, cpus))],
    }
    for c, d in dirs.items():
        _apply(cg, d, {c: settings[c]},
               optional={"memory.memsw.limit_in_bytes", "memory.swappiness", "cpu.shares"})
    if "cpu" in dirs and "cpu" not in cg.missing:
        weigh_parent(dirs["cpu"].parent, 1)
    return cg


def cpu_weight(version: int, cpus: float) -> str:
    """The scheduler weight of a stage granted `cpus` CPUs (at least one task's)."""
    low, high = WEIGHT_RANGE[version]
    return str(min(high, max(low, round(max(1.0, cpus) * WEIGHT_PER_CPU[version]))))


def weigh_parent(parent: Path, version: int) -> None:
    """Set the pipcook-sandbox parent's weight to the sum of its stages' (at
    least one task's). Best effort and racy by design: every runner recomputes
    it whenever a stage comes or goes, so the last writer sees every stage."""
    if parent.name != ROOT_NAME:
        return
    fname = WEIGHT_FILE[version]
    total = 0
    try:
        children = [c for c in parent.iterdir() if c.is_dir()]
    except OSError:
        return
    for child in children:
        total += _int(child / fname) or 0
    low, high = WEIGHT_RANGE[version]
    try:
        _write(parent / fname, str(min(high, max(WEIGHT_PER_CPU[version], low, total))))
    except OSError:
        pass  # the parent just went (its last stage removed) or the file is not there


def _apply(cg: Cgroup, d: Path, settings: dict[str, list[tuple[str, str]]], optional: set[str]) -> None:
    """Write the limits; a required one that does not take marks its
    controller missing (not enforced). Optional files may not exist (no
    swap accounting, older kernels)."""
    for controller, pairs in settings.items():
        if controller in cg.missing:
            continue
        for fname, value in pairs:
            try:
                _write(d / fname, value)
            except OSError:
                if fname not in optional:
                    cg.missing.append(controller)
                    break


def create(name: str, *, memory: int, pids: int, cpus: float, version: int | None = None) -> Cgroup | None:
    """A new cgroup `pipcook-sandbox/<name>` with the given limits, or None
    where no cgroup is writable. `version` forces 1 or 2 (tests, doctor);
    by default the hierarchy that can enforce more of the limits wins, v2
    on a tie. Check `Cgroup.missing` for limits that could not be set."""
    if "/" in name or name in ("", ".", ".."):
        raise ValueError(f"bad cgroup name {name!r}")
    if version is None:
        base2 = _v2_base()
        n2 = len(_v2_controllers(base2)) if base2 is not None and os.access(base2, os.W_OK) else -1
        n1 = len(_v1_controllers())
        order = [2, 1] if n2 >= n1 else [1, 2]
    else:
        order = [version]
    for v in order:
        cg = (_create_v2 if v == 2 else _create_v1)(name, memory, pids, cpus)
        if cg is not None:
            return cg
    return None


def _kernel_at_least(major: int, minor: int) -> bool:
    m = re.match(r"(\d+)\.(\d+)", os.uname().release)
    return m is not None and (int(m.group(1)), int(m.group(2))) >= (major, minor)


def available() -> dict:
    """What works here, for `doctor`."""
    base2 = _v2_base()
    v2: dict[str, Any] | None = None
    if base2 is not None:
        v2 = {"base": str(base2), "writable": os.access(base2, os.W_OK),
              "controllers": _v2_controllers(base2),
              # cgroup.kill exists in non-root cgroups from Linux 5.14.
              "kill": _kernel_at_least(5, 14)}
    v1 = {}
    for c in CONTROLLERS:
        b = _v1_base(c)
        if b is not None:
            v1[c] = {"base": str(b), "writable": os.access(b, os.W_OK)}
    n2 = len(v2["controllers"]) if v2 and v2["writable"] else -1
    n1 = len(_v1_controllers())
    version = None
    if n2 >= 0 or n1 > 0:
        version = 2 if n2 >= n1 else 1
    usable = (v2["controllers"] if version == 2 and v2 else _v1_controllers()) if version else []
    missing = [c for c in CONTROLLERS if c not in usable]
    return {
        "version": version,
        "v2": v2,
        "v1": v1,
        "controllers": usable,
        "degraded": (f"not enforced: {', '.join(missing)} limits" if missing else None),
    }


# --- leftovers of dead runners ------------------------------------------------

_PID_TOKEN = re.compile(r"(?:^|[-_.])pid(\d+)(?=[-_.]|$)")
_PID_LEADING = re.compile(r"^(\d+)-")


def new_run_id(pid: int | None = None) -> str:
    """A run id that carries the runner's pid, for `leftovers()`."""
    return f"{time.strftime('%Y%m%d-%H%M%S')}-pid{pid or os.getpid()}-{secrets.token_hex(3)}"


def runner_pid(name: str) -> int | None:
    m = _PID_TOKEN.search(name) or _PID_LEADING.match(name)
    if not m:
        return None
    pid = int(m.group(1))
    # A date or a counter is not a pid: beyond pid_max it cannot be one.
    return pid if 0 < pid <= (_int(Path("/proc/sys/kernel/pid_max")) or 4194304) else None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _parents() -> list[tuple[int, str, Path]]:
    """(version, controller, pipcook-sandbox dir) for every place stages may live."""
    found: list[tuple[int, str, Path]] = []
    v2m = _v2_mount()
    for cand in filter(None, [_v2_base(), v2m.path if v2m else None]):
        p = cand / ROOT_NAME
        if p.is_dir() and all(p != f[2] for f in found):
            found.append((2, "", p))
    for c in CONTROLLERS:
        m = _v1_mount(c)
        for cand in filter(None, [_v1_base(c), m.path if m else None]):
            p = cand / ROOT_NAME
            if p.is_dir() and all(p != f[2] for f in found):
                found.append((1, c, p))
    return found


def leftovers(is_alive: Callable[[int], bool] = pid_alive) -> list[Cgroup]:
    """Stage cgroups whose runner (the pid in their run id) is dead. Names
    without a pid token are never touched: they may belong to a live run."""
    by_name: dict[tuple[int, str], Cgroup] = {}
    for version, ctrl, parent in _parents():
        for d in sorted(parent.iterdir()):
            if not d.is_dir():
                continue
            pid = runner_pid(d.name)
            if pid is None or is_alive(pid):
                continue
            cg = by_name.setdefault((version, d.name), Cgroup(d.name, version, {}))
            cg.dirs[ctrl or ""] = d
    return list(by_name.values())


def remove_leftovers(is_alive: Callable[[int], bool] = pid_alive) -> list[str]:
    """Kill and remove the cgroups of dead runners; returns what was removed."""
    removed = []
    for cg in leftovers(is_alive):
        cg.kill_all()
        if cg.remove():
            removed += [str(d) for d in cg.all_dirs()]
    for _version, _ctrl, parent in _parents():
        if remove_parent_if_empty(parent):
            removed.append(str(parent))
    return removed


def remove_run(run_id: str) -> list[str]:
    """Kill and remove every stage cgroup of run `run_id` still there: a stage interrupted (SIGTERM,
    a Slurm scancel) while it was being started has no handle to clean it up. Empty parents go too."""
    by_name: dict[tuple[int, str], Cgroup] = {}
    for version, ctrl, parent in _parents():
        for d in parent.iterdir():
            if d.is_dir() and d.name.startswith(f"{run_id}-"):
                by_name.setdefault((version, d.name), Cgroup(d.name, version, {})).dirs[ctrl or ""] = d
    removed = []
    for cg in by_name.values():
        cg.kill_all()
        if cg.remove():
            removed += [str(d) for d in cg.all_dirs()]
    return removed


def from_dirs(name: str, version: int, dirs: dict[str, str]) -> Cgroup:
    """Rebuild a handle from recorded paths (crash recovery)."""
    return Cgroup(name, version, {k: Path(v) for k, v in dirs.items()})


# --- what holds where a controller is not delegated -------------------------------


def user_tasks(uid: int) -> int:
    """Processes and threads of `uid` now: what RLIMIT_NPROC counts."""
    count = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            if entry.stat().st_uid == uid:
                count += len(os.listdir(f"/proc/{entry.name}/task"))
        except OSError:
            continue
    return count


def enclosing_memory_limit() -> int | None:
    """The tightest memory limit on the cgroup this process is in or any above it (a
    batch job's --mem, set on the job's and the step's cgroups), if any."""
    found: list[int] = []
    mount2, base2 = _v2_mount(), _v2_base()
    if mount2 is not None and base2 is not None:
        d = base2
        while d != mount2.path and mount2.path in d.parents:
            text = (_read(d / "memory.max") or "").strip()
            if text.isdigit():
                found.append(int(text))
            d = d.parent
    mount1, base1 = _v1_mount("memory"), _v1_base("memory")
    if mount1 is not None and base1 is not None:
        d = base1
        while d != mount1.path and mount1.path in d.parents:
            value = _int(d / "memory.limit_in_bytes")
            if value is not None and value < (1 << 60):  # "unlimited" is a huge page-rounded number
                found.append(value)
            d = d.parent
    return min(found) if found else None


def what_holds(missing: list[str], nproc: int | None) -> str:
    """One sentence per limit the stage's cgroup could not take: what bounds it instead.
    `nproc` is the RLIMIT_NPROC the caller set for the stage (None: none set)."""
    said = []
    for controller in missing:
        if controller == "memory":
            limit = enclosing_memory_limit()
            said.append(f"memory: {limit >> 20} MiB, the limit of the cgroup the runner is in (a batch job's), "
                        "for the runner and all its stages together" if limit else
                        "memory: nothing (no cgroup limit above the runner either)")
        elif controller == "pids":
            said.append(f"pids: RLIMIT_NPROC={nproc} for uid {os.geteuid()} (every process and thread of that "
                        "user, the runner and other stages included)" if nproc else
                        "pids: nothing (RLIMIT_NPROC does not bind root)")
        elif controller == "cpu":
            try:
                cpus = sorted(os.sched_getaffinity(0))
            except OSError:
                cpus = []
            said.append(f"cpu: the {len(cpus)} CPU(s) this runner may use (its cpuset: a batch job's cores), "
                        "shared with the other stages" if cpus else "cpu: nothing")
    return "; ".join(said)
