"""The runner's cache without a writable home: a private fallback under the job's temp dir."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import run_cli, write_pipeline
from pipcook_sandbox.runner import cachedir
from pipcook_sandbox.runner.errors import PipcookError


@pytest.fixture
def no_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """HOME under a regular file: nothing can be made there, not even by root."""
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("HOME", str(blocker / "home"))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.delenv("PIPCOOK_SANDBOX_CACHE", raising=False)
    monkeypatch.delenv("SLURM_TMPDIR", raising=False)
    tmp = tmp_path / "jobtmp"
    tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp))
    monkeypatch.setattr(cachedir, "_chosen", {})
    return tmp


def test_falls_back_to_a_private_dir_under_the_job_tmp(no_home: Path, capsys: pytest.CaptureFixture) -> None:
    got = cachedir.cache_dir()
    assert got == no_home / f"pipcook-sandbox-{os.geteuid()}"
    assert got.is_dir() and (got.stat().st_mode & 0o777) == 0o700
    assert cachedir.cache_dir() == got
    err = capsys.readouterr().err
    assert err.count("notice:") == 1 and str(got) in err  # said once, on one line
    assert len(err.strip().splitlines()) == 1


def test_slurm_tmpdir_comes_first(no_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    slurm_tmp = tmp_path / "slurmtmp"
    slurm_tmp.mkdir()
    monkeypatch.setenv("SLURM_TMPDIR", str(slurm_tmp))
    assert cachedir.cache_dir().parent == slurm_tmp


@pytest.mark.parametrize("plant", ["other_owner", "group_writable", "symlink"])
def test_a_planted_fallback_is_refused(no_home: Path, tmp_path: Path, plant: str) -> None:
    target = no_home / f"pipcook-sandbox-{os.geteuid()}"
    if plant == "symlink":
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir(mode=0o700)
        target.symlink_to(elsewhere)
    else:
        target.mkdir(mode=0o700)
        if plant == "group_writable":
            os.chmod(target, 0o770)
        elif os.geteuid() == 0:
            os.chown(target, 12345, 12345)
        else:
            pytest.skip("making a directory owned by another uid needs root")
    with pytest.raises(PipcookError, match="refusing the cache fallback"):
        cachedir.cache_dir()


def test_an_unusable_operator_choice_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("PIPCOOK_SANDBOX_CACHE", str(blocker / "cache"))
    monkeypatch.setattr(cachedir, "_chosen", {})
    with pytest.raises(PipcookError, match="PIPCOOK_SANDBOX_CACHE"):
        cachedir.cache_dir()


def test_a_run_without_a_writable_home_finishes(tmp_path: Path) -> None:
    """The crash the Slurm integration found (PermissionError under /home): now a notice."""
    blocker = tmp_path / "file"
    blocker.write_text("")
    jobtmp = tmp_path / "jobtmp"
    jobtmp.mkdir()
    env = {"HOME": str(blocker / "home"), "TMPDIR": str(jobtmp), "XDG_CACHE_HOME": "", "PIPCOOK_SANDBOX_CACHE": "",
           "SLURM_TMPDIR": ""}
    pipeline = write_pipeline(tmp_path / "p")
    done = run_cli("run", str(pipeline), "-o", str(tmp_path / "ws"), env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "notice: cache" in done.stderr and str(jobtmp / f"pipcook-sandbox-{os.geteuid()}") in done.stderr
    # The workspace marker's key (the runner's state dir) falls back the same way.
    assert "notice: state dir" in done.stderr
    assert (jobtmp / f"pipcook-sandbox-{os.geteuid()}" / "state" / "workspace.key").is_file()
    assert (tmp_path / "ws" / "model" / "weights.json").is_file()
