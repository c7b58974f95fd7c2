"""Model: Keras text classifier with its own TextVectorization layer.

The vocabulary is learnt (`adapt`) from the train split inside this stage,
and the vectorizer is part of the saved model, so `model.keras` takes raw
(normalised) strings: predict needs nothing else. Layers:
TextVectorization -> Embedding(32) -> Conv1D(64, 3) (word pairs and
triples, so "not recommend" differs from "recommend") -> global max
pooling -> Dense(32) -> softmax.

Samples: `data` a string, `label` a category name (or its index) from
`meta["categories"]`. Training streams batches from `runtime.dataset.train`
through `tf.data.Dataset.from_generator`, reshuffled every epoch; one
generator runs through every epoch, so the stages upstream never idle
between them.

Options (pipeline `options.train`, query values win; strings accepted):
epochs (10), batchSize (32), learningRate (0.003), maxTokens (5000),
sequenceLength (48), seed (42).

Writes `model.keras` and `labels.json`; logs loss, accuracy, val_loss,
val_accuracy per epoch and `test_accuracy` at the end.
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


def _label_index(label, categories):
    if label in categories:
        return categories.index(label)
    if isinstance(label, int) and 0 <= label < len(categories):
        return label
    if str(label) in [str(c) for c in categories]:
        return [str(c) for c in categories].index(str(label))
    raise ValueError(f"label {label!r} is not one of the categories {categories}")


def _stream(dataset, batch_size, categories, epoch_seed=None, texts_only=False, epochs=1):
    """A generator function over batches of `dataset`, `epochs` times over, each epoch
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
                x = np.array([[str(s["data"])] for s in batch], dtype=object)
                if texts_only:
                    yield x
                else:
                    yield x, np.array([_label_index(s["label"], categories) for s in batch], dtype=np.int32)

    return gen


def _tf_dataset(tf, gen, n, batch_size, texts_only=False, epochs=1):
    x_spec = tf.TensorSpec(shape=(None, 1), dtype=tf.string)
    sig = x_spec if texts_only else (x_spec, tf.TensorSpec(shape=(None,), dtype=tf.int32))
    # No prefetch: one reader at a time keeps the (possibly remote) stream sequential.
    ds = tf.data.Dataset.from_generator(gen, output_signature=sig)
    return ds.apply(tf.data.experimental.assert_cardinality(epochs * -(-n // batch_size)))


def train(runtime, options, ctx):
    import keras
    import tensorflow as tf

    epochs = _opt(options, "epochs", 10, int)
    batch_size = _opt(options, "batchSize", 32, int)
    lr = _opt(options, "learningRate", 0.003, float)
    max_tokens = _opt(options, "maxTokens", 5000, int)
    seq_len = _opt(options, "sequenceLength", 48, int)
    seed = _opt(options, "seed", 42, int)
    keras.utils.set_random_seed(seed)

    pool = runtime.dataset
    categories = list(pool.meta.get("categories") or [])
    if not categories:
        raise ValueError("the dataset meta has no categories")
    if pool.train is None or len(pool.train) == 0:
        raise ValueError("the dataset has no train split")

    vectorize = keras.layers.TextVectorization(
        max_tokens=max_tokens, output_mode="int", output_sequence_length=seq_len, name="vectorize"
    )
    vectorize.adapt(_tf_dataset(tf, _stream(pool.train, 256, categories, texts_only=True), len(pool.train), 256, True))
    vocab = vectorize.vocabulary_size()
    print(f"vocabulary: {vocab} tokens")

    inputs = keras.Input(shape=(1,), dtype="string", name="text")
    x = vectorize(inputs)
    x = keras.layers.Embedding(vocab, 32, name="embed")(x)
    x = keras.layers.Conv1D(64, 3, padding="same", activation="relu")(x)
    x = keras.layers.GlobalMaxPooling1D()(x)
    x = keras.layers.Dropout(0.3)(x)
    x = keras.layers.Dense(32, activation="relu")(x)
    outputs = keras.layers.Dense(len(categories), activation="softmax")(x)
    model = keras.Model(inputs, outputs)
    model.compile(
        optimizer=keras.optimizers.Adam(lr), loss="sparse_categorical_crossentropy", metrics=["accuracy"]
    )

    # One generator through every epoch (steps_per_epoch keeps Keras on it) and the validation
    # split read once: the stages upstream never stop and wait at an epoch boundary.
    steps = -(-len(pool.train) // batch_size)
    train_ds = _tf_dataset(tf, _stream(pool.train, batch_size, categories, epoch_seed=seed, epochs=epochs),
                           len(pool.train), batch_size, epochs=epochs)
    valid_ds = None
    if pool.valid is not None and len(pool.valid) > 0:
        valid_ds = _tf_dataset(tf, _stream(pool.valid, batch_size, categories), len(pool.valid), batch_size).cache()

    class Progress(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            logs = {k: float(v) for k, v in (logs or {}).items()}
            runtime.log_metrics(step=epoch + 1, **logs)
            runtime.notify_progress(90.0 * (epoch + 1) / epochs, epoch=epoch + 1, epochs=epochs)

    model.fit(train_ds, validation_data=valid_ds, epochs=epochs, steps_per_epoch=steps, callbacks=[Progress()],
              shuffle=False, verbose=2)

    if pool.test is not None and len(pool.test) > 0:
        test_ds = _tf_dataset(tf, _stream(pool.test, batch_size, categories), len(pool.test), batch_size)
        loss, acc = model.evaluate(test_ds, verbose=0)
        runtime.log_metrics(step=epochs, test_loss=float(loss), test_accuracy=float(acc))
        print(f"test accuracy: {acc:.4f} on {len(pool.test)} reviews")

    with tempfile.TemporaryDirectory(prefix="text-cls-") as out:  # save_model copies
        model_path = os.path.join(out, "model.keras")
        model.save(model_path)
        labels_path = os.path.join(out, "labels.json")
        with open(labels_path, "w", encoding="utf-8") as f:
            json.dump({"categories": [str(c) for c in categories]}, f)
        runtime.save_model(model_path)
        runtime.save_model(labels_path)
    runtime.notify_progress(100.0)


def predict(runtime, options, ctx):
    import keras
    import tensorflow as tf

    model_dir = runtime.read_model()
    with open(os.path.join(model_dir, "labels.json"), encoding="utf-8") as f:
        categories = json.load(f)["categories"]
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
        x = tf.constant([[str(s["data"])] for s in batch], dtype=tf.string)
        for p in np.asarray(model.predict(x, verbose=0)):
            i = int(np.argmax(p))
            results.append({"label": categories[i], "score": float(p[i])})
    return results
