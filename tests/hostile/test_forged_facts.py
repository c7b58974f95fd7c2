"""A stage cannot forge the runner's facts.

- `metrics.jsonl` lines carry fields the runner owns (`time`, `stage`,
  `step`); a metric of the same name cannot overwrite them (it is kept, under
  a `~` prefix, so nothing the stage logged is lost).
- Who failed is decided from what the runner observed: a stage that reports
  an error of kind "upstream" ("the stage before me sent garbage") while the
  stage before it is fine by every observation is itself the failed stage.

These are host-side rules, the same on every backend: bwrap runs them.
"""
from __future__ import annotations

import time

import pytest

from .attack import assert_contained_failure, run_attack
from .conftest import require_backend

pytestmark = pytest.mark.hostile

FORGED_METRICS = '''
def train(runtime, options, ctx):
    runtime._control.send({"op": "metrics", "step": 1,
                           "metrics": {"stage": 1.0, "time": 0.0, "step": 99.0, "~x": 2.0, "loss": 0.5}})
    runtime.log_metrics(step=2, time=3.5)
'''

FALSE_ACCUSATION = '''
import os


def train(runtime, options, ctx):
    train = runtime.dataset.train  # the dataflow sends good data: read it all
    while train.next_batch(32):
        pass
    runtime._control.send({"op": "error", "kind": "upstream",
                           "message": "stage 'dataflow-1' sent a malformed message: forged"})
    runtime._control.sync(5)
    os._exit(1)
'''


@pytest.fixture
def bwrap() -> str:
    require_backend("bwrap")
    return "bwrap"


def test_a_metric_cannot_overwrite_the_runners_fields(tmp_path, bwrap):
    started = time.time()
    attack = run_attack(tmp_path, bwrap, model=FORGED_METRICS)
    assert attack.returncode == 0, attack.describe()
    lines = attack.metrics()
    assert len(lines) == 2, lines
    first, second = lines
    assert first["stage"] == "model" and first["step"] == 1
    assert started <= first["time"] <= time.time()
    # the stage's values are kept, renamed so that they cannot collide
    assert (first["~stage"], first["~time"], first["~step"], first["~~x"], first["loss"]) == (1.0, 0.0, 99.0, 2.0, 0.5)
    assert "x" not in first and "~x" not in first
    assert second["stage"] == "model" and second["step"] == 2 and second["~time"] == 3.5
    assert started <= second["time"] <= time.time()


def test_an_upstream_claim_does_not_blame_an_innocent_stage(tmp_path, bwrap):
    attack = run_attack(tmp_path, bwrap, model=FALSE_ACCUSATION)
    # the model stage failed (by its own report); the dataflow did nothing wrong the runner could see
    assert_contained_failure(attack, "model", "(model.py)", "forged")
    assert attack.error.startswith("error: stage 'model' (model.py)"), attack.describe()
    assert not attack.error.startswith("error: stage 'dataflow-1'"), attack.describe()
    assert not attack.leftovers()
