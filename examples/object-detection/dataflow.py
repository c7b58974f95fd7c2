"""Dataflow: decode and resize images, keeping their boxes consistent; flip in training.

A sample's `data` is an image path (the datasource, training), raw bytes
(`predict -u FILE`, `serve`) or an array. The result is
`{"data": float32 (S, S, 3) in [0, 1], "label": {"boxes", "classes"} with boxes
scaled to the S x S input, "size": [width, height] of the original image}`;
`size` is what lets the model give boxes back in the input image's pixels.

Augmentation, in training only (the `train` split while `ctx.task_type` is
"train"; never test, validation or predict): a horizontal flip with
probability 0.5, boxes mirrored with the pixels. It draws from its own random
generator, so each epoch sees different flips.

Options: `?size=S` (default 96, a multiple of 4; a second value must equal
the first: the detector is square). In predict mode the size recorded in meta
at training time wins. Meta gets `dimension` {x: S, y: S, z: 3}.
"""
import io
import random

import numpy as np
from PIL import Image


def _size(options, meta, task_type):
    dim = meta.get("dimension") if isinstance(meta, dict) else None
    if task_type == "predict" and isinstance(dim, dict) and "x" in dim:
        return int(dim["x"])  # predict: the size the model was trained at
    raw = options.get("size")
    if raw is None or raw == []:
        raw = ["96"]
    if not isinstance(raw, list):
        raw = [raw]
    try:
        values = [int(str(v).strip()) for v in raw]
    except ValueError:
        raise ValueError(f"option size must be an integer, got {raw!r}") from None
    if len(set(values)) != 1:
        raise ValueError(f"the detector is square: give one size, not {values}")
    size = values[0]
    if not 32 <= size <= 1024 or size % 4:
        raise ValueError(f"size must be a multiple of 4 between 32 and 1024, got {size}")
    return size


def open_image(data):
    if isinstance(data, np.ndarray):
        arr = data
        if arr.dtype != np.uint8:
            arr = np.clip(arr * (255.0 if arr.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
        return Image.fromarray(arr)
    if isinstance(data, (bytes, bytearray, memoryview)):
        return Image.open(io.BytesIO(bytes(data)))
    if isinstance(data, str):
        return Image.open(data)
    raise TypeError(f"image data must be a path, bytes or an array, not {type(data).__name__}")


def prepare(sample, size, flip=False):
    """The sample resized to size x size (boxes scaled with it), mirrored if `flip`."""
    with open_image(sample["data"]) as img:
        img = img.convert("RGB")
        width, height = img.size
        if img.size != (size, size):
            img = img.resize((size, size), Image.BILINEAR)
        pixels = np.asarray(img, dtype=np.float32) / 255.0
    out = dict(sample)
    out["size"] = [width, height]
    label = sample.get("label")
    if isinstance(label, dict) and "boxes" in label:
        boxes = np.array(label["boxes"], dtype=np.float32).reshape(-1, 4)
        boxes[:, [0, 2]] *= size / width
        boxes[:, [1, 3]] *= size / height
        if flip:
            boxes[:, 0] = size - boxes[:, 0] - boxes[:, 2]
        out["label"] = {"boxes": boxes, "classes": np.asarray(label["classes"], dtype=np.int32).ravel()}
    if flip:
        pixels = pixels[:, ::-1]
    out["data"] = np.ascontiguousarray(pixels)
    return out


def dataflow(pool, options, ctx):
    from sandbox import sdk

    task_type = getattr(ctx, "task_type", "train")
    size = _size(options, pool.meta or {}, task_type)
    seed = options.get("seed")
    rng = random.Random(int(seed[-1] if isinstance(seed, list) else seed) if seed else None)

    def meta_fn(meta):
        meta = dict(meta)
        meta["dimension"] = {"x": size, "y": size, "z": 3}
        return meta

    plain = pool.transform(lambda s: prepare(s, size), meta_fn)
    if task_type != "train" or pool.train is None:
        return plain
    flipped = pool.transform(lambda s: prepare(s, size, flip=rng.random() < 0.5))
    return sdk.DatasetPool(train=flipped.train, valid=plain.valid, test=plain.test, predicted=plain.predicted,
                           meta=plain.meta)
