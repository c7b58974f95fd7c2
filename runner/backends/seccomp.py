"""The seccomp policy of every sandbox, as a classic-BPF program for
bubblewrap (`bwrap --seccomp FD`) and as a Docker seccomp profile.

The namespaces and dropped capabilities already make most of these calls fail;
the filter is the second wall, and the only one for calls that need no
capability at all (ptrace of a process with the same uid, io_uring, TIOCSTI,
personality flags, fanotify). The policy is one list of refused calls
(DENIED_EPERM and the argument rules below) over the complete syscall tables
of syscalls.py: every call the tables name and the list does not is allowed,
every call the tables do not know (a kernel newer than them) is refused.

Denied with EPERM (the errno a script would see without privileges anyway):

- ptrace, process_vm_readv, process_vm_writev, kcmp, pidfd_getfd,
  process_madvise: inspecting, writing or steering another process. Without
  this a stage could PTRACE_ATTACH bwrap's pid-1 reaper and hang the sandbox.
- mount, umount2, pivot_root, chroot, and the new mount API (open_tree,
  open_tree_attr, move_mount, fsopen, fsconfig, fsmount, fspick,
  mount_setattr): changing the filesystem view the sandbox was built with.
- unshare, setns: entering or creating namespaces (a new user namespace
  gives back every capability, inside it, and a far larger kernel surface).
- keyctl, add_key, request_key: kernel keyrings are not namespaced.
- bpf, perf_event_open, userfaultfd: big kernel attack surface, and
  userfaultfd is the usual tool to widen kernel race windows.
- init_module, finit_module, delete_module, kexec_load, kexec_file_load,
  reboot, swapon, swapoff, acct, quotactl, quotactl_fd, lookup_dcookie,
  vhangup, settimeofday, clock_settime, sethostname, setdomainname, syslog,
  iopl, ioperm: administering the host (the clock, the kernel log, I/O
  ports and the rest are not namespaced).
- open_by_handle_at, name_to_handle_at: open_by_handle_at opens any inode of
  a mounted filesystem by handle, bypassing the mount view (the "shocker"
  container escape).
- io_uring_setup, io_uring_enter, io_uring_register: io_uring performs
  socket(), openat() and friends without passing through this filter, so it
  would undo the rules below.
- fanotify_init: unprivileged since Linux 5.13, and a stage has nothing to
  watch. get_mempolicy, set_mempolicy, set_mempolicy_home_node, mbind,
  migrate_pages, move_pages: NUMA placement, which moves pages of other
  processes too; libraries fall back when refused (as under Docker, where
  they need CAP_SYS_NICE). lsm_get_self_attr, lsm_set_self_attr,
  lsm_list_modules, uprobe, file_getattr, file_setattr, listns: recent
  calls a stage never needs.
- uselib, ustat, sysfs, _sysctl, create_module, get_kernel_syms,
  query_module, nfsservctl, afs_syscall, tuxcall, security, vserver,
  putpmsg, getpmsg: obsolete or never implemented; refused by name so that
  no kernel can bring one back unnoticed.

The list holds, at least, every call that Docker's default profile refuses
to a container without capabilities (our stages have none): Docker's
default is an allow list, and docker_profile() REPLACES it, so whatever it
refuses must be refused here too. It differs in refusing more (ptrace,
name_to_handle_at, io_uring, every non-unix socket, TIOCSTI, CLONE_NEWTIME).

Denied for some arguments only:

- clone with any namespace flag (CLONE_NEWNS, NEWUTS, NEWIPC, NEWUSER,
  NEWPID, NEWNET, NEWCGROUP, NEWTIME) in its flags argument -> EPERM.
- ioctl TIOCSTI (0x5412: push characters into a terminal's input) and
  TIOCLINUX (0x541c): the classic sandbox escapes through a shared tty ->
  EPERM.
- personality other than the plain Linux personas and the query
  (PERSONALITY_ALLOWED) -> EPERM: ADDR_NO_RANDOMIZE would turn ASLR off
  for what the stage executes next, MMAP_PAGE_ZERO maps page 0,
  READ_IMPLIES_EXEC makes data executable; each helps exploit a bug.

Other errnos:

- clone3 -> ENOSYS: its flags live in memory the filter cannot read, so it
  is refused as "not implemented" and glibc falls back to clone(), which is
  checked above.
- socket and socketpair with a family other than AF_UNIX -> EAFNOSUPPORT:
  the network namespace has no interface anyway; this also closes netlink,
  packet and vsock sockets, whose kernel code is the usual attack surface.
- a number above the last one syscalls.py knows -> ENOSYS: a call added to
  the kernel after those tables has not been reviewed; ENOSYS is what libc
  expects from an older kernel, so it falls back (runc does the same for
  Docker's allow list).

Killed (SECCOMP_RET_KILL_PROCESS):

- any syscall from an architecture other than the one the filter was built
  for (e.g. 32-bit int 0x80 calls on x86_64, whose numbers differ), and
  x32 calls on x86_64 (nr >= 0x40000000): the same call under another
  number would slip past a list keyed by number.

Arguments are compared on their low 32 bits only. That is exact for these
rules: the kernel itself truncates clone's flags, socket's family,
ioctl's command and personality's persona to 32 bits before using them.

Cost: on Linux 5.11 and later the kernel caches, per syscall number, a
verdict that does not depend on arguments, so the length of the list costs
nothing for the calls a stage makes all the time (futex, read, mmap...).
"""
from __future__ import annotations

import platform
import struct

from .syscalls import AARCH64, X86_64

# --- what is denied -------------------------------------------------------

DENIED_EPERM: tuple[str, ...] = (
    # other processes
    "ptrace", "process_vm_readv", "process_vm_writev", "kcmp", "pidfd_getfd", "process_madvise",
    # the filesystem view
    "mount", "umount2", "pivot_root", "chroot",
    "open_tree", "open_tree_attr", "move_mount", "fsopen", "fsconfig", "fsmount", "fspick", "mount_setattr",
    # namespaces
    "unshare", "setns",
    # kernel keyrings
    "keyctl", "add_key", "request_key",
    # large kernel surface
    "bpf", "perf_event_open", "userfaultfd",
    # administering the host
    "init_module", "finit_module", "delete_module", "kexec_load", "kexec_file_load",
    "reboot", "swapon", "swapoff", "acct", "quotactl", "quotactl_fd",
    "lookup_dcookie", "vhangup", "settimeofday", "clock_settime", "sethostname", "setdomainname",
    "syslog", "iopl", "ioperm",
    # "shocker"
    "open_by_handle_at", "name_to_handle_at",
    # io_uring bypasses this filter
    "io_uring_setup", "io_uring_enter", "io_uring_register",
    # not needed, refused to a container without capabilities by Docker's default too
    "fanotify_init",
    "get_mempolicy", "set_mempolicy", "set_mempolicy_home_node", "mbind", "migrate_pages", "move_pages",
    "lsm_get_self_attr", "lsm_set_self_attr", "lsm_list_modules", "uprobe",
    "file_getattr", "file_setattr", "listns",
    # obsolete or never implemented
    "uselib", "ustat", "sysfs", "_sysctl", "create_module", "get_kernel_syms", "query_module",
    "nfsservctl", "afs_syscall", "tuxcall", "security", "vserver", "putpmsg", "getpmsg",
)
# Denied only for some arguments (see the rules above).
CONDITIONAL: tuple[str, ...] = ("clone", "clone3", "ioctl", "socket", "socketpair", "personality")
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
DENIED_IOCTLS = (TIOCSTI, TIOCLINUX)
# PER_LINUX, PER_LINUX32, and either with UNAME26; 0xffffffff only reads the persona.
PERSONALITY_ALLOWED = (0x0, 0x8, 0x20000, 0x20008, 0xFFFFFFFF)
AF_UNIX = 1
EPERM = 1
ENOSYS = 38
EAFNOSUPPORT = 97

# --- syscall numbers (complete tables, see syscalls.py) -------------------

SYSCALLS: dict[str, dict[str, int]] = {"x86_64": X86_64, "aarch64": AARCH64}
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
    prog.append((BPF_JGE_K, max(nr.values()) + 1, "enosys", None))  # newer than the table
    # A name the arch does not have (iopl on aarch64) needs no rule there.
    for name in DENIED_EPERM:
        if name in nr:
            prog.append(_jeq(nr[name], "eperm"))
    prog += [
        _jeq(nr["clone"], "clone"),
        _jeq(nr["clone3"], "enosys"),
        _jeq(nr["ioctl"], "ioctl"),
        _jeq(nr["socket"], "socket"),
        _jeq(nr["socketpair"], "socket"),
        _jeq(nr["personality"], "personality"),
        _ret(RET_ALLOW),
        "clone",
        _ld(_arg_lo(0)),
        (BPF_JSET_K, CLONE_NS_FLAGS, "eperm", "allow"),
        "ioctl",
        _ld(_arg_lo(1)),
        *[_jeq(cmd, "eperm") for cmd in DENIED_IOCTLS],
        _ret(RET_ALLOW),
        "socket",
        _ld(_arg_lo(0)),
        _jeq(AF_UNIX, "allow", "eafnosupport"),
        "personality",
        _ld(_arg_lo(0)),
        *[_jeq(persona, "allow") for persona in PERSONALITY_ALLOWED],
        _ret(RET_ERRNO | EPERM),
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


# --- the same policy as a Docker seccomp profile ---------------------------


def masked_complement(excluded: tuple[int, ...], bits: int = 32) -> list[tuple[int, int]]:
    """(mask, value) pairs such that `x & mask == value` for some pair exactly
    when the low `bits` bits of x are none of `excluded`.

    libseccomp cannot say "arg not in {a, b}" in one allow rule (the
    comparisons of one rule are ANDed, and runc splits two on the same
    argument into separate, ORed rules), so the complement is spelled out as
    a binary trie: a pair for every branch that holds no excluded value.
    At most `bits` pairs per excluded value."""

    def walk(values: set[int], bit: int, mask: int, prefix: int) -> list[tuple[int, int]]:
        if not values:
            return [(mask, prefix)]
        if bit < 0:
            return []  # exactly an excluded value
        b = 1 << bit
        return [pair for side in (0, b)
                for pair in walk({v for v in values if v & b == side}, bit - 1, mask | b, prefix | side)]

    return walk({v & ((1 << bits) - 1) for v in excluded}, bits - 1, 0, 0)


def _arg(index: int, op: str, value: int, value_two: int = 0) -> dict:
    return {"index": index, "value": value, "valueTwo": value_two, "op": op}


def _allow_if(name: str, *args: dict) -> dict:
    return {"names": [name], "action": "SCMP_ACT_ALLOW", "args": list(args)}


def docker_profile() -> dict:
    """A Docker/runc seccomp profile with the same policy, written as an
    allow list: every call of the tables except the denied ones. Unlike a
    deny list on an allowing default, a call this profile does not name is
    refused: one that libseccomp or runc cannot resolve by name, or one newer
    than the tables (runc answers those above the highest number it knows
    with ENOSYS, so libc falls back). libseccomp resolves names per
    architecture and kills calls from unlisted architectures (x32 included)
    itself."""
    known = set(X86_64) | set(AARCH64)
    rules: list[dict] = [
        {"names": sorted(known - set(DENIED)), "action": "SCMP_ACT_ALLOW"},
        # No namespace flag at all: "flags & mask == 0".
        _allow_if("clone", _arg(0, "SCMP_CMP_MASKED_EQ", CLONE_NS_FLAGS, 0)),
        {"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": ENOSYS},
    ]
    # Masked to 32 bits: the kernel ignores the upper half of the command,
    # so setting junk there must not change the verdict.
    rules += [_allow_if("ioctl", _arg(1, "SCMP_CMP_MASKED_EQ", mask, value))
              for mask, value in masked_complement(DENIED_IOCTLS)]
    # 64-bit compares: junk in the upper half is refused, which the kernel
    # would have accepted; that only errs towards refusing.
    for name in ("socket", "socketpair"):
        rules.append(_allow_if(name, _arg(0, "SCMP_CMP_EQ", AF_UNIX)))
        rules.append({"names": [name], "action": "SCMP_ACT_ERRNO", "errnoRet": EAFNOSUPPORT,
                      "args": [_arg(0, "SCMP_CMP_NE", AF_UNIX)]})
    rules += [_allow_if("personality", _arg(0, "SCMP_CMP_EQ", persona)) for persona in PERSONALITY_ALLOWED]
    return {
        "defaultAction": "SCMP_ACT_ERRNO",
        "defaultErrnoRet": EPERM,
        "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_AARCH64"],
        "syscalls": rules,
    }
