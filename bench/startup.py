"""Stage start-up: time from "start this stage" to the script's first line, per backend.

    python -m bench.startup                  # 5 repeats of everything available
    python -m bench.startup --repeat 9 --no-tf

Two levels, each against a bare process measured in the same run,
interleaved (every repeat runs every variant once, so the machine's noise
hits all of them alike; medians reported):

1. Backend. `get_backend(name).start(StageSpec(..., argv=[...]))` runs
   `python -I -S -c CODE` in a fresh sandbox (bwrap; docker when `docker
   info` works and a `pipcook-sandbox-worker:*` image exists); CODE prints
   `time.time()` as its first line, or after `import tensorflow` (the
   framework built in the user cache, mounted at /pipcook/framework as for
   a real stage). The clock starts just before `start()`, so it counts
   everything the backend does (cgroup, seccomp filter, bwrap/containerd,
   the interpreter) and the reference is `subprocess.Popen([python, -I, -S,
   -c, CODE])` of the same CODE with the framework at its host path (what
   the `none` backend starts).

2. Pipeline. `pipcook-sandbox run` of bench/pipelines/startup (a
   datasource and a model that print the time as their first line; the
   model imports TensorFlow first with --tf) per isolation (none, bwrap,
   docker), against `bench/bare_harness.py` running the same scripts in one
   bare process. Reports the time from launching the command to each
   script's first line and the whole run's wall time. The stages of a run
   start together, so the model's first line is what a pipeline waits for.

3. `--tiny`: tests/pipelines/tiny (datasource, dataflow, model, a zip
   artifact) from `pipcook-sandbox run` per isolation against the bare
   harness, wall and CPU seconds; `--base REV` runs git revision REV's code
   in turn with the working tree's (issue #17 target 1: bwrap <= 0.6 s).

Overhead = sandboxed - bare. Targets: under 0.3 s per stage for bwrap,
under 1 s for docker.
"""
from __future__ import annotations

import argparse
import os
import re
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

from bench.common import (  # noqa: E402
    REPO_ROOT,
    Version,
    docker_image,
    median,
    save,
    table,
    tf_framework,
    versions,
)

FIRST = re.compile(rb"FIRST (\S+) ([0-9.]+)")
TF_ENV = "import os; os.environ.update(TF_CPP_MIN_LOG_LEVEL='2', CUDA_VISIBLE_DEVICES='-1', KERAS_BACKEND='tensorflow'); "


def code(tf_site: str | None) -> str:
    if tf_site is None:
        return "import time; print('FIRST script', repr(time.time()), flush=True)"
    return (f"import sys; sys.path.insert(0, {tf_site!r}); " + TF_ENV +
            "import tensorflow; import time; print('FIRST script', repr(time.time()), flush=True)")


def first_time(text: bytes, what: str = "script") -> float | None:
    for m in FIRST.finditer(text):
        if m.group(1).decode() == what:
            return float(m.group(2))
    return None


# ----------------------------------------------------------------- level 1: a backend


def bare_once(tf_site: str | None) -> float:
    t0 = time.time()
    out = subprocess.run([sys.executable, "-I", "-S", "-c", code(tf_site)], capture_output=True, timeout=300).stdout
    t = first_time(out)
    if t is None:
        raise RuntimeError(f"bare python printed no FIRST line: {out[-500:]!r}")
    return t - t0


def backend_once(name: str, framework, tmp: Path, n: int, label: str = "") -> float:
    from pipcook_sandbox.runner.backends import base, get_backend

    mounts = []
    site = None
    if framework is not None:
        mounts.append(base.Mount(framework.dir, base.IN_FRAMEWORK))
        site = f"{base.IN_FRAMEWORK}/site"
    log = tmp / f"{name}-{label}-{n}.log"
    log.unlink(missing_ok=True)  # the backends append to a stage's log
    spec = base.StageSpec(run_id=f"bench{os.getpid()}x{n}", name="startup", mounts=mounts,
                          limits=base.Limits(timeout=300), log_path=log, argv=["-I", "-S", "-c", code(site)],
                          labels={"run_id": f"bench{os.getpid()}x{n}", "stage": "startup"})
    backend = get_backend(name)
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
        raise RuntimeError(f"{name}: no FIRST line in the stage's log: {text[-800:]!r}")
    return t - t0


def level_backend(backends: list[str], framework, repeat: int, with_tf: bool) -> dict:
    variants = [("plain", None)] + ([("tensorflow", framework)] if with_tf and framework is not None else [])
    runs: dict[str, dict[str, list[float]]] = {}
    tmp = Path(tempfile.mkdtemp(prefix="pcsb-startup-"))
    os.chmod(tmp, 0o755)
    try:
        for label, fw in variants:
            # warm-up (page cache, docker's image layers): not counted
            bare_once(str(fw.site) if fw else None)
            for b in backends:
                backend_once(b, fw, tmp, 0, label)
            for r in range(repeat):
                runs.setdefault(label, {}).setdefault("bare", []).append(bare_once(str(fw.site) if fw else None))
                for b in backends:
                    runs[label].setdefault(b, []).append(backend_once(b, fw, tmp, r + 1, label))
                print(f"[startup] {label} repeat {r + 1}/{repeat}: " + ", ".join(
                    f"{k} {v[-1]:.2f}s" for k, v in runs[label].items()), file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    out = {}
    for label, per in runs.items():
        bare = per["bare"]
        out[label] = {"bare_s": median(bare)}
        for b in backends:
            out[label][b] = {
                "s": median(per[b]),
                "overhead_s": median([x - y for x, y in zip(per[b], bare)]),
                "ratio": median([x / y for x, y in zip(per[b], bare)]),
                "runs": per[b],
            }
        out[label]["bare_runs"] = bare
    return out


# ----------------------------------------------------------------- level 2: a whole pipeline


def pipeline_once(isolation: str | None, tf: bool, ws: Path) -> dict:
    """Times from launching the command to each script's first line, and the wall time."""
    pipeline = REPO_ROOT / "bench" / "pipelines" / "startup" / ("pipeline-tf.json" if tf else "pipeline.json")
    shutil.rmtree(ws, ignore_errors=True)
    env = dict(os.environ)
    if isolation is None:
        fw = tf_framework() if tf else None
        if fw is not None:
            env["PYTHONPATH"] = str(fw.site)
        cmd = [sys.executable, str(REPO_ROOT / "bench" / "bare_harness.py"), str(pipeline), "-o", str(ws)]
    else:
        cmd = [sys.executable, "-m", "pipcook_sandbox", "run", str(pipeline), "-o", str(ws), "--isolation", isolation]
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, cwd=str(REPO_ROOT), env=env, timeout=600)
    wall = time.time() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {proc.stderr[-1500:].decode(errors='replace')}")
    text = proc.stdout + proc.stderr
    for log in (ws / "logs").glob("*.log") if (ws / "logs").is_dir() else []:
        text += log.read_bytes()
    firsts = {}
    for stage in ("datasource", "model"):
        t = first_time(text, stage)
        if t is None:
            raise RuntimeError(f"no FIRST {stage} line ({isolation or 'bare'})")
        firsts[stage] = t - t0
    return {"wall": wall, **firsts}


def level_pipeline(isolations: list[str], repeat: int, with_tf: bool) -> dict:
    out = {}
    ws = Path(tempfile.mkdtemp(prefix="pcsb-startup-ws-"))
    try:
        for tf in ([False, True] if with_tf else [False]):
            label = "tensorflow" if tf else "plain"
            per: dict[str, list[dict]] = {}
            for who in [None, *isolations]:
                pipeline_once(who, tf, ws)  # warm-up
            for r in range(repeat):
                for who in [None, *isolations]:
                    per.setdefault(who or "bare", []).append(pipeline_once(who, tf, ws))
                print(f"[startup] pipeline {label} repeat {r + 1}/{repeat}: " + ", ".join(
                    f"{k} model@{v[-1]['model']:.2f}s wall {v[-1]['wall']:.2f}s" for k, v in per.items()),
                    file=sys.stderr, flush=True)
            bare = per["bare"]
            res = {"bare": {k: median([x[k] for x in bare]) for k in ("datasource", "model", "wall")}}
            for iso in isolations:
                runs = per[iso]
                res[iso] = {k: median([x[k] for x in runs]) for k in ("datasource", "model", "wall")}
                for k in ("datasource", "model", "wall"):
                    res[iso][f"{k}_overhead"] = median([x[k] - y[k] for x, y in zip(runs, bare)])
                res[iso]["wall_ratio"] = median([x["wall"] / y["wall"] for x, y in zip(runs, bare)])
                res[iso]["runs"] = runs
            res["bare"]["runs"] = bare
            out[label] = res
    finally:
        shutil.rmtree(ws, ignore_errors=True)
    return out


# ----------------------------------------------------------------- level 3: a trivial pipeline, whole


TINY = REPO_ROOT / "tests" / "pipelines" / "tiny" / "pipeline.json"
TINY_TARGET_S = 0.6  # issue #17 target 1: bwrap from the CLI


def tiny_once(who: str, version: Version, ws: Path) -> dict:
    """Wall and CPU seconds (the command and every child it waited for) of one run of tests/pipelines/tiny."""
    shutil.rmtree(ws, ignore_errors=True)
    if who == "bare":
        cmd = [sys.executable, str(REPO_ROOT / "bench" / "bare_harness.py"), str(TINY), "-o", str(ws)]
    else:
        cmd = [sys.executable, "-m", "pipcook_sandbox", "run", str(TINY), "-o", str(ws), "--isolation", who]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, cwd=str(REPO_ROOT), env=version.env(), timeout=600)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {proc.stderr[-1500:].decode(errors='replace')}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall": wall, "cpu": cpu}


def level_tiny(isolations: list[str], repeat: int, base: str | None) -> dict:
    """tests/pipelines/tiny from the CLI per isolation, beside the bare harness (and, with `base`, the
    same isolations with git revision `base`'s code), every variant once per repeat, in turn."""
    vers = versions(base)
    variants = [("bare", vers[0])] + [(iso, v) for v in vers for iso in isolations]
    runs: dict[str, list[dict]] = {}
    ws = Path(tempfile.mkdtemp(prefix="pcsb-tiny-ws-"))
    try:
        for v in vers:
            v.compile()
        for who, v in variants:
            tiny_once(who, v, ws)  # warm-up: page cache, worker site, framework-free cache
        for r in range(repeat):
            order = variants if r % 2 == 0 else variants[::-1]
            for who, v in order:
                runs.setdefault(f"{who} {v.label}" if who != "bare" else "bare", []).append(tiny_once(who, v, ws))
            print(f"[startup] tiny repeat {r + 1}/{repeat}: " + ", ".join(
                f"{k} {x[-1]['wall']:.2f}s" for k, x in runs.items()), file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(ws, ignore_errors=True)
        for v in vers:
            v.close()
    bare = runs["bare"]
    out = {}
    for key, xs in runs.items():
        out[key] = {
            "wall": median([x["wall"] for x in xs]), "cpu": median([x["cpu"] for x in xs]),
            "wall_over_bare": median([x["wall"] - b["wall"] for x, b in zip(xs, bare)]),
            "cpu_over_bare": median([x["cpu"] - b["cpu"] for x, b in zip(xs, bare)]),
            "runs": xs,
        }
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--no-tf", action="store_true", help="skip the `import tensorflow` variants")
    ap.add_argument("--no-pipeline", action="store_true", help="only the backend level")
    ap.add_argument("--backend", action="append", help="only these backends (bwrap, docker, none)")
    ap.add_argument("--tiny", action="store_true", help="only tests/pipelines/tiny, whole, from the CLI (issue #17 target 1)")
    ap.add_argument("--base", metavar="REV", help="--tiny: also run git revision REV's code, in turn with the working tree's")
    args = ap.parse_args(argv)
    if args.tiny:
        wanted = args.backend or ["none", "bwrap"]
        isolations = [i for i in ("none", "bwrap", "docker") if i in wanted and (i != "docker" or docker_image())]
        res = level_tiny(isolations, args.repeat, args.base)
        rows = []
        for key, r in res.items():
            met = "" if not key.startswith("bwrap") else ("met" if r["wall"] <= TINY_TARGET_S else "MISSED")
            rows.append([key, f"{r['wall']:.2f}", f"{r['wall_over_bare']:+.2f}" if key != "bare" else "",
                         f"{r['cpu']:.2f}", f"{r['cpu_over_bare']:+.2f}" if key != "bare" else "",
                         f"<= {TINY_TARGET_S}" if key.startswith("bwrap") else "", met])
        print(f"\ntests/pipelines/tiny from the command line (medians of {args.repeat}; s; CPU = the command and "
              "every process it waited for):")
        print(table(rows, ["runner", "wall", "wall - bare", "CPU", "CPU - bare", "target (wall)", ""]))
        path = save("startup-tiny", {"repeat": args.repeat, "tiny": res}, argv)
        print(f"\n(saved {path})")
        return 0

    framework = None if args.no_tf else tf_framework(log=lambda *a, **k: print(*a, file=sys.stderr, **k))
    wanted = args.backend or ["bwrap", "docker", "none"]
    backends = [b for b in ("bwrap", "docker") if b in wanted]
    if "docker" in backends and docker_image() is None:
        print("[startup] docker: no engine or no pipcook-sandbox-worker image: skipped", file=sys.stderr)
        backends.remove("docker")
    level1 = level_backend(backends, framework, args.repeat, not args.no_tf)
    rows = []
    targets = {"bwrap": 0.3, "docker": 1.0}
    for label, res in level1.items():
        for b in backends:
            r = res[b]
            rows.append([label, b, f"{r['s']:.3f}", f"{res['bare_s']:.3f}", f"{r['overhead_s']:+.3f}",
                         f"{r['ratio']:.2f}", "yes" if r["overhead_s"] < targets[b] else "NO"])
    print(f"\nBackend start to the script's first line (medians of {args.repeat}; s):")
    print(table(rows, ["script", "backend", "sandboxed", "bare python", "overhead", "ratio", "target met"]))

    level2 = {}
    if not args.no_pipeline:
        isolations = [i for i in ("none", "bwrap", "docker") if i in wanted and (i != "docker" or "docker" in backends)]
        level2 = level_pipeline(isolations, args.repeat, not args.no_tf and framework is not None)
        rows = []
        for label, res in level2.items():
            rows.append([label, "bare harness", f"{res['bare']['datasource']:.2f}", f"{res['bare']['model']:.2f}",
                         f"{res['bare']['wall']:.2f}", "", "", ""])
            for iso in isolations:
                r = res[iso]
                rows.append([label, iso, f"{r['datasource']:.2f}", f"{r['model']:.2f}", f"{r['wall']:.2f}",
                             f"{r['model_overhead']:+.2f}", f"{r['wall_overhead']:+.2f}", f"{r['wall_ratio']:.2f}"])
        print(f"\nWhole pipeline (datasource + model), from launching the command (medians of {args.repeat}; s):")
        print(table(rows, ["model script", "runner", "datasource 1st line", "model 1st line", "wall",
                           "model overhead", "wall overhead", "wall ratio"]))
    path = save("startup", {"repeat": args.repeat, "backend": level1, "pipeline": level2}, argv)
    print(f"\n(saved {path})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
