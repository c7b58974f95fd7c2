"""What an exported model needs besides its weights: labels and preprocessing, as a small JSON file.

A TensorFlow Lite or TensorFlow.js model takes numbers and returns numbers;
the pipeline's dataflow turned inputs into those numbers and `labels.json`
(or the dataset's `categories`) turns the output back into names. Both
exporters write this beside the model so a mobile or web app need not
re-implement them by reading the pipeline's scripts:

    {"format": "tflite", "model": "model.tflite", "type": "TabularClassification",
     "labels": ["setosa", "versicolor", "virginica"],
     "input": {"columns": [...], "dimension": {"x": 4},
               "standardize": {"columns": [...], "mean": [...], "std": [...]}},
     "dataflow": [{"script": "dataflow.py", "options": {}}]}

Everything here comes from files the model stage wrote (untrusted): only
regular files of the processor's private copy are read, only known keys with
JSON values are kept, and the whole is capped in size.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

MAX_BYTES = 1 << 20  # of any file read, and of the sidecar written
# The dataset meta that describes a model's input (set by the SDK's pools and the examples' dataflows).
INPUT_KEYS = ("type", "dimension", "columns", "standardize", "label", "text_normalised", "vocabulary_size",
              "sequence_length")


def _read_json(path: Path) -> Any:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as f:
        data = f.read(MAX_BYTES + 1)
    if len(data) > MAX_BYTES:
        return None
    try:
        return json.loads(data)
    except ValueError:
        return None


def _labels(copy_dir: Path, meta: dict) -> list[str] | None:
    found = _read_json(copy_dir / "labels.json")
    if isinstance(found, dict):
        found = found.get("labels") or found.get("categories")
    if not isinstance(found, list):
        found = meta.get("categories")
    if isinstance(found, list) and all(isinstance(x, (str, int, float)) for x in found):
        return [str(x) for x in found]
    return None


def _dataflow(pipeline: dict) -> list[dict]:
    steps = []
    flows = pipeline.get("dataflow") or []
    for uri in flows if isinstance(flows, list) else []:
        if not isinstance(uri, str):
            continue
        parts = urlsplit(uri)
        options: dict[str, Any] = {}
        for key, value in parse_qsl(parts.query, keep_blank_values=True):
            options[key] = [*options[key], value] if isinstance(options.get(key), list) else \
                [options[key], value] if key in options else value
        steps.append({"script": os.path.basename(parts.path), "options": options})
    return steps


def describe(copy_dir: Path, fmt: str, model_name: str) -> dict:
    """The sidecar of an export, from the private copy of model/ (meta.json, labels.json, pipeline.json)."""
    meta = _read_json(copy_dir / "meta.json")
    meta = meta if isinstance(meta, dict) else {}
    pipeline = _read_json(copy_dir / "pipeline.json")
    pipeline = pipeline if isinstance(pipeline, dict) else {}
    return {
        "format": fmt,
        "model": model_name,
        "type": pipeline.get("type") if isinstance(pipeline.get("type"), str) else None,
        "labels": _labels(copy_dir, meta),
        "input": {k: meta[k] for k in INPUT_KEYS if k in meta},
        "dataflow": _dataflow(pipeline),
        "note": "Inputs must be prepared as the dataflow scripts listed here prepare them (their sources are in "
                "the model's scripts/ folder); the output index i is labels[i].",
    }


def write(path: Path, data: dict) -> Path:
    """Write the sidecar atomically; a link at `path` is replaced, never followed."""
    text = json.dumps(data, indent=2, default=str)
    if len(text) > MAX_BYTES:  # a meta made huge by a script: keep what an app needs most
        data = {**data, "input": {}, "dataflow": []}
        text = json.dumps(data, indent=2, default=str)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text + "\n")
    os.replace(tmp, path)
    return path
