"""Failures a user can cause or meet, through the real CLI: each is one paragraph naming what failed and
why, with exit status 1 (2 for a bad value), never "internal error in pipcook-sandbox"; `--debug` adds
the traceback. The host conditions are real: a mount namespace (unshare -m) where bubblewrap cannot be
run, /tmp read-only, full or out of inodes; a Unix socket nobody listens on as DOCKER_HOST; a workspace
the runner may not read (root without CAP_DAC_OVERRIDE, via setpriv)."""
from __future__ import annotations

import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import REPO, TINY, run_cli

PIPELINE = str(TINY / "pipeline.json")
ROOT = os.geteuid() == 0


def _need(*tools: str, root: bool = True) -> None:
    """Root and the util-linux tools the setups use; with CI=true their absence is a failure."""
    missing = [t for t in tools if shutil.which(t) is None] + (["root"] if root and not ROOT else [])
    if missing:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must run as root with util-linux: missing {', '.join(missing)}")
        pytest.skip(f"needs {', '.join(missing)}")


def _in_mount_ns(setup: str, *args: str, path: str | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """`pipcook-sandbox ARGS` in a private mount namespace prepared by the shell commands `setup`
    (with PATH=`path` for the CLI alone, when given)."""
    argv = (["env", f"PATH={path}"] if path is not None else []) + [sys.executable, "-m", "pipcook_sandbox", *args]
    cli = " ".join(shlex.quote(a) for a in argv)
    return subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", f"set -e; {setup}; exec {cli}"],
                          capture_output=True, text=True, timeout=timeout, cwd=REPO)


def _needed_under_tmp() -> list[str]:
    """The entries of /tmp the CLI itself needs (its venv, the checkout), when they live there."""
    tops = set()
    for p in (sys.prefix, sys.base_prefix, os.path.realpath(sys.executable), str(REPO)):
        rel = os.path.relpath(os.path.realpath(p), "/tmp")
        if not rel.startswith(".."):
            tops.add(rel.split(os.sep)[0])
    return sorted(tops)


def _tmpfs_over_tmp(options: str) -> str:
    """Shell commands covering /tmp with a tmpfs mounted with `options`; what the CLI needs from the old
    /tmp (a venv or checkout there) is bound back at its own path before anything fills the new one."""
    keep = _needed_under_tmp()
    cmds = ["mount --bind /tmp /mnt"] if keep else []
    cmds.append(f"mount -t tmpfs -o {options} tmpfs /tmp")
    for top in map(shlex.quote, keep):
        cmds += [f"mkdir /tmp/{top}", f"mount --bind /mnt/{top} /tmp/{top}"]
    return "; ".join(cmds)


# /tmp itself made read-only: the runner cannot write there, the CLI's own files stay readable.
READ_ONLY_TMP = "mount --bind /tmp /tmp; mount -o remount,bind,ro /tmp"


def _one_paragraph(proc: subprocess.CompletedProcess, status: int, *words: str) -> str:
    """The error paragraph (the last `error:` line), after checking the exit status and the words."""
    assert proc.returncode == status, (proc.returncode, proc.stderr[-3000:])
    assert "internal error" not in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith(("error:", "Error:"))]
    assert len(lines) == 1, proc.stderr[-3000:]
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


# --- bubblewrap missing ---------------------------------------------------------------------------


def test_missing_bwrap_is_one_paragraph_naming_the_fix(tmp_path: Path) -> None:
    _need("unshare", "mount")
    bwrap = shutil.which("bwrap") or "/usr/bin/bwrap"
    if not Path(bwrap).exists():
        pytest.skip("bubblewrap is not installed: nothing to hide")
    # Not on PATH, and the /usr/bin fallback is no program either: bubblewrap is simply not there.
    setup = f"mount --bind /dev/null {shlex.quote(bwrap)}"
    path = str(Path(sys.executable).parent)
    proc = _in_mount_ns(setup, "run", PIPELINE, "-o", str(tmp_path / "ws"), path=path)
    line = _one_paragraph(proc, 1, "bwrap", "bubblewrap is not installed", "apt-get install bubblewrap")
    assert "userns" not in line  # what could not be probed without it is not listed as well

    debug = _in_mount_ns(setup, "run", PIPELINE, "-o", str(tmp_path / "ws2"), "--debug", path=path)
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "bubblewrap is not installed" in debug.stderr


def test_missing_bwrap_for_predict_too(tmp_path: Path) -> None:
    _need("unshare", "mount")
    bwrap = shutil.which("bwrap") or "/usr/bin/bwrap"
    if not Path(bwrap).exists():
        pytest.skip("bubblewrap is not installed: nothing to hide")
    trained = run_cli("run", PIPELINE, "-o", str(tmp_path / "ws"), "--isolation", "none")
    assert trained.returncode == 0, trained.stderr[-2000:]
    proc = _in_mount_ns(f"mount --bind /dev/null {shlex.quote(bwrap)}", "predict", str(tmp_path / "ws"), "-s", "1,2,3,4")
    _one_paragraph(proc, 1, "bwrap", "bubblewrap is not installed")


# --- the Docker engine not running ------------------------------------------------------------------


def _dead_socket(path: Path) -> Path:
    """A Unix socket file nobody listens on: connect() is refused, as after dockerd died."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.close()
    return path


@pytest.mark.parametrize("kind", ["dead socket", "no socket"])
def test_docker_engine_not_running_is_one_paragraph(tmp_path: Path, kind: str) -> None:
    sock = _dead_socket(tmp_path / "docker.sock") if kind == "dead socket" else tmp_path / "missing.sock"
    env = {"DOCKER_HOST": f"unix://{sock}"}
    proc = run_cli("run", PIPELINE, "-o", str(tmp_path / "ws"), "--isolation", "docker", env=env)
    _one_paragraph(proc, 1, "docker backend", "cannot reach the Docker engine", "DOCKER_HOST")
    assert "image is not available" not in proc.stderr  # follows from the engine: not a second reason

    debug = run_cli("run", PIPELINE, "-o", str(tmp_path / "ws2"), "--isolation", "docker", "--debug", env=env)
    assert debug.returncode == 1 and "Traceback" in debug.stderr


def test_images_build_without_docker_engine(tmp_path: Path) -> None:
    env = {"DOCKER_HOST": f"unix://{_dead_socket(tmp_path / 'docker.sock')}"}
    proc = run_cli("images", "build", "--offline", env=env)
    _one_paragraph(proc, 1, "cannot reach the Docker engine", "DOCKER_HOST")


# --- the run's state directory and its disk-quota volumes ---------------------------------------------


@pytest.fixture
def outside_tmp() -> Iterator[Path]:
    """A directory for the workspace that stays visible when /tmp (where tmp_path is) is covered."""
    path = Path(tempfile.mkdtemp(prefix="pcsb-test-ws-", dir="/var/tmp" if os.path.isdir("/var/tmp") else REPO))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def test_read_only_tmp_is_one_paragraph(outside_tmp: Path) -> None:
    _need("unshare", "mount")
    ws = outside_tmp / "ws"
    proc = _in_mount_ns(READ_ONLY_TMP, "run", PIPELINE, "-o", str(ws))
    _one_paragraph(proc, 1, "state directory under /tmp", "Read-only file system")
    assert (ws / "pipeline.json").is_file()  # the workspace is kept, with what the run had written

    debug = _in_mount_ns(READ_ONLY_TMP, "run", PIPELINE, "-o", str(ws), "--force", "--debug")
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "Read-only file system" in debug.stderr


def test_full_tmp_is_one_paragraph(outside_tmp: Path) -> None:
    _need("unshare", "mount", "dd")
    setup = _tmpfs_over_tmp("size=1m") + "; dd if=/dev/zero of=/tmp/fill bs=64k 2>/dev/null || true"
    proc = _in_mount_ns(setup, "run", PIPELINE, "-o", str(outside_tmp / "ws"))
    _one_paragraph(proc, 1, "state directory under /tmp", "No space left on device")


def test_quota_volume_that_cannot_be_made_is_one_paragraph(outside_tmp: Path) -> None:
    """/tmp out of inodes: with few, the run's start fails (the backend's probe, then its state dir); with a
    few more, the disk-quota volumes are where it runs out. Every outcome is one paragraph; the sweep must
    meet the quota volume's."""
    _need("unshare", "mount")
    met = []
    for inodes in range(4, 48):
        ws = outside_tmp / f"ws{inodes}"
        proc = _in_mount_ns(_tmpfs_over_tmp(f"size=64m,nr_inodes={inodes}"), "run", PIPELINE, "-o", str(ws))
        if proc.returncode == 0:
            break  # enough inodes for the whole run
        line = _one_paragraph(proc, 1, "No space left on device")
        met.append(line)
        if "disk-quota volume" in line and "probe sandbox" not in line:  # the run's own, not the probe's
            assert "--disk" in line and "/vol-" in line  # names the option and the stage's volume
            break
    assert any("disk-quota volume" in line and "probe sandbox" not in line for line in met), met


@pytest.mark.parametrize("limit", ["size=8k", "size=8m,nr_inodes=16"])
def test_workspace_on_a_full_filesystem_is_one_paragraph(outside_tmp: Path, limit: str) -> None:
    """-o on a filesystem that fills up (bytes or inodes) partway through the run: whichever write fails
    first, the user reads which file and why."""
    _need("unshare", "mount")
    fs = outside_tmp / "fs"
    fs.mkdir()
    proc = _in_mount_ns(f"mount -t tmpfs -o {limit} tmpfs {shlex.quote(str(fs))}", "run", PIPELINE, "-o", str(fs / "ws"))
    _one_paragraph(proc, 1, "No space left on device")


def test_full_cache_is_one_paragraph(outside_tmp: Path) -> None:
    """The script cache (every script runs from its verified snapshot there) on a filesystem out of inodes."""
    _need("unshare", "mount")
    cache = outside_tmp / "cache"
    cache.mkdir()
    setup = f"mount -t tmpfs -o size=8m,nr_inodes=4 tmpfs {shlex.quote(str(cache))}; export PIPCOOK_SANDBOX_CACHE={shlex.quote(str(cache / 'c'))}"
    proc = _in_mount_ns(setup, "run", PIPELINE, "-o", str(outside_tmp / "ws"))
    _one_paragraph(proc, 1, "stage 'datasource' (datasource.py)", "script cache", "No space left on device",
                   "PIPCOOK_SANDBOX_CACHE")


# --- the service's state directory (--data) ------------------------------------------------------------


@pytest.mark.parametrize("what", ["a file", "not a database"])
@pytest.mark.parametrize("command", [["tenants", "list"], ["tenants", "add", "alice"], ["server", "--port", "0"]])
def test_unusable_service_data_dir_is_one_paragraph(tmp_path: Path, what: str, command: list[str]) -> None:
    data = tmp_path / "data"
    if what == "a file":
        data.write_text("not a directory")
    else:
        data.mkdir()
        (data / "service.db").write_text("not an SQLite database, only text " * 8)
    proc = run_cli(*command, "--data", str(data), timeout=60)
    _one_paragraph(proc, 1, f"cannot use {data} as the service's state directory (--data",
                   "it is a file, not a directory" if what == "a file" else "file is not a database")


def test_read_only_service_data_dir_is_one_paragraph(tmp_path: Path) -> None:
    _need("unshare", "mount")
    ro = tmp_path / "ro"
    ro.mkdir()
    proc = _in_mount_ns(f"mount -o bind,ro {shlex.quote(str(ro))} {shlex.quote(str(ro))}", "tenants", "add", "alice",
                        "--data", str(ro / "svc"))
    _one_paragraph(proc, 1, f"cannot use {ro / 'svc'} as the service's state directory", "Read-only file system")


# --- a bad option value -------------------------------------------------------------------------------


@pytest.mark.parametrize("args,words", [
    (["--stage-uid", "0"], ["--stage-uid", "out of range"]),
    (["--stage-uid", "nobody"], ["--stage-uid", "UID or UID:GID"]),
    (["--set", "epochs"], ["--set", "KEY=VALUE"]),
    (["--set", "dataflow.3.x=1"], ["--set dataflow.3.x=1", "numbered from 0"]),
    (["--downloads", "-5"], ["--downloads", "is not a size"]),
])
def test_bad_option_value_is_a_usage_error(tmp_path: Path, args: list[str], words: list[str]) -> None:
    proc = run_cli("run", PIPELINE, "-o", str(tmp_path / "ws"), *args)
    _one_paragraph(proc, 2, *words)


# --- an unreadable workspace ------------------------------------------------------------------------------


def _without_dac(*args: str) -> subprocess.CompletedProcess:
    """The CLI as root without CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH: mode bits bind it like any user."""
    return subprocess.run(["setpriv", "--bounding-set=-dac_override,-dac_read_search", sys.executable, "-m",
                           "pipcook_sandbox", *args], capture_output=True, text=True, timeout=300, cwd=REPO)


@pytest.mark.parametrize("what", ["workspace", "model dir", "model zip"])
def test_unreadable_workspace_is_one_paragraph(tmp_path: Path, what: str) -> None:
    _need("setpriv")
    ws = tmp_path / "ws"
    trained = run_cli("run", PIPELINE, "-o", str(ws), "--isolation", "none")
    assert trained.returncode == 0, trained.stderr[-2000:]
    target = {"workspace": ws, "model dir": ws / "model", "model zip": ws / "model.zip"}[what]
    mode = target.stat().st_mode
    target.chmod(0)
    try:
        proc = _without_dac("predict", str(ws if what == "workspace" else target), "-s", "1,2,3,4")
        _one_paragraph(proc, 1, "cannot read the model at", "Permission denied")
        served = _without_dac("serve", str(ws if what == "workspace" else target), "--port", "0")
        _one_paragraph(served, 1, "cannot read the model at", "Permission denied")
    finally:
        target.chmod(mode)
