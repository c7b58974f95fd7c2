"""Shared helpers for tests that drive the real CLI and real sandboxes."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from httpserver import Server, serving

# A suite started in the background by a non-interactive shell (`cmd &`) inherits SIGINT ignored, and
# an ignored signal stays ignored across exec: every runner a test starts would then ignore the Ctrl-C
# the signal tests send it. A handler installed here is reset to the default at each child's exec.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "tests" / "pipelines" / "tiny"


def run_cli(*args: str, timeout: float = 600, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`pipcook-sandbox ARGS` in a subprocess, as a user would run it."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "pipcook_sandbox", *args], capture_output=True, text=True,
                          timeout=timeout, env=full_env, cwd=cwd or REPO)


def write_pipeline(root: Path, *, datasource: str | None = None, dataflow: list[str] | None = None,
                   model: str | None = None, extra: dict | None = None, query: dict | None = None) -> Path:
    """A pipeline in `root` whose scripts are the given sources (default: the tiny ones)."""
    root.mkdir(parents=True, exist_ok=True)
    query = query or {}
    refs = {}
    for name, source in (("datasource", datasource), ("model", model)):
        path = root / f"{name}.py"
        path.write_text(textwrap.dedent(source) if source else (TINY / f"{name}.py").read_text())
        refs[name] = path.name + query.get(name, "")
    flows = []
    for i, source in enumerate(dataflow if dataflow is not None else [None], 1):
        path = root / f"dataflow{i}.py"
        path.write_text(textwrap.dedent(source) if source else (TINY / "dataflow.py").read_text())
        flows.append(path.name)
    spec = {"specVersion": "2.0", "datasource": refs["datasource"], "dataflow": flows, "model": refs["model"],
            "options": {"train": {"epochs": 1}}}
    spec.update(extra or {})
    (root / "pipeline.json").write_text(json.dumps(spec))
    return root / "pipeline.json"


def bwrap_available() -> bool:
    return shutil.which("bwrap") is not None and (REPO / "runner" / "backends" / "bwrap.py").is_file()


def require_bwrap() -> None:
    """In CI a missing bubblewrap is a failure, never a silent skip."""
    if not bwrap_available():
        if os.environ.get("CI") == "true":
            pytest.fail("bubblewrap is not available in CI: .ci/run must install it")
        pytest.skip("bubblewrap backend not available on this machine (apt-get install bubblewrap)")


def require_docker():
    """The docker backend module once the engine answers and the worker image exists (built offline if
    missing). Locally an unusable Docker skips with the reason; with CI=true it fails: never a silent skip."""

    def unavailable(why: str) -> None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"Docker is required in CI and is not usable: {why}. .ci/start-docker.sh must start "
                        "dockerd and build the image (see /tmp/dockerd.log)")
        pytest.skip(f"Docker backend not usable here: {why} (start dockerd, then `pipcook-sandbox images build --offline`)")

    try:
        from pipcook_sandbox.runner import images
        from pipcook_sandbox.runner.backends import docker as backend_module

        backend_module.client()
    except Exception as exc:
        unavailable(str(exc))
    tag = images.image_tag()
    if not images.exists(tag):
        try:
            images.build(offline=True)
        except Exception as exc:
            unavailable(f"the image {tag} is missing and could not be built offline: {exc}")
    return backend_module


def slurm_up() -> str | None:
    """None when a Slurm controller answers and a node can take jobs; else why not."""
    for tool in ("sbatch", "squeue", "sacct", "sacctmgr", "scontrol", "sinfo"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed"
    try:
        ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=20, check=False)
        nodes = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], capture_output=True, text=True, timeout=20,
                               check=False)
    except subprocess.TimeoutExpired:
        return "slurmctld does not answer within 20 s"
    if "UP" not in ping.stdout:
        return f"slurmctld is not up ({(ping.stdout + ping.stderr).strip()})"
    if not any(line.startswith(("idle", "mixed", "allocated")) for line in nodes.stdout.splitlines()):
        return f"no usable node (sinfo: {nodes.stdout.strip() or nodes.stderr.strip()})"
    return None


def require_slurm() -> None:
    """In CI a Slurm cluster that is not up is a failure (.ci/start-slurm.sh starts one); elsewhere a
    skip that says so (listed in the closing banner)."""
    why = slurm_up()
    if why is None:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"Slurm is required in CI and is not usable: {why}. .ci/start-slurm.sh must start it "
                    "(logs in /var/log/slurm)")
    pytest.skip(f"Slurm not usable here: {why} (run .ci/start-slurm.sh as root)")


def sandbox_processes(marker: str) -> list[str]:
    """Command lines of live processes that mention `marker` (leftover check)."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmdline:
            found.append(f"{pid}: {cmdline[:200]}")
    return found


def _runner_alive(state_dir: Path) -> bool:
    try:
        pid = json.loads((state_dir / "run.json").read_text())["runner_pid"]
        os.kill(pid, 0)
        return True
    except (OSError, ValueError, KeyError):
        return False


def state_dirs_of(pid: int) -> list[Path]:
    """The state dirs (/tmp/pcsb-*) whose run.json names runner `pid`."""
    found = []
    for d in Path("/tmp").glob("pcsb-*"):
        try:
            if json.loads((d / "run.json").read_text()).get("runner_pid") == pid:
                found.append(d)
        except (OSError, ValueError):
            continue
    return found


def leftover_mounts() -> list[str]:
    """Mounts of run state dirs whose runner is gone (a live run's mounts are its own business)."""
    found = []
    for line in Path("/proc/mounts").read_text().splitlines():
        target = line.split()[1]
        if "/pcsb-" not in target:
            continue
        state = Path("/" + "/".join(p for p in target.split("/")[1:3]))  # /tmp/pcsb-XXXX
        if not _runner_alive(state):
            found.append(line)
    return found


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    return tmp_path


# Where a skip means a guarantee went unchecked on this host (confinement, Docker, limits).
_SECURITY_TESTS = ("tests/hostile/", "tests/test_docker_backend.py", "tests/test_bwrap_backend.py",
                   "tests/test_seccomp.py", "tests/test_cgroups_quota.py", "tests/test_artifact_confinement.py",
                   "tests/test_slurm.py", "tests/test_slurm_service.py", "tests/test_gvisor.py",
                   "tests/test_fetch.py", "tests/test_netpolicy.py", "tests/test_service_separation.py",
                   "tests/test_warm.py", "tests/test_warm_expiry.py", "tests/test_service_warm.py",
                   "tests/test_user_errors.py", "tests/test_run_json.py", "tests/test_killed_while_starting.py",
                   "tests/test_crash_cleanup.py", "tests/test_examples.py", "tests/test_cachedir.py",
                   "tests/test_gpus.py")


def _security_skips(stats: dict) -> list:
    return [r for r in stats.get("skipped", []) if any(r.nodeid.startswith(p) for p in _SECURITY_TESTS)]


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session, exitstatus):
    """With CI=true a skipped security or Docker test fails the run: the banner below says which."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if os.environ.get("CI") == "true" and reporter is not None and _security_skips(reporter.stats) and exitstatus == 0:
        session.exitstatus = 1


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """Every skip of a security or Docker test, in a banner at the end: never silent, in CI or not.

    The backends themselves are never skipped in CI (require_bwrap, require_docker and
    require_backend fail there); what can still skip is a host property (cgroup v2, loop
    devices, a GPU present), and the operator must see which guarantee went unchecked."""
    skipped = _security_skips(terminalreporter.stats)
    if not skipped:
        return
    failing = " (CI=true: this fails the run)" if os.environ.get("CI") == "true" else ""
    terminalreporter.write_sep("!", f"{len(skipped)} security or Docker test(s) SKIPPED on this host{failing}",
                               red=True)
    for report in skipped:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        terminalreporter.write_line(f"SKIPPED {report.nodeid}: {reason}", red=True)


@pytest.fixture(scope="module")
def web() -> Iterator[Server]:
    """A local HTTP server (tests/httpserver.py) for the module: pipelines and scripts over real HTTP."""
    with serving() as state:
        yield state
