"""What a user gets from `pip install .` (a wheel, never an editable checkout).

An editable install reads its data files straight from the repository, so it
hides a wheel that lacks them: a framework's constraint file missing from the
wheel once broke the README's first command on every fresh machine. These
tests build the wheel, install it into a fresh virtual environment, and run
the tool from outside the repository with an empty cache.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import venv
import zipfile
from pathlib import Path

import pytest

from conftest import REPO, TINY, require_bwrap, require_docker

# The folders whose files the installed tool reads at run time.
PACKAGE_FOLDERS = ("runner/", "sandbox/", "frameworks/", "images/")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    # Built from the tracked files alone, as a clean clone would be: pip builds in the
    # source tree, and a stale build/ or an untracked file there must not hide a gap.
    out = tmp_path_factory.mktemp("wheel")
    source = tmp_path_factory.mktemp("source")
    listed = subprocess.run(["git", "ls-files", "-z"], capture_output=True, check=True, cwd=REPO).stdout
    for name in filter(None, listed.decode().split("\0")):
        if (REPO / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
                    "-w", str(out), str(source)], check=True, timeout=300, cwd=out)
    (found,) = out.glob("pipcook_sandbox-*.whl")
    return found


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    """A fresh virtual environment (no system site-packages) with the wheel and its dependencies."""
    env_dir = tmp_path_factory.mktemp("venv")
    venv.create(env_dir, with_pip=True, clear=True)
    python = env_dir / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", str(wheel)],
                   check=True, timeout=900, cwd=env_dir)
    return env_dir


def _tracked_package_files() -> list[str]:
    out = subprocess.run(["git", "ls-files", *PACKAGE_FOLDERS], capture_output=True, text=True, cwd=REPO, check=True)
    return [f for f in out.stdout.split() if not f.endswith(".md")]


def test_the_wheel_holds_every_file_of_the_package_folders(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    tracked = _tracked_package_files()
    assert tracked, "git ls-files found nothing: not a checkout?"
    missing = [f for f in tracked if f"pipcook_sandbox/{f}" not in names]
    assert not missing, f"files the installed tool may read are missing from the wheel: {missing}"


def test_the_wheel_installs_one_top_level_name(wheel):
    tops = {n.split("/", 1)[0] for n in zipfile.ZipFile(wheel).namelist()}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"pipcook_sandbox"}


def _in_venv(installed: Path, *args: str, cwd: Path, env: dict | None = None, timeout: float = 900):
    full = {"PATH": f"{installed / 'bin'}:{os.environ.get('PATH', '/usr/bin:/bin')}", "HOME": os.environ.get("HOME", "/root"),
            "LANG": "C.UTF-8", **(env or {})}
    return subprocess.run([str(installed / "bin" / "pipcook-sandbox"), *args], capture_output=True, text=True,
                          cwd=cwd, env=full, timeout=timeout, stdin=subprocess.DEVNULL)


def test_python_dash_m_runs_the_installed_command(installed, tmp_path):
    proc = subprocess.run([str(installed / "bin" / "python"), "-m", "pipcook_sandbox", "--version"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("pipcook-sandbox, version ")


@pytest.mark.e2e
@pytest.mark.tf
def test_installed_wheel_runs_a_tensorflow_pipeline_from_an_empty_cache(installed, tmp_path):
    """The framework resolves from the wheel's own definition and constraints, with nothing cached."""
    require_bwrap()
    pipeline_dir = tmp_path / "pipeline"
    pipeline_dir.mkdir()
    for name in ("datasource.py", "dataflow.py"):
        (pipeline_dir / name).write_text((TINY / name).read_text())
    (pipeline_dir / "model.py").write_text(textwrap.dedent('''
        import tensorflow as tf

        def train(runtime, options, ctx):
            n = sum(1 for _ in runtime.dataset.train)
            runtime.log_metrics(samples=n, tf_major=int(tf.__version__.split(".")[0]))
    '''))
    (pipeline_dir / "pipeline.json").write_text(json.dumps({
        "specVersion": "2.0", "datasource": "datasource.py?count=40", "dataflow": ["dataflow.py"],
        "model": "model.py", "options": {"framework": "tensorflow@2.21"}}))
    cache = tmp_path / "empty-cache"
    ws = tmp_path / "ws"
    proc = _in_venv(installed, "run", str(pipeline_dir / "pipeline.json"), "-o", str(ws),
                    cwd=tmp_path, env={"PIPCOOK_SANDBOX_CACHE": str(cache)})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    metrics = [json.loads(line) for line in (ws / "metrics.jsonl").read_text().splitlines()]
    assert metrics and metrics[-1]["tf_major"] == 2
    assert metrics[-1]["samples"] > 0
    assert any((cache / "frameworks").iterdir()), "the framework was not built into the fresh cache"


@pytest.mark.docker
def test_installed_wheel_builds_the_worker_image_offline(installed, tmp_path):
    """`images build --offline` from the installed package: its Docker build contexts ship in the wheel."""
    require_docker()
    python = installed / "bin" / "python"
    probe = subprocess.run([str(python), "-c", "from pipcook_sandbox.runner.images import IMAGES_DIR; "
                            "print(all((IMAGES_DIR / f / 'Dockerfile').is_file() for f in ('cpu', 'cuda')))"],
                           capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert probe.stdout.strip() == "True", probe.stdout + probe.stderr
    proc = _in_venv(installed, "images", "build", "--offline", "--force", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "is ready" in proc.stdout + proc.stderr
