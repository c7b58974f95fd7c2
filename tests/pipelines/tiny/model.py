"""Tiny model: a mean-difference classifier, saved as JSON."""
import json
import os

import numpy as np


def train(runtime, options, ctx):
    epochs = int(options.get("epochs", 2))
    train = runtime.dataset.train
    for epoch in range(epochs):
        train.seek(0)
        xs, ys = [], []
        while True:
            batch = train.next_batch(32)
            if not batch:
                break
            xs.extend(s["data"] for s in batch)
            ys.extend(s["label"] for s in batch)
        x, y = np.stack(xs), np.array(ys)
        w = x[y == 1].mean(axis=0) - x[y == 0].mean(axis=0)
        acc = float(((x @ w > 0).astype(int) == y).mean())
        runtime.log_metrics(step=epoch, accuracy=acc, samples=len(xs))
        runtime.notify_progress((epoch + 1) * 100 / epochs, epoch=epoch + 1)
    with open(os.path.join(runtime.read_model(), "weights.json"), "w") as f:
        json.dump({"w": w.tolist(), "categories": runtime.dataset.meta.get("categories")}, f)


def predict(runtime, options, ctx):
    with open(os.path.join(runtime.read_model(), "weights.json")) as f:
        model = json.load(f)
    w = np.array(model["w"])
    out = []
    for sample in runtime.dataset.predicted:
        score = float(np.asarray(sample["data"]) @ w)
        out.append({"label": model["categories"][int(score > 0)], "score": score})
    return out
