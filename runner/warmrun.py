"""A run whose stage sandboxes are booted before its pipeline is known (docs/warm.md).

`WarmStarter` is the run's starter (run.py `_PipelineStarter`) split in two:

- `prepare()`: with only the run's *shape* (its stages' names and roles),
  bind the control sockets, make the volumes and boot one warm sandbox per
  stage (runner/warm.py), each with every mount its stage will have: the
  script is mounted as a directory of the run's state dir, empty until the
  claim; the log goes to the state dir until then (output.LogTarget);
- `claim(plans)`: once the pipeline is parsed and its scripts fetched, copy
  each script into its directory and hand each sandbox to its stage, after
  checking that the stage's sandbox would have the very same WarmKey
  (mounts, limits, uid, site dirs). A sandbox that cannot be used (it died,
  or its key differs) is discarded and that stage started cold in its place.

`run --warm` does both at once. A warm runner process (runner/warmrunner.py)
does `prepare()` before it has a job, `offer()`s the run, and `execute` (what
`run` calls) takes it (`take_prepared`) when the shape and the options agree;
otherwise the prepared run is closed and the run is started cold.
"""
from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from pipcook_sandbox.runner.backends import base
from pipcook_sandbox.runner.backends.base import Mount
from pipcook_sandbox.runner.backends.output import LogTarget

from .run import ExecOptions, ExecResult, Run, StagePlan, _PipelineStarter
from .warm import READY_TIMEOUT, WarmError, WarmKey, WarmSandbox

# What must be equal between the options a run was prepared with and the run's own: they shape its
# sandboxes or what its runner does for them (downloads). The rest (callbacks, pipeline options) is
# the run's own and taken from it.
SHAPING = ("isolation", "limits", "gpu", "nocache", "allow_private", "task_type", "framework", "worker_site",
           "source", "model_dir", "stage_owner")


def shape_plans(dataflows: int = 1) -> list[StagePlan]:
    """Placeholder plans of a train run with `dataflows` dataflows: names and roles, no scripts yet."""
    names = [("datasource", "datasource"), *((f"dataflow-{i}", "dataflow") for i in range(1, dataflows + 1)),
             ("model", "model")]
    return [StagePlan(name, role, Path(f"{name}.py"), {}) for name, role in names]


class WarmStarter(_PipelineStarter):
    """Prepares a run's stages warm from its shape, then claims them for its plans."""

    def __init__(self, run: Run, plans: list[StagePlan]) -> None:
        super().__init__(run, plans)
        self.ctl_dirs: dict[str, Path] = {}
        self.booted: dict[str, tuple[WarmSandbox, LogTarget]] = {}
        self.claimed: list[str] = []  # the stages that run in the sandbox booted for them

    def start(self) -> None:
        self.prepare()
        self.claim(self.plans)

    def _script_dir(self, stage: str) -> Path:
        return self.run.state / "scripts" / stage

    def _script_mount(self, plan: StagePlan, script_in: str) -> Mount:
        return Mount(self._script_dir(plan.name), base.IN_SCRIPTS)

    def _config_mount(self, stage: str) -> Mount:
        """/pipcook/stage.json, as every stage has it: a file of the state dir, empty until the claim
        writes the stage's configuration into it (in place: the bind mount shows the same inode). The
        worker itself takes its configuration from the claim; this copy is for scripts that read it."""
        return Mount(self.run.state / f"stage-{stage}.json", base.IN_STAGE_CONFIG)

    def prepare(self) -> None:
        """Sockets, volumes and one booted sandbox per stage of the shape."""
        self.ctl_dirs = {plan.name: self.run.control_dir(plan.name) for plan in self.plans}
        self.run.control.start()
        self._make_volumes()
        upstream = None
        for plan in self.plans:
            script_dir = self._script_dir(plan.name)
            script_dir.mkdir(parents=True)
            os.chmod(script_dir, 0o755)  # the stage's uid reads it; only the runner writes it
            config, mounts, upstream = self._configure(plan, self.ctl_dirs[plan.name], upstream)
            cfg = self._config_mount(plan.name)
            cfg.source.touch(mode=0o644)
            log = LogTarget(self.run.state / "logs" / f"{plan.name}.log")
            self.booted[plan.name] = (self.run.boot_warm(config, [*mounts, cfg], log), log)

    def fits(self, plans: list[StagePlan]) -> bool:
        return [(p.name, p.role) for p in plans] == [(p.name, p.role) for p in self.plans]

    def claim(self, plans: list[StagePlan]) -> None:
        """Hand each booted sandbox to its stage of `plans` (same shape), in pipeline order."""
        if not self.fits(plans):
            raise WarmError("the pipeline's stages are not those the run was prepared for")
        self.plans = plans
        # Every sandbox ready (or known unusable) before the first claim: a claimed stage runs at once,
        # and the run's monitor (deadlines, disk quotas, events) starts only after the last claim, so
        # no claim may wait for a slow sandbox while others already run.
        unready: dict[str, WarmError] = {}
        deadline = time.monotonic() + READY_TIMEOUT
        for name, (sandbox, _) in self.booted.items():
            try:
                sandbox.wait_ready(deadline)
            except WarmError as exc:
                unready[name] = exc
        upstream = None
        for plan in plans:
            copy = self._script_dir(plan.name) / plan.script.name
            shutil.copyfile(plan.script, copy)
            os.chmod(copy, 0o644)
            config, mounts, upstream = self._configure(plan, self.ctl_dirs[plan.name], upstream)
            sandbox, log = self.booted[plan.name]
            cfg = self._config_mount(plan.name)
            key = WarmKey.of(self.run.backend, self.run.stage_spec(config, [*mounts, cfg], log),
                             list(config.site_dirs))
            with open(cfg.source, "w", encoding="utf-8") as f:  # truncated in place, never replaced
                f.write(config.to_json())
            log_path = self.run.ws.logs / f"{plan.name}.log"
            try:
                if plan.name in unready:
                    raise unready[plan.name]
                self.run.claim_warm(sandbox, key, config)
                # only now: a sandbox that refused or missed its claim keeps its output in the state dir,
                # and the stage's log is the cold sandbox's alone; move_to copies what came before
                log.move_to(log_path)
                self.claimed.append(plan.name)
            except WarmError as exc:  # never used: destroyed, and the stage starts in a fresh sandbox
                self.run.handles.pop(plan.name, None)
                sandbox.discard()
                self.run.emit(plan.name, "note", text=f"warm sandbox not used ({exc}); started cold")
                self.run.start_stage(config, mounts, log_path)
            self.run.volumes_of[plan.name] = self.volumes.get(plan.name)


# The runs a warm runner process prepared before its job (at most one: a warm runner takes one run).
_offered: list[Run] = []


def offer(run: Run) -> None:
    """Make the prepared `run` (run.prepared set) the next matching `run.execute`'s."""
    _offered.append(run)
    _warm_runner[:] = [len(run.prepared.plans)]


def withdraw() -> None:
    """Close every prepared run no execution took (a warm runner's end)."""
    while _offered:
        _offered.pop().close()


def take_prepared(plans: list[StagePlan], ws: Any, opts: ExecOptions) -> Run | None:
    """The offered run prepared for exactly this shape and these options, now the run of `ws` and
    `opts`; None if there is none (a prepared run that does not fit is closed: its sandboxes destroyed)."""
    while _offered:
        run = _offered.pop()
        if run.prepared is not None and run.prepared.fits(plans) \
                and all(getattr(run.opts, f) == getattr(opts, f) for f in SHAPING):
            run.adopt(ws, opts)
            return run
        run.close()
    return None


def execute(plans: list[StagePlan], ws: Any, opts: ExecOptions) -> ExecResult:
    """run.execute, with the run a warm runner prepared for these plans and options if there is one,
    else with every stage booted warm first when `opts.warm` asks (bwrap), else cold."""
    prepared = take_prepared(plans, ws, opts)
    try:
        with prepared or Run(ws, opts) as run:
            starter = WarmStarter if opts.warm and run.backend.can_boot_warm and run.prepared is None else None
            return run.execute(plans, starter=starter)
    finally:
        if _warm_runner:
            # before the CLI's verdict: a runner.log's last lines (which the service shows when a run
            # ends without a verdict) stay the run's own
            tell_warmth(prepared.prepared if prepared is not None else None)


# Set by offer() (runner/warmrunner.py): this process prepared a run, so its runner.log says how warm
# the run was. [K], K: the prepared run's number of stages.
_warm_runner: list[int] = []
_told: list[bool] = []


def tell_warmth(starter: WarmStarter | None) -> None:
    """Print, once, how many of the run's stages ran in the sandbox booted for them (for the operator)."""
    if _told or not _warm_runner:
        return
    _told.append(True)
    claimed = len(starter.claimed) if starter is not None else 0
    print(f"warm runner: {claimed} of {_warm_runner[0]} stages ran in the sandbox booted for them", file=sys.stderr,
          flush=True)
