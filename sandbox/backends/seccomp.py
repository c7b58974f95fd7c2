"""The seccomp deny list of every sandbox, as a classic-BPF program for
bubblewrap (`bwrap --seccomp FD`) and as a Docker seccomp profile.

The namespaces and dropped capabilities already make most of these calls fail;
the filter is the second wall, and the only one for calls that need no
capability at all (ptrace of a process with the same uid, io_uring, TIOCSTI).
The default is ALLOW: the list names what a training script never needs.

Denied with EPERM (the errno a script would see without privileges anyway):

- ptrace, process_vm_readv, process_vm_writev, kcmp: inspecting or writing
  another process. Without this a stage could PTRACE_ATTACH bwrap's pid-1
  reaper and hang the sandbox (measured, see FINDINGS.md).
- mount, umount2, pivot_root, and the new mount API (open_tree, move_mount,
  fsopen, fsconfig, fsmount, fspick, mount_setattr): changing the filesystem
  view the sandbox was built with.
- unshare, setns: entering or creating namespaces (a new user namespace
  gives back every capability, inside it, and a far larger kernel surface).
- keyctl, add_key, request_key: kernel keyrings are not namespaced.
- bpf, perf_event_open, userfaultfd: big kernel attack surface, and
  userfaultfd is the usual tool to widen kernel race windows.
- init_module, finit_module, delete_module, kexec_load, kexec_file_load,
  reboot, swapon, swapoff, acct, quotactl, quotactl_fd, lookup_dcookie,
  vhangup: host administration.
- open_by_handle_at, name_to_handle_at: open_by_handle_at opens any inode of
  a mounted filesystem by handle, bypassing the mount view (the "shocker"
  container escape).
- io_uring_setup, io_uring_enter, io_uring_register: io_uring performs
  socket(), openat() and friends without passing through this filter, so it
  would undo the rules below.
- clone with any namespace flag (CLONE_NEWNS, NEWUTS, NEWIPC, NEWUSER,
  NEWPID, NEWNET, NEWCGROUP, NEWTIME) in its flags argument.
- ioctl TIOCSTI (0x5412: push characters into a terminal's input) and
  TIOCLINUX (0x541c): the classic sandbox escapes through a shared tty.

Other errnos:

- clone3 -> ENOSYS: its flags live in memory the filter cannot read, so it
  is refused as "not implemented" and glibc falls back to clone(), which is
  checked above.
- socket and socketpair with a family other than AF_UNIX -> EAFNOSUPPORT:
  the network namespace has no interface anyway; this also closes netlink,
  packet and vsock sockets, whose kernel code is the usual attack surface.

Killed (SECCOMP_RET_KILL_PROCESS):

- any syscall from an architecture other than the one the filter was built
  for (e.g. 32-bit int 0x80 calls on x86_64, whose numbers differ), and
  x32 calls on x86_64 (nr >= 0x40000000): the same call under another
  number would slip past a list keyed by number.

Arguments are compared on their low 32 bits only. That is exact for these
rules: the kernel itself truncates clone's flags, socket's family and
ioctl's command to 32 bits before using them.
"""
from __future__ import annotations

import platform
import struct

# --- what is denied -------------------------------------------------------

DENIED_EPERM: tuple[str, ...] = (
    "ptrace", "process_vm_readv", "process_vm_writev", "kcmp",
    "mount", "umount2", "pivot_root",
    "open_tree", "move_mount", "fsopen", "fsconfig", "fsmount", "fspick", "mount_setattr",
    "unshare", "setns",
    "keyctl", "add_key", "request_key",
    "bpf", "perf_event_open", "userfaultfd",
    "init_module", "finit_module", "delete_module", "kexec_load", "kexec_file_load",
    "reboot", "swapon", "swapoff", "acct", "quotactl", "quotactl_fd",
    "lookup_dcookie", "vhangup",
    "open_by_handle_at", "name_to_handle_at",
    "io_uring_setup", "io_uring_enter", "io_uring_register",
)
# Denied only for some arguments (see the rules above).
CONDITIONAL: tuple[str, ...] = ("clone", "clone3", "ioctl", "socket", "socketpair")
DENIED: tuple[str, ...] = DENIED_EPERM + CONDITIONAL

CLONE_NS_FLAGS = (
    0x00000080  # CLONE_NEWTIME
    | 0x00020000  # CLONE_NEWNS
    | 0x02000000  # CLONE_NEWCGROUP
    | 0x04000000  # CLONE_NEWUTS
    | 0x08000000  # CLONE_NEWIPC
    | 0x10000000  # CLONE_NEWUSER
    | 0x20000000  # CLONE_NEWPID
    | 0x40000000  # CLONE_NEWNET
)
TIOCSTI = 0x5412
TIOCLINUX = 0x541C
AF_UNIX = 1
EPERM = 1
ENOSYS = 38
EAFNOSUPPORT = 97

# --- syscall numbers (from the kernel's unistd headers) -------------------

# x86_64: arch/x86/entry/syscalls/syscall_64.tbl
_X86_64 = {
    "ioctl": 16, "socket": 41, "socketpair": 53, "clone": 56, "ptrace": 101,
    "vhangup": 153, "pivot_root": 155, "acct": 163, "mount": 165, "umount2": 166,
    "swapon": 167, "swapoff": 168, "reboot": 169, "init_module": 175,
    "delete_module": 176, "quotactl": 179, "lookup_dcookie": 212, "kexec_load": 246,
    "add_key": 248, "request_key": 249, "keyctl": 250, "unshare": 272,
    "perf_event_open": 298, "name_to_handle_at": 303, "open_by_handle_at": 304,
    "setns": 308, "process_vm_readv": 310, "process_vm_writev": 311, "kcmp": 312,
    "finit_module": 313, "kexec_file_load": 320, "bpf": 321, "userfaultfd": 323,
    "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427,
    "open_tree": 428, "move_mount": 429, "fsopen": 430, "fsconfig": 431,
    "fsmount": 432, "fspick": 433, "clone3": 435, "mount_setattr": 442,
    "quotactl_fd": 443,
}
# aarch64: include/uapi/asm-generic/unistd.h
_AARCH64 = {
    "lookup_dcookie": 18, "ioctl": 29, "umount2": 39, "mount": 40, "pivot_root": 41,
    "vhangup": 58, "quotactl": 60, "acct": 89, "unshare": 97, "kexec_load": 104,
    "init_module": 105, "delete_module": 106, "ptrace": 117, "reboot": 142,
    "socket": 198, "socketpair": 199, "add_key": 217, "request_key": 218,
    "keyctl": 219, "clone": 220, "swapon": 224, "swapoff": 225,
    "perf_event_open": 241, "name_to_handle_at": 264, "open_by_handle_at": 265,
    "setns": 268, "process_vm_readv": 270, "process_vm_writev": 271, "kcmp": 272,
    "finit_module": 273, "bpf": 280, "userfaultfd": 282, "kexec_file_load": 294,
    "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427,
    "open_tree": 428, "move_mount": 429, "fsopen": 430, "fsconfig": 431,
    "fsmount": 432, "fspick": 433, "clone3": 435, "mount_setattr": 442,
    "quotactl_fd": 443,
}
SYSCALLS: dict[str, dict[str, int]] = {"x86_64": _X86_64, "aarch64": _AARCH64}
AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
X32_SYSCALL_BIT = 0x40000000
_ARCH_ALIASES = {"amd64": "x86_64", "arm64": "aarch64"}

# --- a tiny classic-BPF assembler ------------------------------------------

BPF_LD_W_ABS = 0x20  # A = *(u32 *)(seccomp_data + k)
BPF_JEQ_K = 0x15  # pc += (A == k) ? jt : jf
BPF_JGE_K = 0x35
BPF_JSET_K = 0x45  # pc += (A & k) ? jt : jf
BPF_RET_K = 0x06

RET_KILL_PROCESS = 0x80000000
RET_ERRNO = 0x00050000
RET_ALLOW = 0x7FFF0000

# struct seccomp_data { int nr; __u32 arch; __u64 ip; __u64 args[6]; }
OFF_NR = 0
OFF_ARCH = 4


def _arg_lo(i: int) -> int:
    """Offset of the low 32 bits of args[i] (both arches are little-endian)."""
    return 16 + 8 * i


# An instruction before assembly: (code, k, jt, jf) where jt/jf are label
# names (or None: fall through). A label is the string itself in the list.
_Insn = tuple[int, int, "str | None", "str | None"]


def _assemble(program: list) -> bytes:
    """Resolve labels into relative jumps and pack `struct sock_filter`s
    (u16 code, u8 jt, u8 jf, u32 k)."""
    labels: dict[str, int] = {}
    insns: list[_Insn] = []
    for item in program:
        if isinstance(item, str):
            if item in labels:
                raise ValueError(f"duplicate label {item}")
            labels[item] = len(insns)
        else:
            insns.append(item)

    def rel(target: str | None, pc: int) -> int:
        if target is None:
            return 0
        off = labels[target] - (pc + 1)
        if not 0 <= off <= 255:  # classic BPF only jumps forward, 8 bits
            raise ValueError(f"jump to {target} out of range ({off})")
        return off

    out = bytearray()
    for pc, (code, k, jt, jf) in enumerate(insns):
        out += struct.pack("<HBBI", code, rel(jt, pc), rel(jf, pc), k & 0xFFFFFFFF)
    return bytes(out)


def _ld(offset: int) -> _Insn:
    return (BPF_LD_W_ABS, offset, None, None)


def _jeq(k: int, jt: str | None, jf: str | None = None) -> _Insn:
    return (BPF_JEQ_K, k, jt, jf)


def _ret(k: int) -> _Insn:
    return (BPF_RET_K, k, None, None)


def host_arch() -> str:
    machine = platform.machine().lower()
    return _ARCH_ALIASES.get(machine, machine)


def program(arch: str | None = None) -> list:
    """The filter as a list of instructions and labels (readable, testable)."""
    arch = _ARCH_ALIASES.get(arch or host_arch(), arch or host_arch())
    if arch not in SYSCALLS:
        raise ValueError(f"no seccomp syscall table for architecture {arch!r}")
    nr = SYSCALLS[arch]
    prog: list = [
        _ld(OFF_ARCH),
        _jeq(AUDIT_ARCH[arch], None, "kill"),
        _ld(OFF_NR),
    ]
    if arch == "x86_64":
        prog.append((BPF_JGE_K, X32_SYSCALL_BIT, "kill", None))
    for name in DENIED_EPERM:
        prog.append(_jeq(nr[name], "eperm"))
    prog += [
        _jeq(nr["clone"], "clone"),
        _jeq(nr["clone3"], "enosys"),
        _jeq(nr["ioctl"], "ioctl"),
        _jeq(nr["socket"], "socket"),
        _jeq(nr["socketpair"], "socket"),
        _ret(RET_ALLOW),
        "clone",
        _ld(_arg_lo(0)),
        (BPF_JSET_K, CLONE_NS_FLAGS, "eperm", "allow"),
        "ioctl",
        _ld(_arg_lo(1)),
        _jeq(TIOCSTI, "eperm"),
        _jeq(TIOCLINUX, "eperm", "allow"),
        "socket",
        _ld(_arg_lo(0)),
        _jeq(AF_UNIX, "allow", "eafnosupport"),
        "allow",
        _ret(RET_ALLOW),
        "eperm",
        _ret(RET_ERRNO | EPERM),
        "enosys",
        _ret(RET_ERRNO | ENOSYS),
        "eafnosupport",
        _ret(RET_ERRNO | EAFNOSUPPORT),
        "kill",
        _ret(RET_KILL_PROCESS),
    ]
    return prog


def bpf_program(arch: str | None = None) -> bytes:
    """The filter as bytes: an array of `struct sock_filter`, what
    `bwrap --seccomp FD` reads from FD."""
    return _assemble(program(arch))


# --- a reference interpreter, for tests and for auditing -------------------


def run_filter(code: bytes, nr: int, arch: int, args: tuple[int, ...] = ()) -> int:
    """Evaluate a filter on one syscall the way the kernel does; returns the
    SECCOMP_RET_* value. Only the opcodes the assembler emits are supported."""
    full_args = list(args) + [0] * (6 - len(args))
    data = struct.pack("<iIQ6Q", nr, arch, 0, *[a & (2**64 - 1) for a in full_args])
    insns = [struct.unpack_from("<HBBI", code, i) for i in range(0, len(code), 8)]
    acc = 0
    pc = 0
    while True:
        op, jt, jf, k = insns[pc]
        pc += 1
        if op == BPF_LD_W_ABS:
            acc = struct.unpack_from("<I", data, k)[0]
        elif op == BPF_RET_K:
            return k
        elif op in (BPF_JEQ_K, BPF_JGE_K, BPF_JSET_K):
            hit = {BPF_JEQ_K: acc == k, BPF_JGE_K: acc >= k, BPF_JSET_K: bool(acc & k)}[op]
            pc += jt if hit else jf
        else:
            raise ValueError(f"unexpected opcode {op:#x}")


# --- the same list as a Docker seccomp profile ---------------------------


def docker_profile() -> dict:
    """A Docker/runc seccomp profile with the same deny list. libseccomp
    resolves names per architecture and kills calls from unlisted
    architectures (x32 included) itself."""
    rules: list[dict] = [
        {"names": sorted(DENIED_EPERM), "action": "SCMP_ACT_ERRNO", "errnoRet": EPERM},
        {"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": ENOSYS},
    ]
    # Rules ORed together, arguments within one rule ANDed: one rule per
    # namespace bit expresses "flags & mask != 0".
    bit = 1
    while bit <= CLONE_NS_FLAGS:
        if CLONE_NS_FLAGS & bit:
            rules.append({
                "names": ["clone"], "action": "SCMP_ACT_ERRNO", "errnoRet": EPERM,
                "args": [{"index": 0, "value": bit, "valueTwo": bit, "op": "SCMP_CMP_MASKED_EQ"}],
            })
        bit <<= 1
    for cmd in (TIOCSTI, TIOCLINUX):
        rules.append({
            "names": ["ioctl"], "action": "SCMP_ACT_ERRNO", "errnoRet": EPERM,
            # Masked: the kernel ignores the upper half of the command, so
            # a plain 64-bit compare could be dodged by setting it.
            "args": [{"index": 1, "value": 0xFFFFFFFF, "valueTwo": cmd, "op": "SCMP_CMP_MASKED_EQ"}],
        })
    # A 64-bit "!= AF_UNIX" only errs towards denying (a family with junk in
    # the upper half is refused, which the kernel would have accepted).
    rules.append({
        "names": ["socket", "socketpair"], "action": "SCMP_ACT_ERRNO", "errnoRet": EAFNOSUPPORT,
        "args": [{"index": 0, "value": AF_UNIX, "valueTwo": 0, "op": "SCMP_CMP_NE"}],
    })
    return {
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_AARCH64"],
        "syscalls": rules,
    }
