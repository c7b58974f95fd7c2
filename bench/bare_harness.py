#!/usr/bin/env python3
"""Run a pipeline's scripts chained in ONE bare Python process: no sandbox.

This is the baseline for benchmarks (what the sandbox costs is the runner's
time minus this) and a quick way to check an example pipeline while writing
it. It is NOT safe: the scripts run with the caller's full rights. Use it
only on scripts you wrote or read.

    python bench/bare_harness.py examples/image-classification/pipeline.json -o /tmp/ex-img
    python bench/bare_harness.py examples/image-classification/pipeline.json -o /tmp/ex-img \
        --task predict -u some.png
    python bench/bare_harness.py examples/text-classification/pipeline.json -o /tmp/ex-txt \
        --task predict -s "great value, works perfectly"

Only local scripts (paths relative to the pipeline file, absolute paths,
`file:` URLs) are supported; `options.framework` is ignored (the packages
come from the current interpreter, e.g. `PYTHONPATH=/tmp/tfwarm`).

Layout of DIR (a subset of the runner's workspace, CONTRACT section 3):
`data/ cache/ model/ framework/ metrics.jsonl`. After training the pool's
meta goes to `model/meta.json` (the runner does the same) and predict mode
reads it from there.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from types import SimpleNamespace
from typing import Any

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

from pipcook_sandbox.sandbox import sdk  # noqa: E402

KNOWN_KEYS = {"specVersion", "type", "datasource", "dataflow", "model", "artifact", "options"}


# ------------------------------------------------------------------ pipeline


def parse_query(query: str) -> dict[str, Any]:
    """Query string -> options: strings, a list for a repeated key, None for a bare key."""
    options: dict[str, Any] = {}
    for part in query.split("&") if query else []:
        if not part:
            continue
        if "=" in part:
            key, value = part.split("=", 1)
            value = urllib.parse.unquote_plus(value)
        else:
            key, value = part, None
        key = urllib.parse.unquote_plus(key)
        if key in options:
            prev = options[key]
            options[key] = (prev if isinstance(prev, list) else [prev]) + [value]
        else:
            options[key] = value
    return options


def resolve_script(uri: str, base_dir: str) -> tuple[str, dict[str, Any], str | None]:
    """A script URI -> (local file path, options, sha256 pin or None)."""
    parsed = urllib.parse.urlsplit(uri)
    pin = None
    if parsed.fragment.startswith("sha256="):
        pin = parsed.fragment[len("sha256="):].lower()
    if parsed.scheme == "file":
        path = urllib.parse.unquote(parsed.path)
    elif parsed.scheme == "":
        path = urllib.parse.unquote(parsed.path)
        if not os.path.isabs(path):
            path = os.path.join(base_dir, path)
    else:
        raise SystemExit(f"bare harness: only local scripts are supported, not {uri!r}")
    path = os.path.normpath(path)
    if not os.path.isfile(path):
        raise SystemExit(f"bare harness: script not found: {path}")
    if pin:
        with open(path, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        if digest != pin:
            raise SystemExit(f"bare harness: {path} has sha256 {digest}, pipeline pins {pin}")
    return path, parse_query(parsed.query), pin


def load_pipeline(path: str) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        spec = json.load(f)
    if not isinstance(spec, dict):
        raise SystemExit("bare harness: the pipeline file must hold a JSON object")
    if spec.get("specVersion") != "2.0":
        raise SystemExit(f"bare harness: specVersion must be \"2.0\", got {spec.get('specVersion')!r}")
    unknown = set(spec) - KNOWN_KEYS
    if unknown:
        raise SystemExit(f"bare harness: unknown pipeline keys: {', '.join(sorted(unknown))}")
    for key in ("datasource", "model"):
        if not isinstance(spec.get(key), str):
            raise SystemExit(f"bare harness: {key!r} must be one script URI")
    return spec


_loaded: dict[str, Any] = {}


def import_script(path: str) -> Any:
    if path in _loaded:
        return _loaded[path]
    name = "bare_script_%d_%s" % (len(_loaded), os.path.splitext(os.path.basename(path))[0].replace("-", "_"))
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    _loaded[path] = module
    return module


def entry(path: str, name: str):
    fn = getattr(import_script(path), name, None)
    if not callable(fn):
        raise SystemExit(f"bare harness: script {path} has no entry {name!r}")
    return fn


# ------------------------------------------------------------------ ctx & runtime


def make_ctx(out: str, task_type: str) -> SimpleNamespace:
    ws = SimpleNamespace(
        data_dir=os.path.join(out, "data"),
        cache_dir=os.path.join(out, "cache"),
        model_dir=os.path.join(out, "model"),
        framework_dir=os.path.join(out, "framework"),
    )
    for d in vars(ws).values():
        os.makedirs(d, exist_ok=True)

    def download(url: str) -> str:
        parsed = urllib.parse.urlsplit(url)
        dest_dir = os.path.join(ws.cache_dir, "downloads")
        os.makedirs(dest_dir, exist_ok=True)
        name = os.path.basename(urllib.parse.unquote(parsed.path)) or "download"
        dest = os.path.join(dest_dir, hashlib.sha256(url.encode()).hexdigest()[:12] + "-" + name)
        if os.path.exists(dest):
            return dest
        if parsed.scheme in ("", "file"):
            shutil.copyfile(urllib.parse.unquote(parsed.path), dest)
        elif parsed.scheme in ("http", "https"):
            with urllib.request.urlopen(url) as r, open(dest + ".part", "wb") as f:  # noqa: S310 - bare harness
                shutil.copyfileobj(r, f)
            os.replace(dest + ".part", dest)
        else:
            raise ValueError(f"download: unsupported URL {url!r}")
        return dest

    def extract(path: str) -> str:
        dest = os.path.join(ws.cache_dir, "extracted", os.path.basename(path))
        for suffix in (".zip", ".tar.gz", ".tgz", ".tar", ".tar.bz2", ".tar.xz"):
            if dest.endswith(suffix):
                dest = dest[: -len(suffix)]
                break
        if not os.path.isdir(dest):
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            tmp = tempfile.mkdtemp(dir=os.path.dirname(dest))
            shutil.unpack_archive(path, tmp)
            os.replace(tmp, dest)
        return dest

    return SimpleNamespace(workspace=ws, task_type=task_type, download=download, extract=extract)


class Runtime:
    def __init__(self, dataset: Any, out: str, model_dir: str) -> None:
        self.dataset = dataset
        self._metrics_path = os.path.join(out, "metrics.jsonl")
        self._model_dir = model_dir
        self._last_progress = -1.0

    def notify_progress(self, value: float, **extra: Any) -> None:
        value = float(value)
        if value != self._last_progress:
            self._last_progress = value
            detail = " ".join(f"{k}={v}" for k, v in extra.items())
            print(f"[progress] {value:5.1f}% {detail}".rstrip(), flush=True)

    def log_metrics(self, step: int | None = None, **metrics: Any) -> None:
        record = {"time": time.time(), "step": step}
        record.update({k: float(v) for k, v in metrics.items()})
        with open(self._metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        shown = " ".join(f"{k}={float(v):.4g}" for k, v in metrics.items())
        print(f"[metrics] step={step} {shown}", flush=True)

    def save_model(self, path: str) -> str:
        """Copy a file or directory into the model directory (no-op if already there)."""
        src = os.path.realpath(os.fspath(path))
        root = os.path.realpath(self._model_dir)
        if src == root or src.startswith(root + os.sep):
            return src
        dest = os.path.join(root, os.path.basename(src.rstrip(os.sep)))
        if os.path.isdir(src):
            shutil.copytree(src, dest, dirs_exist_ok=True)
        else:
            shutil.copy2(src, dest)
        return dest

    def read_model(self) -> str:
        return self._model_dir


# ------------------------------------------------------------------ main


def plain(value: Any) -> Any:
    """Meta -> JSON (tuples to lists, numpy scalars to numbers)."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if hasattr(value, "tolist"):
        return value.tolist()
    return value


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("pipeline")
    ap.add_argument("-o", "--output", default=None, help="workspace dir (default ./pipcook-output-bare-<timestamp>, git-ignored)")
    ap.add_argument("--task", choices=("train", "predict"), default="train")
    ap.add_argument("-s", "--string", action="append", default=[], help="predict input (a string)")
    ap.add_argument("-u", "--upload", action="append", default=[], help="predict input (a file)")
    args = ap.parse_args(argv)

    pipeline_path = os.path.abspath(args.pipeline)
    spec = load_pipeline(pipeline_path)
    base_dir = os.path.dirname(pipeline_path)
    out = os.path.abspath(args.output or f"pipcook-output-bare-{time.strftime('%Y%m%d-%H%M%S')}")
    os.makedirs(out, exist_ok=True)

    pipe_options = spec.get("options") or {}
    train_options = dict(pipe_options.get("train") or {})
    ds_path, ds_opts, _ = resolve_script(spec["datasource"], base_dir)
    flows = [resolve_script(u, base_dir)[:2] for u in (spec.get("dataflow") or [])]
    model_path, model_query, _ = resolve_script(spec["model"], base_dir)
    model_opts = {**train_options, **model_query}

    ctx = make_ctx(out, args.task)
    if args.task == "train" and os.path.exists(os.path.join(out, "metrics.jsonl")):
        os.remove(os.path.join(out, "metrics.jsonl"))  # a fresh run, fresh metrics
    timings: dict[str, float] = {}
    t_start = time.perf_counter()

    if args.task == "train":
        t0 = time.perf_counter()
        pool = entry(ds_path, "datasource")(ds_opts, ctx)
        timings["datasource"] = time.perf_counter() - t0
    else:
        if not args.string and not args.upload:
            ap.error("--task predict needs at least one -s STRING or -u FILE")
        meta_path = os.path.join(ctx.workspace.model_dir, "meta.json")
        if not os.path.isfile(meta_path):
            raise SystemExit(f"bare harness: no {meta_path}: train first with -o {out}")
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
        inputs: list[dict[str, Any]] = [{"data": s, "label": None} for s in args.string]
        for name in args.upload:
            with open(name, "rb") as f:
                inputs.append({"data": f.read(), "label": None, "name": os.path.basename(name)})
        pool = sdk.from_lists(predicted=inputs, meta=meta)

    t0 = time.perf_counter()
    for path, opts in flows:
        pool = entry(path, "dataflow")(pool, opts, ctx)
    timings["dataflows (lazy)"] = time.perf_counter() - t0

    runtime = Runtime(pool, out, ctx.workspace.model_dir)
    t0 = time.perf_counter()
    if args.task == "train":
        entry(model_path, "train")(runtime, model_opts, ctx)
        timings["train"] = time.perf_counter() - t0
        with open(os.path.join(ctx.workspace.model_dir, "meta.json"), "w", encoding="utf-8") as f:
            json.dump(plain(getattr(pool, "meta", {}) or {}), f, indent=2)
        shutil.copyfile(pipeline_path, os.path.join(ctx.workspace.model_dir, "pipeline.json"))
    else:
        results = entry(model_path, "predict")(runtime, model_opts, ctx)
        timings["predict"] = time.perf_counter() - t0
        print(json.dumps(results, indent=2))

    total = time.perf_counter() - t_start
    for stage, seconds in timings.items():
        print(f"[time] {stage}: {seconds:.2f}s", file=sys.stderr)
    print(f"[time] wall: {total:.2f}s ({args.task}, workspace {out})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
