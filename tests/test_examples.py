"""The bundled examples train for real: TensorFlow inside bubblewrap, small data.

Each README states an accuracy; these tests hold the examples to it. The
TensorFlow framework is built once into the user cache (about a minute).
"""
from __future__ import annotations

import json
import os
import re
import shlex

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


# Every example on bwrap and Docker; under gVisor the image example only, in CI's time budget:
# it moves the most bytes between stages (the frames path gVisor forces, docs/docker.md), and the
# text and tabular examples take no sandbox path (download, boundary, framework) that it does not.
# All three under gVisor: PIPCOOK_EXAMPLES_GVISOR=all.
GVISOR_EXAMPLES = sorted(EXAMPLES) if os.environ.get("PIPCOOK_EXAMPLES_GVISOR") == "all" else ["image-classification"]
CASES = [(name, "bwrap") for name in sorted(EXAMPLES)] + [
    pytest.param(name, "docker", marks=pytest.mark.docker) for name in sorted(EXAMPLES)] + [
    pytest.param(name, "docker-gvisor", marks=pytest.mark.docker) for name in GVISOR_EXAMPLES]


@pytest.mark.parametrize(("name", "isolation"), CASES)
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
    if isolation == "bwrap":  # the README's predict commands, on this very workspace
        check_readme_predictions(name, out)


# --- the example READMEs show what the tool really prints ---------------------------------

def documented_predictions(readme: str) -> list[tuple[list[str], str, object]]:
    """(argv, the README's workspace path, the documented output) for each `pipcook-sandbox predict`
    command in the README's shell blocks that is followed by a `# <output>` comment line."""
    found = []
    for block in re.findall(r"```sh\n(.*?)```", readme, flags=re.S):
        lines = block.replace("\\\n", " ").splitlines()
        for line, following in zip(lines, lines[1:]):
            argv = shlex.split(line.split("  #", 1)[0])
            if argv[:2] != ["pipcook-sandbox", "predict"] or not following.startswith("# "):
                continue
            # "0.99..." stands for any number; a trailing ", ..." in a list for "and more like these"
            text = re.sub(r"\d+\.\d*\.\.\.", "0", following[2:]).replace(", ...]", "]")
            found.append((argv[1:], argv[2], json.loads(text)))
    return found


def same_shape(documented, actual) -> bool:
    """Same JSON structure; strings (labels) equal; numbers any number."""
    if isinstance(documented, dict):
        return isinstance(actual, dict) and documented.keys() == actual.keys() and all(
            same_shape(documented[k], actual[k]) for k in documented)
    if isinstance(documented, list):
        return isinstance(actual, list) and len(actual) == len(documented) and all(
            same_shape(d, a) for d, a in zip(documented, actual))
    if isinstance(documented, bool) or isinstance(documented, str):
        return documented == actual
    if isinstance(documented, (int, float)):
        return isinstance(actual, (int, float)) and not isinstance(actual, bool)
    return documented == actual


def test_every_example_readme_documents_a_predict_output():
    for name in EXAMPLES:
        assert documented_predictions((REPO / "examples" / name / "README.md").read_text()), name


def check_readme_predictions(name: str, workspace) -> None:
    """Run each documented `predict` command of the example's README on WORKSPACE; compare the output."""
    commands = documented_predictions((REPO / "examples" / name / "README.md").read_text())
    for argv, documented_ws, documented in commands:
        argv = [a.replace(documented_ws, str(workspace)) for a in argv]
        proc = run_cli(*argv, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        actual = json.loads(proc.stdout)
        assert same_shape(documented, actual), f"README shows {documented}, the tool printed {actual}"
