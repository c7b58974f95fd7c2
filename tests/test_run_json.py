"""`run --json` (the event stream the service stores and serves) and `run --stage-uid`."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import TINY, require_bwrap, run_cli, write_pipeline
from pipcook_sandbox.runner import events

pytestmark = pytest.mark.e2e


def _events(stdout: str) -> list[dict]:
    parsed = [events.decode(line) for line in stdout.splitlines()]
    assert all(e is not None for e in parsed), stdout  # stdout holds events and nothing else
    return parsed  # type: ignore[return-value]


def test_json_events_of_a_successful_run(tmp_path: Path) -> None:
    require_bwrap()
    done = run_cli("run", str(TINY / "pipeline.json"), "-o", str(tmp_path / "ws"), "--json")
    assert done.returncode == 0, done.stderr
    seen = _events(done.stdout)
    kinds = [e["event"] for e in seen]
    assert kinds[-1] == "verdict"
    assert seen[-1]["status"] == "succeeded" and seen[-1]["exit_code"] == 0 and seen[-1]["error"] is None
    started = [e["stage"] for e in seen if e["event"] == "stage" and e["status"] == "started"]
    assert started == ["datasource", "dataflow-1", "model"]
    metrics = [e for e in seen if e["event"] == "metrics"]
    assert len(metrics) == 3 and metrics[0]["stage"] == "model" and "accuracy" in metrics[0]["metrics"]
    assert [e["value"] for e in seen if e["event"] == "progress"][-1] == 100
    assert all(isinstance(e["time"], float) for e in seen)
    assert "done: model in" in done.stderr  # the human messages stay on stderr


def test_json_verdict_of_a_failing_run_is_the_error_paragraph(tmp_path: Path) -> None:
    require_bwrap()
    pipeline = write_pipeline(tmp_path / "p", model="def train(runtime, options, ctx):\n    raise KeyError('\\x1b[31mred')\n")
    done = run_cli("run", str(pipeline), "-o", str(tmp_path / "ws"), "--json")
    assert done.returncode == 1
    verdict = _events(done.stdout)[-1]
    assert verdict["event"] == "verdict" and verdict["status"] == "failed" and verdict["exit_code"] == 1
    assert verdict["stage"] == "model" and verdict["script"] == "model.py"
    assert "stage 'model' (model.py)" in verdict["error"]
    assert "\x1b" not in done.stdout  # every line is ASCII JSON: escapes stay inert


def test_json_verdict_of_an_invalid_pipeline(tmp_path: Path) -> None:
    bad = tmp_path / "pipeline.json"
    bad.write_text(json.dumps({"specVersion": "1.0"}))
    done = run_cli("run", str(bad), "-o", str(tmp_path / "ws"), "--json")
    assert done.returncode == 1
    verdict = _events(done.stdout)[-1]
    assert verdict["status"] == "failed" and "datasource" in verdict["error"] and "missing" in verdict["error"]


@pytest.mark.parametrize("value", ["abc", "0", "-5", "1:x", "99999999999"])
def test_stage_uid_refuses_bad_values(tmp_path: Path, value: str) -> None:
    done = run_cli("run", str(TINY / "pipeline.json"), "-o", str(tmp_path / "ws"), "--stage-uid", value)
    assert done.returncode == 2
    assert "--stage-uid" in done.stderr
    assert not (tmp_path / "ws").exists()


def test_stage_uid_runs_stages_as_that_uid_in_a_private_workspace(tmp_path: Path) -> None:
    require_bwrap()
    if os.geteuid() != 0:
        pytest.skip("--stage-uid needs a root runner")
    probe = ("import os\nfrom sandbox import sdk\n\ndef datasource(options, ctx):\n"
             "    print('ids', os.getuid(), os.getgid(), flush=True)\n"
             "    s = [{'data': [1.0, 0.0, 0.0, float(i % 2)], 'label': i % 2} for i in range(20)]\n"
             "    return sdk.from_lists(train=s, test=s[:4], meta={'categories': ['a', 'b']})\n")
    pipeline = write_pipeline(tmp_path / "p", datasource=probe, dataflow=[])
    ws = tmp_path / "ws"
    done = run_cli("run", str(pipeline), "-o", str(ws), "--stage-uid", "231000:231001")
    assert done.returncode == 0, done.stderr
    assert "ids 231000 231001" in (ws / "logs" / "datasource.log").read_text()
    st = ws.stat()
    assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (231000, 231001, 0o700)
