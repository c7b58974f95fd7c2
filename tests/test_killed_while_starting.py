"""A runner SIGKILLed while it starts a bwrap stage leaves no process of the sandbox outside the
stage's cgroup, and the next runner's cleanup (`pipcook-sandbox clean`, which `run` and the service
call first) then leaves nothing at all: no process, cgroup, mount, loop device or state dir.

The race: bwrap clones the sandbox's first process, which then waits on bwrap's eventfd until the
runner has written the user namespace's maps (mapped mode). A runner killed in between takes bwrap
with it (--die-with-parent) and leaves that first process waiting forever. It must have been born in
the stage's cgroup, or nothing finds it.

The test process makes itself a child subreaper, so every process the runner leaves stays visible as
a descendant of the test (instead of init's child) and the cleanup under test cannot lean on "its
parent is init" to find it. Real CLI, real bubblewrap, mapped mode (the runner is root)."""
from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import REPO, TINY, require_bwrap, run_cli, state_dirs_of
from waiting import wait_until

from pipcook_sandbox.runner.backends import cgroups

PR_SET_CHILD_SUBREAPER = 36
ATTEMPTS = 15  # runs to catch the runner between a clone and its handshake in (5 always sufficed here)


def _children(pid: int) -> list[int]:
    found: list[int] = []
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return found
    for task in tasks:
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return found


def _descendants(pid: int) -> list[int]:
    found, i = _children(pid), 0
    while i < len(found):
        found += _children(found[i])
        i += 1
    return found


def _exe(pid: int) -> str:
    try:
        return os.path.basename(os.readlink(f"/proc/{pid}/exe"))
    except OSError:
        return ""  # gone, or a zombie


def _live(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _cgroup_paths(pid: int) -> dict[str, str]:
    """controller -> cgroup path ("" for the v2 line)."""
    paths: dict[str, str] = {}
    try:
        lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    except OSError:
        return paths
    for line in lines:
        _, ctrls, path = line.split(":", 2)
        for c in ctrls.split(",") if ctrls else [""]:
            paths[c] = path
    return paths


def _in_runner_cgroup(pid: int, runner: int) -> bool:
    """Whether `pid` sits in a stage cgroup of runner `runner` in every hierarchy stages use."""
    paths = _cgroup_paths(pid)
    # v1: one line per controller (a "0::" line may be there too, unused); v2: only the "0::" line
    wanted = [c for c in cgroups.CONTROLLERS if c in paths] or [""]
    return all(cgroups.runner_pid(Path(paths.get(c, "/")).name) == runner for c in wanted)


def _sandbox_processes(root: int) -> list[int]:
    """Live descendants of `root` that are bwrap or run under a bwrap: the sandboxes' processes."""
    found: list[int] = []

    def walk(pid: int, inside: bool) -> None:
        for child in _children(pid):
            under = inside or _exe(child) == "bwrap"
            if under and _live(child):
                found.append(child)
            walk(child, under)

    walk(root, False)
    return found


def _loop_backing_files() -> list[str]:
    files = []
    for f in Path("/sys/block").glob("loop*/loop/backing_file"):
        try:
            files.append(f.read_text().strip())
        except OSError:
            continue
    return files


class Adopter:
    """This process as a child subreaper: what a killed runner leaves is reparented here, and each
    such orphan is reaped by a thread of its own when it ends (never a waitpid(-1) that could take
    another test's child)."""

    def __init__(self) -> None:
        self.reaping: set[int] = set()
        self.libc = ctypes.CDLL(None, use_errno=True)

    def adopt(self, skip: set[int]) -> None:
        for pid in _children(os.getpid()):
            if pid not in skip and pid not in self.reaping:
                self.reaping.add(pid)
                threading.Thread(target=self._reap, args=(pid,), daemon=True).start()

    @staticmethod
    def _reap(pid: int) -> None:
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass


@contextmanager
def adopting() -> Iterator[Adopter]:
    adopter = Adopter()
    before = set(_descendants(os.getpid()))  # an earlier test's live processes are not this test's
    assert adopter.libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0, ctypes.get_errno()
    try:
        yield adopter
    finally:
        adopter.libc.prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)
        for pid in set(_descendants(os.getpid())) - before:  # a failed test's leftovers: not for the next test
            if _exe(pid) == "bwrap":
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        adopter.adopt(before)


def _start_runner(tmp_path: Path, n: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pipcook_sandbox", "run", str(TINY / "pipeline.json"),
                             "--isolation", "bwrap", "-o", str(tmp_path / f"ws{n}")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)


def _first_bwrap(runner: subprocess.Popen) -> int | None:
    """The runner's first child that is bwrap (exec'd), polled as fast as this process can."""
    while runner.poll() is None:
        for child in _children(runner.pid):
            if _exe(child) == "bwrap":
                return child
    return None


def _kill_and_check(runner: subprocess.Popen, adopter: Adopter, before: set[int]) -> list[str]:
    """SIGKILL the runner, then what its sandboxes left: wrong now (outside the runner's cgroups) and,
    after `pipcook-sandbox clean`, anything at all. Returns the problems found."""
    runner.send_signal(signal.SIGKILL)
    runner.wait(timeout=30)
    me = os.getpid()
    adopter.adopt(before | {runner.pid})
    # What the runner had forked but not yet exec'd as bwrap (a Popen child, a mount) goes its way
    # first: it either ends or becomes bwrap.
    wait_until(lambda: all(_exe(p) == "bwrap" or not _live(p) or p in _sandbox_processes(me)
                           for p in set(_descendants(me)) - before),
               30, "the killed runner's forked children to exec or end")
    adopter.adopt(before | {runner.pid})
    problems = [f"process {p} ({_exe(p)}) outside the runner's cgroups: {_cgroup_paths(p)}"
                for p in _sandbox_processes(me) if p not in before and not _in_runner_cgroup(p, runner.pid)]
    state_dirs = state_dirs_of(runner.pid)

    cleaned = run_cli("clean")
    assert cleaned.returncode == 0, cleaned.stderr
    adopter.adopt(before | {runner.pid})
    problems += [f"process {p} ({_exe(p)}) survived the cleanup"
                 for p in set(_descendants(me)) - before if _live(p)]
    problems += [f"cgroup {d}" for cg in cgroups.leftovers(is_alive=lambda pid: pid != runner.pid)
                 if cgroups.runner_pid(cg.name) == runner.pid for d in cg.all_dirs() if d.exists()]
    problems += [f"state dir {d}" for d in state_dirs if d.exists()]
    mounts = Path("/proc/mounts").read_text().splitlines()
    problems += [f"mount {line}" for line in mounts for d in state_dirs if f" {d}/" in line]
    problems += [f"loop device on {f}" for f in _loop_backing_files() for d in state_dirs if f.startswith(f"{d}/")]
    return problems


@pytest.fixture
def mapped() -> None:
    require_bwrap()
    if os.geteuid() != 0:
        pytest.skip("the id handshake (mapped mode) needs a runner started as root")


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return ""


def _unmapped(pid: int) -> bool:
    """`pid` waits for its id maps (an empty uid_map); False once mapped or gone."""
    try:
        return Path(f"/proc/{pid}/uid_map").read_text().strip() == ""
    except OSError:
        return False


def _stop_in_handshake(runner: subprocess.Popen) -> int | None:
    """Stop the runner (SIGSTOP) at a moment one of its stages' bwrap has cloned the sandbox's first
    process, which waits for the maps the stopped runner has not written; that process's pid. A stage
    whose handshake was over first (or a probe sandbox that ended) lets the runner go on to the next
    one. None: the run ended before one was caught."""
    seen: set[int] = set()
    while runner.poll() is None:
        fresh = [c for c in _children(runner.pid) if c not in seen and _exe(c) == "bwrap"]
        if not fresh:
            continue
        runner.send_signal(signal.SIGSTOP)
        wait_until(lambda: _state(runner.pid) in ("T", "t", "Z", ""), 10, "the runner to stop")
        for bwrap in fresh:
            seen.add(bwrap)
            first = wait_until(lambda: [c for c in _children(bwrap) if _exe(c) == "bwrap"] or not _live(bwrap),
                               20, "bwrap to clone the sandbox's first process, or to end")
            if first is not True and _unmapped(first[0]):
                return first[0]
        runner.send_signal(signal.SIGCONT)
    return None


def test_runner_killed_between_clone_and_handshake_leaves_nothing(tmp_path: Path, mapped: None) -> None:
    """Stop the runner while a sandbox's first process waits for its id handshake, kill it: that
    process is in the stage's cgroup, and the next runner's cleanup leaves nothing."""
    before = set(_descendants(os.getpid()))  # an earlier test's live processes are not this test's
    with adopting() as adopter:
        for n in range(ATTEMPTS):
            runner = _start_runner(tmp_path, n)
            waiting = _stop_in_handshake(runner)
            problems = _kill_and_check(runner, adopter, before)
            assert not problems, "\n".join(problems)
            if waiting is not None:
                return  # caught the sandbox before its maps: the race, and nothing left
        pytest.fail(f"in {ATTEMPTS} runs the runner was never stopped before an id handshake")


@pytest.mark.parametrize("delay", [0.0, 0.005, 0.02, 0.05, 0.1, 0.2, 0.4, 0.8])
def test_runner_killed_at_any_point_of_the_start_leaves_nothing(tmp_path: Path, mapped: None, delay: float) -> None:
    """The runner killed `delay` s after its first bwrap appeared: every stage at whatever point
    of its start that is (cgroup made, volume mounted, bwrap exec'd, cloned, mapped, running)."""
    before = set(_descendants(os.getpid()))  # an earlier test's live processes are not this test's
    with adopting() as adopter:
        runner = _start_runner(tmp_path, 0)
        assert _first_bwrap(runner) is not None, "the run ended before it started a bwrap stage"
        end = time.monotonic() + delay
        while time.monotonic() < end:  # a sample point, not an ordering: the check holds at every one
            pass
        problems = _kill_and_check(runner, adopter, before)
    assert not problems, "\n".join(problems)
