"""The one stage configuration: written by the runner, parsed and checked by the worker."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pipcook_sandbox.sandbox.stageconfig import VERSION, ConfigError, ScriptEntry, StageConfig

from conftest import REPO


def _config(**changes) -> StageConfig:
    cfg = StageConfig(stage="serve", role="serve", script="/pipcook/scripts/model.py",
                      control="ipc:///pipcook/ipc/control/control.sock", task_type="predict",
                      dataflows=[ScriptEntry("dataflow-1", "/pipcook/scripts/flow.py", {"k": "v"})],
                      model=ScriptEntry("model", "/pipcook/scripts/model.py"), hints={"cpus": 2.0, "gpu": "0"})
    for key, value in changes.items():
        setattr(cfg, key, value)
    return cfg


def test_what_the_runner_writes_the_worker_reads_back():
    cfg = _config()
    assert StageConfig.parse(json.loads(cfg.to_json())) == cfg
    assert json.loads(cfg.to_json())["version"] == VERSION


@pytest.mark.parametrize("change, words", [
    ({"version": 1}, "version 1"),
    ({"version": None}, "version None"),
    ({"surprise": 1}, "unknown fields: surprise"),
    ({"role": "root"}, "role 'root'"),
    ({"site_dirs": "/etc"}, "'site_dirs' has the wrong type"),
    ({"options": []}, "'options' has the wrong type"),
    ({"model": {"stage": "model"}}, "malformed script entry"),
])
def test_a_configuration_of_another_shape_is_refused(change, words):
    raw = json.loads(_config().to_json())
    raw.update(change)
    with pytest.raises(ConfigError, match=words.replace("(", r"\(")):
        StageConfig.parse(raw)


def test_a_missing_field_is_refused():
    raw = json.loads(_config().to_json())
    del raw["control"]
    with pytest.raises(ConfigError, match="no 'control'"):
        StageConfig.parse(raw)


def test_the_worker_refuses_a_stage_json_of_another_version(tmp_path):
    raw = json.loads(_config().to_json())
    raw["version"] = VERSION + 1
    path = tmp_path / "stage.json"
    path.write_text(json.dumps(raw))
    boot = f"import sys; sys.path.insert(0, {str(REPO)!r}); from sandbox.worker import main; sys.exit(main({str(path)!r}))"
    done = subprocess.run([sys.executable, "-I", "-S", "-c", boot], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert f"stage.json is version {VERSION + 1}; this worker reads version {VERSION}" in done.stderr
