"""Service mode under load (issue 14, item 6).

Phase "calm": TENANTS tenants each submit RUNS tiny pipelines at once over
HTTP to a real `pipcook-sandbox server` (bwrap). Measured: all finish; each
tenant's share of completed runs at the halfway point (Jain's fairness
index, (sum x)^2 / (n sum x^2), 1.0 = equal); p50/p95 queue wait (created ->
started); server RSS over the phase; leftovers (processes, mounts under the
data dir) after it.

Phase "hostile": the same, plus one tenant that submits a fork bomb, a
memory bomb and a disk fill, then 1,000 submissions in a burst. Measured:
how many of its submissions answered 429, and the others' p95 wait against
the calm phase (target <= 1.2x).

    python -m bench.service                       # 8 tenants x 20 runs (long: ~1 hour on 2 vCPUs)
    python -m bench.service --tenants 8 --runs 3  # the short setting
    python -m bench.service --engine slurm ...    # each run a Slurm job (.ci/start-slurm.sh's cluster)

With --engine slurm the service hands every run to Slurm at once, so a run's
queue wait is measured to its job's start (sacct Start), not to its hand-over,
and its tenants are Slurm accounts (named b<random>-tN, removed afterwards).
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx

from bench.common import REPO_ROOT, machine

TINY = REPO_ROOT / "tests" / "pipelines" / "tiny"
FORK_BOMB = '''
import os


def datasource(options, ctx):
    while True:
        try:
            os.fork()
        except OSError:
            pass
'''
MEMORY_BOMB = '''
def datasource(options, ctx):
    hog = []
    while True:
        hog.append(bytearray(64 << 20))
'''
DISK_FILL = '''
import os


def datasource(options, ctx):
    with open(os.path.join(ctx.workspace.data_dir, "fill"), "wb") as f:
        while True:
            f.write(b"x" * (1 << 20))
'''


def _serve(directory: Path) -> tuple[ThreadingHTTPServer, str]:
    handler = functools.partial(_Quiet, directory=str(directory))
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd, f"http://127.0.0.1:{httpd.server_address[1]}"


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args: Any) -> None:
        pass


def _cli(*args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "pipcook_sandbox", *args], capture_output=True, text=True,
                          check=True, stdin=subprocess.DEVNULL)
    return done.stdout.strip()


def _rss(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) << 10
    except OSError:
        pass
    return 0


def _leftovers(data: Path, server_pid: int) -> dict[str, int]:
    procs = 0
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != server_pid:
            try:
                if str(data) in (entry / "cmdline").read_bytes().decode("utf-8", "replace"):
                    procs += 1
            except OSError:
                continue
    mounts = sum(str(data) in line for line in Path("/proc/self/mountinfo").read_text().splitlines())
    return {"processes": procs, "mounts": mounts}


def jain(values: list[float]) -> float:
    return sum(values) ** 2 / (len(values) * sum(v * v for v in values)) if any(values) else 1.0


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def _job_starts(job_ids: list[str]) -> dict[str, float]:
    """Slurm job id -> when the job started (epoch seconds), from accounting."""
    if not job_ids:
        return {}
    out = subprocess.run(["sacct", "-X", "-n", "-P", "-o", "JobID,Start", "-j", ",".join(job_ids)],
                         capture_output=True, text=True, check=True, env={**os.environ, "SLURM_TIME_FORMAT": "%s"})
    starts = {}
    for line in out.stdout.splitlines():
        job, _, start = line.partition("|")
        if start.isdigit():
            starts[job] = float(start)
    return starts


def phase(name: str, args: argparse.Namespace, web: str, hostile: bool) -> dict[str, Any]:
    data = Path(tempfile.mkdtemp(prefix=f"pcsb-bench-service-{name}-"))
    os.chmod(data, 0o755)
    slurm = args.engine == "slurm"
    # Slurm accounts are the cluster's, not the data dir's: names of their own, made by `tenants add`.
    prefix = f"b{os.urandom(2).hex()}-" if slurm else ""
    account = ["--slurm-account"] if slurm else []
    tokens = {f"{prefix}t{i}": _cli("tenants", "add", f"{prefix}t{i}", "--data", str(data / "d"), "--cpus", "0.5",
                                    "--memory", "256m", "--max-running", "2", "--max-queued", str(max(args.runs, 20)),
                                    *account)
              for i in range(args.tenants)}
    if hostile:
        bad = _cli("tenants", "add", f"{prefix}hostile", "--data", str(data / "d"), "--cpus", "0.5", "--memory",
                   "256m", "--disk", "64m", "--timeout", "20", "--max-running", "2", "--max-queued", "20", *account)
    engine_args = ["--engine", "slurm"] if slurm else ["--capacity-cpus", str(args.capacity_cpus)]
    if slurm and args.slurm_partition:
        engine_args += ["--slurm-partition", args.slurm_partition]
    server = subprocess.Popen([sys.executable, "-m", "pipcook_sandbox", "server", "--port", "0", "--data",
                               str(data / "d"), "--allow-private", "127.0.0.1", *engine_args,
                               "--isolation", args.isolation],
                              stdout=subprocess.DEVNULL, stderr=open(data / "server.log", "wb"),
                              stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 180
    url = ""
    while time.monotonic() < deadline:
        try:
            info = json.loads((data / "d" / "server.json").read_text())
            if info["pid"] == server.pid and httpx.get(info["url"] + "/healthz", timeout=5).status_code == 200:
                url = info["url"]
                break
        except (OSError, ValueError, httpx.HTTPError):
            pass
        time.sleep(0.5)
    if not url:
        raise SystemExit(f"the server did not start: {(data / 'server.log').read_text()[-2000:]}")
    rss: list[int] = []
    stop_sampling = threading.Event()

    def sample() -> None:
        while not stop_sampling.is_set():
            rss.append(_rss(server.pid))
            stop_sampling.wait(1.0)

    threading.Thread(target=sample, daemon=True).start()
    ids: dict[str, list[str]] = {t: [] for t in tokens}
    refused = {"hostile_429": 0, "hostile_other": 0, "hostile_accepted": 0}
    barrier = threading.Barrier(len(tokens) + (1 if hostile else 0))

    def submit_all(tenant: str, token: str) -> None:
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=60) as client:
            barrier.wait()
            for _ in range(args.runs):
                response = client.post("/v1/runs", json={"pipeline_url": f"{web}/pipeline.json"})
                response.raise_for_status()
                ids[tenant].append(response.json()["id"])

    def attack(token: str) -> None:
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=60) as client:
            barrier.wait()
            for script in ("fork.py", "memory.py", "disk.py"):
                body = {"pipeline": {"specVersion": "2.0", "datasource": f"{web}/{script}",
                                     "model": f"{web}/model.py"}}
                client.post("/v1/runs", json=body).raise_for_status()
            for _ in range(args.burst):
                code = client.post("/v1/runs", json={"pipeline_url": f"{web}/pipeline.json"}).status_code
                key = "hostile_429" if code == 429 else "hostile_accepted" if code == 202 else "hostile_other"
                refused[key] += 1

    started_at = time.time()
    threads = [threading.Thread(target=submit_all, args=(t, tok)) for t, tok in tokens.items()]
    if hostile:
        threads.append(threading.Thread(target=attack, args=(bad,)))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    total = args.tenants * args.runs
    half: dict[str, int] | None = None
    runs: dict[str, list[dict[str, Any]]] = {}
    while True:
        runs = {}
        for tenant, token in tokens.items():
            with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=60) as client:
                runs[tenant] = client.get("/v1/runs", params={"limit": 1000}).json()["runs"]
        done = {t: sum(r["status"] in ("succeeded", "failed", "canceled") for r in rs) for t, rs in runs.items()}
        if half is None and sum(done.values()) >= total / 2:
            half = done
        if sum(done.values()) >= total:
            break
        time.sleep(1.0)
    elapsed = time.time() - started_at
    if hostile:  # cancel what the hostile tenant still has, so the phase ends
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {bad}"}, timeout=60) as client:
            for run in client.get("/v1/runs", params={"limit": 1000}).json()["runs"]:
                client.post(f"/v1/runs/{run['id']}/cancel")
            hostile_runs = client.get("/v1/runs", params={"limit": 1000}).json()["runs"]
    stop_sampling.set()
    if slurm:  # handed to Slurm at once: the wait is until Slurm started the job
        starts = _job_starts([r["job"]["id"] for rs in runs.values() for r in rs if r.get("job")])
        waits = [starts[r["job"]["id"]] - r["created"] for rs in runs.values() for r in rs
                 if r.get("job") and r["job"]["id"] in starts]
    else:
        waits = [r["started"] - r["created"] for rs in runs.values() for r in rs if r["started"]]
    statuses = [r["status"] for rs in runs.values() for r in rs]
    server.send_signal(signal.SIGTERM)
    server.wait(120)
    if slurm:  # jobs outlive the server: wait for the canceled ones to leave, then drop the accounts
        names = list(tokens) + ([f"{prefix}hostile"] if hostile else [])
        for tenant in names:
            subprocess.run(["scancel", f"--account={tenant}"], capture_output=True, check=False)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and subprocess.run(
                ["squeue", "-h", "-A", ",".join(names)], capture_output=True, text=True, check=False).stdout.strip():
            time.sleep(1.0)
    left = _leftovers(data / "d", server.pid)
    if slurm:
        left["slurm_cgroups"] = len(list(Path("/sys/fs/cgroup").glob("*/slurm*/**/pipcook-sandbox")))
        for tenant in names:
            _cli("tenants", "remove", tenant, "--data", str(data / "d"), "--slurm-account")
    shutil.rmtree(data, ignore_errors=True)
    result = {
        "phase": name, "engine": args.engine, "tenants": args.tenants, "runs_each": args.runs, "elapsed_s": round(elapsed, 1),
        "succeeded": statuses.count("succeeded"), "failed": statuses.count("failed"),
        "jain_at_half": round(jain([float(v) for v in (half or {}).values()]), 4), "completed_at_half": half,
        "wait_p50_s": round(percentile(waits, 0.5), 2), "wait_p95_s": round(percentile(waits, 0.95), 2),
        "server_rss_mib": {"first": round(rss[0] / 2**20, 1) if rss else None,
                           "peak": round(max(rss) / 2**20, 1) if rss else None,
                           "last": round(rss[-1] / 2**20, 1) if rss else None},
        "leftovers": left,
    }
    if hostile:
        result.update(refused)
        result["hostile_runs"] = {s: sum(r["status"] == s for r in hostile_runs)
                                  for s in ("succeeded", "failed", "canceled")}
        result["hostile_errors"] = sorted({(r["error"] or "")[:160] for r in hostile_runs
                                           if r["status"] == "failed"})
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tenants", type=int, default=8)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--burst", type=int, default=1000)
    parser.add_argument("--capacity-cpus", type=float, default=2.0)
    parser.add_argument("--isolation", default="bwrap")
    parser.add_argument("--skip-hostile", action="store_true")
    parser.add_argument("--engine", choices=["local", "slurm"], default="local",
                        help="slurm: each run a Slurm job (--capacity-cpus is then Slurm's business)")
    parser.add_argument("--slurm-partition")
    args = parser.parse_args()
    site = Path(tempfile.mkdtemp(prefix="pcsb-bench-site-"))
    for name in ("pipeline.json", "datasource.py", "dataflow.py", "model.py"):
        (site / name).write_bytes((TINY / name).read_bytes())
    (site / "fork.py").write_text(FORK_BOMB)
    (site / "memory.py").write_text(MEMORY_BOMB)
    (site / "disk.py").write_text(DISK_FILL)
    httpd, web = _serve(site)
    results = {"machine": machine(), "command": " ".join(sys.argv), "phases": []}
    try:
        calm = phase("calm", args, web, hostile=False)
        results["phases"].append(calm)
        print(json.dumps(calm, indent=2), flush=True)
        if not args.skip_hostile:
            rough = phase("hostile", args, web, hostile=True)
            rough["p95_vs_calm"] = round(rough["wait_p95_s"] / calm["wait_p95_s"], 2) if calm["wait_p95_s"] else None
            results["phases"].append(rough)
            print(json.dumps(rough, indent=2), flush=True)
    finally:
        httpd.shutdown()
        shutil.rmtree(site, ignore_errors=True)
    out = REPO_ROOT / "bench" / "out"
    out.mkdir(parents=True, exist_ok=True)
    target = out / ("service.json" if args.engine == "local" else f"service-{args.engine}.json")
    target.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {target}")


if __name__ == "__main__":
    main()
