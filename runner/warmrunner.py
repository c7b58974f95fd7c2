"""A runner process started before its run: imports done, the run's sandboxes booted, one job, then exit.

    python -m pipcook_sandbox.runner.warmrunner [--max-idle S] [--dataflows N] -- RUN_OPTIONS...

The service's local engine (engines/local.py, `server --warm N`) keeps a few
of these per *key*: the tenant and every option of its `run` command line
(isolation, limits, --stage-uid, --allow-private, --no-gpu), so a runner is
only ever prepared for one tenant with one set of limits. It:

1. imports the runner (the CLI, the Run, the backend) and prepares a train
   run of the usual shape (datasource, N dataflows, model) with exactly the
   options RUN_OPTIONS give (warmrun.WarmStarter.prepare: sockets, volumes,
   one warm sandbox per stage, limits in force from boot);
2. waits for one job on stdin: a JSON line {"argv": the whole `run`
   command line, "stdout": path, "stderr": path, "cwd": dir}; the engine
   writes it and closes stdin. EOF, a malformed line or --max-idle seconds
   without a job: it tears everything down and exits EXIT_NO_JOB (75),
   having run nothing and written no verdict. The pool (engines/warmpool.py)
   owns expiry and stops handing a runner out well before this timer, which
   starts only once the sandboxes are booted: the timer is a backstop;
3. points its stdout/stderr at the job's files and runs the CLI with the
   job's argv; `run` then takes the prepared run if the pipeline has that
   shape and the options agree, else closes it and runs cold;
4. exits with the CLI's status. A prepared run nobody took is closed.

SIGTERM at any point (the server's cancel, its shutdown, or the kernel's
PDEATHSIG when the server is killed) tears the run down like Ctrl-C.
"""
from __future__ import annotations

import argparse
import json
import os
import select
import signal
import sys
from typing import Any

PLACEHOLDER = "pipeline.json"
EXIT_NO_JOB = 75  # EX_TEMPFAIL: no job taken, nothing run (engines/warmpool.py has the same number)


def _terminate(signum: int, frame: Any) -> None:
    # Once: a server's shutdown sends SIGTERM and its exit then sends PDEATHSIG's; a second SystemExit
    # in the middle of the teardown would leave the prepared run's mounts behind.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise SystemExit(143)


def warm_imports() -> None:
    """Import what `run` imports once it has a job (the CLI's display, report, training, events), so
    that the job does not pay for it."""
    from . import display, events, report, training  # noqa: F401


def prepare(run_args: list[str], dataflows: int) -> Any:
    """The prepared, offered Run for RUN_OPTIONS; None where a warm run cannot serve them (GPU, not bwrap)."""
    from . import cli, run, warmrun
    from .backends import get_backend, owner
    from .workerenv import ensure_worker_site

    ctx = cli.run.make_context("run", [PLACEHOLDER, *run_args])
    p = ctx.params
    if p.get("gpu") or not get_backend(p["isolation"]).can_boot_warm:
        return None
    from .doctor import require_backend

    require_backend(p["isolation"])  # the job's own check then finds it done (doctor._confirmed)
    ids = owner.parse(p["stage_uid"]) if p.get("stage_uid") else None
    if ids is not None:
        owner.set_stage_owner(*ids)
    limits = cli._limits(p["memory"], p["cpus"], p["pids"], p["disk"], p["timeout"], p.get("downloads"))
    opts = run.ExecOptions(isolation=p["isolation"], limits=limits, gpu=False, nocache=p["nocache"],
                           allow_private=tuple(p["allow_private"]), task_type="train", framework=None,
                           worker_site=ensure_worker_site(log=lambda _: None), warm=True,
                           stage_owner=ids)  # as the job's `run --stage-uid` sets it (warmrun.SHAPING)
    prepared = run.Run(None, opts)
    prepared.open()
    try:
        starter = warmrun.WarmStarter(prepared, warmrun.shape_plans(dataflows))
        starter.prepare()
    except BaseException:
        prepared.close()
        raise
    prepared.prepared = starter
    warmrun.offer(prepared)
    return prepared


def wait_job(max_idle: float) -> dict | None:
    """The job line from stdin; None on EOF, a malformed line or after `max_idle` seconds."""
    ready, _, _ = select.select([sys.stdin], [], [], max_idle)
    if not ready:
        return None
    line = sys.stdin.readline()
    try:
        job = json.loads(line) if line else None
    except ValueError:
        return None
    if not isinstance(job, dict) or not isinstance(job.get("argv"), list) \
            or not all(isinstance(a, str) for a in job["argv"]):
        return None
    return job


def _redirect(job: dict) -> None:
    for fd, key in ((1, "stdout"), (2, "stderr")):
        path = job.get(key)
        if isinstance(path, str):
            sys.stdout.flush()
            sys.stderr.flush()
            target = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
            os.dup2(target, fd)
            os.close(target)
    if isinstance(job.get("cwd"), str):
        os.chdir(job["cwd"])


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _terminate)
    parser = argparse.ArgumentParser(prog="warmrunner")
    parser.add_argument("--max-idle", type=float, default=300.0)
    parser.add_argument("--dataflows", type=int, default=1)
    parser.add_argument("run_args", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    run_args = args.run_args[1:] if args.run_args[:1] == ["--"] else args.run_args
    from . import cli, warmrun

    warm_imports()
    prepared = None
    try:
        unprepared = ""
        try:
            prepared = prepare(run_args, args.dataflows)
        except Exception as exc:  # the job still runs, cold; said in its runner log
            unprepared = f"warm runner: could not prepare a warm run ({type(exc).__name__}: {exc}); running cold"
        job = wait_job(args.max_idle)
        if job is None:  # never 0: a run handed to it anyway must not look succeeded
            return EXIT_NO_JOB
        _redirect(job)
        if unprepared:
            print(unprepared, file=sys.stderr)
        try:
            cli.main.main(args=job["argv"], prog_name="pipcook-sandbox", standalone_mode=True)
        except SystemExit as exc:
            return exc.code if isinstance(exc.code, int) else 1
        finally:  # for the operator (runner.log), if the run never got as far as its stages (warmrun.execute
            # says it first otherwise, before the verdict): whether the run found its sandboxes booted
            if prepared is not None:
                warmrun.tell_warmth(prepared.prepared if prepared not in warmrun._offered else None)
        return 0
    finally:
        warmrun.withdraw()


if __name__ == "__main__":
    code = main()
    # Everything of the run is torn down by now (its Run closed, the verdict written): skip the
    # interpreter's own teardown of the runner's modules, which the service would wait for.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
