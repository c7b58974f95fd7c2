"""Who failed, and why, from what the runner observed of each stage.

The runner's own observations (a limit it enforced, an exit code, a protocol
violation, a full disk quota) always come first; a stage's own error report
next. A stage's claim that the stage before it sent something unreadable
(`kind: "upstream"`) is never taken as the other stage's failure: it stays
the reporting stage's, naming the stage it accuses.
"""
from __future__ import annotations

import os
import signal
from dataclasses import dataclass, field
from pathlib import Path

from pipcook_sandbox.runner.backends import base
from pipcook_sandbox.runner.backends.base import Limits

from .control import shown
from .errors import StageError
from .units import fmt_bytes

UPSTREAM = 9  # the priority of a stage's "the stage before me failed" error: the cause is elsewhere


@dataclass
class Observation:
    """What the runner saw of one stage by the time it judged the run."""

    outcome: base.Outcome = field(default_factory=lambda: base.Outcome(None))
    error: dict | None = None  # the stage's own error report (validated by the control channel)
    violation: str | None = None  # a protocol violation the runner recorded
    disk_full: bool = False  # its quota volume is used up


def tail(path: Path, lines: int = 3) -> str:
    """The last lines of a stage's log, made inert for the terminal."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.path.getsize(path) - 4096))
            text = f.read().decode("utf-8", "replace").strip().splitlines()[-lines:]
        return shown(" | ".join(text), 1000) or "(none)"  # the stage's own output: inert
    except OSError:
        return "(no log)"


def _limit_message(reason: str | None, limits: Limits) -> str | None:
    return {
        base.REASON_TIMEOUT: f"stopped after {limits.timeout:g} s: the wall-clock limit (--timeout) was reached",
        base.REASON_MEMORY: f"killed for using more than {fmt_bytes(limits.memory)} of memory (--memory)",
        base.REASON_MEMORY_SHARED: ("killed when the memory the whole run may use ran out (the limit of the cgroup "
                                    "the runner runs in, e.g. a Slurm job's --mem), before its own --memory"),
        base.REASON_PIDS: f"reached the limit of {limits.pids} processes and threads (--pids)",
        base.REASON_DISK: f"filled its disk quota of {fmt_bytes(limits.disk)} (--disk)",
        base.REASON_OUTPUT: f"wrote more than {fmt_bytes(limits.output)} to stdout/stderr, the cap on captured output",
    }.get(reason or "")


def _exit_message(code: int, log_path: Path) -> str:
    if code < 0:
        try:
            what = f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            what = f"was killed by signal {-code}"
    else:
        what = f"exited with code {code} without reporting an error"
    return f"{what}; last output: {tail(log_path)}"


def stage_failure(name: str, script: str, seen: Observation, limits: Limits,
                  log_path: Path) -> tuple[int, StageError] | None:
    """(priority, error) for a stage that failed, lowest priority first; None if it did not."""
    outcome, error = seen.outcome, seen.error
    reason = outcome.reason
    if reason is None and seen.disk_full and (error is not None or outcome.exit_code not in (0, None)):
        # It died of ENOSPC (a raised OSError, say) before the monitor saw the volume full.
        reason = base.REASON_DISK
    limit = _limit_message(reason, limits)
    if limit is not None:
        detail = f" ({outcome.detail})" if outcome.detail else ""
        return 0, StageError(limit + detail, name, script)
    if seen.violation:
        return 1, StageError(f"broke the protocol with the runner and was stopped: {seen.violation}", name, script)
    if error is not None:
        priority = UPSTREAM if error.get("kind") == "upstream" else 2
        return priority, StageError(error["message"], name, script, error.get("traceback", ""))
    if reason == base.REASON_CANCELLED or outcome.exit_code in (0, None):
        return None
    return 3, StageError(_exit_message(outcome.exit_code, log_path), name, script)


@dataclass
class Stage:
    """A stage as the verdict names it."""

    name: str
    script: str
    log: Path


def judge(stages: list[Stage], seen: dict[str, Observation], done: set[str], limits: Limits) -> StageError:
    """The one error that explains a failed run (the stages are in pipeline order, the model last)."""
    candidates = []
    for index, stage in enumerate(stages):
        found = stage_failure(stage.name, stage.script, seen[stage.name], limits, stage.log)
        if found:
            candidates.append((found[0], index, found[1]))
    model = stages[-1]
    if not candidates and model.name not in done and seen[model.name].outcome.exit_code == 0:
        return StageError("exited with code 0 before its work was done (the script ended the process itself, "
                          f"e.g. with os._exit); last output: {tail(model.log)}", model.name, model.script)
    if not candidates:
        served = [s.name for s in stages[:-1]]
        return StageError(f"stopped before the model finished (a serving stage among {', '.join(served)} "
                          "exited early)", model.name, model.script)
    candidates.sort(key=lambda c: (c[0], c[1]))
    priority, index, error = candidates[0]
    named = {stages[i].name for _, i, _ in candidates}
    if priority == UPSTREAM and index > 0 and stages[index - 1].name not in named:
        # Only this stage says that the one before it sent something it could not read; the
        # runner saw nothing wrong with that one (no error, no limit, a clean exit). A stage's
        # word never puts the blame on another: the failure stays with the stage that reported
        # it, and the message says which stage it accuses.
        upstream, reporter = stages[index - 1], stages[index]
        return StageError(f"reported that it could not read what stage '{upstream.name}' ({upstream.script}) "
                          f"sent: {error.cause}", reporter.name, reporter.script, error.traceback)
    return error
