"""Fix and rerun: `run --force` and `run --set`, through the real CLI and real bubblewrap.

--force replaces an -o directory only if pipcook-sandbox created it: each
way of faking that (no marker, a link, a forged or copied marker, a marker a
stage planted inside its workspace) is its own test, and each asserts that
the directory's files are still there.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import TINY, require_bwrap, run_cli, write_pipeline

MARKER = ".pipcook-sandbox-workspace"
FAILING_MODEL = '''
def train(runtime, options, ctx):
    raise ValueError("learning rate too high")
'''


@pytest.fixture(autouse=True)
def _bwrap():
    require_bwrap()


def _refused_to_replace(target: Path, proc) -> None:
    assert proc.returncode == 1, proc.stderr
    assert "--force will not replace it" in proc.stderr or "symbolic link" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_force_replaces_the_workspace_of_a_failed_run(tmp_path):
    out = tmp_path / "ws"
    broken = write_pipeline(tmp_path / "broken", model=FAILING_MODEL)
    first = run_cli("run", str(broken), "-o", str(out))
    assert first.returncode == 1 and "learning rate too high" in first.stderr
    assert (out / MARKER).is_file()
    again = run_cli("run", str(TINY / "pipeline.json"), "-o", str(out))
    assert again.returncode == 1 and "--force" in again.stderr  # the refusal says how to go on
    fixed = run_cli("run", str(TINY / "pipeline.json"), "-o", str(out), "--force")
    assert fixed.returncode == 0, fixed.stderr
    assert (out / "model" / "weights.json").is_file()
    assert "learning rate" not in (out / "logs" / "model.log").read_text()  # the old run's files are gone


def test_force_refuses_a_directory_without_the_marker(tmp_path):
    mine = tmp_path / "thesis"
    mine.mkdir()
    (mine / "chapter1.tex").write_text("precious")
    proc = run_cli("run", str(TINY / "pipeline.json"), "-o", str(mine), "--force")
    _refused_to_replace(mine, proc)
    assert (mine / "chapter1.tex").read_text() == "precious"


def test_force_refuses_a_symlink_even_to_a_real_workspace(tmp_path):
    real = tmp_path / "ws"
    assert run_cli("run", str(TINY / "pipeline.json"), "-o", str(real)).returncode == 0
    link = tmp_path / "link"
    link.symlink_to(real)
    proc = run_cli("run", str(TINY / "pipeline.json"), "-o", str(link), "--force")
    _refused_to_replace(link, proc)
    assert (real / "model" / "weights.json").is_file() and link.is_symlink()


def test_force_refuses_a_copied_marker(tmp_path):
    """A valid marker copied from a real workspace into another directory does not make it one."""
    real = tmp_path / "ws"
    assert run_cli("run", str(TINY / "pipeline.json"), "-o", str(real)).returncode == 0
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("keep")
    shutil.copyfile(real / MARKER, other / MARKER)
    proc = run_cli("run", str(TINY / "pipeline.json"), "-o", str(other), "--force")
    _refused_to_replace(other, proc)
    assert (other / "keep.txt").read_text() == "keep"


def test_force_refuses_a_marker_that_is_a_link(tmp_path):
    real = tmp_path / "ws"
    assert run_cli("run", str(TINY / "pipeline.json"), "-o", str(real)).returncode == 0
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("keep")
    (other / MARKER).symlink_to(real / MARKER)
    proc = run_cli("run", str(TINY / "pipeline.json"), "-o", str(other), "--force")
    _refused_to_replace(other, proc)
    assert (other / "keep.txt").read_text() == "keep"


def test_force_refuses_a_marker_planted_by_a_stage(tmp_path):
    """A hostile datasource writes a marker into data/ (which lands in the workspace), then the user
    points -o at that folder: it is not a workspace the runner created, so nothing is removed."""
    planter = '''
        import json, os
        from sandbox import sdk

        def datasource(options, ctx):
            with open(os.path.join(ctx.workspace.data_dir, ".pipcook-sandbox-workspace"), "w") as f:
                json.dump({"created_by": "pipcook-sandbox", "tag": "0" * 64}, f)
            with open(os.path.join(ctx.workspace.data_dir, "dataset.csv"), "w") as f:
                f.write("x,y\\n")
            return sdk.from_lists(train=[{"data": [1.0, 2.0, 3.0, 4.0], "label": 1},
                                         {"data": [-1.0, -2.0, -3.0, -4.0], "label": 0}],
                                  meta={"type": "general", "categories": ["neg", "pos"]})
    '''
    pipeline = write_pipeline(tmp_path / "p", datasource=planter)
    ws = tmp_path / "ws"
    assert run_cli("run", str(pipeline), "-o", str(ws)).returncode == 0
    assert (ws / "data" / MARKER).is_file()  # the stage did plant it
    proc = run_cli("run", str(TINY / "pipeline.json"), "-o", str(ws / "data"), "--force")
    _refused_to_replace(ws / "data", proc)
    assert (ws / "data" / "dataset.csv").is_file()


def test_set_overrides_train_and_script_options_and_records_them(tmp_path):
    out = tmp_path / "ws"
    proc = run_cli("run", str(TINY / "pipeline.json"), "-o", str(out), "--set", "train.epochs=2",
                   "--set", "datasource.count=120", "--set", "dataflow.0.factor=3", "--set", "model.note=hi")
    assert proc.returncode == 0, proc.stderr
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 1]  # 2 epochs, not the file's 3
    assert (out / "data" / "made.txt").read_text() == "120 samples\n"
    assert json.loads((out / "model" / "meta.json").read_text())["factor"] == 3.0
    recorded = json.loads((out / "pipeline.json").read_text())
    assert recorded["options"]["train"]["epochs"] == 2
    assert recorded["datasource"] == "datasource.py?count=120"
    assert recorded["dataflow"] == ["dataflow.py?factor=3"]
    assert recorded["model"] == "model.py?note=hi"
    assert "override: train.epochs=2" in proc.stderr


@pytest.mark.parametrize("bad", ["epochs=3", "train.epochs", "optimizer.lr=0.1", "dataflow.x.size=1"])
def test_malformed_set_is_a_usage_error(tmp_path, bad):
    proc = run_cli("run", str(TINY / "pipeline.json"), "-o", str(tmp_path / "ws"), "--set", bad)
    assert proc.returncode == 2, proc.stderr
    assert "--set" in proc.stderr and not (tmp_path / "ws").exists()


def test_set_naming_a_missing_dataflow_is_a_usage_error(tmp_path):
    proc = run_cli("run", str(TINY / "pipeline.json"), "-o", str(tmp_path / "ws"), "--set", "dataflow.3.size=1")
    assert proc.returncode == 2, proc.stderr
    assert "1 dataflow script(s)" in proc.stderr
    assert not (tmp_path / "ws").exists()
