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

    images, annotations, results = [], [], []
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
