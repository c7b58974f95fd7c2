"""The bundled examples train for real: TensorFlow inside bubblewrap, small data.

Each README states an accuracy; these tests hold the examples to it. The
TensorFlow framework is built once into the user cache (about a minute).
"""
from __future__ import annotations

import json
import os

import pytest
from conftest import REPO, leftover_mounts, require_bwrap, require_docker, run_cli

pytestmark = [pytest.mark.e2e, pytest.mark.tf]

EXAMPLES = {
    "image-classification": 0.9,
    "text-classification": 0.9,
    "tabular-classification": 0.9,
}


def require_gvisor() -> None:
    """The docker backend with the runsc runtime registered as the backend needs it (CI: a failure)."""
    backend = require_docker()
    problem = backend.runtime_problem("runsc")
    if problem:
        if os.environ.get("CI") == "true":
            pytest.fail(f"gVisor is required in CI: {problem} (.ci/start-docker.sh registers it)")
        pytest.skip(f"gVisor not usable here: {problem}")


@pytest.mark.parametrize("isolation", ["bwrap", pytest.param("docker", marks=pytest.mark.docker),
                                       pytest.param("docker-gvisor", marks=pytest.mark.docker)])
@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_example_trains_to_its_stated_accuracy(name, isolation, tmp_path):
    {"bwrap": require_bwrap, "docker": require_docker, "docker-gvisor": require_gvisor}[isolation]()
    # docker-gvisor: the docker backend with gVisor as its runtime (docs/docker.md)
    env = {"PIPCOOK_DOCKER_RUNTIME": "runsc" if isolation == "docker-gvisor" else ""}
    out = tmp_path / "ws"
    proc = run_cli("run", str(REPO / "examples" / name / "pipeline.json"), "-o", str(out), "--isolation",
                   isolation.split("-")[0], timeout=1200, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    final = [m for m in metrics if "test_accuracy" in m]
    assert final, f"no test_accuracy in {metrics[-3:]}"
    assert final[-1]["test_accuracy"] >= EXAMPLES[name]
    assert (out / "model" / "model.keras").is_file()
    assert (out / "model" / "pipeline.json").is_file() and (out / "model" / "meta.json").is_file()
    assert json.loads((out / "framework" / "framework.json").read_text())["name"] == "tensorflow"
    assert not leftover_mounts()
