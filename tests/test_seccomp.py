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

from sandbox.backends import seccomp as sc

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


@pytest.mark.parametrize("arch", ARCHES)
@pytest.mark.parametrize("name", sc.DENIED_EPERM)
def test_denied_calls_get_eperm(arch: str, name: str) -> None:
    assert errno_of(verdict(arch, name)) == errno.EPERM


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
    code = sc.bpf_program(arch)
    for nr in (0, 1, 3, 57, 59, 60, 63, 231, 257):  # read/write/close/fork/... or their aarch64 peers
        if nr in sc.SYSCALLS[arch].values():
            continue
        assert sc.run_filter(code, nr, sc.AUDIT_ARCH[arch]) == ALLOW


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
        assert set(sc.DENIED) <= set(table), arch
        assert len(set(table.values())) == len(table), f"duplicate numbers in {arch}"


def test_docker_profile_matches_the_list() -> None:
    prof = sc.docker_profile()
    json.dumps(prof)
    assert prof["defaultAction"] == "SCMP_ACT_ALLOW"
    eperm = [r for r in prof["syscalls"] if r.get("errnoRet") == errno.EPERM and "args" not in r]
    assert set(sc.DENIED_EPERM) <= {n for r in eperm for n in r["names"]}
    assert all(r["action"] == "SCMP_ACT_ERRNO" for r in prof["syscalls"])
    clone_bits = {r["args"][0]["value"] for r in prof["syscalls"] if r["names"] == ["clone"]}
    assert sum(clone_bits) == sc.CLONE_NS_FLAGS
    clone3 = [r for r in prof["syscalls"] if r["names"] == ["clone3"]]
    assert clone3 and clone3[0]["errnoRet"] == errno.ENOSYS
    sock = [r for r in prof["syscalls"] if "socket" in r["names"]][0]
    assert sock["errnoRet"] == errno.EAFNOSUPPORT and sock["args"][0]["op"] == "SCMP_CMP_NE"


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
    from sandbox.backends import bwrap, cgroups
    from sandbox.backends.base import Limits, StageSpec

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
    assert got["thread"] == "ok" and got["fork"] == 7 and got["subprocess"] == 0
    if os.uname().machine == "x86_64":
        assert "x32 survived" not in text
        assert outcome.exit_code == 128 + 31  # SIGSYS, reported by bwrap as 128+n
