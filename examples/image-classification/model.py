"""Model: a small Keras CNN for image classification, trained by streaming.

Three conv blocks (32-32 / 64 / 64 filters, max pooling), a global max pool
and a 64-unit dense layer: about 70k parameters.

Samples come from the dataflow as float32 arrays (h, w, 3) in [0, 1] with
an integer `label` (index into `meta["categories"]`). Training pulls
batches from `runtime.dataset.train` through `tf.data.Dataset.from_generator`
(re-shuffled every epoch), so the data set never has to fit in memory.

Written for streaming from other stages: one generator runs through every
epoch (`steps_per_epoch` keeps Keras on the same iterator), so the stages
upstream never stop and wait at an epoch boundary while TensorFlow finishes
its last batches; the validation split, small, is streamed once and cached.

Options (pipeline `options.train`, query values win; strings accepted):
epochs (10), batchSize (32), learningRate (0.001), seed (42).

Writes `model.keras` and `labels.json` into the model dir; logs loss,
accuracy, val_loss, val_accuracy per epoch and `test_accuracy` at the end.
"""
import json
import os
import tempfile

import numpy as np


def _opt(options, key, default, cast):
    value = options.get(key, default)
    if isinstance(value, list):
        value = value[-1] if value else default
    if value is None or value == "":
        return default
    return cast(value)


def _stream(dataset, batch_size, h, w, epoch_seed=None, epochs=1):
    """A generator function over (x, y) batches of `dataset`, `epochs` times over, each epoch
    reshuffled with epoch_seed + epoch (if given)."""

    def gen():
        for epoch in range(epochs):
            if epoch_seed is not None:
                dataset.shuffle(epoch_seed + epoch)
            dataset.seek(0)
            while True:
                batch = dataset.next_batch(batch_size)
                if not batch:
                    break
                x = np.stack([np.asarray(s["data"], dtype=np.float32).reshape(h, w, 3) for s in batch])
                y = np.asarray([int(s["label"]) for s in batch], dtype=np.int32)
                yield x, y

    return gen


def _tf_dataset(tf, gen, h, w, n, batch_size, epochs=1):
    sig = (
        tf.TensorSpec(shape=(None, h, w, 3), dtype=tf.float32),
        tf.TensorSpec(shape=(None,), dtype=tf.int32),
    )
    # No prefetch: the generator reads a (possibly remote) dataset; one reader
    # at a time keeps the stage-to-stage stream strictly sequential.
    ds = tf.data.Dataset.from_generator(gen, output_signature=sig)
    return ds.apply(tf.data.experimental.assert_cardinality(epochs * -(-n // batch_size)))


def build(keras, h, w, classes, lr):
    model = keras.Sequential(
        [
            keras.Input(shape=(h, w, 3)),
            keras.layers.Conv2D(32, 3, padding="same", activation="relu"),
            keras.layers.Conv2D(32, 3, padding="same", activation="relu"),
            keras.layers.MaxPooling2D(),
            keras.layers.Conv2D(64, 3, padding="same", activation="relu"),
            keras.layers.MaxPooling2D(),
            keras.layers.Conv2D(64, 3, padding="same", activation="relu"),
            keras.layers.GlobalMaxPooling2D(),
            keras.layers.Dense(64, activation="relu"),
            keras.layers.Dense(classes, activation="softmax"),
        ]
    )
    model.compile(
        optimizer=keras.optimizers.Adam(lr),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    return model


def train(runtime, options, ctx):
    import keras
    import tensorflow as tf

    epochs = _opt(options, "epochs", 10, int)
    batch_size = _opt(options, "batchSize", 32, int)
    lr = _opt(options, "learningRate", 0.001, float)
    seed = _opt(options, "seed", 42, int)
    keras.utils.set_random_seed(seed)

    pool = runtime.dataset
    meta = pool.meta
    categories = list(meta.get("categories") or [])
    if not categories:
        raise ValueError("the dataset meta has no categories")
    dim = meta.get("dimension") or {}
    w, h = int(dim.get("x", 32)), int(dim.get("y", 32))
    if pool.train is None or len(pool.train) == 0:
        raise ValueError("the dataset has no train split")

    model = build(keras, h, w, len(categories), lr)
    steps = -(-len(pool.train) // batch_size)
    train_ds = _tf_dataset(tf, _stream(pool.train, batch_size, h, w, epoch_seed=seed, epochs=epochs), h, w,
                           len(pool.train), batch_size, epochs)
    valid_ds = None
    if pool.valid is not None and len(pool.valid) > 0:
        # Read once, then from memory: reopening the stream each epoch would make the stages
        # upstream redo its work (and wait for the request) at every epoch boundary.
        valid_ds = _tf_dataset(tf, _stream(pool.valid, batch_size, h, w), h, w, len(pool.valid), batch_size).cache()

    class Progress(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            logs = {k: float(v) for k, v in (logs or {}).items()}
            runtime.log_metrics(step=epoch + 1, **logs)
            runtime.notify_progress(90.0 * (epoch + 1) / epochs, epoch=epoch + 1, epochs=epochs)

    model.fit(
        train_ds,  # one pass of the generator covers every epoch, reshuffled per epoch
        validation_data=valid_ds,
        epochs=epochs,
        steps_per_epoch=steps,
        callbacks=[Progress()],
        shuffle=False,  # the generator shuffles
        verbose=2,
    )

    if pool.test is not None and len(pool.test) > 0:
        loss, acc = model.evaluate(_tf_dataset(tf, _stream(pool.test, batch_size, h, w), h, w, len(pool.test), batch_size), verbose=0)
        runtime.log_metrics(step=epochs, test_loss=float(loss), test_accuracy=float(acc))
        print(f"test accuracy: {acc:.4f} on {len(pool.test)} images")

    with tempfile.TemporaryDirectory(prefix="image-cls-") as out:  # save_model copies
        model_path = os.path.join(out, "model.keras")
        model.save(model_path)
        labels_path = os.path.join(out, "labels.json")
        with open(labels_path, "w", encoding="utf-8") as f:
            json.dump({"categories": categories, "dimension": {"x": w, "y": h, "z": 3}}, f)
        runtime.save_model(model_path)
        runtime.save_model(labels_path)
    runtime.notify_progress(100.0)


def predict(runtime, options, ctx):
    import keras

    model_dir = runtime.read_model()
    with open(os.path.join(model_dir, "labels.json"), encoding="utf-8") as f:
        info = json.load(f)
    categories = info["categories"]
    w, h = int(info["dimension"]["x"]), int(info["dimension"]["y"])
    model = keras.models.load_model(os.path.join(model_dir, "model.keras"))

    dataset = runtime.dataset.predicted
    results = []
    if dataset is None:
        return results
    dataset.seek(0)
    while True:
        batch = dataset.next_batch(64)
        if not batch:
            break
        x = np.stack([np.asarray(s["data"], dtype=np.float32).reshape(h, w, 3) for s in batch])
        probs = model.predict(x, verbose=0)
        for p in probs:
            i = int(np.argmax(p))
            results.append({"label": str(categories[i]), "score": float(p[i])})
    return results
