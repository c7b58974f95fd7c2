"""The object-detection example's own COCO mAP and decoding, checked on the host.

The model stage cannot use pycocotools (the framework does not ship it), so
examples/object-detection/model.py implements COCOeval's bbox protocol itself;
here it must give pycocotools' figures on the same ground truth and detections:
random scenes with near misses, duplicates, wrong classes, missed objects, ties
in score, classes without any ground truth or without any detection.
No TensorFlow: the functions tested are numpy only.
"""
from __future__ import annotations

import contextlib
import importlib.util
import io
import json
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from conftest import REPO

EXAMPLE = REPO / "examples" / "object-detection"


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"od_{name}", EXAMPLE / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


model = _load("model")


def _scene(rng: np.random.Generator, num_classes: int, quality: float):
    """Ground truth and detections for a batch of images; `quality` is how close detections stay."""
    ground_truth, detections = [], []
    for _ in range(int(rng.integers(5, 15))):
        n = int(rng.integers(0, 6))
        gt = np.column_stack([rng.uniform(0, 80, (n, 2)), rng.uniform(5, 40, (n, 2))])
        gc = rng.integers(0, num_classes, n)
        boxes, classes, scores = [], [], []
        for box, cls in zip(gt, gc):
            if rng.random() < 0.15:
                continue  # a miss
            for _ in range(1 + int(rng.random() < 0.2)):  # sometimes a duplicate
                jitter = rng.normal(0, (1 - quality) * 8, 4)
                boxes.append(np.maximum(box + jitter, [0, 0, 1, 1]))
                classes.append(cls if rng.random() > 0.1 else int(rng.integers(0, num_classes)))
                scores.append(float(np.round(rng.uniform(0.05, 1.0), 2)))  # rounded: ties happen
        for _ in range(int(rng.integers(0, 3))):  # false alarms
            boxes.append(np.concatenate([rng.uniform(0, 80, 2), rng.uniform(3, 30, 2)]))
            classes.append(int(rng.integers(0, num_classes)))
            scores.append(float(np.round(rng.uniform(0.01, 0.7), 2)))
        ground_truth.append((gt, gc))
        detections.append((np.asarray(boxes).reshape(-1, 4), np.asarray(classes, dtype=int), np.asarray(scores)))
    return ground_truth, detections


def _pycocotools(ground_truth, detections, num_classes: int) -> list[float]:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    images: list[dict] = []
    annotations: list[dict] = []
    results: list[dict] = []
    for image_id, ((gt, gc), (db, dc, ds)) in enumerate(zip(ground_truth, detections), 1):
        images.append({"id": image_id, "width": 200, "height": 200})
        for box, cls in zip(gt, gc):
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": int(cls) + 1,
                                "bbox": [float(v) for v in box], "area": float(box[2] * box[3]), "iscrowd": 0})
        for box, cls, score in zip(db, dc, ds):
            results.append({"image_id": image_id, "category_id": int(cls) + 1, "bbox": [float(v) for v in box],
                            "score": float(score)})
    coco = COCO()
    coco.dataset = {"images": images, "annotations": annotations,
                    "categories": [{"id": i + 1, "name": str(i)} for i in range(num_classes)]}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
        found = coco.loadRes(results) if results else COCO()
        evaluator = COCOeval(coco, found, "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return [float(v) for v in evaluator.stats[:3]]  # mAP, mAP50, mAP75


@pytest.mark.parametrize("seed", range(8))
def test_coco_map_matches_pycocotools(seed):
    rng = np.random.default_rng(seed)
    num_classes = 4
    ground_truth, detections = _scene(rng, num_classes, quality=[0.2, 0.6, 0.9, 0.99][seed % 4])
    ours = model.coco_map(ground_truth, detections, num_classes)
    theirs = _pycocotools(ground_truth, detections, num_classes)
    assert theirs[1] > 0.05  # the scenes are not degenerate: some hits, some misses
    assert [ours["map"], ours["map50"], ours["map75"]] == pytest.approx(theirs, abs=1e-9)


def test_a_class_without_detections_counts_zero_and_one_without_ground_truth_is_left_out():
    gt = [(np.array([[10, 10, 20, 20], [50, 50, 10, 10]], float), np.array([0, 1]))]
    perfect_class0 = [(np.array([[10, 10, 20, 20], [0, 0, 5, 5]], float), np.array([0, 2]), np.array([0.9, 0.8]))]
    ours = model.coco_map(gt, perfect_class0, 3)
    theirs = _pycocotools(gt, perfect_class0, 3)
    assert ours["map50"] == pytest.approx(theirs[1]) == pytest.approx(0.5)  # class 0: 1, class 1: 0, class 2: none
    assert ours["map"] == pytest.approx(theirs[0])


def test_no_ground_truth_at_all_is_minus_one_as_in_cocoeval():
    assert model.coco_map([(np.zeros((0, 4)), np.zeros(0, int))],
                          [(np.array([[1, 1, 5, 5]], float), np.array([0]), np.array([0.5]))], 2)["map50"] == -1


def _grid_with(objects, num_classes=4, size=96):
    """A perfect model output for `objects` [(class, [x, y, w, h])]: the training target itself."""
    boxes = np.array([b for _, b in objects], np.float32)
    classes = np.array([c for c, _ in objects])
    y = model.encode(boxes, classes, size // 4, size // 4, num_classes)
    return y[..., :num_classes + 4]


def test_decode_gives_back_the_encoded_boxes_scaled_to_the_image():
    objects = [(0, [10.0, 12.0, 20.0, 24.0]), (2, [50.0, 40.0, 30.0, 30.0]), (3, [60.0, 5.0, 12.0, 16.0])]
    found = model.decode(_grid_with(objects), 4, scale_x=2.0, scale_y=0.5, threshold=0.5, width=192, height=48)
    assert sorted(c for c, _, _ in found) == [0, 2, 3]
    for cls, box in objects:
        (score, got), = [(s, b) for c, s, b in found if c == cls]
        assert score == pytest.approx(1.0)
        expected = [box[0] * 2, box[1] * 0.5, box[2] * 2, box[3] * 0.5]
        np.testing.assert_allclose(got, expected, atol=1e-3)


def test_decode_suppresses_a_weaker_overlapping_box_of_the_same_class_only():
    out = _grid_with([(1, [20.0, 20.0, 40.0, 40.0])])
    # the object's centre is cell (10, 10); a second peak of class 1 three cells up (not a 3x3
    # neighbour) with the same box size overlaps it with IoU 0.54: NMS removes it
    out[7, 10, 1], out[7, 10, 4:8] = 0.8, out[10, 10, 4:8]
    # a peak at the centre in class 2: a different class is never suppressed
    out[10, 10, 2] = 0.7
    found = model.decode(out, 4, threshold=0.3)
    assert [(c, round(s, 2)) for c, s, _ in found] == [(1, 1.0), (2, 0.7)]
    kept_without_nms = model.decode(out, 4, threshold=0.3, nms_iou=1.0)
    assert len(kept_without_nms) == 3


def test_the_synthetic_set_is_coco_and_deterministic(tmp_path):
    """make_dataset.py: the same seed writes the same bytes; boxes lie inside their images."""
    import zipfile

    make = _load("make_dataset")
    for name in ("a", "b"):
        assert make.main([str(tmp_path / f"{name}.zip"), "--count", "6", "--seed", "3"]) == 0
    assert (tmp_path / "a.zip").read_bytes() == (tmp_path / "b.zip").read_bytes()
    make.main([str(tmp_path / "c.zip"), "--count", "6", "--seed", "4"])
    assert (tmp_path / "c.zip").read_bytes() != (tmp_path / "a.zip").read_bytes()
    with zipfile.ZipFile(tmp_path / "a.zip") as zf:
        doc = json.loads(zf.read("train/annotations.json"))
        assert {"train/annotations.json", "val/annotations.json", "test/annotations.json"} <= set(zf.namelist())
        assert [c["name"] for c in doc["categories"]] == ["circle", "cross", "square", "triangle"]
        assert len(doc["images"]) == 6 and len(doc["annotations"]) >= 6
        per_image: dict[int, int] = {}
        for ann in doc["annotations"]:
            x, y, w, h = ann["bbox"]
            assert 0 <= x and 0 <= y and w > 5 and h > 5 and x + w <= 96.01 and y + h <= 96.01
            per_image[ann["image_id"]] = per_image.get(ann["image_id"], 0) + 1
        assert max(per_image.values()) > 1  # several objects per image
        for im in doc["images"]:
            assert f"train/{im['file_name']}" in zf.namelist()


def _coco_dir(root: Path, split_dir: str, doc: dict, images: dict[str, tuple[int, int]]) -> None:
    from PIL import Image

    folder = root / split_dir
    folder.mkdir(parents=True, exist_ok=True)
    for name, size in images.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", size, (10, 20, 30)).save(folder / name)
    (folder / "annotations.json").write_text(json.dumps(doc))


def test_the_reader_maps_coco_ids_skips_crowds_and_clips_boxes(tmp_path):
    datasource = _load("datasource")
    cats = [{"id": 9, "name": "button"}, {"id": 5, "name": "icon"}]  # ids out of order, with gaps
    _coco_dir(tmp_path, "ds/train", {"categories": cats, "images": [{"id": 7, "file_name": "a/1.png", "width": 50,
                                                                     "height": 40}],
                                     "annotations": [
                                         {"id": 1, "image_id": 7, "category_id": 9, "bbox": [40, 30, 20, 20]},
                                         {"id": 2, "image_id": 7, "category_id": 5, "bbox": [1, 2, 3, 4]},
                                         {"id": 3, "image_id": 7, "category_id": 5, "bbox": [0, 0, 9, 9], "iscrowd": 1},
                                         {"id": 4, "image_id": 99, "category_id": 5, "bbox": [0, 0, 9, 9]}]},
              {"a/1.png": (50, 40)})
    _coco_dir(tmp_path, "ds/val", {"categories": cats, "images": [{"id": 8, "file_name": "2.png"}],
                                   "annotations": []}, {"2.png": (30, 30)})
    splits, meta = datasource.read_archive_dir(str(tmp_path))
    assert meta["categories"] == ["icon", "button"] and meta["coco_category_ids"] == [5, 9]
    assert set(splits) == {"train", "valid"} and splits["valid"][0]["label"]["boxes"].shape == (0, 4)
    (sample,) = splits["train"]
    assert sample["id"] == 7 and sample["data"].endswith("a/1.png")
    np.testing.assert_allclose(sample["label"]["boxes"], [[40, 30, 10, 10], [1, 2, 3, 4]])  # clipped to 50x40
    assert sample["label"]["classes"].tolist() == [1, 0]


@pytest.mark.parametrize("bad, message", [
    ({"file_name": "../outside.png"}, "missing or outside its folder"),
    ({"file_name": "/etc/hostname"}, "missing or outside its folder"),
    ({"file_name": "nope.png"}, "missing or outside its folder"),
])
def test_the_reader_refuses_images_outside_the_archive(tmp_path, bad, message):
    datasource = _load("datasource")
    (tmp_path / "outside.png").write_bytes(b"x")
    _coco_dir(tmp_path, "data/train", {"categories": [{"id": 1, "name": "a"}],
                                       "images": [{"id": 1, **bad}], "annotations": []}, {})
    with pytest.raises(ValueError, match=message):
        datasource.read_archive_dir(str(tmp_path / "data"))


def test_the_reader_names_what_is_missing(tmp_path):
    datasource = _load("datasource")
    with pytest.raises(ValueError, match="no train/annotations.json"):
        datasource.read_archive_dir(str(tmp_path))
    _coco_dir(tmp_path, "x/train", {"categories": [{"id": 1, "name": "a"}], "images": [],
                                    "annotations": [{"id": 1, "image_id": 1, "category_id": 3, "bbox": [0, 0, 1, 1]}]},
              {})
    with pytest.raises(ValueError, match="no train split with images"):
        datasource.read_archive_dir(str(tmp_path))


def test_the_dataflow_scales_and_flips_boxes_with_the_pixels():
    from PIL import Image

    dataflow = _load("dataflow")
    img = Image.new("RGB", (200, 100), (0, 0, 0))
    img.paste((255, 255, 255), (20, 10, 60, 50))  # box [20, 10, 40, 40]
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    sample = {"data": buf.getvalue(), "label": {"boxes": np.array([[20, 10, 40, 40]], np.float32),
                                                "classes": np.array([2], np.int32)}}
    plain = dataflow.prepare(sample, 64)
    assert plain["size"] == [200, 100] and plain["data"].shape == (64, 64, 3)
    np.testing.assert_allclose(plain["label"]["boxes"], [[6.4, 6.4, 12.8, 25.6]], atol=1e-4)
    flipped = dataflow.prepare(sample, 64, flip=True)
    np.testing.assert_allclose(flipped["label"]["boxes"], [[64 - 6.4 - 12.8, 6.4, 12.8, 25.6]], atol=1e-4)
    np.testing.assert_array_equal(flipped["data"], plain["data"][:, ::-1])
    bright = np.argwhere(flipped["data"][..., 0] > 0.5)  # the white square moved with its box
    assert abs(bright[:, 1].min() - (64 - 6.4 - 12.8)) <= 1 and abs(bright[:, 1].max() + 1 - (64 - 6.4)) <= 1
    assert flipped["label"]["classes"].tolist() == [2]


def test_decode_js_decodes_as_model_py_does(tmp_path):
    """decode.js (for the tfjs export) against model.py's decode, on random grids full of peaks,
    overlaps and near-ties: the same detections in the same order."""
    import shutil
    import subprocess

    if not shutil.which("node"):
        pytest.fail("node is not installed (apt-get install -y npm); .ci/run installs it")
    rng = np.random.default_rng(11)
    cases = []
    for i in range(6):
        out = np.concatenate([rng.random((16, 16, 4)) ** 3, rng.normal(0, 0.3, (16, 16, 2)) + 0.5,
                              rng.normal(1.5, 0.6, (16, 16, 2))], axis=-1).astype(np.float32)
        options = {"scaleX": 1.5 + i * 0.1, "scaleY": 0.8, "threshold": 0.2 + 0.05 * i, "nmsIou": 0.3 + 0.05 * i,
                   "maxDetections": 30 + 10 * i, "width": 96, "height": 50}
        cases.append((out, options))
    (tmp_path / "cases.json").write_text(json.dumps([{"data": o.ravel().tolist(), "options": opt} for o, opt in cases]))
    script = tmp_path / "run.js"
    script.write_text(f"""
        const {{ decode }} = require({json.dumps(str(EXAMPLE / "decode.js"))});
        const cases = JSON.parse(require("fs").readFileSync({json.dumps(str(tmp_path / "cases.json"))}, "utf8"));
        console.log(JSON.stringify(cases.map((c) => decode(Float32Array.from(c.data), 16, 16, 4, c.options))));
    """)
    proc = subprocess.run(["node", str(script)], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    from_js = json.loads(proc.stdout)
    for (out, o), js in zip(cases, from_js):
        py = model.decode(out, 4, o["scaleX"], o["scaleY"], o["threshold"], o["maxDetections"], o["nmsIou"],
                          width=o["width"], height=o["height"])
        assert len(py) > 3
        assert [(d["label"], round(d["score"], 5)) for d in js] == [(c, round(s, 5)) for c, s, _ in py]
        np.testing.assert_allclose([d["box"] for d in js], [b for _, _, b in py], atol=1e-3)
