"""Model: a small single-stage detector (CenterNet-style) in Keras, trained from scratch.

The network maps an S x S image to a grid of S/4 x S/4 cells (stride 4). Each
cell holds, per class, the probability that an object's centre falls in it
(a heat map, sigmoid) and four regression values: the centre's offset inside
the cell (x, y) and the box's log width and height in cells. One output
tensor, (S/4, S/4, classes + 4), of built-in layers only, so the same model
exports to TensorFlow.js (`decode.js` beside this file decodes it in JS).

Backbone: conv 16 (stride 2) / conv 32 / conv 32 (stride 2) / conv 64, then
two dilated 3x3 convs (dilation 2 and 4) for a receptive field as large as
the largest shapes, batch norm and ReLU after each; a 3x3 conv and a 1x1 conv
per head. About 110k parameters.

Training: the heat map target is a Gaussian around each centre, with the
penalty-reduced focal loss of CenterNet (Zhou et al., "Objects as Points",
2019); L1 on the regression values at the centres. Batches stream through
`tf.data.Dataset.from_generator`, one generator for every epoch (as in the
image example), targets encoded here from the boxes the dataflow gives.

Decoding (predict, evaluation): local maxima of the heat map (3x3) above a
score threshold, the top 100, boxes from the regression values, then
per-class non-maximum suppression (IoU > 0.5). Boxes come out in the input
image's pixels, [x, y, w, h] from the top-left corner.

Evaluation: COCO mAP@[.5:.95] and mAP@0.5 on the test split (`coco_map`, this
file's own implementation of COCOeval's bbox protocol: 101-point interpolated
precision, greedy matching by score, at most 100 detections per image and
class), logged as `test_map`, `test_map50`, `test_map75`.

Options (pipeline `options.train`, query values win; strings accepted):
epochs (20), batchSize (16), learningRate (0.004, cosine decay), seed (42);
for predict: threshold (0.3, minimum score), maxDetections (100), nmsIou (0.5).

Writes `model.keras` and `detector.json` (categories, input size, stride).
"""
import json
import os
import tempfile

import numpy as np

STRIDE = 4
EVAL_THRESHOLD = 0.01  # COCO evaluation wants the low-scoring detections too


def _opt(options, key, default, cast):
    value = options.get(key, default)
    if isinstance(value, list):
        value = value[-1] if value else default
    if value is None or value == "":
        return default
    return cast(value)


# ------------------------------------------------------------------ targets


def _gaussian_radius(h, w, min_overlap=0.7):
    """CenterNet's radius: the largest shift of a box's corners that keeps IoU >= min_overlap."""
    a1, b1, c1 = 1, h + w, w * h * (1 - min_overlap) / (1 + min_overlap)
    r1 = (b1 + np.sqrt(b1 ** 2 - 4 * a1 * c1)) / 2
    a2, b2, c2 = 4, 2 * (h + w), (1 - min_overlap) * w * h
    r2 = (b2 + np.sqrt(b2 ** 2 - 4 * a2 * c2)) / 2
    a3, b3, c3 = 4 * min_overlap, -2 * min_overlap * (h + w), (min_overlap - 1) * w * h
    r3 = (b3 + np.sqrt(b3 ** 2 - 4 * a3 * c3)) / 2
    return min(r1, r2, r3)


def encode(boxes, classes, grid_h, grid_w, num_classes):
    """The training target of one image: (grid_h, grid_w, classes + 5) = heat map, offset x/y,
    log w/h (in cells), and a mask of the centre cells. `boxes` are [x, y, w, h] in input pixels."""
    y = np.zeros((grid_h, grid_w, num_classes + 5), dtype=np.float32)
    ys, xs = np.mgrid[0:grid_h, 0:grid_w].astype(np.float32)
    for (bx, by, bw, bh), cls in zip(np.asarray(boxes, dtype=np.float32).reshape(-1, 4), np.asarray(classes).ravel()):
        if bw <= 0 or bh <= 0 or not 0 <= int(cls) < num_classes:
            continue
        cx, cy = (bx + bw / 2) / STRIDE, (by + bh / 2) / STRIDE
        ix, iy = int(np.clip(np.floor(cx), 0, grid_w - 1)), int(np.clip(np.floor(cy), 0, grid_h - 1))
        radius = max(0.0, _gaussian_radius(bh / STRIDE, bw / STRIDE))
        sigma = (2 * radius + 1) / 6
        g = np.exp(-((xs - ix) ** 2 + (ys - iy) ** 2) / (2 * sigma * sigma))
        y[..., int(cls)] = np.maximum(y[..., int(cls)], g)
        y[iy, ix, num_classes:] = [cx - ix, cy - iy, np.log(bw / STRIDE), np.log(bh / STRIDE), 1.0]
    return y


# ------------------------------------------------------------------ network and loss


def build(keras, size, num_classes):
    """The detector for `size` x `size` inputs: one output (size/4, size/4, num_classes + 4)."""
    layers = keras.layers

    def conv(x, filters, stride=1, dilation=1):
        x = layers.Conv2D(filters, 3, strides=stride, dilation_rate=dilation, padding="same", use_bias=False)(x)
        x = layers.BatchNormalization()(x)
        return layers.ReLU()(x)

    inputs = keras.Input(shape=(size, size, 3))
    x = conv(inputs, 16, stride=2)
    x = conv(x, 32)
    x = conv(x, 32, stride=2)
    x = conv(x, 64)
    x = conv(x, 64, dilation=2)
    x = conv(x, 64, dilation=4)
    heat = layers.Conv2D(32, 3, padding="same", activation="relu")(x)
    # bias -2.19: every cell starts at probability 0.1, as CenterNet does, so the
    # focal loss of the many empty cells does not swamp the first steps
    heat = layers.Conv2D(num_classes, 1, activation="sigmoid",
                         bias_initializer=keras.initializers.Constant(-2.19), name="heat")(heat)
    reg = layers.Conv2D(32, 3, padding="same", activation="relu")(x)
    reg = layers.Conv2D(4, 1, name="regression")(reg)
    return keras.Model(inputs, layers.Concatenate(name="detections")([heat, reg]), name="centernet")


def make_loss(tf, num_classes):
    """Penalty-reduced focal loss on the heat map + L1 on the regression at object centres."""

    def loss(y_true, y_pred):
        heat_t, reg_t, mask = y_true[..., :num_classes], y_true[..., num_classes:num_classes + 4], y_true[..., -1:]
        heat_p = tf.clip_by_value(y_pred[..., :num_classes], 1e-4, 1 - 1e-4)
        reg_p = y_pred[..., num_classes:num_classes + 4]
        pos = tf.cast(heat_t >= 1.0 - 1e-4, tf.float32)
        pos_loss = tf.math.log(heat_p) * tf.square(1 - heat_p) * pos
        neg_loss = tf.math.log(1 - heat_p) * tf.square(heat_p) * tf.pow(1 - heat_t, 4) * (1 - pos)
        n = tf.maximum(tf.reduce_sum(pos), 1.0)
        focal = -(tf.reduce_sum(pos_loss) + tf.reduce_sum(neg_loss)) / n
        l1 = tf.reduce_sum(tf.abs(reg_t - reg_p) * mask) / tf.maximum(tf.reduce_sum(mask), 1.0)
        return focal + l1

    return loss


# ------------------------------------------------------------------ decoding


def box_iou(box, boxes):
    """IoU of one [x, y, w, h] box with each of `boxes` (n, 4)."""
    x0 = np.maximum(box[0], boxes[:, 0])
    y0 = np.maximum(box[1], boxes[:, 1])
    x1 = np.minimum(box[0] + box[2], boxes[:, 0] + boxes[:, 2])
    y1 = np.minimum(box[1] + box[3], boxes[:, 1] + boxes[:, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    union = box[2] * box[3] + boxes[:, 2] * boxes[:, 3] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def nms(boxes, scores, iou_threshold):
    """Indices kept by greedy non-maximum suppression, highest score first."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])  # stable: ties keep grid order
    keep = []
    suppressed = np.zeros(len(scores), dtype=bool)
    for i in order:
        if suppressed[i]:
            continue
        keep.append(i)
        suppressed |= box_iou(boxes[i], boxes) > iou_threshold
        suppressed[i] = True
    return keep


def decode(output, num_classes, scale_x=1.0, scale_y=1.0, threshold=0.3, max_detections=100, nms_iou=0.5,
           width=None, height=None):
    """Detections [(class, score, [x, y, w, h])] from one output grid (gh, gw, classes + 4).

    Boxes are scaled by (scale_x, scale_y) from input pixels to the caller's image and
    clipped to (width, height) when given. `decode.js` does exactly this in JavaScript."""
    out = np.asarray(output, dtype=np.float32)
    gh, gw = out.shape[:2]
    heat = out[..., :num_classes]
    padded = np.pad(heat, ((1, 1), (1, 1), (0, 0)), constant_values=-np.inf)
    local_max = np.max(np.stack([padded[dy:dy + gh, dx:dx + gw] for dy in range(3) for dx in range(3)]), axis=0)
    peaks = np.argwhere((heat >= local_max) & (heat >= threshold))  # (y, x, class), grid order
    scores = heat[peaks[:, 0], peaks[:, 1], peaks[:, 2]] if len(peaks) else np.zeros(0, np.float32)
    order = sorted(range(len(peaks)), key=lambda i: -scores[i])[:max_detections]
    candidates = []
    for i in order:
        iy, ix, cls = (int(v) for v in peaks[i])
        off_x, off_y, log_w, log_h = out[iy, ix, num_classes:num_classes + 4]
        w = float(np.exp(np.clip(log_w, -10, 10))) * STRIDE
        h = float(np.exp(np.clip(log_h, -10, 10))) * STRIDE
        cx, cy = (ix + float(off_x)) * STRIDE, (iy + float(off_y)) * STRIDE
        x0, y0, x1, y1 = (cx - w / 2) * scale_x, (cy - h / 2) * scale_y, (cx + w / 2) * scale_x, (cy + h / 2) * scale_y
        if width is not None:
            x0, x1 = max(0.0, x0), min(float(width), x1)
        if height is not None:
            y0, y1 = max(0.0, y0), min(float(height), y1)
        if x1 > x0 and y1 > y0:
            candidates.append((cls, float(scores[i]), [x0, y0, x1 - x0, y1 - y0]))
    result = []
    for cls in sorted({c for c, _, _ in candidates}):
        mine = [d for d in candidates if d[0] == cls]
        boxes = np.asarray([d[2] for d in mine], dtype=np.float64)
        result.extend(mine[i] for i in nms(boxes, [d[1] for d in mine], nms_iou))
    result.sort(key=lambda d: -d[1])
    return result


# ------------------------------------------------------------------ COCO mAP


def _iou_matrix(dets, gts):
    """IoU (len(dets), len(gts)) of [x, y, w, h] boxes, as COCO's maskUtils.iou computes it for boxes."""
    if len(dets) == 0 or len(gts) == 0:
        return np.zeros((len(dets), len(gts)))
    return np.stack([box_iou(d, gts) for d in dets])


def coco_map(ground_truth, detections, num_classes, max_detections=100):
    """COCO bbox mAP, the COCOeval protocol for area "all" and no crowd boxes.

    ground_truth: per image (boxes (n, 4) [x, y, w, h], classes (n,));
    detections: per image (boxes (m, 4), classes (m,), scores (m,)), same image order.
    Returns {"map": mAP@[.5:.95], "map50": mAP@0.5, "map75": mAP@0.75}; -1 where no class has a ground truth."""
    iou_thresholds = np.linspace(0.5, 0.95, 10)
    recall_thresholds = np.linspace(0.0, 1.0, 101)
    precision = -np.ones((len(iou_thresholds), len(recall_thresholds), num_classes))
    for cls in range(num_classes):
        scores, matched, n_gt = [], [], 0
        for (gt_boxes, gt_classes), (dt_boxes, dt_classes, dt_scores) in zip(ground_truth, detections):
            gt = np.asarray(gt_boxes, dtype=np.float64).reshape(-1, 4)[np.asarray(gt_classes).ravel() == cls]
            sel = np.asarray(dt_classes).ravel() == cls
            dt = np.asarray(dt_boxes, dtype=np.float64).reshape(-1, 4)[sel]
            ds = np.asarray(dt_scores, dtype=np.float64).ravel()[sel]
            if len(gt) == 0 and len(dt) == 0:
                continue
            order = np.argsort(-ds, kind="mergesort")[:max_detections]
            dt, ds = dt[order], ds[order]
            ious = _iou_matrix(dt, gt)
            n_gt += len(gt)
            hits = np.zeros((len(iou_thresholds), len(dt)), dtype=bool)
            for t, threshold in enumerate(iou_thresholds):
                taken = np.zeros(len(gt), dtype=bool)
                for d in range(len(dt)):
                    best, best_iou = -1, min(threshold, 1 - 1e-10)
                    for g in range(len(gt)):
                        if taken[g] or ious[d, g] < best_iou:
                            continue
                        best, best_iou = g, ious[d, g]
                    if best >= 0:
                        taken[best] = True
                        hits[t, d] = True
            scores.append(ds)
            matched.append(hits)
        if n_gt == 0:
            continue
        all_scores = np.concatenate(scores) if scores else np.zeros(0)
        order = np.argsort(-all_scores, kind="mergesort")
        hits = np.concatenate(matched, axis=1)[:, order] if matched else np.zeros((len(iou_thresholds), 0), bool)
        for t in range(len(iou_thresholds)):
            tp = np.cumsum(hits[t]).astype(np.float64)
            fp = np.cumsum(~hits[t]).astype(np.float64)
            recall = tp / n_gt
            prec = tp / (tp + fp + np.spacing(1))
            for i in range(len(prec) - 1, 0, -1):  # the precision envelope
                prec[i - 1] = max(prec[i - 1], prec[i])
            q = np.zeros(len(recall_thresholds))
            idx = np.searchsorted(recall, recall_thresholds, side="left")
            ok = idx < len(prec)
            q[ok] = prec[idx[ok]]
            precision[t, :, cls] = q

    def mean(p):
        valid = p[p > -1]
        return float(valid.mean()) if valid.size else -1.0

    return {"map": mean(precision), "map50": mean(precision[0]), "map75": mean(precision[5])}


# ------------------------------------------------------------------ streaming


def _stack(batch, size):
    return np.stack([np.asarray(s["data"], dtype=np.float32).reshape(size, size, 3) for s in batch])


def _stream(dataset, batch_size, size, num_classes, epoch_seed=None, epochs=1):
    grid = size // STRIDE

    def gen():
        for epoch in range(epochs):
            if epoch_seed is not None:
                dataset.shuffle(epoch_seed + epoch)
            dataset.seek(0)
            while True:
                batch = dataset.next_batch(batch_size)
                if not batch:
                    break
                y = np.stack([encode(s["label"]["boxes"], s["label"]["classes"], grid, grid, num_classes)
                              for s in batch])
                yield _stack(batch, size), y

    return gen


def _tf_dataset(tf, gen, size, num_classes, n, batch_size, epochs=1):
    grid = size // STRIDE
    sig = (tf.TensorSpec(shape=(None, size, size, 3), dtype=tf.float32),
           tf.TensorSpec(shape=(None, grid, grid, num_classes + 5), dtype=tf.float32))
    ds = tf.data.Dataset.from_generator(gen, output_signature=sig)
    return ds.apply(tf.data.experimental.assert_cardinality(epochs * -(-n // batch_size)))


def evaluate(model, dataset, size, num_classes, batch_size=32):
    """COCO mAP of `model` on `dataset` (samples with label boxes in input pixels)."""
    ground_truth, detections = [], []
    dataset.seek(0)
    while True:
        batch = dataset.next_batch(batch_size)
        if not batch:
            break
        outputs = model.predict(_stack(batch, size), verbose=0)
        for sample, out in zip(batch, outputs):
            ground_truth.append((sample["label"]["boxes"], sample["label"]["classes"]))
            found = decode(out, num_classes, threshold=EVAL_THRESHOLD)
            detections.append((np.asarray([d[2] for d in found]).reshape(-1, 4), [d[0] for d in found],
                               [d[1] for d in found]))
    return coco_map(ground_truth, detections, num_classes), len(ground_truth)


# ------------------------------------------------------------------ entries


def train(runtime, options, ctx):
    import time

    import keras
    import tensorflow as tf

    epochs = _opt(options, "epochs", 20, int)
    batch_size = _opt(options, "batchSize", 16, int)
    lr = _opt(options, "learningRate", 0.004, float)
    seed = _opt(options, "seed", 42, int)
    keras.utils.set_random_seed(seed)
    gpus = tf.config.list_physical_devices("GPU")
    # One line a GPU check can grep (bench/gpu_check.sh): what TensorFlow saw in this stage.
    print(f"tensorflow devices: GPU {len(gpus)} {[g.name for g in gpus]}", flush=True)

    pool = runtime.dataset
    meta = pool.meta
    categories = list(meta.get("categories") or [])
    if not categories:
        raise ValueError("the dataset meta has no categories")
    size = int((meta.get("dimension") or {}).get("x", 96))
    if size % STRIDE:
        raise ValueError(f"the input size ({size}) must be a multiple of {STRIDE}")
    if pool.train is None or len(pool.train) == 0:
        raise ValueError("the dataset has no train split")
    num_classes = len(categories)

    steps = -(-len(pool.train) // batch_size)
    model = build(keras, size, num_classes)
    schedule = keras.optimizers.schedules.CosineDecay(lr, decay_steps=epochs * steps, alpha=0.02)
    model.compile(optimizer=keras.optimizers.Adam(schedule), loss=make_loss(tf, num_classes))
    train_ds = _tf_dataset(tf, _stream(pool.train, batch_size, size, num_classes, epoch_seed=seed, epochs=epochs),
                           size, num_classes, len(pool.train), batch_size, epochs)
    valid_ds = None
    if pool.valid is not None and len(pool.valid) > 0:
        valid_ds = _tf_dataset(tf, _stream(pool.valid, batch_size, size, num_classes), size, num_classes,
                               len(pool.valid), batch_size).cache()

    class Progress(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            logs = {k: float(v) for k, v in (logs or {}).items() if k != "learning_rate"}
            runtime.log_metrics(step=epoch + 1, **logs)
            runtime.notify_progress(90.0 * (epoch + 1) / epochs, epoch=epoch + 1, epochs=epochs)

    started = time.monotonic()
    model.fit(train_ds, validation_data=valid_ds, epochs=epochs, steps_per_epoch=steps, callbacks=[Progress()],
              shuffle=False, verbose=2)
    train_seconds = time.monotonic() - started
    runtime.log_metrics(step=epochs, train_seconds=train_seconds, gpus=len(gpus))
    print(f"trained {epochs} epochs on {len(pool.train)} images in {train_seconds:.0f} s")

    if pool.test is not None and len(pool.test) > 0:
        result, n = evaluate(model, pool.test, size, num_classes)
        runtime.log_metrics(step=epochs, test_map=result["map"], test_map50=result["map50"],
                            test_map75=result["map75"])
        print(f"test mAP@0.5 {result['map50']:.3f}, mAP@[.5:.95] {result['map']:.3f} on {n} images")

    with tempfile.TemporaryDirectory(prefix="detector-") as out:  # save_model copies
        model_path = os.path.join(out, "model.keras")
        model.save(model_path)
        info_path = os.path.join(out, "detector.json")
        with open(info_path, "w", encoding="utf-8") as f:
            json.dump({"categories": categories, "dimension": {"x": size, "y": size, "z": 3}, "stride": STRIDE,
                       "output": "heat map (classes, sigmoid) + offset x, y + log w, h in cells"}, f)
        runtime.save_model(model_path)
        runtime.save_model(info_path)
    runtime.notify_progress(100.0)


def predict(runtime, options, ctx):
    import keras

    threshold = _opt(options, "threshold", 0.3, float)
    max_detections = _opt(options, "maxDetections", 100, int)
    nms_iou = _opt(options, "nmsIou", 0.5, float)
    model_dir = runtime.read_model()
    with open(os.path.join(model_dir, "detector.json"), encoding="utf-8") as f:
        info = json.load(f)
    categories = info["categories"]
    size = int(info["dimension"]["x"])
    model = keras.models.load_model(os.path.join(model_dir, "model.keras"), compile=False)

    dataset = runtime.dataset.predicted
    results = []
    if dataset is None:
        return results
    dataset.seek(0)
    while True:
        batch = dataset.next_batch(32)
        if not batch:
            break
        outputs = model.predict(_stack(batch, size), verbose=0)
        for sample, out in zip(batch, outputs):
            width, height = (float(v) for v in (sample.get("size") or (size, size)))
            found = decode(out, len(categories), width / size, height / size, threshold, max_detections, nms_iou,
                           width=width, height=height)
            results.append([{"label": str(categories[cls]), "score": round(score, 4),
                             "box": [round(v, 2) for v in box]} for cls, score, box in found])
    return results
