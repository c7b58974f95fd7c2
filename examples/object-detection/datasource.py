"""Datasource: an object-detection set in COCO format, from a zip (URL) or generated here.

With `?url=https://host/data/shapes.zip` the runner downloads the archive on the
script's behalf (`ctx.download`, the sandbox's only way out) and `ctx.extract`
unpacks it. Without `url` the script draws a synthetic set itself (seeded,
see `generate_coco`), packs it into the same kind of zip under the cache dir,
and reads that back through the same code: the example works out of the box,
and the COCO reader is what runs either way. `make_dataset.py` writes the same
zip on the host, to serve or to inspect.

The archive holds one folder per split, each with a COCO `annotations.json`
(`images`, `annotations` with `bbox` [x, y, w, h] in pixels and
`category_id`, `categories`) and the images it names (`file_name` relative to
that folder). Split folders are `train/`, `val/` (or `valid/`, `validation/`)
and `test/`; they may sit one level down. An archive with a single
`annotations.json` and no split folders is all train.

Samples: `{"data": <image path>, "label": {"boxes": float32 (n, 4) [x, y, w, h]
in image pixels, "classes": int32 (n,) index into meta.categories},
"id": <COCO image id>}`. Meta: `type: image`, `categories` (names, in COCO id
order), `format: coco`.

Options (query string, all strings): url; for the generated set: count (train
images, default 600), validCount (count // 6), testCount (count // 4), size
(side in pixels, 96), seed (7), maxObjects (per image, 4).
"""
import io
import json
import math
import os
import random
import zipfile

import numpy as np
from PIL import Image, ImageDraw

CLASSES = ("circle", "cross", "square", "triangle")
SPLIT_DIRS = {"train": "train", "val": "valid", "valid": "valid", "validation": "valid", "test": "test"}
MAX_IMAGES = 200_000
MAX_ANNOTATIONS_BYTES = 256 << 20
GENERATOR_VERSION = 1


def _opt(options, key, default, cast=int):
    value = options.get(key, default)
    if isinstance(value, list):
        value = value[-1] if value else default
    if value is None or value == "":
        return default
    try:
        return cast(value)
    except (TypeError, ValueError):
        raise ValueError(f"option {key!r} must be a {cast.__name__}, got {value!r}") from None


# ------------------------------------------------------------------ the synthetic set


def _rotated(points, cx, cy, angle):
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + (x - cx) * c - (y - cy) * s, cy + (x - cx) * s + (y - cy) * c) for x, y in points]


def _shape_polygons(shape, cx, cy, r, angle, rng):
    """The polygons (or one ellipse box) that draw `shape`; every point lies inside its bounding box."""
    if shape == "circle":
        return [("ellipse", [(cx - r, cy - r), (cx + r, cy + r)])]
    if shape == "square":
        h = r * 0.75
        return [("polygon", _rotated([(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)],
                                     cx, cy, angle))]
    if shape == "triangle":
        return [("polygon", [(cx + r * math.cos(a), cy + r * math.sin(a))
                             for a in (angle, angle + 2.0944, angle + 4.1888)])]
    if shape == "cross":
        w = r * rng.uniform(0.28, 0.38)
        bars = ([(cx - r, cy - w), (cx + r, cy - w), (cx + r, cy + w), (cx - r, cy + w)],
                [(cx - w, cy - r), (cx + w, cy - r), (cx + w, cy + r), (cx - w, cy + r)])
        return [("polygon", _rotated(bar, cx, cy, angle)) for bar in bars]
    raise ValueError(shape)


def _bbox(parts):
    xs = [x for _, pts in parts for x, _ in pts]
    ys = [y for _, pts in parts for _, y in pts]
    return min(xs), min(ys), max(xs), max(ys)


def _covered(a, b):
    """How much of the smaller of two boxes (x0, y0, x1, y1) the other covers, 0..1."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    smaller = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return ix * iy / smaller if smaller > 0 else 0.0


def _clutter(draw, big, rng):
    """Background clutter: thin lines and small specks, all much smaller or thinner than an object."""
    for _ in range(rng.randint(6, 14)):
        colour = tuple(rng.randrange(256) for _ in range(3))
        x0, y0 = rng.uniform(0, big), rng.uniform(0, big)
        length, a = rng.uniform(0.1, 0.5) * big, rng.uniform(0, math.pi)
        draw.line([(x0, y0), (x0 + length * math.cos(a), y0 + length * math.sin(a))], fill=colour,
                  width=max(1, int(big * rng.uniform(0.004, 0.012))))
    for _ in range(rng.randint(5, 15)):
        colour = tuple(rng.randrange(256) for _ in range(3))
        x, y, s = rng.uniform(0, big), rng.uniform(0, big), rng.uniform(0.005, 0.02) * big
        draw.ellipse([x - s, y - s, x + s, y + s], fill=colour)


def draw_image(size, rng, nprng, max_objects=4):
    """One `size` x `size` RGB image and its objects [(class index, (x0, y0, x1, y1))].

    Drawn at 4x and scaled down (anti-aliased). Objects are 16-40% of the side
    across; some overlap, the later drawn on top, but no box covers more than 40%
    of another's (a label never names a hidden shape)."""
    k = 4
    big = size * k
    top = np.array([rng.randrange(256) for _ in range(3)], dtype=np.float32)
    bottom = np.array([rng.randrange(256) for _ in range(3)], dtype=np.float32)
    ramp = np.linspace(0.0, 1.0, big, dtype=np.float32)[:, None, None]
    background = (top * (1 - ramp) + bottom * ramp) * np.ones((1, big, 1), dtype=np.float32)
    img = Image.fromarray(background.astype(np.uint8))
    draw = ImageDraw.Draw(img)
    _clutter(draw, big, rng)
    mean_bg = float((top.sum() + bottom.sum()) / 6)
    objects = []
    for _ in range(rng.randint(1, max_objects)):
        for _attempt in range(30):
            cls = rng.randrange(len(CLASSES))
            r = rng.uniform(0.08, 0.20) * big
            cx, cy = rng.uniform(r, big - r), rng.uniform(r, big - r)
            parts = _shape_polygons(CLASSES[cls], cx, cy, r, rng.uniform(-math.pi, math.pi), rng)
            box = _bbox(parts)
            if all(_covered(box, other) <= 0.4 for _, other in objects):
                break
        else:
            continue
        while True:  # a colour that stands out from the background
            fg = tuple(rng.randrange(256) for _ in range(3))
            if abs(sum(fg) / 3 - mean_bg) >= 60:
                break
        for kind, pts in parts:
            if kind == "ellipse":
                draw.ellipse(pts, fill=fg)
            else:
                draw.polygon(pts, fill=fg)
        objects.append((cls, box))
    img = img.resize((size, size), Image.LANCZOS)
    pixels = np.asarray(img, dtype=np.float32) + nprng.normal(0.0, 6.0, (size, size, 3))
    img = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    return img, [(cls, tuple(v / k for v in box)) for cls, box in objects]


def _write(zf, name, data):
    info = zipfile.ZipInfo(name, date_time=(2020, 1, 1, 0, 0, 0))  # fixed: the same seed gives the same bytes
    info.external_attr = 0o644 << 16
    zf.writestr(info, data)


def generate_coco(path, counts, size=96, seed=7, max_objects=4):
    """Write a COCO-format zip at `path`: `<split>/annotations.json` and `<split>/images/*.png`."""
    rng = random.Random(seed)
    nprng = np.random.default_rng(seed)
    categories = [{"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(CLASSES)]
    tmp = path + ".partial"
    image_id = ann_id = 0
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as zf:
        for split, count in counts.items():
            images, annotations = [], []
            for _ in range(count):
                image_id += 1
                img, objects = draw_image(size, rng, nprng, max_objects)
                name = f"images/{split}-{image_id:06d}.png"
                buf = io.BytesIO()
                img.save(buf, format="PNG")
                _write(zf, f"{split}/{name}", buf.getvalue())
                images.append({"id": image_id, "file_name": name, "width": size, "height": size})
                for cls, (x0, y0, x1, y1) in objects:
                    x0, y0, x1, y1 = max(0.0, x0), max(0.0, y0), min(float(size), x1), min(float(size), y1)
                    ann_id += 1
                    annotations.append({"id": ann_id, "image_id": image_id, "category_id": cls + 1,
                                        "bbox": [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)],
                                        "area": round((x1 - x0) * (y1 - y0), 2), "iscrowd": 0})
            doc = {"info": {"description": "synthetic shapes", "seed": seed, "version": GENERATOR_VERSION},
                   "images": images, "annotations": annotations, "categories": categories}
            _write(zf, f"{split}/annotations.json", json.dumps(doc))
    os.replace(tmp, path)
    return path


# ------------------------------------------------------------------ reading COCO


def find_annotation_files(root):
    """{split: annotations.json path}: split folders at most two levels below `root`; a lone
    annotations.json in a folder of another name is the train split."""
    found, others = {}, []
    for dirpath, dirnames, filenames in os.walk(root):
        depth = 0 if dirpath == root else os.path.relpath(dirpath, root).count(os.sep) + 1
        dirnames[:] = [d for d in sorted(dirnames) if not d.startswith(("__MACOSX", ".")) and depth < 2]
        if "annotations.json" in filenames:
            split = SPLIT_DIRS.get(os.path.basename(dirpath).lower())
            path = os.path.join(dirpath, "annotations.json")
            if split is None:
                others.append(path)
            elif split not in found:
                found[split] = path
    if not found and len(others) == 1:
        found["train"] = others[0]
    if not found:
        raise ValueError("the archive has no train/annotations.json (COCO format, one folder per split: "
                         "train/, val/, test/)")
    return found


def read_coco(path, categories=None):
    """(samples, category names) of one COCO annotations file; boxes clipped to the image."""
    if os.path.getsize(path) > MAX_ANNOTATIONS_BYTES:
        raise ValueError(f"{os.path.basename(path)} is larger than {MAX_ANNOTATIONS_BYTES} bytes")
    with open(path, encoding="utf-8") as f:
        doc = json.load(f)
    if not isinstance(doc, dict) or not isinstance(doc.get("images"), list):
        raise ValueError(f"{path}: not a COCO annotations file (no 'images' list)")
    cats = doc.get("categories") or []
    if categories is None:
        categories = sorted(((int(c["id"]), str(c["name"])) for c in cats), key=lambda c: c[0])
    index = {cid: i for i, (cid, _) in enumerate(categories)}
    folder = os.path.dirname(path)
    real_folder = os.path.realpath(folder)
    images = {}
    for im in doc["images"][:MAX_IMAGES]:
        file_path = os.path.realpath(os.path.join(folder, str(im["file_name"])))
        if not file_path.startswith(real_folder + os.sep) or not os.path.isfile(file_path):
            raise ValueError(f"{path}: image {im['file_name']!r} is missing or outside its folder")
        images[im["id"]] = {"path": file_path, "w": float(im.get("width") or 0), "h": float(im.get("height") or 0),
                            "boxes": [], "classes": []}
    for ann in doc.get("annotations") or []:
        image = images.get(ann.get("image_id"))
        if image is None or ann.get("iscrowd"):
            continue
        if int(ann["category_id"]) not in index:
            raise ValueError(f"{path}: annotation {ann.get('id')} has category_id {ann['category_id']}, "
                             "not among the categories")
        x, y, w, h = (float(v) for v in ann["bbox"])
        if image["w"] and image["h"]:  # clip to the image, as COCO's own tools assume
            x0, y0 = max(0.0, x), max(0.0, y)
            w, h = min(image["w"], x + w) - x0, min(image["h"], y + h) - y0
            x, y = x0, y0
        if w <= 0 or h <= 0:
            continue
        image["boxes"].append([x, y, w, h])
        image["classes"].append(index[int(ann["category_id"])])
    samples = [{"data": im["path"], "id": image_id,
                "label": {"boxes": np.asarray(im["boxes"], dtype=np.float32).reshape(-1, 4),
                          "classes": np.asarray(im["classes"], dtype=np.int32)}}
               for image_id, im in images.items()]
    return samples, categories


def read_archive_dir(root):
    """A pool's splits and meta from an unpacked COCO archive."""
    files = find_annotation_files(root)
    categories = None
    splits = {}
    for split in ("train", "valid", "test"):
        if split in files:
            splits[split], categories = read_coco(files[split], categories)
    if "train" not in splits or not splits["train"]:
        raise ValueError("the archive has no train split with images (train/annotations.json)")
    if not categories:
        raise ValueError("the annotations list no categories")
    meta = {"type": "image", "format": "coco", "categories": [name for _, name in categories],
            "coco_category_ids": [cid for cid, _ in categories]}
    return splits, meta


def datasource(options, ctx):
    from sandbox import sdk

    url = options.get("url")
    if isinstance(url, list):
        url = url[-1]
    if url:
        archive = ctx.download(url)
        source = url
    else:
        count = _opt(options, "count", 600)
        counts = {"train": count, "val": _opt(options, "validCount", max(1, count // 6)),
                  "test": _opt(options, "testCount", max(1, count // 4))}
        size, seed = _opt(options, "size", 96), _opt(options, "seed", 7)
        max_objects = _opt(options, "maxObjects", 4)
        if count < 1 or not 32 <= size <= 1024 or not 1 <= max_objects <= 20:
            raise ValueError("count must be >= 1, size between 32 and 1024, maxObjects between 1 and 20")
        name = f"shapes-coco-v{GENERATOR_VERSION}-{counts['train']}-{counts['val']}-{counts['test']}-{size}-{seed}-{max_objects}.zip"
        archive = os.path.join(ctx.workspace.cache_dir, name)
        if not os.path.isfile(archive):
            generate_coco(archive, counts, size, seed, max_objects)
        source = f"generated ({name})"
    splits, meta = read_archive_dir(ctx.extract(archive))
    meta["source"] = source
    print(f"COCO data from {source}: " + ", ".join(f"{k} {len(v)} images" for k, v in splits.items()))
    return sdk.from_lists(meta=meta, **splits)
