"""Accepting a run: the pipeline validated as a remote one, limits checked against quotas, queued.

Everything is decided before the run is queued: a run that is queued can
start. A tenant's pipeline is untrusted and remote whatever it says: inline
pipelines may name only absolute http(s) scripts and frameworks; a
`pipeline_url` is fetched here, under the network policy and a size cap,
validated with the contract's rules for remote pipelines (relative
references resolve against the URL), and stored with every reference made
absolute, so the runner never reads a host path on a tenant's behalf.
"""
from __future__ import annotations

import copy
import json
import os
import secrets
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

from pipcook_sandbox.runner import fetch, spec
from pipcook_sandbox.runner.errors import PipcookError, Rejected
from pipcook_sandbox.runner.units import fmt_bytes

from .db import QUEUED, RUNNING, Database
from .scheduler import Needs, run_dir
from .tenants import Tenant

MAX_BODY = 256 << 10  # bytes of a request body
MAX_PIPELINE = 64 << 10  # bytes of a pipeline (inline, or fetched from pipeline_url)
REMOTE = ("http", "https")
INLINE_SOURCE = "https://inline.invalid/pipeline.json"  # never fetched: every reference must be absolute


@dataclass(frozen=True)
class Asked:
    cpus: float | None = None
    memory: int | None = None
    disk: int | None = None
    timeout: float | None = None
    pids: int | None = None
    gpus: int = 0


def _absolute(value: Any, field: str) -> None:
    if not isinstance(value, str) or urlsplit(value).scheme.lower() not in REMOTE or not urlsplit(value).netloc:
        raise Rejected(422, f"pipeline field '{field}': a tenant's pipeline may name only absolute http(s) URLs "
                            f"(no paths, file: URLs or relative references), got {json.dumps(value)[:200]}")


def check_inline(raw: Any) -> dict[str, Any]:
    """RAW as a tenant may send it, or Rejected(422) saying what is wrong."""
    if not isinstance(raw, dict):
        raise Rejected(422, "'pipeline' must be a JSON object (the pipeline file's content)")
    if len(json.dumps(raw)) > MAX_PIPELINE:
        raise Rejected(422, f"the pipeline is larger than {fmt_bytes(MAX_PIPELINE)}")
    try:
        parsed = spec.parse_pipeline(copy.deepcopy(raw), INLINE_SOURCE)
    except PipcookError as exc:
        raise Rejected(422, str(exc).replace(INLINE_SOURCE, "pipeline")) from None
    _absolute(raw.get("datasource"), "datasource")
    for i, ref in enumerate(raw.get("dataflow") or []):
        _absolute(ref, f"dataflow[{i}]")
    _absolute(raw.get("model"), "model")
    if parsed.framework_ref is not None:  # a URL or path of an archive, not NAME@VERSION
        _absolute((raw.get("options") or {}).get("framework"), "options.framework")
    from pipcook_sandbox.runner.artifacts import installed

    known = installed()
    for i, entry in enumerate(raw.get("artifact") or []):
        if entry.get("processor") not in known:
            raise Rejected(422, f"pipeline field 'artifact[{i}]': no artifact processor "
                                f"{json.dumps(entry.get('processor'))[:100]} on this server "
                                f"(installed: {', '.join(sorted(known)) or 'none'})")
    return raw


def fetch_pipeline(url: str, allow_private: tuple[str, ...]) -> dict[str, Any]:
    """The pipeline at URL with every reference made absolute (then checked as inline)."""
    if urlsplit(url).scheme.lower() not in REMOTE:
        raise Rejected(422, f"'pipeline_url' must be an http(s) URL, got {json.dumps(url)[:200]}")
    try:
        data = fetch.fetch_bytes(url, allow_private=allow_private, max_bytes=MAX_PIPELINE, timeout=20)
        parsed = spec.parse_pipeline(data, url)
    except PipcookError as exc:
        raise Rejected(422, f"pipeline_url: {exc}") from None
    raw = copy.deepcopy(parsed.raw)
    raw["datasource"] = urljoin(url, raw["datasource"])
    if raw.get("dataflow"):
        raw["dataflow"] = [urljoin(url, ref) for ref in raw["dataflow"]]
    raw["model"] = urljoin(url, raw["model"])
    if parsed.options.get("framework") is not None:
        raw.setdefault("options", {})["framework"] = parsed.options["framework"]
    return check_inline(raw)


def decide_limits(tenant: Tenant, asked: Asked, capacity: dict[str, float] | None, stages: int) -> dict[str, Any]:
    """The run's limits: the tenant's quota unless it asks for less; more answers 422."""
    over = []
    if asked.cpus is not None and asked.cpus > tenant.cpus:
        over.append(f"{asked.cpus:g} CPUs per stage (quota {tenant.cpus:g})")
    if asked.memory is not None and asked.memory > tenant.memory:
        over.append(f"{fmt_bytes(asked.memory)} of memory per stage (quota {fmt_bytes(tenant.memory)})")
    if asked.disk is not None and asked.disk > tenant.disk:
        over.append(f"{fmt_bytes(asked.disk)} of disk per stage (quota {fmt_bytes(tenant.disk)})")
    if asked.timeout is not None and asked.timeout > tenant.timeout:
        over.append(f"a {asked.timeout:g} s timeout per stage (quota {tenant.timeout:g} s)")
    if asked.gpus > tenant.gpus:
        over.append(f"{asked.gpus} GPU(s) (quota {tenant.gpus})")
    if over:
        raise Rejected(422, f"tenant {tenant.name!r} asked for more than its quota allows: {', '.join(over)}; "
                            "ask for less or have the operator raise the quota (`tenants add`)")
    for name, value in (("cpus", asked.cpus), ("memory", asked.memory), ("disk", asked.disk),
                        ("timeout", asked.timeout), ("pids", asked.pids)):
        if value is not None and value <= 0:
            raise Rejected(422, f"limits.{name} must be positive")
    if asked.pids is not None and asked.pids < 8:
        raise Rejected(422, "limits.pids must be at least 8 (Python and its threads need a few)")
    limits = {"cpus": asked.cpus or tenant.cpus, "memory": asked.memory or tenant.memory,
              "disk": asked.disk or tenant.disk, "timeout": asked.timeout or tenant.timeout,
              "pids": min(asked.pids or 256, 1024), "gpus": asked.gpus, "stages": stages}
    if capacity is not None:
        needs = Needs.of(limits)
        if not needs.fits(capacity):
            raise Rejected(422, f"the run needs {needs.cpus:g} CPUs, {fmt_bytes(needs.memory)} of memory and "
                                f"{needs.gpus:g} GPU(s) at once (memory for each of its {stages} stages), more than this "
                                f"server has ({capacity['cpus']:g} CPUs, {fmt_bytes(capacity['memory'])}, "
                                f"{capacity['gpus']:g} GPUs); ask for less per stage")
    return limits


def new_run_id() -> str:
    return "r" + time.strftime("%Y%m%d", time.gmtime()) + "-" + secrets.token_hex(6)


def enqueue(db: Database, data: Path, tenant: Tenant, pipeline: dict[str, Any], source: str,
            limits: dict[str, Any], engine_queues: bool = False) -> dict[str, Any]:
    """Write the run's directory and queue it, if the tenant's queue has room (else 429).

    `engine_queues`: the engine (Slurm) holds the queue, so runs handed over and waiting there are
    "running" here; the room is then max-running + max-queued for queued and running together
    (the tenant's account's GrpSubmitJobs is the same number)."""
    run_id = new_run_id()
    directory = run_dir(data, tenant.name, run_id)
    directory.mkdir(mode=0o700, parents=True)
    if os.geteuid() == 0:
        os.chown(directory, tenant.uid, tenant.uid)
    (directory / "pipeline.json").write_text(json.dumps(pipeline, indent=2) + "\n")
    run = {"id": run_id, "tenant": tenant.name, "state": QUEUED, "source": source[:2000], "created": time.time(),
           **limits}
    try:
        with db.transaction() as conn:
            if engine_queues:
                active = conn.execute("SELECT count(*) FROM runs WHERE tenant = ? AND state IN (?, ?)",
                                      (tenant.name, QUEUED, RUNNING)).fetchone()[0]
                if active >= tenant.max_running + tenant.max_queued:
                    raise Rejected(429, f"tenant {tenant.name!r} has {active} runs queued or running, its limit "
                                        f"(max-running {tenant.max_running} + max-queued {tenant.max_queued}); "
                                        "wait for some to finish or cancel some")
            else:
                queued = conn.execute("SELECT count(*) FROM runs WHERE tenant = ? AND state = ?",
                                      (tenant.name, QUEUED)).fetchone()[0]
                if queued >= tenant.max_queued:
                    raise Rejected(429, f"tenant {tenant.name!r} has {queued} runs queued, its limit (max-queued "
                                        f"{tenant.max_queued}); wait for some to start or cancel some")
            columns = ", ".join(run)
            conn.execute(f"INSERT INTO runs ({columns}) VALUES ({', '.join('?' for _ in run)})", tuple(run.values()))
            conn.execute("INSERT INTO transitions (run_id, state, at, note) VALUES (?, ?, ?, ?)",
                         (run_id, QUEUED, run["created"], "submitted"))
    except BaseException:
        shutil.rmtree(directory, ignore_errors=True)
        raise
    return run


def stage_count(pipeline: dict[str, Any]) -> int:
    return 2 + len(pipeline.get("dataflow") or [])
