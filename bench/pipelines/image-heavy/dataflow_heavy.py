"""The image example's dataflow plus deliberately CPU-heavy augmentation (for bench/e2e.py).

Same samples in, same shapes out as examples/image-classification/dataflow.py
(decode, RGB, resize to `size`, float32 in [0, 1]), but each image first goes
through `augment` rounds of work at `factor` times the resolution: upscale
(bicubic), a small rotation, a Gaussian blur, an unsharp mask, then back down. The angle
is a hash of the sample's path and the round, so every run (and every
runner) does exactly the same work on the same pixels. It stands for the
real thing (random crops, colour jitter, ...) that makes a dataflow the
bottleneck, to show whether stages run in parallel.

Options: `?size=W&size=H` (default 32 x 32), `?augment=N` rounds (default 1),
`?factor=F` (default 2). The defaults make the dataflow cost about what
training costs per epoch on the 2-vCPU VM (~1.3 ms per image), the case where
running them side by side helps most.
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


def augment(img, rounds, key, factor=2):
    w, h = img.size
    for k in range(rounds):
        big = img.resize((w * factor, h * factor), Image.BICUBIC)
        big = big.rotate(_angle(key, k), resample=Image.BICUBIC, fillcolor=big.getpixel((0, 0)))
        big = big.filter(ImageFilter.GaussianBlur(1.5)).filter(ImageFilter.UnsharpMask(2, 120, 2))
        img = big.resize((w, h), Image.LANCZOS)
    return img


def jitter_views(x, views, key):
    """The mean of `views` jittered copies of x (float32 h x w x 3): shifts of up to 1 pixel,
    brightness and contrast. Numpy on 3 KB arrays: the time goes to the interpreter and
    numpy's per-call overhead, with the GIL held, as in most hand-written augmentation."""
    h = hashlib.sha256(f"{key}#views".encode()).digest()
    acc = np.zeros_like(x)
    for k in range(views):
        b = h[k % len(h)]
        y = np.roll(x, ((b & 3) - 1 if b & 3 != 3 else 0, ((b >> 2) & 3) - 1 if (b >> 2) & 3 != 3 else 0), axis=(0, 1))
        y = (y - 0.5) * (0.95 + (b >> 5) / 80.0) + 0.5 + ((b % 7) - 3) / 200.0
        acc += np.clip(y, 0.0, 1.0)
    return acc / views


def decode(data, w, h, rounds, factor=2, views=0):
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
        img = augment(img, rounds, key, factor)
        x = np.asarray(img, dtype=np.float32) / 255.0
        return jitter_views(x, views, key) if views else x


def dataflow(pool, options, ctx):
    w, h = _size(options)
    rounds = _opt_int(options, "augment", 0)
    factor = _opt_int(options, "factor", 2)
    views = _opt_int(options, "views", 24)

    def fn(sample):
        out = dict(sample)
        out["data"] = decode(sample["data"], w, h, rounds, factor, views)
        return out

    def meta_fn(meta):
        meta = dict(meta)
        meta["dimension"] = {"x": w, "y": h, "z": 3}
        return meta

    return pool.transform(fn, meta_fn)
