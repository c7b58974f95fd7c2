"""Mistakes in a pipeline file are caught before any stage starts, through the real CLI.

Each case: the run exits 1 within seconds, names the unknown key and the key
that was probably meant, and leaves no workspace behind (nothing ran).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from conftest import TINY, run_cli

TINY_SPEC = json.loads((TINY / "pipeline.json").read_text())


def _pipeline(tmp_path: Path, change) -> Path:
    spec = json.loads(json.dumps(TINY_SPEC))
    change(spec)
    for name in ("datasource.py", "dataflow.py", "model.py"):
        (tmp_path / name).write_text((TINY / name).read_text())
    path = tmp_path / "pipeline.json"
    path.write_text(json.dumps(spec))
    return path


def _refused(tmp_path: Path, change) -> str:
    pipeline = _pipeline(tmp_path, change)
    out = tmp_path / "ws"
    started = time.monotonic()
    proc = run_cli("run", str(pipeline), "-o", str(out), "--isolation", "none", timeout=120)
    took = time.monotonic() - started
    assert proc.returncode == 1, proc.stderr
    assert not out.exists(), "a workspace was created: something started before the check"
    assert "Traceback" not in proc.stderr
    assert took < 30  # refused up front, not after training
    return proc.stderr


def _rename(mapping: dict, old: str, new: str) -> None:
    mapping[new] = mapping.pop(old)


def test_top_level_typo_names_the_key_and_suggests_the_right_one(tmp_path):
    err = _refused(tmp_path, lambda s: _rename(s, "datasource", "datasorce"))
    assert "unknown key 'datasorce' (did you mean 'datasource'?)" in err
    assert "is required" not in err


def test_options_typo_is_refused(tmp_path):
    err = _refused(tmp_path, lambda s: _rename(s["options"], "train", "trian"))
    assert "unknown key 'options.trian' (did you mean 'train'?)" in err


def test_misspelt_task_type_is_refused(tmp_path):
    err = _refused(tmp_path, lambda s: s.update(type="ImageClasification"))
    assert "unknown task type 'ImageClasification' (did you mean 'ImageClassification'?)" in err


def test_artifact_option_typo_is_refused_before_training(tmp_path):
    err = _refused(tmp_path, lambda s: s.update(artifact=[{"processor": "zip", "targte": "model.zip"}]))
    assert "artifact[0]" in err
    assert "unknown option 'targte' for artifact processor 'zip' (did you mean 'target'?)" in err


def test_unknown_artifact_processor_is_refused_before_training(tmp_path):
    err = _refused(tmp_path, lambda s: s.update(artifact=[{"processor": "zpi"}]))
    assert "no artifact processor 'zpi' is installed on this host (did you mean 'zip'?)" in err


def test_tflite_processor_declares_its_options(tmp_path):
    err = _refused(tmp_path, lambda s: s.update(artifact=[{"processor": "tflite", "modle": "model.keras"}]))
    assert "unknown option 'modle' for artifact processor 'tflite' (did you mean 'model'?)" in err


@pytest.mark.parametrize("artifact", [[{"processor": "zip", "target": "m.zip"}],
                                      [{"processor": "tflite", "target": "m.tflite", "model": "model.keras",
                                        "framework": "tensorflow@2.21"}]])
def test_declared_options_pass_the_check(artifact):
    from pipcook_sandbox.runner import validate

    validate.check_artifacts(artifact)  # no error: every key is declared by its processor
