"""End to end: the image-classification example trained four ways, wall time against a bare process.

    python -m bench.e2e                      # both pipelines, every runner available, 3 repeats
    python -m bench.e2e --quick              # 3 epochs, 1 repeat
    python -m bench.e2e --pipeline image --runner bare --runner bwrap

Runners (each from a fresh workspace, so each draws its images again):

    bare    python bench/bare_harness.py PIPELINE (one bare process, no sandbox): the baseline
    bwrap   pipcook-sandbox run PIPELINE --isolation bwrap
    docker  pipcook-sandbox run PIPELINE --isolation docker (when `docker info` works and
            a pipcook-sandbox-worker image exists)
    mlflow  mlflow run bench/mlflow_project --env-manager local (MLflow 3, file store): the
            same scripts chained by the bare harness inside an MLflow run, metrics logged

Pipelines:

    image        examples/image-classification/pipeline.json as shipped
    image-heavy  bench/pipelines/image-heavy: the same datasource and model, and a dataflow
                 that does deliberately CPU-heavy augmentation (one round of 4x upscale,
                 rotation, blur, unsharp mask, per image, each time it is read); in one process
                 that work and training take turns, in the sandbox they overlap

Thread settings are the same for all: inside a sandbox the framework's
initialize sets TF_NUM_INTRAOP_THREADS=cpus, TF_NUM_INTEROP_THREADS=min(2,
cpus), OMP_NUM_THREADS=cpus (cpus = the stage's CPU quota, by default the
host's cores); for bare and mlflow the same variables are set to the same
values in the environment, with TF_CPP_MIN_LOG_LEVEL=2 and
CUDA_VISIBLE_DEVICES=-1, and TensorFlow comes from the same framework
directory (on PYTHONPATH).

Each repeat runs every runner once, in turn; the ratio of each runner to
the bare run of the same repeat is computed per repeat, then the median.
Targets: bwrap <= 1.10x bare on `image`, < 1.0x on `image-heavy`, never
slower than mlflow.
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
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = "bench"

from bench.common import REPO_ROOT, docker_image, have, median, save, table, tf_framework  # noqa: E402

PIPELINES = {
    "image": REPO_ROOT / "examples" / "image-classification" / "pipeline.json",
    "image-heavy": REPO_ROOT / "bench" / "pipelines" / "image-heavy" / "pipeline.json",
}
RUNNERS = ("bare", "bwrap", "docker", "mlflow")


def thread_env(cpus: float) -> dict[str, str]:
    """What frameworks/tensorflow/initialize.py sets inside a stage with this CPU quota."""
    n = max(1, int(cpus + 0.5))
    return {"TF_NUM_INTRAOP_THREADS": str(n), "TF_NUM_INTEROP_THREADS": str(min(2, n)), "OMP_NUM_THREADS": str(n),
            "TF_CPP_MIN_LOG_LEVEL": "2", "KERAS_BACKEND": "tensorflow", "CUDA_VISIBLE_DEVICES": "-1"}


def variant(pipeline: Path, epochs: int | None) -> tuple[Path, bool]:
    """The pipeline, or a copy beside it with fewer epochs (relative script paths keep working)."""
    if epochs is None:
        return pipeline, False
    spec = json.loads(pipeline.read_text())
    spec.setdefault("options", {}).setdefault("train", {})["epochs"] = epochs
    tmp = pipeline.parent / f".bench-{pipeline.stem}-{os.getpid()}.json"
    tmp.write_text(json.dumps(spec, indent=2))
    return tmp, True


def run_once(runner: str, pipeline: Path, ws: Path, site: Path, env_threads: dict, mlruns: Path) -> dict:
    shutil.rmtree(ws, ignore_errors=True)
    env = dict(os.environ)
    if runner in ("bare", "mlflow"):
        env.update(env_threads)
        env["PYTHONPATH"] = str(site)
    if runner == "bare":
        cmd = [sys.executable, str(REPO_ROOT / "bench" / "bare_harness.py"), str(pipeline), "-o", str(ws)]
    elif runner == "mlflow":
        env.update(MLFLOW_ALLOW_FILE_STORE="true", MLFLOW_TRACKING_URI=mlruns.as_uri())
        cmd = ["mlflow", "run", str(REPO_ROOT / "bench" / "mlflow_project"), "--env-manager", "local",
               "-P", f"pipeline={pipeline}", "-P", f"output={ws}"]
    else:
        # image-heavy names the example's scripts in ../../../examples: the operator allows that directory
        cmd = [sys.executable, "-m", "pipcook_sandbox", "run", str(pipeline), "-o", str(ws), "--isolation", runner,
               "--allow-path", str(REPO_ROOT / "examples")]
    from bench.scale import Sampler

    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    owners: set[int] = set()
    with Sampler(owners, interval=0.1) as sampler:  # the stages' processes, found through their cgroups
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=str(REPO_ROOT),
                                env=env)
        owners.add(proc.pid)
        _, stderr = proc.communicate(timeout=3600)
        wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    # CPU seconds: the command and what it waited for (bare, mlflow: everything; the runner), plus
    # every process seen in a stage's cgroup (bwrap stages are not reaped into the runner's rusage).
    # Docker's containers are containerd's children, in cgroups of their own: not counted.
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime) + sampler.stage_cpu_seconds()
    if proc.returncode != 0:
        raise RuntimeError(f"{runner} failed ({proc.returncode}): {' '.join(cmd)}\n{stderr[-3000:]}")
    acc = None
    metrics = ws / "metrics.jsonl"
    if metrics.is_file():
        for line in metrics.read_text().splitlines():
            rec = json.loads(line)
            if "test_accuracy" in rec:
                acc = rec["test_accuracy"]
    return {"wall": wall, "cpu": cpu, "test_accuracy": acc}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pipeline", action="append", choices=list(PIPELINES))
    ap.add_argument("--runner", action="append", choices=list(RUNNERS))
    ap.add_argument("--repeat", type=int, default=None, help="default 3 (quick: 1)")
    ap.add_argument("--epochs", type=int, default=None, help="override the pipelines' epochs (quick: 3)")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    repeat = args.repeat or (1 if args.quick else 3)
    epochs = args.epochs or (3 if args.quick else None)

    framework = tf_framework(log=lambda *a, **k: print(*a, file=sys.stderr, **k))
    if framework is None:
        print("[e2e] needs the TensorFlow framework (runner.frameworks.resolve('tensorflow@2.21')): skipped")
        save("e2e", {"skipped": "no TensorFlow framework"}, argv)
        return 0
    runners = list(args.runner or RUNNERS)
    if "docker" in runners and docker_image() is None:
        print("[e2e] docker: no engine or no pipcook-sandbox-worker image: skipped", file=sys.stderr)
        runners.remove("docker")
    if "mlflow" in runners and not have("mlflow"):
        print("[e2e] mlflow: not installed (pip install mlflow-skinny): skipped", file=sys.stderr)
        runners.remove("mlflow")
    if "bare" not in runners:
        runners.insert(0, "bare")
    from pipcook_sandbox.runner.limits import from_options

    cpus = from_options(None, None, None, None, None).cpus  # the runner's default quota per stage
    env_threads = thread_env(cpus)

    results: dict[str, dict] = {}
    tmp = Path(tempfile.mkdtemp(prefix="pcsb-e2e-"))
    try:
        for name in args.pipeline or list(PIPELINES):
            pipeline, temporary = variant(PIPELINES[name], epochs)
            runs: dict[str, list[dict]] = {r: [] for r in runners}
            try:
                for r in range(repeat):
                    for runner in runners:
                        res = run_once(runner, pipeline, tmp / f"ws-{runner}", framework.site, env_threads, tmp / "mlruns")
                        runs[runner].append(res)
                        print(f"[e2e] {name} repeat {r + 1}/{repeat} {runner}: {res['wall']:.1f}s wall, {res['cpu']:.1f}s CPU "
                              f"test_accuracy={res['test_accuracy']}", file=sys.stderr, flush=True)
            finally:
                if temporary:
                    pipeline.unlink()
            bare = [x["wall"] for x in runs["bare"]]
            out = {}
            for runner in runners:
                walls = [x["wall"] for x in runs[runner]]
                cpus = [x["cpu"] for x in runs[runner]]
                out[runner] = {"wall_s": median(walls), "ratio_bare": median([w / b for w, b in zip(walls, bare)]),
                               "cpu_s": median(cpus), "cpu_ratio_bare": median([c / x["cpu"] for c, x in zip(cpus, runs["bare"])]),
                               "cpus": cpus,
                               "test_accuracy": [x["test_accuracy"] for x in runs[runner]], "walls": walls}
            if "mlflow" in runs:
                ml = [x["wall"] for x in runs["mlflow"]]
                for runner in runners:
                    out[runner]["ratio_mlflow"] = median([x["wall"] / m for x, m in zip(runs[runner], ml)])
            results[name] = out
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    rows = []
    for name, out in results.items():
        for runner, r in out.items():
            acc = [a for a in r["test_accuracy"] if a is not None]
            rows.append([name, runner, f"{r['wall_s']:.1f}", f"{r['ratio_bare']:.2f}",
                         f"{r['ratio_mlflow']:.2f}" if "ratio_mlflow" in r else "-",
                         "-" if runner == "docker" else f"{r['cpu_s']:.0f} ({r['cpu_ratio_bare']:.2f})",
                         f"{median(acc):.4f}" if acc else "-"])
    print(f"\nTraining wall time (medians of {repeat}; epochs {'as shipped' if epochs is None else epochs}; "
          f"threads {env_threads['TF_NUM_INTRAOP_THREADS']} intra / {env_threads['TF_NUM_INTEROP_THREADS']} inter):")
    print(table(rows, ["pipeline", "runner", "wall s", "x bare", "x mlflow", "CPU s (x bare)", "test accuracy"]))
    path = save("e2e", {"repeat": repeat, "epochs": epochs, "threads": env_threads, "results": results}, argv)
    print(f"\n(saved {path})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
