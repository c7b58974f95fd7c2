"""Helpers shared by the benchmarks: machine facts, medians, result files.

Every benchmark measures its own baseline in the same run and prints ratios
against it: this machine kind is a noisy shared 2-vCPU VM, so an absolute
figure from another run means little.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

RESULTS_DIR = Path(os.environ.get("PIPCOOK_BENCH_OUT", REPO_ROOT / "bench" / "out"))


def machine() -> dict[str, Any]:
    """What the figures were measured on (nproc, memory, kernel, CPU, load)."""

    def sh(*cmd: str) -> str:
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    cpu = ""
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": sh("nproc"),
        "free_h": sh("free", "-h").splitlines()[1:2],
        "uname_r": platform.release(),
        "cpu": cpu,
        "python": platform.python_version(),
        "loadavg": open("/proc/loadavg").read().split()[:3] if os.path.exists("/proc/loadavg") else [],
        "git": sh("git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"),
    }


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def timed(fn: Callable[[], Any]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def save(name: str, data: dict, argv: list[str] | None = None) -> Path:
    """Write `data` (plus the machine and the command) to bench/out/<name>.json; return the path."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    args = sys.argv[1:] if argv is None else argv
    data = {"machine": machine(), "command": " ".join([f"python -m bench.{name}", *args]), **data}
    path.write_text(json.dumps(data, indent=2, default=str))
    return path


def _rev(rev: str) -> str:
    out = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "--short", rev], capture_output=True, text=True)
    return out.stdout.strip() or rev


def _dirty() -> bool:
    out = subprocess.run(["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--untracked-files=no"],
                         capture_output=True, text=True)
    return bool(out.stdout.strip())


class Version:
    """Code to run a command with: the working tree, or a git revision extracted to a temporary dir.

    A benchmark that compares against the previous commit runs both in the same run, interleaved,
    so the machine's noise hits both alike: `env()` puts the revision's `pipcook_sandbox` first on
    PYTHONPATH (before the editable install of the working tree)."""

    def __init__(self, rev: str | None = None) -> None:
        self.rev = rev
        self.label = f"{_rev('HEAD')}{'+changes' if _dirty() else ''}" if rev is None else _rev(rev)
        self.tmp: Path | None = None
        if rev is not None:
            self.tmp = Path(tempfile.mkdtemp(prefix="pcsb-bench-base-"))
            src = self.tmp / "src"
            src.mkdir()
            archive = subprocess.run(["git", "-C", str(REPO_ROOT), "archive", rev], check=True, capture_output=True).stdout
            subprocess.run(["tar", "-x", "-C", str(src)], input=archive, check=True)
            (self.tmp / "pipcook_sandbox").symlink_to(src)  # the package-dir mapping of pyproject.toml

    @property
    def root(self) -> Path:
        """The checkout whose `pipcook_sandbox` this version runs."""
        return REPO_ROOT if self.tmp is None else self.tmp / "src"

    def compile(self) -> None:
        """Byte-compile the package, as pip does when it installs the wheel: start-up benchmarks then
        measure what a user runs, whatever PYTHONDONTWRITEBYTECODE says on this machine (stages
        mount the package read-only and never write bytecode themselves)."""
        subprocess.run([sys.executable, "-m", "compileall", "-q", *(str(self.root / d) for d in ("runner", "sandbox", "frameworks")),
                        str(self.root / "__init__.py"), str(self.root / "__main__.py")], check=True, capture_output=True)

    def env(self, base: dict | None = None) -> dict:
        env = dict(os.environ if base is None else base)
        if self.tmp is not None:
            env["PYTHONPATH"] = os.pathsep.join(p for p in (str(self.tmp), env.get("PYTHONPATH", "")) if p)
        return env

    def close(self) -> None:
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)


def versions(base: str | None) -> list[Version]:
    """The working tree, and `base` (a git revision) when given."""
    return [Version()] + ([Version(base)] if base else [])


def fmt_rate(bytes_per_s: float) -> str:
    return f"{bytes_per_s / 1e9:.2f} GB/s" if bytes_per_s >= 1e9 else f"{bytes_per_s / 1e6:.0f} MB/s"


def table(rows: list[list[Any]], header: list[str]) -> str:
    cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def have(cmd: str) -> bool:
    return shutil.which(cmd) is not None


def tf_framework(log=lambda *a, **k: None):
    """The TensorFlow framework the examples use, built in the user cache on first use (or None)."""
    from pipcook_sandbox.runner import frameworks

    try:
        return frameworks.resolve("tensorflow@2.21", log=log)
    except Exception as exc:  # no network to build it, say
        print(f"[bench] TensorFlow framework unavailable: {exc}", file=sys.stderr)
        return None


def docker_image() -> str | None:
    """A `pipcook-sandbox-worker:*` image when `docker info` works, else None."""
    if not have("docker"):
        return None
    try:
        if subprocess.run(["docker", "info"], capture_output=True, timeout=20).returncode != 0:
            return None
        out = subprocess.run(["docker", "images", "--format", "{{.Repository}}:{{.Tag}}", "pipcook-sandbox-worker"],
                             capture_output=True, text=True, timeout=20).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return None
    return out[0] if out else None
