"""A run's typed events (runner/run.py RunEvent), as an observer such as a live display sees them."""
from __future__ import annotations

import json

import pytest

from pipcook_sandbox.runner.backends import base
from pipcook_sandbox.runner.run import RunEvent
from pipcook_sandbox.runner.training import RunOptions, run_pipeline

from conftest import TINY, require_bwrap

pytestmark = pytest.mark.e2e


def test_an_observer_sees_every_stage_start_its_metrics_and_the_models_end(tmp_path):
    require_bwrap()
    events: list[RunEvent] = []
    limits = base.Limits(memory=512 << 20, cpus=1.0, pids=64, disk=64 << 20, timeout=120)
    ws = run_pipeline(str(TINY / "pipeline.json"),
                      RunOptions(output=tmp_path / "ws", isolation="bwrap", limits=limits, log=lambda _: None,
                                 observers=(events.append,)))
    kinds = [(e.stage, e.kind) for e in events]
    for stage in ("datasource", "dataflow-1", "model"):
        assert (stage, "started") in kinds
    assert ("model", "done") in kinds and ("model", "exited") in kinds
    assert next(e for e in events if e.kind == "exited" and e.stage == "model").data == {"code": 0}
    assert kinds.index(("model", "started")) < kinds.index(("model", "done")) < kinds.index(("model", "exited"))
    # the metrics events are exactly the lines of metrics.jsonl
    lines = [json.loads(line) for line in ws.metrics.read_text().splitlines()]
    assert [e.data["record"] for e in events if e.kind == "metrics"] == lines
    progress = [e.data["value"] for e in events if e.kind == "progress"]
    assert progress and progress[-1] == 100.0
