"""Warm runners through the service (issue #17, target 1 second half and target 2; docs/warm.md).

In one run, for each mode (cold: `server`, warm: `server --warm N`), a fresh
server on a fresh data dir (bwrap, local engine):

- latency: the tiny pipeline (tests/pipelines/tiny, over HTTP), submitted
  one at a time, `--gap` seconds apart (the time the pool has to refill),
  measured by the client from the POST to the terminal state (polled every
  10 ms); the first run of each mode is dropped (the pool is empty before
  a tenant's first run: every mode's first run is cold);
- throughput: `--tenants` tenants submit `--runs` tiny pipelines each, all
  at once; runs per minute from the first POST to the last terminal state.

CPU: the server's process tree (server, runners, warm runners, stages: every
process it reaped; stages reaped outside it are missed, as in bench/startup),
from getrusage(RUSAGE_CHILDREN) around each mode (the server is stopped at
the end of its mode, warm runners included), per run. The package is
byte-compiled first, as pip leaves it (bench/common.Version.compile).

    python -m bench.warm                                    # 10 latency runs, 4 x 10 for throughput
    python -m bench.warm --latency 5 --runs 5 --tenants 4   # the short setting
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from bench.common import REPO_ROOT, Version, machine, median, save
from bench.service import _cli, _serve

TINY = REPO_ROOT / "tests" / "pipelines" / "tiny"
TERMINAL = ("succeeded", "failed", "canceled")


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _start_server(data: Path, extra: list[str]) -> tuple[subprocess.Popen, str]:
    server = subprocess.Popen([sys.executable, "-m", "pipcook_sandbox", "server", "--port", "0", "--data",
                               str(data / "d"), "--allow-private", "127.0.0.1", "--isolation", "bwrap", *extra],
                              stdout=subprocess.DEVNULL, stderr=open(data / "server.log", "wb"),
                              stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            info = json.loads((data / "d" / "server.json").read_text())
            if info["pid"] == server.pid and httpx.get(info["url"] + "/healthz", timeout=5).status_code == 200:
                return server, info["url"]
        except (OSError, ValueError, httpx.HTTPError):
            pass
        time.sleep(0.2)
    raise SystemExit(f"the server did not start: {(data / 'server.log').read_text()[-2000:]}")


def _run_once(client: httpx.Client, url: str) -> tuple[float, str]:
    t0 = time.perf_counter()
    response = client.post("/v1/runs", json={"pipeline_url": url})
    response.raise_for_status()
    run_id = response.json()["id"]
    while True:
        state = client.get(f"/v1/runs/{run_id}").json()
        if state["status"] in TERMINAL:
            return time.perf_counter() - t0, state["status"]
        time.sleep(0.01)


def mode(name: str, args: argparse.Namespace, web: str) -> dict[str, Any]:
    data = Path(tempfile.mkdtemp(prefix=f"pcsb-bench-warm-{name}-"))
    os.chmod(data, 0o755)
    tokens = [_cli("tenants", "add", f"t{i}", "--data", str(data / "d"), "--cpus", "0.5", "--memory", "256m",
                   "--max-running", str(args.max_running), "--max-queued", str(max(args.runs, 20)))
              for i in range(args.tenants)]
    extra = ["--capacity-cpus", str(args.capacity_cpus)]
    if name == "warm":
        extra += ["--warm", str(args.warm), "--warm-total", str(args.warm * args.tenants)]
    cpu0 = _children_cpu()
    server, url = _start_server(data, extra)
    lat: list[float] = []
    statuses: dict[str, int] = {}
    try:
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {tokens[0]}"}, timeout=60) as client:
            for i in range(args.latency + 1):
                wall, status = _run_once(client, f"{web}/pipeline.json")
                statuses[status] = statuses.get(status, 0) + 1
                if i > 0:
                    lat.append(wall)
                time.sleep(args.gap)  # the pool refills between two submissions (a client's think time)
        done: list[float] = []
        lock = threading.Lock()
        barrier = threading.Barrier(args.tenants)
        t_start = [0.0]

        def tenant(token: str) -> None:
            with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=60) as client:
                barrier.wait()
                t_start[0] = t_start[0] or time.perf_counter()
                ids = []
                for _ in range(args.runs):
                    response = client.post("/v1/runs", json={"pipeline_url": f"{web}/pipeline.json"})
                    response.raise_for_status()
                    ids.append(response.json()["id"])
                pending = set(ids)
                while pending:
                    for run_id in list(pending):
                        state = client.get(f"/v1/runs/{run_id}").json()
                        if state["status"] in TERMINAL:
                            pending.discard(run_id)
                            with lock:
                                done.append(time.perf_counter())
                                statuses[state["status"]] = statuses.get(state["status"], 0) + 1
                    time.sleep(0.05)

        threads = [threading.Thread(target=tenant, args=(t,)) for t in tokens]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        span = max(done) - t_start[0]
    finally:
        server.terminate()
        server.wait(120)
    cpu = _children_cpu() - cpu0
    total_runs = args.latency + 1 + args.runs * args.tenants
    shutil.rmtree(data, ignore_errors=True)
    return {"latency_s": lat, "latency_median_s": median(lat), "throughput_per_min": 60 * len(done) / span,
            "throughput_span_s": span, "cpu_s_per_run": cpu / total_runs, "statuses": statuses,
            "load_after": os.getloadavg()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--latency", type=int, default=10, help="runs one at a time (after a first, dropped)")
    parser.add_argument("--gap", type=float, default=2.0, help="seconds between two latency runs")
    parser.add_argument("--tenants", type=int, default=4)
    parser.add_argument("--runs", type=int, default=10, help="runs per tenant, all at once (throughput)")
    parser.add_argument("--max-running", type=int, default=4)
    parser.add_argument("--capacity-cpus", type=float, default=8.0)
    parser.add_argument("--warm", type=int, default=2, help="warm runners per tenant (server --warm)")
    args = parser.parse_args()
    Version().compile()  # bytecode as pip leaves it, whatever PYTHONDONTWRITEBYTECODE says (bench/common.py)
    httpd, web = _serve(TINY)
    try:
        load0 = os.getloadavg()
        results = {name: mode(name, args, web) for name in ("cold", "warm")}
    finally:
        httpd.shutdown()
    cold, warm = results["cold"], results["warm"]
    summary = {
        "latency_median_s": {"cold": cold["latency_median_s"], "warm": warm["latency_median_s"],
                             "warm/cold": warm["latency_median_s"] / cold["latency_median_s"]},
        "throughput_per_min": {"cold": cold["throughput_per_min"], "warm": warm["throughput_per_min"]},
        "cpu_s_per_run": {"cold": cold["cpu_s_per_run"], "warm": warm["cpu_s_per_run"],
                          "warm/cold": warm["cpu_s_per_run"] / cold["cpu_s_per_run"]},
        "load_before": load0,
    }
    print(json.dumps(summary, indent=1))
    path = save("warm", {"args": vars(args), "machine": machine(), "results": results, "summary": summary})
    print(f"saved {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
