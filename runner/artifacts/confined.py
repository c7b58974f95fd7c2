"""Run an artifact processor's conversion code inside a sandbox.

The processors are trusted; the model files they convert are not: a model
script wrote them, and Keras, h5py and TensorFlow parse them (Keras's
`safe_mode` has been bypassed before, e.g. CVE-2025-1550). So the parsing runs
where the script ran: in the run's backend, like a stage. It gets

    /pipcook/convert/script   the conversion code, read-only
    /pipcook/convert/model    a private copy of model/'s regular files, read-only
    /pipcook/convert/siteN    the site dirs it imports from (the framework), read-only
    /pipcook/convert/out      its only writable dir, on a disk quota (--disk)
    /tmp                      private, size-capped

no network, the run's memory / CPU / pids limits, a wall-clock timeout and an
output cap; the regular files of out/ are copied to the host afterwards, links
never followed. With `--isolation none` (trusted code only) it is a plain
subprocess, as everything else is then.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from pipcook_sandbox.runner.backends import base, get_backend
from pipcook_sandbox.runner.statedir import new_state_dir

from . import ArtifactError

IN = "/pipcook/convert"
POLL = 0.1


@dataclass(frozen=True)
class Job:
    """One conversion: `code` run as a script with `args`, where {model}, {out}, {tmp} and {site0},
    {site1}, ... stand for the paths the code sees (inside the sandbox, or the host's without one)."""

    processor: str
    code: str
    args: list[str]
    model: Path  # the private copy of model/ (host)
    site_dirs: list[Path]
    out: Path  # where the results land on the host (an empty dir)
    timeout: float


def run(job: Job, isolation: str, limits: base.Limits | None = None) -> str:
    """Run the job; its captured output on success, ArtifactError (naming the processor) otherwise."""
    if isolation == "none":
        return _run_unconfined(job)
    return _run_confined(job, isolation, limits or base.Limits())


def _boot(script: str, site_dirs: list[str]) -> str:
    # -I -S: neither the runner's packages nor PYTHON* variables; only the given site dirs.
    return ("import site, sys, runpy\n"
            f"for d in {site_dirs!r}: site.addsitedir(d)\n"
            f"sys.argv = [{script!r}] + sys.argv[1:]\n"
            f"runpy.run_path({script!r}, run_name='__main__')\n")


def _args(job: Job, paths: dict[str, str]) -> list[str]:
    return [a.format(**paths) for a in job.args]


def _failure(job: Job, output: str, code: int | None) -> ArtifactError:
    missing = re.findall(r"ModuleNotFoundError: No module named '([^']+)'", output)
    if missing:
        return ArtifactError(f"artifact processor {job.processor!r} needs the Python library "
                             f"{missing[-1].split('.')[0]!r}, which is not installed in "
                             f"{', '.join(str(d) for d in job.site_dirs)}")
    lines = [line for line in output.strip().splitlines() if line.strip()]
    cause = lines[-1] if lines else f"exit code {code}"
    return ArtifactError(f"artifact processor {job.processor!r}: the conversion failed: {cause[:2000]}")


def _env(home: str, tmp: str) -> dict[str, str]:
    # keras writes ~/.keras: HOME is private
    return {"HOME": home, "TMPDIR": tmp, "LANG": "C.UTF-8", "TF_CPP_MIN_LOG_LEVEL": "2",
            "CUDA_VISIBLE_DEVICES": "-1", "KERAS_BACKEND": "tensorflow"}


def _run_unconfined(job: Job) -> str:
    work = Path(tempfile.mkdtemp(prefix=f"pcsb-{job.processor}-run-"))
    try:
        script = work / "convert.py"
        script.write_text(job.code)
        (work / "home").mkdir()
        paths = {"model": str(job.model), "out": str(job.out), "tmp": str(work),
                 **{f"site{i}": str(d) for i, d in enumerate(job.site_dirs)}}
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **_env(str(work / "home"), str(work))}
        try:
            proc = subprocess.run([sys.executable, "-I", "-S", "-c", _boot(str(script), [str(d) for d in job.site_dirs]),
                                   *_args(job, paths)], cwd=work, env=env, stdin=subprocess.DEVNULL,
                                  capture_output=True, text=True, timeout=job.timeout)
        except subprocess.TimeoutExpired:
            raise ArtifactError(f"artifact processor {job.processor!r}: the conversion took longer than "
                                f"{job.timeout:g} s") from None
        if proc.returncode != 0:
            raise _failure(job, proc.stderr, proc.returncode)
        return proc.stderr
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _run_confined(job: Job, isolation: str, limits: base.Limits) -> str:
    from pipcook_sandbox.runner.backends import quota

    backend = get_backend(isolation)
    run_id = f"{os.getpid()}-{os.urandom(3).hex()}"
    stage = f"artifact-{job.processor}"
    # A state dir like a run's (run.json names its owner) so `clean` and leftover checks know it.
    state = new_state_dir("pcsb-", run_id)
    volume = handle = None
    try:
        script_dir = state / "script"
        script_dir.mkdir()
        (script_dir / "convert.py").write_text(job.code)
        os.chmod(script_dir, 0o755)
        os.chmod(script_dir / "convert.py", 0o644)
        _world_readable(job.model)
        volume = quota.create_volume(state / "vol", limits.disk, ["out"])
        mounts = [base.Mount(script_dir, f"{IN}/script"), base.Mount(job.model, f"{IN}/model"),
                  base.Mount(volume.path("out"), f"{IN}/out", writable=True)]
        sites = []
        for i, d in enumerate(job.site_dirs):
            mounts.append(base.Mount(d, f"{IN}/site{i}"))
            sites.append(f"{IN}/site{i}")
        paths = {"model": f"{IN}/model", "out": f"{IN}/out", "tmp": "/tmp",
                 **{f"site{i}": s for i, s in enumerate(sites)}}
        log_path = state / "convert.log"
        spec = base.StageSpec(
            run_id=run_id, name=stage, mounts=mounts, limits=limits.replace(timeout=job.timeout), log_path=log_path,
            env=_env("/tmp", "/tmp"), argv=["-I", "-S", "-c", _boot(f"{IN}/script/convert.py", sites), *_args(job, paths)],
            labels={"run_id": run_id, "stage": stage}, options=base.StageOptions(state_dir=state))
        handle = backend.start(spec)
        started = time.monotonic()
        while handle.poll() is None:
            if time.monotonic() - started > job.timeout:
                handle.terminate(base.REASON_TIMEOUT)
            elif volume.exceeded():
                handle.terminate(base.REASON_DISK)
            time.sleep(POLL)
        outcome = handle.outcome()
        handle.cleanup()
        output = log_path.read_text("utf-8", errors="replace") if log_path.is_file() else ""
        if outcome.reason or outcome.exit_code != 0:
            raise _stopped(job, outcome, limits) if outcome.reason else _failure(job, output, outcome.exit_code)
        volume.copy_out({"out": job.out})
        return output
    except KeyboardInterrupt:
        if handle is not None:
            handle.terminate(base.REASON_CANCELLED)
        raise
    finally:
        if handle is not None:
            try:
                handle.terminate(base.REASON_CANCELLED)
                handle.cleanup()
            except Exception:
                pass
        if volume is not None:
            volume.destroy()
        shutil.rmtree(state, ignore_errors=True)


def _stopped(job: Job, outcome: base.Outcome, limits: base.Limits) -> ArtifactError:
    from pipcook_sandbox.runner.units import fmt_bytes

    why = {
        base.REASON_TIMEOUT: f"it took longer than {job.timeout:g} s",
        base.REASON_MEMORY: f"it was killed for using more than {fmt_bytes(limits.memory)} of memory (--memory)",
        base.REASON_PIDS: f"it started more than {limits.pids} processes or threads (--pids)",
        base.REASON_DISK: f"it wrote more than {fmt_bytes(limits.disk)} (--disk)",
        base.REASON_OUTPUT: f"it printed more than {fmt_bytes(limits.output)}",
        base.REASON_CANCELLED: "it was interrupted",
    }.get(outcome.reason or "", outcome.detail or f"it stopped ({outcome.reason})")
    return ArtifactError(f"artifact processor {job.processor!r}: the conversion was stopped: {why}")


def _world_readable(root: Path) -> None:
    """The sandbox user (uid 65534 when the runner is root) must read the private copy: it is ours,
    made moments ago from regular files only, so widening its modes shares nothing else."""
    os.chmod(root, 0o755)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            os.chmod(os.path.join(dirpath, name), 0o755)
        for name in filenames:
            os.chmod(os.path.join(dirpath, name), 0o644)
