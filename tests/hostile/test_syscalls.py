"""System calls a stage never needs are refused by the seccomp policy, in both
backends. With Docker our profile REPLACES Docker's default one, so each call
Docker's default refuses to a container without capabilities must be refused
by ours too (runner/backends/seccomp.py).

Each attack calls the kernel directly through ctypes (the numbers come from
our own tables for this machine) and reports what came back. Several of
these calls also need a capability the stage lacks; the ones that would
succeed without one (personality flags, name_to_handle_at, pidfd_getfd,
fanotify since Linux 5.13, calls newer than the tables) are the ones the
filter alone stops.
"""
from __future__ import annotations

import pytest

from pipcook_sandbox.runner.backends.seccomp import SYSCALLS, host_arch

from .attack import backend_cli, run_attack

pytestmark = pytest.mark.hostile

# Every script gets `call(name_or_nr, *args)` -> "ok" or the errno's name.
PRELUDE = r'''
import ctypes, errno, json, os

NR = __NR__
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long


def call(which, *args):
    nr = NR.get(which) if isinstance(which, str) else which
    if nr is None:
        return "absent"  # not on this architecture
    ctypes.set_errno(0)
    r = libc.syscall(ctypes.c_long(nr), *[ctypes.c_long(a) if isinstance(a, int) else a for a in args])
    return "ok" if r >= 0 else errno.errorcode.get(ctypes.get_errno(), str(ctypes.get_errno()))


def report(found):
    print("REPORT", json.dumps(found), flush=True)
'''


def _model(body: str) -> str:
    """A model script whose train() runs `body` (which fills `found`) and reports it."""
    table = {name: nr for name, nr in SYSCALLS[host_arch()].items()}
    indented = "\n".join("    " + line if line else "" for line in body.strip("\n").splitlines())
    return PRELUDE.replace("__NR__", repr(table)) + f"\n\ndef train(runtime, options, ctx):\n" \
        f"    found = {{}}\n{indented}\n    report(found)\n"


def _refused(attack, *names: str, also: tuple[str, ...] = ()) -> dict:
    assert attack.returncode == 0, attack.describe()
    found = attack.reports("model")
    for name in names:
        assert found[name] in ("EPERM", "absent", *also), (name, found)
    assert not attack.leftovers()
    return found


ADMIN = r'''
found["reboot"] = call("reboot", 0, 0, 0, None)
found["swapon"] = call("swapon", b"/tmp/swap", 0)
found["swapoff"] = call("swapoff", b"/tmp/swap")
found["acct"] = call("acct", b"/tmp/acct")
found["settimeofday"] = call("settimeofday", None, None)
found["clock_settime"] = call("clock_settime", 0, None)       # EFAULT if it got past the filter
found["sethostname"] = call("sethostname", None, 1000)        # EINVAL if it got past the filter
found["syslog"] = call("syslog", 10, None, 0)                 # SYSLOG_ACTION_SIZE_BUFFER
found["chroot"] = call("chroot", b"/tmp")
found["iopl"] = call("iopl", 3)
found["ioperm"] = call("ioperm", 0x80, 1, 1)
found["init_module"] = call("init_module", None, 0, b"")
found["kexec_load"] = call("kexec_load", 0, 0, None, 0)
'''


def test_host_administration_calls_are_refused(tmp_path, isolation):
    """Rebooting, swap, process accounting, the clock, the host name, the kernel
    log, I/O ports, kernel modules: none of it is namespaced."""
    attack = run_attack(tmp_path, isolation, model=_model(ADMIN))
    _refused(attack, "reboot", "swapon", "swapoff", "acct", "settimeofday", "clock_settime", "sethostname",
             "syslog", "chroot", "iopl", "ioperm", "init_module", "kexec_load")


SHOCKER = r'''
handle = ctypes.create_string_buffer(8 + 128)
ctypes.c_uint.from_buffer(handle).value = 128  # handle_bytes
mount_id = ctypes.c_int()
found["name_to_handle_at"] = call("name_to_handle_at", -100, b"/etc/hostname", handle, ctypes.byref(mount_id), 0)
# The "shocker" escape: a handle for inode 2 (a filesystem's root) opened without any path.
ctypes.c_uint.from_buffer(handle).value = 8
ctypes.c_int.from_buffer(handle, 4).value = 1  # FILEID_INO32_GEN
ctypes.c_uint.from_buffer(handle, 8).value = 2
fd = os.open("/", os.O_RDONLY)
found["open_by_handle_at"] = call("open_by_handle_at", fd, handle, os.O_RDONLY)
'''


def test_file_handles_that_bypass_the_mount_view_are_refused(tmp_path, isolation):
    attack = run_attack(tmp_path, isolation, model=_model(SHOCKER))
    _refused(attack, "name_to_handle_at", "open_by_handle_at")


PERSONA = r'''
for flag, name in ((0x0040000, "ADDR_NO_RANDOMIZE"), (0x0400000, "READ_IMPLIES_EXEC"), (0x0100000, "MMAP_PAGE_ZERO")):
    found[name] = call("personality", flag)
found["query"] = call("personality", 0xFFFFFFFF)
try:
    found["persona now"] = open("/proc/self/personality").read().strip()
except FileNotFoundError:  # gVisor's /proc has no personality file: ask the kernel itself
    found["persona now"] = str(libc.syscall(ctypes.c_long(NR["personality"]), ctypes.c_long(0xFFFFFFFF)))
'''


def test_personality_cannot_turn_off_aslr(tmp_path, isolation):
    """personality() needs no capability: without the rule a stage could run
    whatever it executes next without address randomisation, or with page 0 mapped."""
    attack = run_attack(tmp_path, isolation, model=_model(PERSONA))
    found = _refused(attack, "ADDR_NO_RANDOMIZE", "READ_IMPLIES_EXEC", "MMAP_PAGE_ZERO")
    if isolation == "docker-gvisor":
        # The query passes the filter and gVisor's kernel answers EINVAL: it implements only the plain
        # persona (no /proc/self/personality either), so nothing could have been switched.
        assert found["query"] == "EINVAL" and found["persona now"] == "-1", found
        return
    assert found["query"] == "ok" and int(found["persona now"], 16) == 0, found


OTHERS = r'''
import time
child = os.fork()
if child == 0:
    time.sleep(30)
    os._exit(0)
try:
    try:
        pidfd = os.pidfd_open(child)
        found["pidfd_open"] = "ok"
    except OSError as e:  # gVisor's kernel has no pidfds: the filter is still asked, with a bad fd
        pidfd = -1
        found["pidfd_open"] = errno.errorcode.get(e.errno, str(e.errno))
    found["pidfd_getfd"] = call("pidfd_getfd", pidfd, 1, 0)
    iov = (ctypes.c_char * 64)()
    found["process_madvise"] = call("process_madvise", pidfd, ctypes.byref(iov), 0, 8, 0)  # MADV_COLD
    status = ctypes.c_int()
    page = ctypes.c_void_p(0x400000)
    found["move_pages"] = call("move_pages", child, 1, ctypes.byref(page), None, ctypes.byref(status), 0)
    mask = ctypes.c_ulong(1)
    found["migrate_pages"] = call("migrate_pages", child, 64, ctypes.byref(mask), ctypes.byref(mask))
    found["get_mempolicy"] = call("get_mempolicy", None, None, 0, None, 0)
finally:
    os.kill(child, 9)
    os.waitpid(child, 0)
'''


def test_another_process_cannot_be_reached_through_pidfds_or_page_moves(tmp_path, isolation):
    """pidfd_getfd steals a descriptor from a process of the same uid (no
    capability needed); process_madvise and the NUMA page moves act on its memory."""
    attack = run_attack(tmp_path, isolation, model=_model(OTHERS))
    found = _refused(attack, "pidfd_getfd", "process_madvise", "move_pages", "migrate_pages", "get_mempolicy")
    # gVisor (this runsc) does not implement pidfd_open; the kernels of bwrap and runc do. Either way
    # the calls above were refused by the filter (EPERM), not by a bad descriptor (EBADF).
    assert found["pidfd_open"] == ("ENOSYS" if isolation == "docker-gvisor" else "ok"), found


UNNEEDED = r'''
found["fanotify_init"] = call("fanotify_init", 0x200, 0)  # FAN_REPORT_FID: open to unprivileged users
for name in ("lsm_list_modules", "open_tree_attr", "file_getattr", "file_setattr", "listns"):
    found[name] = call(name, None, None, 0, 0, 0)
last = max(NR.values())
for nr in (last + 1, last + 37, 1000):
    found[f"nr {nr}"] = call(nr, 0, 0, 0)
'''


def test_calls_a_stage_never_needs_and_calls_newer_than_our_tables_are_refused(tmp_path, isolation):
    """Whatever a kernel newer than our tables adds has not been reviewed: it is
    refused (ENOSYS, so libc falls back), in Docker too, where the profile is an
    allow list and runc answers ENOSYS above the highest number it names."""
    attack = run_attack(tmp_path, isolation, model=_model(UNNEEDED))
    found = _refused(attack, "fanotify_init", "lsm_list_modules", "open_tree_attr", "file_getattr",
                     "file_setattr", "listns", also=("ENOSYS",))
    assert all(found[key] in ("ENOSYS", "EPERM") for key in found if key.startswith("nr ")), found
    if backend_cli(isolation)[0] == "bwrap":
        assert all(found[key] == "ENOSYS" for key in found if key.startswith("nr ")), found
