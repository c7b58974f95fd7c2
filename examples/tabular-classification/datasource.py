"""Datasource: a generated, iris-like table of flower measurements.

Without `url`, it writes `train.csv`, `valid.csv` and `test.csv` into
`data/flowers/` with the columns

    sepal_length, sepal_width, petal_length, petal_width, species

(centimetres, one decimal) and returns `sdk.from_csv(..., label="species")`.
Each species (`setosa`, `versicolor`, `virginica`) is drawn from a
correlated normal distribution whose per-species means and spreads are
those of Fisher's iris data, so `setosa` stands apart and the other two
overlap a little, as in the real set. Seeded: same options, same files.

Options (query string): count (rows per species in train, default 100),
validCount (default count // 5), testCount (default count // 2), seed (5).
With `?url=https://host/data/table.zip` (or `.csv`) it downloads that data
instead: an archive holding `train.csv` (and optionally `valid.csv`,
`test.csv`), or one CSV used as the train split; the label column is
`?label=NAME` (default `species`).
"""
import csv
import json
import os

import numpy as np

from sandbox import sdk

COLUMNS = ("sepal_length", "sepal_width", "petal_length", "petal_width")
# Per-species means and standard deviations of Fisher's iris data (cm).
SPECIES = {
    "setosa": ((5.006, 3.428, 1.462, 0.246), (0.352, 0.379, 0.174, 0.105)),
    "versicolor": ((5.936, 2.770, 4.260, 1.326), (0.516, 0.314, 0.470, 0.198)),
    "virginica": ((6.588, 2.974, 5.552, 2.026), (0.636, 0.322, 0.552, 0.275)),
}
# A within-species correlation between the four measurements.
CORRELATION = np.array(
    [
        [1.0, 0.5, 0.6, 0.4],
        [0.5, 1.0, 0.4, 0.4],
        [0.6, 0.4, 1.0, 0.5],
        [0.4, 0.4, 0.5, 1.0],
    ]
)


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


def generate(root, counts, seed):
    params = {"counts": counts, "seed": seed, "version": 1}
    marker = os.path.join(root, "generated.json")
    if os.path.isfile(marker):
        with open(marker, encoding="utf-8") as f:
            if json.load(f) == params:
                return
    os.makedirs(root, exist_ok=True)
    rng = np.random.default_rng(seed)
    for split, count in counts.items():
        rows = []
        for species, (mean, std) in SPECIES.items():
            cov = CORRELATION * np.outer(std, std)
            values = rng.multivariate_normal(mean, cov, size=count)
            values = np.clip(values, 0.1, None)
            rows += [[f"{v:.1f}" for v in row] + [species] for row in values]
        order = rng.permutation(len(rows))
        with open(os.path.join(root, f"{split}.csv"), "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(list(COLUMNS) + ["species"])
            writer.writerows(rows[i] for i in order)
    with open(marker, "w", encoding="utf-8") as f:
        json.dump(params, f)


def _remote(url, label, ctx):
    path = ctx.download(url)
    if path.lower().endswith(".csv"):
        return sdk.from_csv(train=path, label=label)
    folder = ctx.extract(path)
    found = {}
    for dirpath, _, files in os.walk(folder):
        for split in ("train", "valid", "test"):
            if f"{split}.csv" in files and split not in found:
                found[split] = os.path.join(dirpath, f"{split}.csv")
    if "train" not in found:
        raise ValueError("the archive has no train.csv")
    return sdk.from_csv(label=label, **found)


def datasource(options, ctx):
    label = options.get("label") or "species"
    if isinstance(label, list):
        label = label[-1]
    url = options.get("url")
    if isinstance(url, list):
        url = url[-1]
    if url:
        return _remote(url, label, ctx)

    count = _opt(options, "count", 100)
    if count < 1:
        raise ValueError("count must be >= 1")
    counts = {
        "train": count,
        "valid": _opt(options, "validCount", max(1, count // 5)),
        "test": _opt(options, "testCount", max(1, count // 2)),
    }
    seed = _opt(options, "seed", 5)
    root = os.path.join(ctx.workspace.data_dir, "flowers")
    generate(root, counts, seed)
    return sdk.from_csv(
        train=os.path.join(root, "train.csv"),
        valid=os.path.join(root, "valid.csv"),
        test=os.path.join(root, "test.csv"),
        label="species",
        meta={"source": "generated iris-like measurements", "seed": seed},
    )
