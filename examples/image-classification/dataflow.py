"""Dataflow: decode images and resize them to float32 arrays in [0, 1].

A sample's `data` may be a file path (str: what the datasource gives in
training), raw bytes (what `predict -u FILE` or `serve` gives) or an array
already. The result is `{"data": float32 array (h, w, 3), "label": ...}`.

Options: `?size=W&size=H` (default 32 x 32; one value gives a square).
The pool's meta gets `dimension` {x: W, y: H, z: 3}. In predict mode the
size recorded in meta at training time wins, so the model always sees the
shape it was trained on.
"""
import io

import numpy as np
from PIL import Image


def _size(options, meta, task_type):
    dim = meta.get("dimension") if isinstance(meta, dict) else None
    raw = options.get("size")
    if raw is None or raw == []:
        raw = ["32", "32"]
    if not isinstance(raw, list):
        raw = [raw]
    try:
        values = [int(str(v).strip()) for v in raw]
    except ValueError:
        raise ValueError(f"option size must be integers, got {raw!r}")
    if len(values) == 1:
        values = values * 2
    w, h = values[0], values[1]
    if task_type == "predict" and isinstance(dim, dict) and "x" in dim and "y" in dim:
        w, h = int(dim["x"]), int(dim["y"])  # predict: the training size
    if not (1 <= w <= 4096 and 1 <= h <= 4096):
        raise ValueError(f"size out of range: {w}x{h}")
    return w, h


def decode(data, w, h):
    if isinstance(data, np.ndarray):
        arr = data
        if arr.dtype != np.uint8:
            arr = np.clip(arr * (255.0 if arr.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
        img = Image.fromarray(arr)
    elif isinstance(data, (bytes, bytearray, memoryview)):
        img = Image.open(io.BytesIO(bytes(data)))
    elif isinstance(data, str):
        img = Image.open(data)
    else:
        raise TypeError(f"image data must be a path, bytes or an array, not {type(data).__name__}")
    with img:
        img = img.convert("RGB")
        if img.size != (w, h):
            img = img.resize((w, h), Image.BILINEAR)
        return np.asarray(img, dtype=np.float32) / 255.0


def dataflow(pool, options, ctx):
    w, h = _size(options, pool.meta or {}, getattr(ctx, "task_type", "train"))

    def fn(sample):
        out = dict(sample)
        out["data"] = decode(sample["data"], w, h)
        return out

    def meta_fn(meta):
        meta = dict(meta)
        meta["dimension"] = {"x": w, "y": h, "z": 3}
        return meta

    return pool.transform(fn, meta_fn)
