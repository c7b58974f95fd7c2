"""The seccomp filter: its logic on a reference interpreter (both
architectures), the Docker profile built from the same list, and the real
kernel's verdict inside a bwrap sandbox."""
from __future__ import annotations

import errno
import json
import os
import struct
import textwrap

import pytest

from pipcook_sandbox.runner.backends import seccomp as sc

ARCHES = ("x86_64", "aarch64")
ALLOW = sc.RET_ALLOW
KILL = sc.RET_KILL_PROCESS


def verdict(arch: str, name: str, *args: int, audit_arch: int | None = None) -> int:
    code = sc.bpf_program(arch)
    return sc.run_filter(code, sc.SYSCALLS[arch][name], sc.AUDIT_ARCH[arch] if audit_arch is None else audit_arch, args)


def errno_of(ret: int) -> int | None:
    return ret & 0xFFFF if ret & 0xFFFF0000 == sc.RET_ERRNO else None


@pytest.mark.parametrize("arch", ARCHES)
def test_program_is_packed_sock_filters(arch: str) -> None:
    code = sc.bpf_program(arch)
    assert isinstance(code, bytes) and len(code) % 8 == 0
    assert len(code) // 8 < 4096  # BPF_MAXINSNS
    first = struct.unpack_from("<HBBI", code, 0)
    assert first == (sc.BPF_LD_W_ABS, 0, 0, sc.OFF_ARCH)  # the arch is checked first


# Only the calls each architecture has: an absent one (iopl on aarch64) has no number to deny.
@pytest.mark.parametrize("arch, name", [(arch, name) for arch in ARCHES for name in sc.DENIED_EPERM
                                        if name in sc.SYSCALLS[arch]])
def test_denied_calls_get_eperm(arch: str, name: str) -> None:
    assert errno_of(verdict(arch, name)) == errno.EPERM


# Calls Docker's default profile refuses to a container without capabilities
# (the "significant syscalls blocked" of Docker's seccomp documentation, and
# those its allow list leaves out). docker_profile() replaces that profile, so
# each must stay refused here.
REFUSED_BY_DOCKER_DEFAULT = (
    "acct", "add_key", "bpf", "chroot", "clock_settime", "create_module", "delete_module", "fanotify_init",
    "finit_module", "get_kernel_syms", "get_mempolicy", "init_module", "ioperm", "iopl", "kcmp",
    "kexec_file_load", "kexec_load", "keyctl", "lookup_dcookie", "mbind", "migrate_pages", "mount",
    "move_mount", "move_pages", "nfsservctl", "open_by_handle_at", "open_tree", "perf_event_open",
    "pidfd_getfd", "pivot_root", "process_madvise", "query_module", "quotactl", "reboot", "request_key",
    "set_mempolicy", "setdomainname", "sethostname", "setns", "settimeofday", "swapoff", "swapon",
    "syslog", "sysfs", "_sysctl", "umount2", "unshare", "uselib", "userfaultfd", "ustat", "vhangup",
    "io_uring_setup", "io_uring_enter", "io_uring_register", "fsopen", "fsmount", "fspick", "fsconfig",
    "mount_setattr", "open_tree_attr", "quotactl_fd", "lsm_get_self_attr", "lsm_set_self_attr",
    "lsm_list_modules", "set_mempolicy_home_node",
)


@pytest.mark.parametrize("arch", ARCHES)
def test_everything_dockers_default_refuses_is_refused(arch: str) -> None:
    present = [name for name in REFUSED_BY_DOCKER_DEFAULT if name in sc.SYSCALLS[arch]]
    assert len(present) > 50
    prof = sc.docker_profile()
    for name in present:
        assert errno_of(verdict(arch, name)) == errno.EPERM, name
        assert profile_verdict(prof, name) == ("SCMP_ACT_ERRNO", errno.EPERM), name


@pytest.mark.parametrize("arch", ARCHES)
def test_personality_only_plain_personas(arch: str) -> None:
    for persona in (0x0, 0x8, 0x20000, 0x20008, 0xFFFFFFFF):
        assert verdict(arch, "personality", persona) == ALLOW, hex(persona)
    for persona in (0x0040000, 0x0400000, 0x0100000, 0x0040008):  # ADDR_NO_RANDOMIZE, READ_IMPLIES_EXEC, MMAP_PAGE_ZERO
        assert errno_of(verdict(arch, "personality", persona)) == errno.EPERM, hex(persona)


@pytest.mark.parametrize("arch", ARCHES)
def test_calls_newer_than_the_table_get_enosys(arch: str) -> None:
    code = sc.bpf_program(arch)
    last = max(sc.SYSCALLS[arch].values())
    assert last >= 470  # listns, Linux 6.18
    for nr in (last + 1, last + 50, 1000, 0x3FFFFFFF):
        assert errno_of(sc.run_filter(code, nr, sc.AUDIT_ARCH[arch])) == errno.ENOSYS, nr


@pytest.mark.parametrize("arch", ARCHES)
def test_clone_with_namespace_flags_is_denied(arch: str) -> None:
    fork_flags = 0x01200011  # CLONE_CHILD_SETTID|CLONE_CHILD_CLEARTID|SIGCHLD (glibc fork)
    thread_flags = 0x003D0F00  # CLONE_VM|FS|FILES|SIGHAND|THREAD|SYSVSEM|SETTLS|PARENT_SETTID|CHILD_CLEARTID
    assert verdict(arch, "clone", fork_flags) == ALLOW
    assert verdict(arch, "clone", thread_flags) == ALLOW
    for flag in (0x00020000, 0x02000000, 0x04000000, 0x08000000, 0x10000000, 0x20000000, 0x40000000, 0x80):
        assert errno_of(verdict(arch, "clone", fork_flags | flag)) == errno.EPERM, hex(flag)
    assert errno_of(verdict(arch, "clone3")) == errno.ENOSYS


@pytest.mark.parametrize("arch", ARCHES)
def test_ioctl_tiocsti_and_tioclinux_denied(arch: str) -> None:
    assert errno_of(verdict(arch, "ioctl", 0, 0x5412)) == errno.EPERM
    assert errno_of(verdict(arch, "ioctl", 0, 0x541C)) == errno.EPERM
    # The kernel truncates the command to 32 bits: junk above must not help.
    assert errno_of(verdict(arch, "ioctl", 0, (1 << 32) | 0x5412)) == errno.EPERM
    assert verdict(arch, "ioctl", 0, 0x541B) == ALLOW  # FIONREAD
    assert verdict(arch, "ioctl", 0, 0x5401) == ALLOW  # TCGETS


@pytest.mark.parametrize("arch", ARCHES)
def test_sockets_only_af_unix(arch: str) -> None:
    for name in ("socket", "socketpair"):
        assert verdict(arch, name, 1, 1, 0) == ALLOW
        for family in (2, 10, 16, 17, 40):  # INET, INET6, NETLINK, PACKET, VSOCK
            assert errno_of(verdict(arch, name, family, 1, 0)) == errno.EAFNOSUPPORT


@pytest.mark.parametrize("arch", ARCHES)
def test_other_calls_allowed(arch: str) -> None:
    everyday = ("read", "write", "close", "openat", "mmap", "munmap", "futex", "execve", "exit_group",
                "rt_sigaction", "epoll_pwait", "getrandom", "sched_getaffinity", "prlimit64", "rseq",
                "madvise", "mprotect", "wait4", "pipe2", "statx", "newfstatat", "fstat", "memfd_create")
    for name in everyday:
        assert verdict(arch, name) == ALLOW, name
    allowed = [name for name in sc.SYSCALLS[arch] if name not in sc.DENIED]
    assert len(allowed) > 250  # the list refuses what a stage never needs, not everything
    for name in allowed:
        assert verdict(arch, name) == ALLOW, name


@pytest.mark.parametrize("arch", ARCHES)
def test_foreign_architecture_is_killed(arch: str) -> None:
    assert verdict(arch, "ptrace", audit_arch=0x40000003) == KILL  # AUDIT_ARCH_I386
    other = [a for a in ARCHES if a != arch][0]
    assert verdict(arch, "ptrace", audit_arch=sc.AUDIT_ARCH[other]) == KILL


def test_x32_syscalls_are_killed() -> None:
    code = sc.bpf_program("x86_64")
    assert sc.run_filter(code, 0x40000000 | 0, sc.AUDIT_ARCH["x86_64"]) == KILL
    assert sc.run_filter(code, 0x40000000 | 101, sc.AUDIT_ARCH["x86_64"]) == KILL


def test_unknown_arch_refused() -> None:
    with pytest.raises(ValueError):
        sc.bpf_program("riscv64")


def test_syscall_tables_cover_the_list() -> None:
    for arch, table in sc.SYSCALLS.items():
        assert set(sc.CONDITIONAL) <= set(table), arch
        assert len(set(table.values())) == len(table), f"duplicate numbers in {arch}"
    # A name no table knows would be a typo that denies nothing.
    assert [n for n in sc.DENIED if not any(n in t for t in sc.SYSCALLS.values())] == []
    only_x86 = {n for n in sc.DENIED if n not in sc.SYSCALLS["aarch64"]}
    assert "iopl" in only_x86 and "reboot" not in only_x86


def test_the_bpf_program_fits_its_jumps() -> None:
    for arch in ARCHES:
        assert len(sc.program(arch)) < 250  # forward jumps of at most 255 instructions


def profile_verdict(prof: dict, name: str, *args: int) -> tuple[str, int | None]:
    """(action, errno) of a Docker profile for one call, the way libseccomp
    reads it: a rule matches when every comparison holds; none -> the default."""
    full = list(args) + [0] * (6 - len(args))
    ops = {"SCMP_CMP_EQ": lambda x, a: x == a["value"], "SCMP_CMP_NE": lambda x, a: x != a["value"],
           "SCMP_CMP_MASKED_EQ": lambda x, a: x & a["value"] == a["valueTwo"]}
    hits = {(r["action"], r.get("errnoRet")) for r in prof["syscalls"]
            if name in r["names"] and all(ops[a["op"]](full[a["index"]], a) for a in r.get("args", []))}
    assert len(hits) <= 1, f"{name}{args}: rules overlap with different actions {hits}"
    return hits.pop() if hits else (prof["defaultAction"], prof["defaultErrnoRet"])


def _as_bpf(action: tuple[str, int | None]) -> int:
    return sc.RET_ALLOW if action[0] == "SCMP_ACT_ALLOW" else sc.RET_ERRNO | action[1]


def test_docker_profile_is_an_allow_list() -> None:
    """It replaces Docker's default (an allow list): what it does not name is refused."""
    prof = sc.docker_profile()
    json.dumps(prof)
    assert prof["defaultAction"] == "SCMP_ACT_ERRNO" and prof["defaultErrnoRet"] == errno.EPERM
    assert profile_verdict(prof, "a_call_from_a_future_kernel") == ("SCMP_ACT_ERRNO", errno.EPERM)
    allowed = {n for r in prof["syscalls"] if r["action"] == "SCMP_ACT_ALLOW" and "args" not in r for n in r["names"]}
    assert not allowed & set(sc.DENIED)


# Arguments that exercise every argument rule (and are plain for the rest).
ARGS = [(), (0x01200011,), (0x01200011 | 0x10000000,), (0x80,), (0, 0x5412), (0, 0x541C), (0, 0x541B),
        (0, 0x5401), (1, 1, 0), (2, 1, 0), (16, 3, 0), (0x40000,), (0x8,), (0xFFFFFFFF,)]


@pytest.mark.parametrize("arch", ARCHES)
def test_docker_profile_and_bpf_filter_agree_on_every_call(arch: str) -> None:
    prof = sc.docker_profile()
    code = sc.bpf_program(arch)
    for name, nr in sc.SYSCALLS[arch].items():
        for args in ARGS:
            assert _as_bpf(profile_verdict(prof, name, *args)) == sc.run_filter(code, nr, sc.AUDIT_ARCH[arch], args), \
                (name, args)


def test_docker_profile_ioctl_rules_refuse_exactly_two_commands() -> None:
    prof = sc.docker_profile()
    for cmd in (0x5412, 0x541C, (7 << 32) | 0x5412):  # the kernel ignores the upper half
        assert profile_verdict(prof, "ioctl", 0, cmd) == ("SCMP_ACT_ERRNO", errno.EPERM), hex(cmd)
    for cmd in (0, 0x5401, 0x5411, 0x5413, 0x541B, 0x541D, 0x80045430, 0xC0184800, 0xFFFFFFFF, 0x15412):
        assert profile_verdict(prof, "ioctl", 0, cmd) == ("SCMP_ACT_ALLOW", None), hex(cmd)


def test_masked_complement_is_exact() -> None:
    import random

    rng = random.Random(7)
    for excluded in ((0x5412, 0x541C), (0,), (0xFFFFFFFF, 1, 2, 0x80000000), ()):
        pairs = sc.masked_complement(excluded)
        assert len(pairs) <= max(1, 32 * len(excluded))
        for x in [*excluded, *range(0, 64), *(rng.getrandbits(32) for _ in range(3000))]:
            assert any(x & m == v for m, v in pairs) == (x not in excluded), (excluded, hex(x))


def test_docker_profile_socket_and_clone_rules() -> None:
    prof = sc.docker_profile()
    assert profile_verdict(prof, "socket", 1, 1, 0) == ("SCMP_ACT_ALLOW", None)
    assert profile_verdict(prof, "socket", 2, 1, 0) == ("SCMP_ACT_ERRNO", errno.EAFNOSUPPORT)
    assert profile_verdict(prof, "socketpair", 40, 1, 0) == ("SCMP_ACT_ERRNO", errno.EAFNOSUPPORT)
    assert profile_verdict(prof, "clone", 0x01200011) == ("SCMP_ACT_ALLOW", None)
    for bit in (0x80, 0x20000, 0x02000000, 0x04000000, 0x08000000, 0x10000000, 0x20000000, 0x40000000):
        assert profile_verdict(prof, "clone", 0x01200011 | bit) == ("SCMP_ACT_ERRNO", errno.EPERM), hex(bit)
    assert profile_verdict(prof, "clone3") == ("SCMP_ACT_ERRNO", errno.ENOSYS)


# --- the real kernel -----------------------------------------------------------

KERNEL_CHECKS = r"""
import ctypes, errno, os, socket, subprocess, sys, threading
libc = ctypes.CDLL(None, use_errno=True)
def call(name, *args):
    r = getattr(libc, name)(*args)
    return "ok" if r >= 0 else errno.errorcode.get(ctypes.get_errno())
def sock(fam, typ=socket.SOCK_STREAM):
    try:
        socket.socket(fam, typ).close()
        return "ok"
    except OSError as e:
        return errno.errorcode.get(e.errno)
out = {
    "status": [l for l in open("/proc/self/status").read().splitlines() if l.startswith("Seccomp:")][0],
    "inet": sock(socket.AF_INET), "inet6": sock(socket.AF_INET6, socket.SOCK_DGRAM),
    "netlink": sock(socket.AF_NETLINK, socket.SOCK_RAW), "unix": sock(socket.AF_UNIX),
    "ptrace": call("ptrace", 0, 0, 0, 0),
    "unshare": call("unshare", 0x10000000),
    "mount": call("mount", b"none", b"/tmp", b"tmpfs", 0, None),
    "io_uring": call("syscall", 425, 8, None),
    "bpf": call("syscall", 321 if os.uname().machine == "x86_64" else 280, 0, None, 0),
    "no_aslr": call("personality", 0x0040000), "persona": call("personality", 0xFFFFFFFF),
    "past_the_table": call("syscall", 471),
}
t = threading.Thread(target=lambda: None); t.start(); t.join(); out["thread"] = "ok"
pid = os.fork()
if pid == 0:
    os._exit(7)
out["fork"] = os.waitpid(pid, 0)[1] >> 8
out["subprocess"] = subprocess.run(["/bin/true"]).returncode
print(repr(out), flush=True)
if os.uname().machine == "x86_64":
    libc.syscall(0x40000000 | 39)  # x32 getpid: the process is killed
    print("x32 survived", flush=True)
"""


def test_filter_in_a_real_sandbox(tmp_path) -> None:
    from conftest import require_bwrap

    require_bwrap()
    from pipcook_sandbox.runner.backends import bwrap, cgroups
    from pipcook_sandbox.runner.backends.base import Limits, StageSpec

    spec = StageSpec(run_id=cgroups.new_run_id(), name="seccomp", mounts=[],
                     limits=Limits(memory=512 << 20, pids=64, disk=16 << 20), log_path=tmp_path / "log",
                     argv=["-I", "-S", "-c", textwrap.dedent(KERNEL_CHECKS)])
    h = bwrap.start(spec)
    try:
        outcome = bwrap.enforce_deadline(h, 60)
    finally:
        h.cleanup()
    text = spec.log_path.read_text()
    line = [l for l in text.splitlines() if l.startswith("{")]
    assert line, text
    got = eval(line[0])  # our own repr of a dict of str/int
    assert got["status"].split()[-1] == "2"
    assert got["inet"] == got["inet6"] == got["netlink"] == "EAFNOSUPPORT"
    assert got["unix"] == "ok"
    assert got["ptrace"] == got["unshare"] == got["mount"] == got["io_uring"] == got["bpf"] == "EPERM"
    assert got["no_aslr"] == "EPERM" and got["persona"] == "ok" and got["past_the_table"] == "ENOSYS"
    assert got["thread"] == "ok" and got["fork"] == 7 and got["subprocess"] == 0
    if os.uname().machine == "x86_64":
        assert "x32 survived" not in text
        assert outcome.exit_code == 128 + 31  # SIGSYS, reported by bwrap as 128+n
