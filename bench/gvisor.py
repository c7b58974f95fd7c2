"""What gVisor costs: the Docker backend under runsc against the same backend under runc, in one run.

    python -m bench.gvisor                   # 5 repeats
    python -m bench.gvisor --repeat 3

Needs a Docker engine with the worker image and the `runsc` runtime
registered as .ci/start-docker.sh does. Every repeat runs every variant once
(runc, then runsc), so the machine's noise hits both alike; ratios runsc/runc
are taken per repeat, then the median.

1. Stage start-up: `docker.start(StageSpec(argv=[-I, -S, -c, CODE]))` to the
   script's first line, CODE printing the time (plain) or importing numpy
   from the image's site first (a script's usual first line).
2. A CPU-heavy dataflow: `pipcook-sandbox run bench/pipelines/cpu-heavy`
   (64 128x128 images through 6 rounds of FFT, mask, inverse and a
   pure-Python row reduction each): the run's wall time and the model's
   read time (the dataflow streams into it, so that is the dataflow's work).
3. Moving tensors between two stages: `bench/pipelines/stream` (256 x 1 MiB,
   read 3 times): the model's boundary rate, and whether the shared-memory
   ring was mapped (it is not under gVisor: frames carry the bytes).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = "bench"

from bench.common import REPO_ROOT, fmt_rate, median, save, table
from bench.startup import first_time

RUNTIMES = ("runc", "runsc")
CODES = {
    "plain": "import time; print('FIRST script', repr(time.time()), flush=True)",
    "numpy": ("import sys; sys.path.insert(0, '/pipcook/site'); import numpy; import time; "
              "print('FIRST script', repr(time.time()), flush=True)"),
}


def start_once(runtime: str, code: str, tmp: Path, n: int) -> float:
    from pipcook_sandbox.runner.backends import base
    from pipcook_sandbox.runner.backends import docker as backend

    log = tmp / f"{runtime}-{n}.log"
    log.unlink(missing_ok=True)
    spec = base.StageSpec(run_id=f"benchgv{os.getpid()}x{n}", name="startup", mounts=[],
                          limits=base.Limits(timeout=300), log_path=log, argv=["-I", "-S", "-c", code],
                          labels={"runtime": runtime})
    t0 = time.time()
    handle = backend.start(spec)
    try:
        deadline = time.monotonic() + 300
        while handle.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
    finally:
        handle.terminate(base.REASON_CANCELLED)
        handle.cleanup()
    text = log.read_bytes() if log.exists() else b""
    t = first_time(text)
    if t is None:
        raise RuntimeError(f"{runtime}: no FIRST line in the stage's log: {text[-800:]!r}")
    return t - t0


def run_once(runtime: str, pipeline: Path, ws: Path) -> dict:
    shutil.rmtree(ws, ignore_errors=True)
    env = {k: v for k, v in os.environ.items() if k != "PIPCOOK_DOCKER_RUNTIME"}
    if runtime != "runc":
        env["PIPCOOK_DOCKER_RUNTIME"] = runtime
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "pipcook_sandbox", "run", str(pipeline), "-o", str(ws),
                           "--isolation", "docker", "--timeout", "600"], capture_output=True, cwd=str(REPO_ROOT),
                          env=env, timeout=900)
    wall = time.time() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{runtime}: {pipeline} failed: {proc.stderr[-1500:].decode(errors='replace')}")
    metrics = [json.loads(line) for line in (ws / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {"wall": wall, "metrics": metrics}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args(argv)
    from pipcook_sandbox.runner.backends import docker as backend

    problem = backend.runtime_problem("runsc")
    if problem:
        print(f"[gvisor] cannot measure: {problem}", file=sys.stderr)
        return 1
    tmp = Path(tempfile.mkdtemp(prefix="pcsb-gvisor-"))
    os.chmod(tmp, 0o755)
    starts: dict[str, dict[str, list[float]]] = {}
    cpu: dict[str, list[dict]] = {}
    stream: dict[str, list[dict]] = {}
    try:
        for label, code in CODES.items():
            for rt in RUNTIMES:
                start_once(rt, code, tmp, 0)  # warm-up: not counted
            for r in range(args.repeat):
                for rt in RUNTIMES:
                    starts.setdefault(label, {}).setdefault(rt, []).append(start_once(rt, code, tmp, r + 1))
                print(f"[gvisor] start-up {label} {r + 1}/{args.repeat}: " + ", ".join(
                    f"{rt} {v[-1]:.2f}s" for rt, v in starts[label].items()), file=sys.stderr, flush=True)
        for r in range(args.repeat):
            for rt in RUNTIMES:
                got = run_once(rt, REPO_ROOT / "bench" / "pipelines" / "cpu-heavy" / "pipeline.json", tmp / "ws")
                cpu.setdefault(rt, []).append({"wall": got["wall"], "read_s": got["metrics"][-1]["read_s"]})
                got = run_once(rt, REPO_ROOT / "bench" / "pipelines" / "stream" / "pipeline.json", tmp / "ws")
                last = got["metrics"][-1]
                stream.setdefault(rt, []).append({"wall": got["wall"], "boundary_Bps": last["boundary_Bps"],
                                                  "ring_bytes": last["ring_bytes"]})
            print(f"[gvisor] pipelines {r + 1}/{args.repeat}: " + ", ".join(
                f"{rt} cpu-heavy {cpu[rt][-1]['wall']:.1f}s stream {fmt_rate(stream[rt][-1]['boundary_Bps'])}"
                for rt in RUNTIMES), file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    def ratio(a: list[float], b: list[float]) -> float:
        return median([x / y for x, y in zip(a, b)])

    rows = []
    for label, per in starts.items():
        rows.append([f"stage start-up ({label})", f"{median(per['runc']):.2f} s", f"{median(per['runsc']):.2f} s",
                     f"{ratio(per['runsc'], per['runc']):.2f}x"])
    for key, what in (("wall", "cpu-heavy run, wall"), ("read_s", "cpu-heavy dataflow (model's read time)")):
        a, b = [x[key] for x in cpu["runsc"]], [x[key] for x in cpu["runc"]]
        rows.append([what, f"{median(b):.2f} s", f"{median(a):.2f} s", f"{ratio(a, b):.2f}x"])
    a, b = [x["boundary_Bps"] for x in stream["runsc"]], [x["boundary_Bps"] for x in stream["runc"]]
    rows.append(["1 MiB tensors between stages", fmt_rate(median(b)), fmt_rate(median(a)), f"{ratio(a, b):.2f}x"])
    rings = {rt: sorted({x["ring_bytes"] for x in stream[rt]}) for rt in RUNTIMES}
    print(f"\ngVisor (runsc) against runc, Docker backend, medians of {args.repeat}:")
    print(table(rows, ["what", "runc", "runsc", "runsc / runc"]))
    print(f"shared-memory ring mapped (bytes): runc {rings['runc']}, runsc {rings['runsc']}")
    path = save("gvisor", {"repeat": args.repeat, "startup": starts, "cpu_heavy": cpu, "stream": stream}, argv)
    print(f"\n(saved {path})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
