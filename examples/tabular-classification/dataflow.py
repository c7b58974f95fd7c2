"""Dataflow: table rows -> standardised float32 feature vectors.

In training, the mean and standard deviation of every feature column are
computed over the train split (one pass, when this dataflow runs) and put
in meta as `standardize: {columns, mean, std}`, so that predict (where
there is no train split and meta is the one saved at training) uses the
very same numbers. `data` becomes a float32 vector in column order.

A sample's `data` may be:
- a dict {column: value} (a CSV row, what the datasource gives);
- a string (what `predict -s` and `serve` give): a JSON object
  `{"sepal_length": 5.1, ...}`, a JSON list, or comma-separated values in
  column order (`"5.1,3.5,1.4,0.2"`);
- bytes (`predict -u row.csv`): the same, decoded as UTF-8; a CSV with a
  header line and one row is read by column name;
- a list or array of numbers in column order.

A missing column or a non-number is a clear error naming it.
"""
import csv
import io
import json
import math

import numpy as np


def _parse_text(text, columns):
    text = text.strip()
    if text.startswith("{") or text.startswith("["):
        try:
            return json.loads(text)
        except ValueError as e:
            raise ValueError(f"input is not valid JSON: {e}") from None
    lines = [line for line in text.splitlines() if line.strip()]
    if len(lines) == 2:  # a header line and one row
        row = next(csv.DictReader(io.StringIO("\n".join(lines))))
        return {k.strip(): v for k, v in row.items() if k is not None}
    if len(lines) != 1:
        raise ValueError(f"expected one row of {len(columns)} values, got {len(lines)} lines")
    return next(csv.reader(io.StringIO(lines[0])))


def _number(value, column):
    if isinstance(value, str):
        value = value.strip()
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"column {column!r}: {value!r} is not a number") from None
    if math.isnan(number) or math.isinf(number):
        raise ValueError(f"column {column!r}: {value!r} is not a finite number")
    return number


def to_vector(data, columns):
    if isinstance(data, (bytes, bytearray, memoryview)):
        data = bytes(data).decode("utf-8-sig", errors="replace")
    if isinstance(data, str):
        data = _parse_text(data, columns)
    if isinstance(data, dict):
        missing = [c for c in columns if c not in data]
        if missing:
            raise ValueError(f"missing column(s): {', '.join(missing)} (expected {', '.join(columns)})")
        values = [_number(data[c], c) for c in columns]
    else:
        values = list(np.asarray(data, dtype=object).reshape(-1))
        if len(values) != len(columns):
            raise ValueError(f"expected {len(columns)} values ({', '.join(columns)}), got {len(values)}")
        values = [_number(v, c) for v, c in zip(values, columns)]
    return np.asarray(values, dtype=np.float64)


def _stats(dataset, columns):
    """Mean and std of each column over `dataset`, one streaming pass."""
    n, total, total_sq = 0, np.zeros(len(columns)), np.zeros(len(columns))
    dataset.seek(0)
    while True:
        batch = dataset.next_batch(256)
        if not batch:
            break
        x = np.stack([to_vector(s["data"], columns) for s in batch])
        n += len(x)
        total += x.sum(axis=0)
        total_sq += (x * x).sum(axis=0)
    dataset.seek(0)
    if n == 0:
        raise ValueError("the train split is empty")
    mean = total / n
    std = np.sqrt(np.maximum(total_sq / n - mean * mean, 0.0))
    std[std < 1e-8] = 1.0  # a constant column stays 0 after centring
    return mean, std


def dataflow(pool, options, ctx):
    meta = dict(pool.meta or {})
    saved = meta.get("standardize")
    if pool.train is not None and len(pool.train) > 0:
        columns = list(meta.get("columns") or [])
        if not columns:
            first = pool.train.next_batch(1)
            pool.train.seek(0)
            if not first or not isinstance(first[0]["data"], dict):
                raise ValueError("meta has no `columns` and the rows are not dicts")
            columns = list(first[0]["data"])
        mean, std = _stats(pool.train, columns)
        saved = {"columns": columns, "mean": mean.tolist(), "std": std.tolist()}
    elif not saved:
        raise ValueError("no train split and no `standardize` in meta: train the pipeline first")

    columns = list(saved["columns"])
    mean = np.asarray(saved["mean"], dtype=np.float64)
    std = np.asarray(saved["std"], dtype=np.float64)

    def fn(sample):
        out = dict(sample)
        out["data"] = ((to_vector(sample["data"], columns) - mean) / std).astype(np.float32)
        return out

    def meta_fn(m):
        m = dict(m)
        m["type"] = "table"
        m["standardize"] = saved
        m["dimension"] = {"x": len(columns)}
        return m

    return pool.transform(fn, meta_fn)
