"""Running one attack through the real CLI, and checking the host afterwards.

Every test of the suite writes a small pipeline whose scripts are hostile,
runs `pipcook-sandbox run` in a subprocess exactly as a user would (with small
limits, so nothing takes long), and then asserts the outcome from outside:
what the runner said, what landed in the workspace, what the host still has.

Other runs may share this machine (other test sessions, other engineers), so
the leftover checks only count what belongs to *this* runner: state dirs and
mounts that appeared during the run and are not recorded by another live
runner, cgroups and containers labelled with this runner's pid, and
processes carrying a marker the test chose.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from conftest import REPO, leftover_mounts, sandbox_processes, write_pipeline

BACKENDS = ("bwrap", "docker", "docker-gvisor")
# A backend id of this suite -> the CLI's --isolation and the environment it runs with:
# docker-gvisor is the docker backend with gVisor as its runtime (docs/docker.md).
GVISOR_ENV = {"PIPCOOK_DOCKER_RUNTIME": "runsc"}


def backend_cli(isolation: str) -> tuple[str, dict[str, str]]:
    """(--isolation value, extra environment) of a backend id."""
    if isolation == "docker-gvisor":
        return "docker", dict(GVISOR_ENV)
    return isolation, {}


def uses_docker(isolation: str) -> bool:
    return backend_cli(isolation)[0] == "docker"
# Small per-stage limits: every attack ends within seconds.
LIMITS = {"--memory": "256m", "--pids": "64", "--disk": "64m", "--timeout": "20"}
TMP = Path("/tmp")
# The temporary dirs a runner makes: mkdtemp("pcsb-") for a run's state, and
# "pcsb-model-"/"pcsb-predict-" for predict.
RUNNER_DIR = re.compile(r"pcsb-(?:model-|predict-)?[a-z0-9_]{8}")


def token(prefix: str = "pcsb-hostile") -> str:
    """A unique string an attack plants or looks for."""
    return f"{prefix}-{secrets.token_hex(6)}"


def limit_args(**changes: str) -> list[str]:
    """The small limits as CLI arguments; `timeout="5"` etc. override one."""
    merged = dict(LIMITS)
    merged.update({f"--{k}": v for k, v in changes.items()})
    return [x for kv in merged.items() for x in kv]


@dataclass
class Attack:
    isolation: str
    returncode: int
    stdout: str
    stderr: str
    ws: Path
    elapsed: float
    runner_pid: int
    before: "HostSnapshot" = field(repr=False)
    peak_rss: int = 0  # the runner's peak resident memory, bytes

    @property
    def output(self) -> str:
        return self.stdout + self.stderr

    @property
    def error(self) -> str:
        """The one-paragraph error the runner printed (empty if none)."""
        lines = [line for line in self.stderr.splitlines() if line.startswith("error: ")]
        return lines[-1] if lines else ""

    def log(self, stage: str = "model") -> str:
        path = self.ws / "logs" / f"{stage}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def metrics(self) -> list[dict]:
        path = self.ws / "metrics.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def reports(self, stage: str = "model") -> dict:
        """The JSON object a hostile script printed as `REPORT {...}` in its log."""
        found = [line for line in self.log(stage).splitlines() if line.startswith("REPORT ")]
        assert found, f"stage {stage} printed no REPORT line; runner said: {self.stderr[-2000:]}\n" \
                      f"log: {self.log(stage)[-2000:]}"
        return json.loads(found[-1][len("REPORT "):])

    def leftovers(self, *markers: str) -> list[str]:
        return self.before.leftovers(self.runner_pid, markers, docker=uses_docker(self.isolation))

    def describe(self) -> str:
        return (f"[{self.isolation}] exit {self.returncode} after {self.elapsed:.1f} s\n"
                f"stderr: {self.stderr[-3000:]}")


class HostSnapshot:
    """What the host had before a run, to tell this run's leftovers from others'."""

    def __init__(self) -> None:
        self.dirs = set(TMP.glob("pcsb-*"))
        self.mounts = set(leftover_mounts())

    @staticmethod
    def _owner(state_dir: Path) -> int | None:
        """The runner pid recorded in a state dir (the orchestrator's run.json, or a bwrap stage record)."""
        for record in sorted(state_dir.glob("*.json")):
            try:
                return int(json.loads(record.read_text())["runner_pid"])
            except (OSError, ValueError, KeyError, TypeError):
                continue
        return None

    def _ours(self, state_dir: Path, runner_pid: int) -> bool:
        if state_dir in self.dirs or not RUNNER_DIR.fullmatch(state_dir.name):
            return False  # older, or another tool's (benchmarks use pcsb-tp-...)
        owner = self._owner(state_dir)
        # None: just being made by another run, or ours half-removed: look until it names its runner or
        # goes (a dir that keeps no record for 2 s counts as ours)
        deadline = time.monotonic() + 2
        while owner is None and state_dir.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
            owner = self._owner(state_dir)
        if not state_dir.exists():
            return False
        return owner is None or owner == runner_pid

    def leftovers(self, runner_pid: int, markers: tuple[str, ...] = (), docker: bool = False) -> list[str]:
        found: list[str] = []
        for marker in markers:
            found += [f"process {p}" for p in sandbox_processes(marker)]
        for d in sorted(set(TMP.glob("pcsb-*"))):
            if self._ours(d, runner_pid):
                found.append(f"state dir {d}")
        for line in sorted(set(leftover_mounts()) - self.mounts):
            mountpoint = Path(line.split()[1])
            state_dir = next((TMP / p for p in mountpoint.parts if p.startswith("pcsb-")), None)
            if state_dir is None or self._owner(state_dir) in (None, runner_pid):
                found.append(f"mount {line}")
        from pipcook_sandbox.runner.backends import cgroups

        for cg in cgroups.leftovers(is_alive=lambda pid: pid != runner_pid):
            found += [f"cgroup {d}" for d in cg.all_dirs() if d.exists()]
        if docker:
            from pipcook_sandbox.runner.backends import docker as docker_backend

            label = f"{docker_backend.LABEL_PID}={runner_pid}"
            found += [f"container {c.name}" for c in
                      docker_backend.client().containers.list(all=True, filters={"label": label})]
        return found


def run_cli_tracked(args: list[str], *, env: dict | None = None, timeout: float = 240,
                    cwd: Path | None = None) -> tuple[subprocess.CompletedProcess, int, float]:
    """`pipcook-sandbox ARGS` as conftest.run_cli does, but keeping the runner's pid.
    `--isolation docker-gvisor` becomes `--isolation docker` under gVisor (backend_cli)."""
    args = list(args)
    extra: dict[str, str] = {}
    for i, arg in enumerate(args[:-1]):
        if arg == "--isolation":
            args[i + 1], extra = backend_cli(args[i + 1])
    full_env = {**os.environ, **extra, **(env or {})}
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "pipcook_sandbox", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=full_env, cwd=cwd or REPO)
    peak = _PeakMemory(proc.pid)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.terminate()  # SIGTERM: the runner's orderly teardown, as for Ctrl-C
        try:
            out, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        raise AssertionError(f"the runner did not finish in {timeout} s: {err[-3000:]}") from None
    finally:
        peak.stop()
    elapsed = time.monotonic() - t0
    done = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    done.peak_rss = peak.value  # type: ignore[attr-defined]
    return done, proc.pid, elapsed


class _PeakMemory:
    """The runner's peak resident memory (VmHWM), sampled while it runs."""

    def __init__(self, pid: int) -> None:
        self.pid, self.value = pid, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            try:
                for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        self.value = max(self.value, int(line.split()[1]) * 1024)
            except (OSError, ValueError):
                return

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def run_attack(tmp_path: Path, isolation: str, *, datasource: str | None = None, dataflow: list[str] | None = None,
               model: str | None = None, args: list[str] | tuple[str, ...] = (), limits: list[str] | None = None,
               env: dict | None = None, extra: dict | None = None, query: dict | None = None,
               timeout: float = 240) -> Attack:
    """Write a pipeline of the given scripts (the tiny ones where None) and run it."""
    pipeline = write_pipeline(tmp_path / "pipeline", datasource=datasource, dataflow=dataflow, model=model,
                              extra=extra, query=query)
    ws = tmp_path / "ws"
    before = HostSnapshot()
    cmd = ["run", str(pipeline), "-o", str(ws), "--isolation", isolation,
           *(limits if limits is not None else limit_args()), *args]
    proc, pid, elapsed = run_cli_tracked(cmd, env=env, timeout=timeout)
    return Attack(isolation, proc.returncode, proc.stdout, proc.stderr, ws, elapsed, pid, before, proc.peak_rss)


def assert_contained_failure(attack: Attack, stage: str, *words: str, within: float = 60) -> None:
    """The runner failed the run cleanly: exit 1, one paragraph naming the stage and `words`, no traceback, fast."""
    assert attack.returncode == 1, attack.describe()
    assert f"stage '{stage}'" in attack.error, attack.describe()
    for word in words:
        assert word in attack.error, f"{word!r} not in the error\n{attack.describe()}"
    assert "Traceback" not in attack.stderr, attack.describe()
    assert "internal error" not in attack.stderr, attack.describe()
    assert attack.elapsed < within, attack.describe()


def workspace_bytes(ws: Path) -> list[tuple[Path, bytes]]:
    """Every regular file of a workspace with its content (links are reported, never followed)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(ws, followlinks=False):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            if path.is_symlink():
                found.append((path, b"SYMLINK -> " + os.readlink(path).encode()))
            elif path.is_file():
                found.append((path, path.read_bytes()))
    return found


def grep_workspace(ws: Path, needle: str) -> list[str]:
    """Files of the workspace (zip members included, decompressed) that contain `needle`."""
    import zipfile

    raw = needle.encode()
    hits = []
    for path, data in workspace_bytes(ws):
        if raw in data:
            hits.append(str(path))
        if path.suffix == ".zip" and zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as zf:
                for info in zf.infolist():
                    if raw in zf.read(info):
                        hits.append(f"{path}!{info.filename}")
    return hits


def private_cache(tmp_path: Path) -> dict[str, str]:
    """Env for a runner with a cache of its own (downloads, scripts), sharing
    only the worker's dependencies with the real cache (built once, read-only)."""
    from pipcook_sandbox.runner.fetch import cache_dir

    root = tmp_path / "cache"
    root.mkdir(parents=True, exist_ok=True)
    shared = cache_dir() / "worker-site"
    if shared.is_dir() and not (root / "worker-site").exists():
        (root / "worker-site").symlink_to(shared, target_is_directory=True)
    return {"PIPCOOK_SANDBOX_CACHE": str(root)}
