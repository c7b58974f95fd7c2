"""gVisor (`runsc`) as the Docker backend's runtime: recognising it, checking
it was registered with the flags a stage needs, and adapting the seccomp
profile to what gVisor applies.

gVisor is a runtime *option* of the Docker backend, not a backend of its
own: every other setting of a stage (user, capabilities, read-only root,
mounts, quota volumes, limits, labels, cleanup) is the Docker backend's, so
they are written and tested once. What gVisor adds is a kernel written in Go
(the Sentry) between the script and the host: the script's system calls are
served by the Sentry, which itself reaches the host through a small, seccomp-
filtered set of calls; its files come through a separate process (the gofer).

The engine must know the runtime with these flags (`.ci/start-docker.sh`
registers it so in /etc/docker/daemon.json):

    --oci-seccomp    apply the container's seccomp profile inside the
                     sandbox. Without it gVisor ignores the profile, and the
                     project's policy (no ptrace, no namespaces, no non-unix
                     sockets, ...) would silently not apply to the script.
    --network=none   the Sentry gets no network stack beyond its own
                     loopback (Docker's `network_mode none` is kept too).
    --host-uds=all   stages talk to the runner and to each other over unix
                     sockets in bind-mounted directories (ZeroMQ ipc, the
                     shared-memory ring): `open` lets a stage connect to a
                     socket bound outside its sandbox, `create` makes a
                     socket a stage binds a real one that the runner and the
                     next stage (another sandbox) can reach. A stage only
                     sees the socket directories of its own run.

Host-side code: never mounted into a sandbox.
"""
from __future__ import annotations

import copy
import os
from typing import Any

REQUIRED_FLAGS = ("--oci-seccomp", "--network=none", "--host-uds=all")
RUNTIME_NAME = "runsc"
# gVisor's name for a call whose Linux name its syscall table lacks (found in runsc's debug log).
GVISOR_SPELLING = {"pselect6": "pselect"}
# What `doctor` says gVisor adds and costs (the figures: bench/RESULTS.md).
ADDS = ("a user-space kernel (gVisor's Sentry) between the script and the host kernel: the script's "
        "system calls never reach the host's; the Sentry reaches it through a small filtered set")
COSTS = ("measured against runc (bench/RESULTS.md, python -m bench.gvisor): stage start-up ~1.5-1.7x "
         "(+0.5 s), compute ~1.0x, tensors between stages ~0.13x (no shared-memory ring across gVisor "
         "sandboxes); no GPU (this runsc has no nvproxy)")


def host_pids(pids: int) -> int:
    """The host pids cgroup limit of a gVisor stage allowed `pids` tasks.

    Measured (ptrace platform): an idle Python stage is 44 host tasks (the
    Sentry's threads, the gofer, the stubs); each guest thread adds almost
    none, each guest process about 5. The script's own count is enforced by
    the Sentry (RLIMIT_NPROC = pids); this bound keeps the host's process
    table safe, and is reached by a process bomb before RLIMIT_NPROC is, so
    a fork bomb is still stopped and named by the pids cgroup's `events`."""
    return 64 + 4 * pids


def is_gvisor(runtime: dict[str, Any] | None) -> bool:
    """Is this entry of the engine's `Runtimes` (docker info) gVisor?"""
    if not runtime:
        return False
    path = str(runtime.get("path") or "")
    return os.path.basename(path).startswith("runsc")


def runtime_args(runtime: dict[str, Any] | None) -> list[str]:
    args = (runtime or {}).get("runtimeArgs") or []
    return [str(a) for a in args]


def missing_flags(runtime: dict[str, Any] | None) -> list[str]:
    """The required flags this registration lacks (`--flag value` spelled
    as two arguments counts too; a later repeat of a flag wins, as in runsc)."""
    given: dict[str, str] = {}
    args = runtime_args(runtime)
    i = 0
    while i < len(args):
        arg = args[i].lstrip("-")
        if "=" in arg:
            key, value = arg.split("=", 1)
        elif i + 1 < len(args) and not args[i + 1].startswith("-") and arg != "oci-seccomp":
            key, value = arg, args[i + 1]
            i += 1
        else:
            key, value = arg, "true"
        given[key] = value
        i += 1
    missing = []
    for flag in REQUIRED_FLAGS:
        key, _, value = flag.lstrip("-").partition("=")
        if given.get(key) != (value or "true"):
            missing.append(flag)
    return missing


def registration_problem(name: str, runtime: dict[str, Any] | None) -> str | None:
    """None when the engine's runtime `name` is gVisor registered as a stage
    needs it, else the reason (with the fix)."""
    missing = missing_flags(runtime)
    if not missing:
        return None
    return (f"the Docker runtime {name!r} is gVisor but registered without {' '.join(missing)} "
            f"(it has: {' '.join(runtime_args(runtime)) or 'no flags'}); without them the seccomp policy "
            "is ignored or stages cannot reach their sockets. Register it with "
            f"\"runtimeArgs\": [{', '.join(repr(f).replace(chr(39), chr(34)) for f in REQUIRED_FLAGS)}] in "
            "/etc/docker/daemon.json and reload dockerd (SIGHUP), as .ci/start-docker.sh does")


def adapt_profile(profile: dict[str, Any]) -> dict[str, Any]:
    """The Docker seccomp profile as gVisor applies it (`--oci-seccomp`).

    This runsc applies every refusal with EPERM: it ignores a rule's
    `errnoRet` (measured: socket(AF_INET) gives EPERM, not EAFNOSUPPORT).
    One rule then breaks every program: clone3 is refused so that libc falls
    back to clone, whose flags seccomp can read, and that fallback happens
    only on ENOSYS; EPERM makes pthread_create fail. So clone3 is allowed
    here, and the Sentry itself answers it: this gVisor does not implement
    clone3 (ENOSYS, measured), and a gVisor that did would create any
    namespace inside its own kernel, not the host's.

    gVisor also looks names up in its own syscall table and skips those it
    does not know (its debug log: "OCI seccomp: ignoring syscall"), so a call
    it spells differently would fall to the default, EPERM: pselect6, which
    glibc's select() uses, is "pselect" there. Calls newer than this gVisor
    (openat2, futex_waitv, landlock_*, ...) are skipped too and refused with
    EPERM; unconfined, the Sentry would answer ENOSYS."""
    adapted = copy.deepcopy(profile)
    rules = []
    for rule in adapted["syscalls"]:
        if rule.get("names") == ["clone3"]:
            continue
        rule["names"] = sorted(set(rule["names"]) | {GVISOR_SPELLING[n] for n in rule["names"] if n in GVISOR_SPELLING})
        rules.append(rule)
    rules.append({"names": ["clone3"], "action": "SCMP_ACT_ALLOW"})
    adapted["syscalls"] = rules
    return adapted
