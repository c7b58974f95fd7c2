"""The script SDK: ready-made datasets and pools for pipeline scripts.

`from sandbox import sdk` inside any stage. Nothing here is required: any
object with the members of docs/scripts.md works as a pool. This module
runs inside the sandbox, so it imports only the standard library and numpy
(lazily, for the CSV pool's numeric columns).

    pool = sdk.from_lists(train=[{"data": 1, "label": 0}], meta={"type": "general"})
    pool = sdk.from_image_folder(ctx.extract(ctx.download(url)))
    pool = sdk.from_csv(train="train.csv", test="test.csv", label="species")
"""
from __future__ import annotations

import csv
import os
import random
from typing import Any, Callable, Iterable, Iterator, Sequence

SPLITS = ("train", "test", "valid", "predicted")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")


class Dataset:
    """A sequence of samples with a cursor, as docs/scripts.md describes.

    Random access goes through `_get(i)`; subclasses provide it and `__len__`.
    `shuffle` reorders an index permutation, never the underlying data, so a
    lazy dataset stays lazy.
    """

    def __init__(self) -> None:
        self._pos = 0
        self._order: list[int] | None = None

    # -- what subclasses provide
    def __len__(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def _get(self, index: int) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    # -- the contract
    def _at(self, i: int) -> Any:
        return self._get(self._order[i] if self._order is not None else i)

    def next(self) -> Any:
        if self._pos >= len(self):
            return None
        sample = self._at(self._pos)
        self._pos += 1
        return sample

    def next_batch(self, n: int) -> list:
        end = len(self) if n <= 0 else min(len(self), self._pos + n)
        batch = [self._at(i) for i in range(self._pos, end)]
        self._pos = max(self._pos, end)
        return batch

    def seek(self, pos: int) -> None:
        self._pos = max(0, min(int(pos), len(self)))

    def tell(self) -> int:
        return self._pos

    def shuffle(self, seed: int | None = None) -> None:
        order = list(range(len(self)))
        random.Random(seed).shuffle(order)
        self._order = order

    def __iter__(self) -> Iterator[Any]:
        self.seek(0)
        while True:
            sample = self.next()
            if sample is None:
                return
            yield sample

    def __repr__(self) -> str:
        return f"<{type(self).__name__} len={len(self)} pos={self._pos}>"


class ListDataset(Dataset):
    def __init__(self, samples: Sequence[Any]) -> None:
        super().__init__()
        self._samples = list(samples)

    def __len__(self) -> int:
        return len(self._samples)

    def _get(self, index: int) -> Any:
        return self._samples[index]


class TransformedDataset(Dataset):
    """`fn` applied to each sample of `base` when read: lazy, as the contract wants."""

    def __init__(self, base: Any, fn: Callable[[Any], Any]) -> None:
        super().__init__()
        self._base = base
        self._fn = fn

    def __len__(self) -> int:
        return len(self._base)

    def _get(self, index: int) -> Any:
        raise NotImplementedError  # reads go through the base's own cursor

    # Reading through the base's cursor (not by index) keeps a remote base
    # streaming in order instead of fetching one sample per request.
    def next(self) -> Any:
        sample = self._base.next()
        return None if sample is None else self._fn(sample)

    def next_batch(self, n: int) -> list:
        return [self._fn(s) for s in self._base.next_batch(n)]

    def seek(self, pos: int) -> None:
        self._base.seek(pos)

    def tell(self) -> int:
        tell = getattr(self._base, "tell", None)
        return tell() if tell else 0

    def shuffle(self, seed: int | None = None) -> None:
        self._base.shuffle(seed)

    def __iter__(self) -> Iterator[Any]:
        self.seek(0)
        while True:
            batch = self.next_batch(64)
            if not batch:
                return
            yield from batch


class DatasetPool:
    """`meta` plus the four splits; `transform` gives a lazy pool."""

    def __init__(
        self,
        train: Any = None,
        test: Any = None,
        valid: Any = None,
        predicted: Any = None,
        meta: dict | None = None,
    ) -> None:
        self.train, self.test, self.valid, self.predicted = train, test, valid, predicted
        self.meta = dict(meta or {})
        self.meta.setdefault("type", "general")
        self.meta["size"] = {s: (len(getattr(self, s)) if getattr(self, s) is not None else 0) for s in SPLITS}

    def transform(self, fn: Callable[[Any], Any], meta_fn: Callable[[dict], dict] | None = None) -> "DatasetPool":
        return transform(self, fn, meta_fn)

    def __repr__(self) -> str:
        return f"<DatasetPool {self.meta.get('type')} size={self.meta.get('size')}>"


def transform(pool: Any, fn: Callable[[Any], Any], meta_fn: Callable[[dict], dict] | None = None) -> DatasetPool:
    """Lazy pool over any pool-like object (ours, a remote proxy, the script's own)."""
    splits = {s: (TransformedDataset(getattr(pool, s), fn) if getattr(pool, s, None) is not None else None) for s in SPLITS}
    meta = dict(getattr(pool, "meta", None) or {})
    if meta_fn is not None:
        meta = meta_fn(dict(meta))
    return DatasetPool(meta=meta, **splits)


# ---------------------------------------------------------------- ready pools


def from_lists(
    train: Iterable | None = None,
    test: Iterable | None = None,
    valid: Iterable | None = None,
    predicted: Iterable | None = None,
    meta: dict | None = None,
) -> DatasetPool:
    """A pool from Python lists of samples (`{"data": ..., "label": ...}`)."""
    wrap = lambda xs: None if xs is None else ListDataset(list(xs))  # noqa: E731
    return DatasetPool(wrap(train), wrap(test), wrap(valid), wrap(predicted), meta=meta)


def from_image_folder(
    root: str | os.PathLike,
    splits: dict[str, str] | None = None,
    meta: dict | None = None,
) -> DatasetPool:
    """Images in `root/<split dir>/<label>/*.jpg`.

    Split dirs default to `train/`, `validation/` (or `valid/`), `test/`.
    Samples are `{"data": "<absolute path>", "label": <category index>}`:
    paths, not pixels, so a datasource stays cheap and a dataflow decodes.
    Categories are the sorted union of the label dirs; meta lists them.
    """
    root = os.fspath(root)
    splits = splits or {"train": "train", "valid": "validation", "test": "test"}
    found: dict[str, dict[str, list[str]]] = {}
    for split, dirname in splits.items():
        base = os.path.join(root, dirname)
        if split == "valid" and not os.path.isdir(base) and os.path.isdir(os.path.join(root, "valid")):
            base = os.path.join(root, "valid")
        if not os.path.isdir(base):
            continue
        found[split] = {}
        for label in sorted(os.listdir(base)):
            label_dir = os.path.join(base, label)
            if not os.path.isdir(label_dir) or os.path.islink(label_dir):
                continue
            files = sorted(
                os.path.join(label_dir, f)
                for f in os.listdir(label_dir)
                if f.lower().endswith(IMAGE_SUFFIXES) and os.path.isfile(os.path.join(label_dir, f))
            )
            found[split][label] = files
    if not found:
        raise ValueError(f"no image folders under {root!r}: expected {root}/train/<label>/*.jpg")
    categories = sorted({label for per_label in found.values() for label in per_label})
    index = {c: i for i, c in enumerate(categories)}
    lists = {
        split: [{"data": path, "label": index[label]} for label, files in per_label.items() for path in files]
        for split, per_label in found.items()
    }
    info = {"type": "image", "categories": categories}
    info.update(meta or {})
    return from_lists(meta=info, **lists)


def _convert(value: str) -> Any:
    try:
        return float(value) if any(c in value for c in ".eE") or value.lower() in ("nan", "inf", "-inf") else int(value)
    except ValueError:
        return value


def read_csv(path: str | os.PathLike, label: str | None = "label", delimiter: str = ",") -> tuple[list[dict], list[str]]:
    """Rows of a CSV file as samples `{"data": {column: value}, "label": value}`.

    Numbers are converted (int, else float); everything else stays a string.
    Returns the samples and the feature column names in file order.
    """
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        columns = list(reader.fieldnames or [])
        if label is not None and label not in columns:
            raise ValueError(f"{os.fspath(path)!r} has no label column {label!r} (columns: {', '.join(columns)})")
        features = [c for c in columns if c != label]
        samples = [
            {"data": {c: _convert(row[c]) for c in features}, "label": (_convert(row[label]) if label else None)}
            for row in reader
        ]
    return samples, features


def from_csv(
    train: str | os.PathLike | None = None,
    test: str | os.PathLike | None = None,
    valid: str | os.PathLike | None = None,
    predicted: str | os.PathLike | None = None,
    label: str | None = "label",
    meta: dict | None = None,
) -> DatasetPool:
    """A pool from CSV files with a header row; `label` names the target column."""
    lists: dict[str, list] = {}
    features: list[str] = []
    for split, path in (("train", train), ("test", test), ("valid", valid), ("predicted", predicted)):
        if path is not None:
            lists[split], features = read_csv(path, label=None if split == "predicted" else label)
    labels = sorted({s["label"] for rows in lists.values() for s in rows if s["label"] is not None}, key=str)
    info: dict[str, Any] = {"type": "table", "columns": features, "label": label}
    if labels and all(isinstance(x, (int, str)) for x in labels):
        info["categories"] = labels
    info["dimension"] = {"x": len(features)}
    info.update(meta or {})
    return from_lists(meta=info, **lists)
