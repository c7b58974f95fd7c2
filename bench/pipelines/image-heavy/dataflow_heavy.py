"""The image example's dataflow plus deliberately CPU-heavy augmentation (for bench/e2e.py).

Same samples in, same shapes out as examples/image-classification/dataflow.py
(decode, RGB, resize to `size`, float32 in [0, 1]), but each image first goes
through `augment` rounds of work at 4x the resolution: upscale (bicubic), a
small rotation, a Gaussian blur, an unsharp mask, then back down. The angle
is a hash of the sample's path and the round, so every run (and every
runner) does exactly the same work on the same pixels. It stands for the
real thing (random crops, colour jitter, ...) that makes a dataflow the
bottleneck, to show whether stages run in parallel.

Options: `?size=W&size=H` (default 32 x 32), `?augment=N` rounds (default 1).
"""
import hashlib

import numpy as np
from PIL import Image, ImageFilter


def _opt_int(options, key, default):
    value = options.get(key, default)
    if isinstance(value, list):
        value = value[-1] if value else default
    return int(value)


def _size(options):
    raw = options.get("size") or ["32", "32"]
    if not isinstance(raw, list):
        raw = [raw]
    values = [int(v) for v in raw]
    if len(values) == 1:
        values = values * 2
    return values[0], values[1]


def _angle(key, k):
    h = hashlib.sha256(f"{key}#{k}".encode()).digest()
    return (h[0] / 255.0 - 0.5) * 20.0  # -10 .. +10 degrees


def augment(img, rounds, key):
    w, h = img.size
    for k in range(rounds):
        big = img.resize((w * 4, h * 4), Image.BICUBIC)
        big = big.rotate(_angle(key, k), resample=Image.BICUBIC, fillcolor=big.getpixel((0, 0)))
        big = big.filter(ImageFilter.GaussianBlur(1.5)).filter(ImageFilter.UnsharpMask(2, 120, 2))
        img = big.resize((w, h), Image.LANCZOS)
    return img


def decode(data, w, h, rounds):
    if isinstance(data, str):  # the key: split/label/file, the same inside a sandbox and out
        img, key = Image.open(data), "/".join(data.replace("\\", "/").split("/")[-3:])
    elif isinstance(data, (bytes, bytearray, memoryview)):
        import io

        img, key = Image.open(io.BytesIO(bytes(data))), hashlib.sha256(bytes(data)).hexdigest()
    elif isinstance(data, np.ndarray):
        arr = data if data.dtype == np.uint8 else np.clip(data * 255.0, 0, 255).astype(np.uint8)
        img, key = Image.fromarray(arr), "array"
    else:
        raise TypeError(f"image data must be a path, bytes or an array, not {type(data).__name__}")
    with img:
        img = img.convert("RGB")
        if img.size != (w, h):
            img = img.resize((w, h), Image.BILINEAR)
        img = augment(img, rounds, key)
        return np.asarray(img, dtype=np.float32) / 255.0


def dataflow(pool, options, ctx):
    w, h = _size(options)
    rounds = _opt_int(options, "augment", 1)

    def fn(sample):
        out = dict(sample)
        out["data"] = decode(sample["data"], w, h, rounds)
        return out

    def meta_fn(meta):
        meta = dict(meta)
        meta["dimension"] = {"x": w, "y": h, "z": 3}
        return meta

    return pool.transform(fn, meta_fn)
