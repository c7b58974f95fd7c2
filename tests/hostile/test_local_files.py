"""A local pipeline names only regular files under its own directory.

A pipeline on disk is as untrusted as one from a URL: the runner (root, on a
training host) used to read whatever path it named, copy it into the
workspace and mount it into a stage, which can send it anywhere through
`ctx.download`. Now every file a local pipeline names (scripts, a framework
archive) must resolve, links included, to a regular file under the
pipeline's directory, or under a directory the operator allowed with
`--allow-path DIR`; files of /proc, /sys and /dev, devices, fifos and
directories never. One spelling of the attack per test; the refusal comes
before any stage starts, so one backend is enough (bwrap).
"""
from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from .attack import (
    HostSnapshot,
    grep_workspace,
    limit_args,
    run_cli_tracked,
    token,
)
from .conftest import require_backend

pytestmark = pytest.mark.hostile

SECRET_SCRIPT = "SECRET = {secret!r}\n\ndef load(runtime, options, ctx):\n    return None\n"


@pytest.fixture
def bwrap() -> str:
    require_backend("bwrap")
    return "bwrap"


def _pipeline(root: Path, **fields: str) -> Path:
    """The tiny pipeline in `root`, with `fields` (datasource, model, framework) replaced."""
    from conftest import write_pipeline

    path = write_pipeline(root)
    spec = json.loads(path.read_text())
    for name, value in fields.items():
        if name == "framework":
            spec["options"]["framework"] = value
        else:
            spec[name] = value
    path.write_text(json.dumps(spec))
    return path


def _run(tmp_path: Path, pipeline: Path, *args: str, env: dict | None = None):
    from .attack import Attack

    ws = tmp_path / "ws"
    before = HostSnapshot()
    proc, pid, elapsed = run_cli_tracked(["run", str(pipeline), "-o", str(ws), "--isolation", "bwrap",
                                          *limit_args(timeout="120"), *args], env=env, timeout=120)
    return Attack("bwrap", proc.returncode, proc.stdout, proc.stderr, ws, elapsed, pid, before)


def _secret_outside(tmp_path: Path) -> tuple[Path, str]:
    secret = token("pcsb-secret")
    outside = tmp_path / "outside"
    outside.mkdir()
    path = outside / "secret.py"
    path.write_text(SECRET_SCRIPT.format(secret=secret))
    return path, secret


def assert_refused(attack, field: str, secret: str | None = None) -> None:
    assert attack.returncode == 1, attack.describe()
    assert f"field '{field}'" in attack.error, attack.describe()
    assert "--allow-path" in attack.error, attack.describe()  # the rule, and the way out
    assert "Traceback" not in attack.stderr and "internal error" not in attack.stderr, attack.describe()
    if secret is not None:
        assert not grep_workspace(attack.ws, secret), grep_workspace(attack.ws, secret)
        assert secret not in attack.output


def test_an_absolute_path_outside_is_refused(tmp_path, bwrap):
    path, secret = _secret_outside(tmp_path)
    attack = _run(tmp_path, _pipeline(tmp_path / "p", datasource=str(path)))
    assert_refused(attack, "datasource", secret)


def test_a_file_url_outside_is_refused(tmp_path, bwrap):
    path, secret = _secret_outside(tmp_path)
    attack = _run(tmp_path, _pipeline(tmp_path / "p", model=path.as_uri()))
    assert_refused(attack, "model", secret)


def test_a_home_path_is_refused(tmp_path, bwrap):
    path, secret = _secret_outside(tmp_path)
    attack = _run(tmp_path, _pipeline(tmp_path / "p", datasource="~/secret.py"), env={"HOME": str(path.parent)})
    assert_refused(attack, "datasource", secret)


def test_dot_dot_out_of_the_directory_is_refused(tmp_path, bwrap):
    _path, secret = _secret_outside(tmp_path)
    attack = _run(tmp_path, _pipeline(tmp_path / "p", datasource="../outside/secret.py"))
    assert_refused(attack, "datasource", secret)


def test_a_link_pointing_out_is_refused(tmp_path, bwrap):
    path, secret = _secret_outside(tmp_path)
    root = tmp_path / "p"
    pipeline = _pipeline(root, datasource="innocent.py")
    (root / "innocent.py").symlink_to(path)
    attack = _run(tmp_path, pipeline)
    assert_refused(attack, "datasource", secret)


def test_a_linked_directory_pointing_out_is_refused(tmp_path, bwrap):
    path, secret = _secret_outside(tmp_path)
    root = tmp_path / "p"
    pipeline = _pipeline(root, datasource="lib/secret.py")
    (root / "lib").symlink_to(path.parent, target_is_directory=True)
    attack = _run(tmp_path, pipeline)
    assert_refused(attack, "datasource", secret)


def test_the_runners_environment_is_refused(tmp_path, bwrap):
    secret = token("pcsb-envsecret")
    attack = _run(tmp_path, _pipeline(tmp_path / "p", datasource="/proc/self/environ"),
                  env={"PCSB_CREDENTIAL": secret})
    assert_refused(attack, "datasource", secret)


def test_proc_is_refused_even_under_an_allowed_root(tmp_path, bwrap):
    secret = token("pcsb-envsecret")
    attack = _run(tmp_path, _pipeline(tmp_path / "p", datasource="/proc/self/environ"), "--allow-path", "/",
                  env={"PCSB_CREDENTIAL": secret})
    assert_refused(attack, "datasource", secret)


def test_a_fifo_is_refused_without_hanging(tmp_path, bwrap):
    root = tmp_path / "p"
    pipeline = _pipeline(root, datasource="pipe.py")
    os.mkfifo(root / "pipe.py")
    attack = _run(tmp_path, pipeline)
    assert_refused(attack, "datasource")
    assert "fifo" in attack.error
    assert attack.elapsed < 60


def test_a_device_is_refused(tmp_path, bwrap):
    if os.geteuid() != 0:
        pytest.skip("mknod needs root")
    root = tmp_path / "p"
    pipeline = _pipeline(root, model="zero.py")
    os.mknod(root / "zero.py", stat.S_IFCHR | 0o666, os.makedev(1, 5))  # /dev/zero: endless
    attack = _run(tmp_path, pipeline)
    assert_refused(attack, "model")
    assert "device" in attack.error


def test_a_directory_is_refused(tmp_path, bwrap):
    root = tmp_path / "p"
    pipeline = _pipeline(root, model="adir")
    (root / "adir").mkdir()
    attack = _run(tmp_path, pipeline)
    assert_refused(attack, "model")
    assert "directory" in attack.error


def test_a_framework_archive_outside_is_refused(tmp_path, bwrap):
    secret = token("pcsb-fwsecret")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "fw.zip").write_text(secret)
    attack = _run(tmp_path, _pipeline(tmp_path / "p", framework=str(outside / "fw.zip")))
    assert_refused(attack, "options.framework", secret)


def test_allow_path_lets_the_operator_allow_a_directory(tmp_path, bwrap):
    from conftest import TINY

    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "datasource.py").write_text((TINY / "datasource.py").read_text())
    pipeline = _pipeline(tmp_path / "p", datasource=str(shared / "datasource.py"))
    refused = _run(tmp_path / "first", pipeline)
    assert_refused(refused, "datasource")
    allowed = _run(tmp_path / "second", pipeline, "--allow-path", str(shared))
    assert allowed.returncode == 0, allowed.describe()
    assert (allowed.ws / "model" / "pipeline.json").is_file()


def test_a_fifo_in_a_model_dir_is_refused_by_predict(tmp_path, bwrap):
    """A model dir is as hostile as a pipeline: its scripts are read under the same rule."""
    from conftest import TINY, run_cli

    trained = run_cli("run", str(TINY / "pipeline.json"), "-o", str(tmp_path / "ws"), *limit_args(timeout="120"), timeout=300)
    assert trained.returncode == 0, trained.stderr
    model = tmp_path / "ws" / "model"
    script = next((model / "scripts").glob("model*.py"))
    script.unlink()
    os.mkfifo(script)
    proc = run_cli("predict", str(model), "-s", "1,2,3,4", *limit_args(timeout="120"), timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert "fifo" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
