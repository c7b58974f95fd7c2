"""Many pipelines on one host, and a 2 GiB stream through one: throughput, limits, the runner's memory.

    python -m bench.scale                    # N = 1, 2, 4, 8 and the 2 GiB stream, bwrap
    python -m bench.scale --n 1 --n 4 --no-stream
    python -m bench.scale --stream-gib 0.5 --isolation none

1. N copies of tests/pipelines/tiny (datasource, dataflow, model, a zip
   artifact; no TensorFlow) started at once with `pipcook-sandbox run`, each
   in its own workspace. Reports pipelines per minute (N / wall time of the
   slowest), each run's exit code, each stage's memory peak read from its
   cgroup while it ran (memory.peak on cgroup v2, memory.max_usage_in_bytes
   on v1; sampled every 50 ms, so a peak in the last 50 ms of a stage can be
   missed), and what was left behind: state dirs /tmp/pcsb-*, cgroups of
   these runs, mounts, and any process seen in a stage's cgroup that is
   still alive.
2. bench/pipelines/stream2g: a datasource making 2048 x 1 MiB arrays on
   demand -> a dataflow adding 1 to every byte -> a model checking each one,
   i.e. 2 GiB through two boundaries. Reports the RSS of the `pipcook-sandbox
   run` process sampled every 100 ms (start, peak, end: it should stay flat,
   since stages carry the data, not the runner), each stage's cgroup memory
   peak, and the rate the model saw.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = "bench"

from bench.common import REPO_ROOT, median, save, table  # noqa: E402

TINY = REPO_ROOT / "tests" / "pipelines" / "tiny" / "pipeline.json"
STREAM = REPO_ROOT / "bench" / "pipelines" / "stream2g" / "pipeline.json"


def cgroup_roots() -> list[Path]:
    """Where the runner (a child of this process, same cgroup) makes its stages' cgroups."""
    roots = []
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return roots
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            base = Path("/sys/fs/cgroup") / path.lstrip("/")
        elif "memory" in controllers.split(","):
            base = Path("/sys/fs/cgroup/memory") / path.lstrip("/")
        else:
            continue
        for b in (base, base.parent):
            roots.append(b / "pipcook-sandbox")
    return roots


class Sampler:
    """Polls the stages' cgroups (memory peak, pids) and, optionally, one process's RSS."""

    def __init__(self, owners: set[int], rss_pid: int | None = None, interval: float = 0.05) -> None:
        self.owners = owners  # runner pids whose stages to watch (filled in as they start)
        self.state_dirs: set[Path] = set()
        self.roots = cgroup_roots()
        self.rss_pid = rss_pid
        self.interval = interval
        self.peaks: dict[str, int] = {}  # cgroup name -> bytes
        self.pids: dict[int, str] = {}  # pid -> its /proc/<pid>/stat start time
        self.ticks: dict[tuple[int, str], int] = {}  # (pid, start time) -> utime + stime, last seen
        self.groups: dict[tuple[int, str], str] = {}  # (pid, start time) -> its stage's cgroup name
        self.rss: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "Sampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def cpu_by_stage(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for key, ticks in self.ticks.items():
            stage = self.groups[key].split("-", 2)[-1]
            out[stage] = out.get(stage, 0.0) + ticks / os.sysconf("SC_CLK_TCK")
        return out

    def stage_cpu_seconds(self) -> float:
        """CPU time of every process seen in the watched stages' cgroups (last sample of each)."""
        return sum(self.ticks.values()) / os.sysconf("SC_CLK_TCK")

    def _run(self) -> None:
        t0 = time.monotonic()
        while not self._stop.is_set():
            for root in self.roots:
                try:
                    entries = list(os.scandir(root))
                except OSError:
                    continue
                for e in entries:
                    m = re.match(r"(\d+)-", e.name)
                    if not e.is_dir(follow_symlinks=False) or not m or int(m.group(1)) not in self.owners:
                        continue
                    d = Path(e.path)
                    for f in ("memory.peak", "memory.max_usage_in_bytes"):
                        try:
                            v = int((d / f).read_text())
                        except (OSError, ValueError):
                            continue
                        self.peaks[e.name] = max(self.peaks.get(e.name, 0), v)
                    try:
                        for p in (d / "cgroup.procs").read_text().split():
                            pid = int(p)
                            if pid not in self.pids:
                                self.pids[pid] = _start_time(pid)
                            t = _cpu_ticks(pid)
                            if t is not None:
                                self.ticks[(pid, t[0])] = t[1]
                                self.groups[(pid, t[0])] = e.name
                    except (OSError, ValueError):
                        pass
            for d in Path(tempfile.gettempdir()).glob("pcsb-*"):
                if d not in self.state_dirs:
                    try:
                        if json.loads((d / "run.json").read_text()).get("runner_pid") in self.owners:
                            self.state_dirs.add(d)
                    except (OSError, ValueError):
                        pass
            if self.rss_pid is not None:
                try:
                    for line in open(f"/proc/{self.rss_pid}/status"):
                        if line.startswith("VmRSS:"):
                            self.rss.append((time.monotonic() - t0, int(line.split()[1]) * 1024))
                except OSError:
                    pass
            self._stop.wait(self.interval)


def _cpu_ticks(pid: int) -> tuple[str, int] | None:
    """(start time, utime + stime in clock ticks) of a process, threads included."""
    try:
        f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return f[19], int(f[11]) + int(f[12])
    except (OSError, IndexError, ValueError):
        return None


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""


def _start_time(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def leftovers(runner_pids: list[int], sampler: Sampler) -> list[str]:
    """What these runs left: their state dirs, cgroups, mounts, processes."""
    found = [f"state dir {d}" for d in sampler.state_dirs if d.exists()]
    for root in sampler.roots:
        for d in root.glob("*") if root.is_dir() else []:
            if any(d.name.startswith(f"{pid}-") for pid in runner_pids):
                found.append(f"cgroup {d}")
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            mp = line.split()[1]
            if any(mp.startswith(str(d) + "/") for d in sampler.state_dirs):
                found.append(f"mount {mp}")
    except OSError:
        pass
    time.sleep(1.0)  # stages' processes exit with the runner; init reaps the last zombies
    for pid, start in sampler.pids.items():
        if start and _start_time(pid) == start and _state(pid) not in ("Z", "X", ""):
            found.append(f"process {pid} still alive")
    return found


def run_cmd(pipeline: Path, ws: Path, isolation: str) -> list[str]:
    return [sys.executable, "-m", "pipcook_sandbox", "run", str(pipeline), "-o", str(ws), "--isolation", isolation]


def concurrent(n: int, isolation: str, tmp: Path) -> dict:
    owners: set[int] = set()
    with Sampler(owners) as sampler:
        t0 = time.perf_counter()
        procs = []
        for i in range(n):
            ws = tmp / f"ws-{n}-{i}"
            procs.append(subprocess.Popen(run_cmd(TINY, ws, isolation), cwd=str(REPO_ROOT), stdout=subprocess.DEVNULL,
                                          stderr=subprocess.PIPE))
            owners.add(procs[-1].pid)
        codes, errors = [], []
        for p in procs:
            _, err = p.communicate(timeout=900)
            codes.append(p.returncode)
            if p.returncode:
                errors.append(err.decode(errors="replace")[-500:])
        wall = time.perf_counter() - t0
    runner_pids = [p.pid for p in procs]
    per_run: dict[int, dict[str, int]] = {pid: {} for pid in runner_pids}
    for name, peak in sampler.peaks.items():
        m = re.match(r"(\d+)-[0-9a-f]+-(.+)$", name)
        if m and int(m.group(1)) in per_run:
            per_run[int(m.group(1))][m.group(2)] = peak
    artifacts_ok = all((tmp / f"ws-{n}-{i}" / "model.zip").exists() or any((tmp / f"ws-{n}-{i}").rglob("model.zip"))
                       for i in range(n))
    return {
        "n": n, "wall_s": wall, "pipelines_per_min": 60.0 * n / wall, "exit_codes": codes, "errors": errors,
        "artifacts_ok": artifacts_ok, "stage_peaks": {str(k): v for k, v in per_run.items()},
        "leftovers": leftovers(runner_pids, sampler),
    }


def stream(isolation: str, gib: float, tmp: Path) -> dict:
    count = max(1, int(gib * 1024))
    spec = json.loads(STREAM.read_text())
    spec["datasource"] = f"datasource.py?count={count}&mib=1"
    pipeline = STREAM.parent / f".bench-{os.getpid()}.json"
    pipeline.write_text(json.dumps(spec))
    ws = tmp / "ws-stream"
    try:
        t0 = time.perf_counter()
        proc = subprocess.Popen(run_cmd(pipeline, ws, isolation), cwd=str(REPO_ROOT), stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)
        with Sampler({proc.pid}, rss_pid=proc.pid, interval=0.1) as sampler:
            _, err = proc.communicate(timeout=1800)
        wall = time.perf_counter() - t0
    finally:
        pipeline.unlink()
    if proc.returncode != 0:
        return {"error": err.decode(errors="replace")[-2000:], "exit_code": proc.returncode}
    metrics = [json.loads(line) for line in (ws / "metrics.jsonl").read_text().splitlines()]
    rss = [r for _, r in sampler.rss]
    # "flat": the RSS once the stages run (after the runner's own imports) against its end value
    steady = rss[len(rss) // 5:] if len(rss) >= 5 else rss
    peaks = {}
    for name, peak in sampler.peaks.items():
        m = re.match(r"(\d+)-[0-9a-f]+-(.+)$", name)
        if m and int(m.group(1)) == proc.pid:
            peaks[m.group(2)] = peak
    return {
        "bytes": metrics[-1]["bytes"], "model_Bps": metrics[-1]["Bps"], "wall_s": wall,
        "runner_rss_start": rss[0] if rss else None, "runner_rss_peak": max(rss) if rss else None,
        "runner_rss_end": rss[-1] if rss else None, "runner_rss_steady_min": min(steady) if steady else None,
        "runner_rss_steady_max": max(steady) if steady else None, "rss_samples": len(rss),
        "rss_series": [[round(t, 2), r] for t, r in sampler.rss[:: max(1, len(sampler.rss) // 60)]],
        "stage_peaks": peaks, "leftovers": leftovers([proc.pid], sampler),
    }


def mib(x: int | None) -> str:
    return "-" if x is None else f"{x / (1 << 20):.0f} MiB"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", action="append", type=int, help="pipelines at once (repeatable; default 1 2 4 8)")
    ap.add_argument("--isolation", default="bwrap")
    ap.add_argument("--repeat", type=int, default=1, help="repeats of each N (medians)")
    ap.add_argument("--no-stream", action="store_true", help="skip the 2 GiB stream")
    ap.add_argument("--stream-gib", type=float, default=2.0)
    args = ap.parse_args(argv)
    ns = args.n or [1, 2, 4, 8]
    tmp = Path(tempfile.mkdtemp(prefix="pcsb-scale-"))
    results, stream_res = [], None
    try:
        for n in ns:
            reps = []
            for r in range(args.repeat):
                res = concurrent(n, args.isolation, tmp)
                reps.append(res)
                print(f"[scale] N={n}: {res['wall_s']:.1f}s, {res['pipelines_per_min']:.1f}/min, exit codes "
                      f"{res['exit_codes']}, leftovers {len(res['leftovers'])}", file=sys.stderr, flush=True)
                for i in range(n):
                    shutil.rmtree(tmp / f"ws-{n}-{i}", ignore_errors=True)
            best = reps[-1]
            best["pipelines_per_min"] = median([x["pipelines_per_min"] for x in reps])
            best["wall_s"] = median([x["wall_s"] for x in reps])
            best["exit_codes"] = [c for x in reps for c in x["exit_codes"]]
            best["leftovers"] = [lo for x in reps for lo in x["leftovers"]]
            results.append(best)
        if not args.no_stream:
            stream_res = stream(args.isolation, args.stream_gib, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    rows = []
    base = results[0]["pipelines_per_min"] if results else 1.0
    for r in results:
        peaks = [v for run in r["stage_peaks"].values() for v in run.values()]
        rows.append([r["n"], f"{r['wall_s']:.1f}", f"{r['pipelines_per_min']:.1f}", f"{r['pipelines_per_min'] / base:.2f}",
                     "yes" if all(c == 0 for c in r["exit_codes"]) else f"NO {r['exit_codes']}",
                     mib(max(peaks)) if peaks else "-", "none" if not r["leftovers"] else "; ".join(r["leftovers"][:3])])
    print(f"\n{args.isolation}: N copies of tests/pipelines/tiny at once ({os.cpu_count()} CPUs):")
    print(table(rows, ["N", "wall s", "pipelines/min", "x N=1", "all exit 0", "max stage memory peak", "leftovers"]))
    if stream_res:
        if "error" in stream_res:
            print(f"\n2 GiB stream FAILED: {stream_res['error']}")
        else:
            s = stream_res
            print(f"\n{s['bytes'] / (1 << 30):.2f} GiB through datasource -> dataflow -> model ({args.isolation}): "
                  f"{s['wall_s']:.1f}s wall, model saw {s['model_Bps'] / 1e9:.2f} GB/s")
            print(f"runner RSS: start {mib(s['runner_rss_start'])}, peak {mib(s['runner_rss_peak'])}, end "
                  f"{mib(s['runner_rss_end'])} (while stages ran: {mib(s['runner_rss_steady_min'])} .. "
                  f"{mib(s['runner_rss_steady_max'])}; {s['rss_samples']} samples)")
            print("stage memory peaks (cgroup): " + ", ".join(f"{k} {mib(v)}" for k, v in s["stage_peaks"].items()))
            print(f"leftovers: {'none' if not s['leftovers'] else s['leftovers']}")
    path = save("scale", {"isolation": args.isolation, "concurrent": results, "stream": stream_res}, argv)
    print(f"\n(saved {path})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
