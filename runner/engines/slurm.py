"""The `slurm` engine: each run is one Slurm batch job running the runner.

Submission is `sbatch` and watching is `squeue` then `sacct --parsable2`
(the command-line tools, not slurmrestd): they need nothing on the server's
host beyond the Slurm client and munge (slurmrestd needs its own daemon and,
off the controller's host, JWT keys); their `--parsable2` output has kept its
columns across Slurm releases while `--json`'s schema changes with every data
parser version; and they are what an operator types to debug the same job.
docs/slurm.md says more.

A job carries the run's limits: `--account` (the tenant's Slurm account),
`--qos`, `--mem` (every stage that streams at once, plus the runner),
`--cpus-per-task` (the most one stage may use: stages share the job's cores),
`--time` (the per-stage timeout plus setup time: stages run together), and
`--gres=gpu:N`. The job's stdout is the run's event stream and its stderr the
runner's log, both in the run directory, which must be on a filesystem the
compute nodes share with the server (docs/slurm.md).

Slurm's queue is the queue: this engine never holds a run back itself
(`capacity()` is None). Jobs are found again after a server restart by id
alone, from `squeue` while slurmctld remembers them and `sacct` after.
"""
from __future__ import annotations

import math
import os
import pwd
import re
import shlex
import shutil
import subprocess
import threading
import time
from collections.abc import Iterable, Mapping
from typing import Any

from .base import (
    CANCELED,
    FAILED,
    GONE,
    PENDING,
    RUNNING,
    SUCCEEDED,
    Engine,
    EngineError,
    JobState,
    RunRequest,
)
from .local import command
from .stages import concurrent_stages

MiB = 1 << 20
JOB_ID = re.compile(r"^\d+(?:_\d+)?$")
ACCOUNT = re.compile(r"^[a-z][a-z0-9_-]{0,39}$")

# Slurm job states (squeue %T, sacct State) -> engine states. Everything not
# listed ended the job without it succeeding.
_STATES = {
    "PENDING": PENDING, "CONFIGURING": PENDING, "REQUEUED": PENDING, "REQUEUE_FED": PENDING,
    "REQUEUE_HOLD": PENDING, "RESV_DEL_HOLD": PENDING, "SPECIAL_EXIT": PENDING,
    "RUNNING": RUNNING, "COMPLETING": RUNNING, "SUSPENDED": RUNNING, "STOPPED": RUNNING,
    "RESIZING": RUNNING, "SIGNALING": RUNNING, "STAGE_OUT": RUNNING,
    "COMPLETED": SUCCEEDED, "CANCELLED": CANCELED,
}

# What an ended job's Slurm state means, for the service's error paragraph.
REASONS = {
    "OUT_OF_MEMORY": "the Slurm job used more memory than it was given (--mem); the kernel killed it",
    "TIMEOUT": "the Slurm job reached its time limit (--time) and Slurm stopped it",
    "CANCELLED": "the Slurm job was cancelled (scancel, by the service or an operator)",
    "NODE_FAIL": "the node running the Slurm job failed",
    "BOOT_FAIL": "the node for the Slurm job failed to boot",
    "DEADLINE": "the Slurm job reached its deadline before it could finish",
    "PREEMPTED": "the Slurm job was preempted by a job of higher priority",
    "FAILED": "the runner exited with an error (see the run's events and runner.log)",
}

_EXIT = re.compile(r"^(\d+):(\d+)$")


def explain(reason: str) -> str:
    """One sentence for a `JobState.reason` this engine gave."""
    return REASONS.get(reason.split()[0] if reason else "", reason)


def _exit_code(text: str) -> int | None:
    """sacct's ExitCode "CODE:SIGNAL" -> an exit status (128+signal when killed)."""
    m = _EXIT.match(text.strip())
    if not m:
        return None
    code, sig = int(m.group(1)), int(m.group(2))
    return 128 + sig if sig else code


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise EngineError(f"the slurm engine needs `{name}` (the Slurm client tools) on this host's PATH; "
                          "install slurm-client and munge, and point /etc/slurm/slurm.conf at the cluster")
    return path


def _call(argv: list[str], *, input: str | None = None, timeout: float = 30, check: bool = True) -> str:
    """Run a Slurm tool; its stdout, or EngineError naming the command and what it said."""
    try:
        done = subprocess.run([_tool(argv[0]), *argv[1:]], input=input, capture_output=True, text=True, check=False,
                              timeout=timeout, env={**os.environ, "SLURM_TIME_FORMAT": "standard"})
    except subprocess.TimeoutExpired:
        raise EngineError(f"`{' '.join(argv[:2])}` did not answer within {timeout:g} s: is slurmctld "
                          "(or slurmdbd, for sacct/sacctmgr) up?") from None
    if check and done.returncode != 0:
        said = (done.stderr or done.stdout).strip().splitlines()
        raise EngineError(f"`{shlex.join(argv[:3])}` failed (exit {done.returncode}): "
                          f"{' '.join(said[-3:]) or 'no message'}")
    return done.stdout


def account_name(tenant: str, prefix: str = "") -> str:
    """The Slurm account of `tenant`: Slurm lowercases names, so a tenant whose
    name would change is refused rather than merged with another."""
    name = prefix + tenant
    if not ACCOUNT.match(name):
        raise EngineError(f"tenant {tenant!r} cannot be a Slurm account name ({name!r}): use lowercase "
                          "letters, digits, '-' and '_', starting with a letter, at most 40 characters")
    return name


class SlurmEngine(Engine):
    name = "slurm"
    jobs_outlive_server = True  # a job runs on whether or not the server that submitted it lives
    queues_tenants = True  # each tenant's account holds it to its limits (GrpJobs...) and fair share

    def __init__(self, *, partition: str | None = None, python: str | None = None,
                 runner_memory: int = 512 * MiB, setup_time: float = 900.0,
                 job_memory_cap: int | None = None, account_prefix: str = "",
                 job_user: str | None = None, sbatch_args: Iterable[str] = (),
                 poll_interval: float = 1.0) -> None:
        self.partition = partition
        self.python = python  # the runner's interpreter on the compute nodes (default: ours)
        self.runner_memory = runner_memory  # the runner itself and its artifact processors
        self.setup_time = setup_time  # fetching scripts, building a framework, artifacts
        self.job_memory_cap = job_memory_cap  # what the partition allows one job, if less than the sum
        self.account_prefix = account_prefix
        self.sbatch_args = list(sbatch_args)
        self.poll_interval = poll_interval
        self._seen: dict[str, tuple[float, JobState]] = {}  # job id -> (when asked, what Slurm said)
        self._lock = threading.Lock()  # the scheduler polls, the API thread may cancel
        # Run jobs as this user instead of the server's (sbatch --uid: the server must be root).
        # Its runner is then unprivileged: stages run as that user, per-stage memory limits come
        # from the job's delegated memory cgroup, pids/cpu from RLIMIT_NPROC and the job's cpuset.
        self.job_user: pwd.struct_passwd | None = None
        if job_user is not None:
            try:
                self.job_user = pwd.getpwnam(job_user)
            except KeyError:
                raise EngineError(f"the slurm engine's job user {job_user!r} does not exist on this host") from None
            if os.geteuid() != 0:
                raise EngineError(f"running jobs as {job_user!r} needs the server to run as root (sbatch --uid)")
        _tool("sbatch")

    # --- submitting ------------------------------------------------------------------

    def job_options(self, request: RunRequest) -> list[str]:
        """The sbatch options that carry the run's identity and limits."""
        memory = request.memory * concurrent_stages(request) + self.runner_memory
        if self.job_memory_cap is not None:
            memory = min(memory, self.job_memory_cap)
        minutes = math.ceil((request.timeout + self.setup_time) / 60)
        opts = [f"--job-name=pipcook-{request.run_id}"[:100],
                f"--account={request.account or account_name(request.tenant, self.account_prefix)}",
                f"--mem={math.ceil(memory / MiB)}M",
                f"--cpus-per-task={max(1, math.ceil(request.cpus))}",
                f"--time={minutes}",
                "--nodes=1", "--ntasks=1",
                f"--chdir={request.run_dir}",
                f"--output={request.events}", f"--error={request.runner_log}", "--open-mode=append",
                # The server's environment (its secrets included) stays on the server.
                "--export=NONE",
                "--parsable"]
        if request.qos:
            opts.append(f"--qos={request.qos}")
        if self.partition:
            opts.append(f"--partition={self.partition}")
        if request.gpus:
            opts.append(f"--gres=gpu:{int(request.gpus)}")
        if self.job_user is not None:
            opts += [f"--uid={self.job_user.pw_uid}", f"--gid={self.job_user.pw_gid}"]
        return opts + self.sbatch_args

    def job_script(self, request: RunRequest) -> str:
        """The batch script: the environment the runner needs, then the runner itself (exec, so
        scancel's SIGTERM reaches it and it tears its sandboxes down)."""
        env: dict[str, str] = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}
        try:
            env["HOME"] = (self.job_user or pwd.getpwuid(os.geteuid())).pw_dir
        except KeyError:
            pass
        env.update({k: v for k, v in os.environ.items() if k.startswith("PIPCOOK_") or k == "XDG_CACHE_HOME"})
        env.update(request.env)
        lines = ["#!/bin/sh", f"# pipcook-sandbox run {request.run_id} of tenant {request.tenant}"]
        lines += [f"export {k}={shlex.quote(v)}" for k, v in sorted(env.items()) if re.match(r"^[A-Za-z_]\w*$", k)]
        lines.append("exec " + shlex.join(command(request, self.python)))
        return "\n".join(lines) + "\n"

    def submit(self, request: RunRequest) -> str:
        script = self.job_script(request)
        (request.run_dir / "slurm-job.sh").write_text(script)
        options = self.job_options(request)
        try:
            out = _call(["sbatch", *options], input=script).strip()
        except EngineError as exc:
            if "Invalid account" in str(exc):
                account = next(o for o in options if o.startswith("--account=")).split("=", 1)[1]
                raise EngineError(f"Slurm refused run {request.run_id} of tenant {request.tenant}: its account "
                                  f"{account!r} does not exist or this user may not use it ({exc}); "
                                  f"`pipcook-sandbox tenants add {request.tenant} --slurm-account` makes it") from None
            raise
        job_id = out.split(";")[0].strip()  # --parsable: "ID" or "ID;CLUSTER"
        if not JOB_ID.match(job_id):
            raise EngineError(f"sbatch accepted run {request.run_id} but answered {out!r}, not a job id")
        return job_id

    # --- watching ----------------------------------------------------------------------

    def _squeue(self, job_ids: list[str]) -> dict[str, tuple[str, str]]:
        """Job id -> (Slurm state, reason) for the jobs slurmctld still holds."""
        if not job_ids:
            return {}
        try:
            out = _call(["squeue", "-h", "-t", "all", "-o", "%i|%T|%r", "-j", ",".join(job_ids)])
        except EngineError as exc:
            if "Invalid job id" not in str(exc):  # a lone id slurmctld has forgotten; else it is down
                raise
            out = ""
        found = {}
        for line in out.splitlines():
            parts = line.strip().split("|")
            if len(parts) == 3:
                found[parts[0]] = (parts[1], parts[2])
        return found

    def _sacct(self, job_ids: list[str]) -> dict[str, tuple[str, str, str]]:
        """Job id -> (state, exit code, reason) from the accounting database."""
        if not job_ids:
            return {}
        out = _call(["sacct", "-X", "-n", "-P", "-o", "JobID,State,ExitCode,Reason", "-j", ",".join(job_ids)])
        found = {}
        for line in out.splitlines():
            parts = line.strip().split("|")
            if len(parts) == 4:
                found[parts[0]] = (parts[1], parts[2], parts[3])
        return found

    def _states(self, job_ids: list[str]) -> dict[str, JobState]:
        ids = [j for j in job_ids if JOB_ID.match(j)]
        queued = self._squeue(ids)
        result: dict[str, JobState] = {}
        ended = []
        for job_id in ids:
            slurm_state, why = queued.get(job_id, ("", ""))
            engine_state = _STATES.get(slurm_state.split()[0] if slurm_state else "")
            if engine_state in (PENDING, RUNNING):
                result[job_id] = JobState(engine_state, reason="" if why in ("None", "") else why)
            else:
                ended.append(job_id)  # ended, or already forgotten by slurmctld
        accounted = self._sacct(ended)
        for job_id in ended:
            if job_id not in accounted:
                # Known to slurmctld as ended but not yet in the database: ask again next time.
                fallback = queued.get(job_id)
                result[job_id] = JobState(RUNNING, reason="ending") if fallback else JobState(GONE)
                continue
            slurm_state, exit_text, why = accounted[job_id]
            word = slurm_state.split()[0]  # "CANCELLED by 0" -> "CANCELLED"
            code = _exit_code(exit_text)
            state = _STATES.get(word, FAILED)
            if state == SUCCEEDED and code not in (0, None):
                state = FAILED
            reason = "" if state == SUCCEEDED else word
            if state in (PENDING, RUNNING):
                result[job_id] = JobState(state, reason="" if why in ("None", "") else why)
            else:
                result[job_id] = JobState(state, exit_code=code, reason=reason)
        for job_id in job_ids:
            result.setdefault(job_id, JobState(GONE, reason="not a Slurm job id"))
        return result

    def poll(self, job_id: str) -> JobState:
        """The job's state, at most `poll_interval` seconds old. The service polls every running
        run several times a second; slurmctld gets one `squeue` (and one `sacct` for jobs that
        left it) per interval for all the jobs asked about lately, not one per job per poll."""
        now = time.monotonic()
        with self._lock:
            hit = self._seen.get(job_id)
            if hit is not None and (hit[1].final or now - hit[0] < self.poll_interval):
                return hit[1]
            for old in [j for j, (t, state) in self._seen.items() if now - t > 600]:
                del self._seen[old]  # not asked about for ten minutes: forgotten
            batch = {job_id, *(j for j, (t, state) in self._seen.items() if not state.final)}
        try:
            states = self._states(sorted(batch))
        except EngineError as exc:
            # Never raise for a job: a controller that does not answer leaves the run as it was.
            return JobState(RUNNING, reason=f"unknown: {exc}")
        with self._lock:
            for j, state in states.items():
                self._seen[j] = (now, state)
        return states[job_id]

    def recover(self, job_ids: list[str]) -> dict[str, JobState]:
        """One squeue and one sacct call for every job the service had running."""
        try:
            return self._states(list(job_ids))
        except EngineError as exc:
            return {j: JobState(RUNNING, reason=f"unknown: {exc}") for j in job_ids}

    def cancel(self, job_id: str) -> None:
        """scancel: Slurm sends SIGTERM to the runner and its stages, SIGKILL after KillWait.
        Cancelling a job that has ended is not an error."""
        if not JOB_ID.match(job_id):
            raise EngineError(f"cannot cancel {job_id!r}: not a Slurm job id")
        _call(["scancel", job_id], check=False)
        with self._lock:
            self._seen.pop(job_id, None)  # the next poll asks Slurm again

    def capacity(self) -> dict[str, float] | None:
        return None

    def ensure_tenant(self, tenant: str, quotas: dict[str, float | int | None]) -> None:
        users = None
        if self.job_user is not None:
            users = [pwd.getpwuid(os.geteuid()).pw_name, self.job_user.pw_name]
        ensure_account(tenant, quotas, users=users, prefix=self.account_prefix)


def create(**options: Any) -> SlurmEngine:  # the server's options; the constructor takes what it knows
    """The engine, from the server's options (`partition=` from --slurm-partition)."""
    return SlurmEngine(**options)


# --- tenant accounts -----------------------------------------------------------------------


_TRES = {"cpus": ("GrpTRES", "cpu"), "memory": ("GrpTRES", "mem"), "gpus": ("GrpTRES", "gres/gpu"),
         "job_cpus": ("MaxTRESPerJob", "cpu"), "job_memory": ("MaxTRESPerJob", "mem"),
         "job_gpus": ("MaxTRESPerJob", "gres/gpu")}
_PLAIN = {"max_jobs": "GrpJobs", "max_submit": "GrpSubmitJobs", "fairshare": "Fairshare"}


def _value(key: str, value: float | None) -> str:
    if value is None:
        return "-1"  # sacctmgr: clear the limit
    if key.endswith("memory"):
        return f"{math.ceil(value / MiB)}M"
    return str(math.ceil(value))


def ensure_account(tenant: str, quotas: Mapping[str, float | int | None] | None = None, *,
                   users: Iterable[str] | None = None, prefix: str = "", parent: str = "root",
                   qos: str | None = None) -> str:
    """Create the tenant's Slurm account, or check and update it; returns its name.

    `quotas`: each key present sets that limit (None clears it); limits whose key is
    absent are left as they are, so an operator's own `sacctmgr` settings survive:
      max_jobs        GrpJobs: the tenant's jobs running at once (more wait, AssocGrpJobsLimit)
      max_submit      GrpSubmitJobs: jobs queued or running at once
      cpus, memory, gpus              GrpTRES: all the tenant's running jobs together
      job_cpus, job_memory, job_gpus  MaxTRESPerJob: any one job
      fairshare       Fairshare: the tenant's share of the cluster (a new account has 1)
    `users` are the Slurm users whose jobs may run under it (default: this process's
    user, the one the server submits as; add the engine's `job_user` if it has one).
    Needs Slurm operator rights (root or AdminLevel=Operator)."""
    name = account_name(tenant, prefix)
    q = dict(quotas or {})
    unknown = set(q) - set(_TRES) - set(_PLAIN)
    if unknown:
        raise EngineError(f"unknown Slurm quota(s) for tenant {tenant!r}: {', '.join(sorted(unknown))}")
    who = list(users) if users is not None else [pwd.getpwuid(os.geteuid()).pw_name]
    have = _call(["sacctmgr", "-n", "-P", "show", "account", name, "format=account"]).split()
    if name not in have:
        _call(["sacctmgr", "-i", "add", "account", name, f"parent={parent}",
               f"description=pipcook-sandbox tenant {tenant}", "organization=pipcook-sandbox"])
    associated = _call(["sacctmgr", "-n", "-P", "show", "assoc", f"account={name}", "format=user"]).split()
    for user in who:
        if user not in associated:
            _call(["sacctmgr", "-i", "add", "user", user, f"account={name}"])

    # Limits on the account's own association (user=) bind all its users together.
    settings = [f"{_PLAIN[k]}={_value(k, v)}" for k, v in q.items() if k in _PLAIN]
    tres: dict[str, list[str]] = {}
    for key, value in q.items():
        if key in _TRES:
            field, unit = _TRES[key]
            tres.setdefault(field, []).append(f"{unit}={_value(key, value)}")
    settings += [f"{field}={','.join(parts)}" for field, parts in tres.items()]
    if qos:
        settings += [f"QOS+={qos}", f"DefaultQOS={qos}"]
    if settings:
        argv = ["sacctmgr", "-i", "modify", "account", "where", f"name={name}", "user=", "set", *settings]
        done = subprocess.run([_tool("sacctmgr"), *argv[1:]], capture_output=True, text=True, timeout=30,
                              check=False)
        said = (done.stdout + done.stderr).strip()
        if done.returncode != 0 and "Nothing modified" not in said:  # limits already as asked: exit 1, fine
            raise EngineError(f"`sacctmgr modify account {name}` failed (exit {done.returncode}): "
                              f"{' '.join(said.splitlines()[-3:]) or 'no message'}")
    return name


def tenant_quotas(*, max_running: int, max_queued: int, cpus: float, gpus: int) -> dict[str, float | int | None]:
    """A service tenant's quotas as Slurm association limits: its max-running becomes GrpJobs (more
    of its jobs wait, AssocGrpJobsLimit), running plus queued its GrpSubmitJobs, and one job may ask
    for at most the CPUs (`--cpus-per-task`) and GPUs a run of it may have."""
    return {"max_jobs": max_running, "max_submit": max_running + max_queued,
            "job_cpus": max(1, math.ceil(cpus)), "job_gpus": gpus}


def account_limits(tenant: str, prefix: str = "") -> dict[str, str]:
    """The limits Slurm holds for the tenant's account (for `tenants show` and tests)."""
    name = account_name(tenant, prefix)
    out = _call(["sacctmgr", "-n", "-P", "show", "assoc", f"account={name}", "user=",
                 "format=account,grpjobs,grpsubmit,grptres,maxtres,fairshare,qos"])
    for line in out.splitlines():
        parts = line.split("|")
        if parts and parts[0] == name:
            keys = ["account", "GrpJobs", "GrpSubmitJobs", "GrpTRES", "MaxTRESPerJob", "Fairshare", "QOS"]
            return dict(zip(keys, parts))
    raise EngineError(f"Slurm has no account {name!r} for tenant {tenant!r} (`tenants add` creates it)")


def remove_account(tenant: str, prefix: str = "") -> bool:
    """Delete the tenant's account and its users' associations; False if it did not exist.
    Slurm refuses while the account has jobs queued or running: cancel them first."""
    name = account_name(tenant, prefix)
    have = _call(["sacctmgr", "-n", "-P", "show", "account", name, "format=account"]).split()
    if name not in have:
        return False
    _call(["sacctmgr", "-i", "delete", "user", "where", f"account={name}"], check=False)
    _call(["sacctmgr", "-i", "delete", "account", name])
    return True
