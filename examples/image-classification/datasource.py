"""Datasource: a small, generated image set of simple shapes (or a remote one).

Without `url`, it draws `circle`, `square`, `triangle` and `cross` images
with PIL into the workspace's data dir, seeded, so every run gets the same
pixels and no download is needed:

    data/shapes/train/<label>/*.png       `count` per class (default 300)
    data/shapes/validation/<label>/*.png  `validCount` per class (default count // 5)
    data/shapes/test/<label>/*.png        `testCount` per class (default count // 3)

Each image: a random background colour with light noise, one shape of a
contrasting random colour, random size, position and rotation.

Options (query string, all strings): count, validCount, testCount, size
(default 32: the generated images are size x size), seed (default 7).

With `?url=https://host/data/flowers.zip`, it downloads and unpacks that
archive instead (through ctx.download / ctx.extract, the sandbox's only
way out) and reads the folder holding `train/<label>/*.jpg` (also
`validation/`, `test/`).
"""
import json
import math
import os
import random

import numpy as np
from PIL import Image, ImageDraw

from sandbox import sdk

SHAPES = ("circle", "cross", "square", "triangle")


def _opt(options, key, default, cast=int):
    value = options.get(key, default)
    if isinstance(value, list):
        value = value[-1] if value else default
    if value is None or value == "":
        return default
    try:
        return cast(value)
    except (TypeError, ValueError):
        raise ValueError(f"option {key!r} must be a {cast.__name__}, got {value!r}")


def _rotated(points, cx, cy, angle):
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + (x - cx) * c - (y - cy) * s, cy + (x - cx) * s + (y - cy) * c) for x, y in points]


def _colour_pair(rng):
    """A background and a foreground colour that differ clearly in brightness."""
    while True:
        bg = tuple(rng.randrange(256) for _ in range(3))
        fg = tuple(rng.randrange(256) for _ in range(3))
        if abs(sum(bg) - sum(fg)) / 3 >= 70:
            return bg, fg


def draw_shape(shape, size, rng, nprng):
    """One `size` x `size` RGB image of `shape`. Drawn at 4x and scaled down (anti-aliased)."""
    k = 4
    big = size * k
    bg, fg = _colour_pair(rng)
    img = Image.new("RGB", (big, big), bg)
    d = ImageDraw.Draw(img)
    r = rng.uniform(0.22, 0.40) * big  # "radius" of the shape
    cx = rng.uniform(r + 0.04 * big, big - r - 0.04 * big)
    cy = rng.uniform(r + 0.04 * big, big - r - 0.04 * big)
    angle = rng.uniform(-math.pi, math.pi)
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fg)
    elif shape == "square":
        h = r * 0.8
        pts = [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
        d.polygon(_rotated(pts, cx, cy, angle), fill=fg)
    elif shape == "triangle":
        pts = [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in (angle, angle + 2.0944, angle + 4.1888)]
        d.polygon(pts, fill=fg)
    elif shape == "cross":
        w = r * rng.uniform(0.28, 0.40)
        bar1 = [(cx - r, cy - w), (cx + r, cy - w), (cx + r, cy + w), (cx - r, cy + w)]
        bar2 = [(cx - w, cy - r), (cx + w, cy - r), (cx + w, cy + r), (cx - w, cy + r)]
        d.polygon(_rotated(bar1, cx, cy, angle), fill=fg)
        d.polygon(_rotated(bar2, cx, cy, angle), fill=fg)
    else:
        raise ValueError(shape)
    img = img.resize((size, size), Image.LANCZOS)
    pixels = np.asarray(img, dtype=np.float32)
    pixels += nprng.normal(0.0, 8.0, pixels.shape)  # light noise
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def generate(root, counts, size, seed):
    """Write the image set under `root`, unless the same one is already there."""
    params = {"counts": counts, "size": size, "seed": seed, "shapes": list(SHAPES), "version": 1}
    marker = os.path.join(root, "generated.json")
    if os.path.isfile(marker):
        with open(marker, encoding="utf-8") as f:
            if json.load(f) == params:
                return
    rng = random.Random(seed)
    nprng = np.random.default_rng(seed)
    for split, count in counts.items():
        for shape in SHAPES:
            folder = os.path.join(root, split, shape)
            os.makedirs(folder, exist_ok=True)
            for i in range(count):
                draw_shape(shape, size, rng, nprng).save(os.path.join(folder, f"{shape}-{i:04d}.png"))
    with open(marker, "w", encoding="utf-8") as f:
        json.dump(params, f)


def _find_image_root(folder):
    """The folder holding `train/` inside an unpacked archive (it may be nested)."""
    for dirpath, dirnames, _ in os.walk(folder):
        if "train" in dirnames:
            return dirpath
        dirnames[:] = [d for d in dirnames if not d.startswith(("__MACOSX", "."))]
    raise ValueError(f"the archive has no train/<label>/ folder (looked under {folder})")


def datasource(options, ctx):
    url = options.get("url")
    if isinstance(url, list):
        url = url[-1]
    if url:
        root = _find_image_root(ctx.extract(ctx.download(url)))
        return sdk.from_image_folder(root)

    count = _opt(options, "count", 300)
    counts = {
        "train": count,
        "validation": _opt(options, "validCount", max(1, count // 5)),
        "test": _opt(options, "testCount", max(1, count // 3)),
    }
    size = _opt(options, "size", 32)
    seed = _opt(options, "seed", 7)
    if count < 1 or size < 8:
        raise ValueError("count must be >= 1 and size >= 8")
    root = os.path.join(ctx.workspace.data_dir, "shapes")
    generate(root, counts, size, seed)
    return sdk.from_image_folder(root, meta={"source": "generated shapes", "seed": seed})
