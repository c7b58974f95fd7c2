"""The script SDK (sandbox/sdk.py): the Dataset contract, pools, lazy
transforms, and the ready pools from image folders and CSV files."""
from __future__ import annotations

import math
import os
import random
from pathlib import Path

import pytest
from PIL import Image

from pipcook_sandbox.sandbox import sdk
from pipcook_sandbox.sandbox.sdk import DatasetPool, ListDataset


def items(n):
    return [{"data": i, "label": i % 3} for i in range(n)]


# ------------------------------------------------------------------ Dataset contract


def test_list_dataset_len_next_and_end():
    ds = ListDataset(items(5))
    assert len(ds) == 5
    assert [ds.next()["data"] for _ in range(5)] == [0, 1, 2, 3, 4]
    assert ds.next() is None
    assert ds.next() is None
    assert ds.tell() == 5


def test_list_dataset_copies_its_input():
    source = items(3)
    ds = ListDataset(source)
    source.append({"data": 99})
    assert len(ds) == 3


def test_next_batch_including_n_le_zero():
    ds = ListDataset(items(10))
    assert [s["data"] for s in ds.next_batch(3)] == [0, 1, 2]
    assert [s["data"] for s in ds.next_batch(4)] == [3, 4, 5, 6]
    assert [s["data"] for s in ds.next_batch(100)] == [7, 8, 9]
    assert ds.next_batch(3) == []
    ds.seek(4)
    assert [s["data"] for s in ds.next_batch(0)] == [4, 5, 6, 7, 8, 9]
    ds.seek(8)
    assert [s["data"] for s in ds.next_batch(-1)] == [8, 9]
    assert ds.next_batch(0) == [] and ds.next() is None


def test_seek_clamps():
    ds = ListDataset(items(4))
    ds.seek(-3)
    assert ds.tell() == 0 and ds.next()["data"] == 0
    ds.seek(100)
    assert ds.tell() == 4 and ds.next() is None
    ds.seek(2.9)  # int(): floors
    assert ds.next()["data"] == 2
    ds.seek(3)
    assert ds.next()["data"] == 3


def test_shuffle_with_seed_is_deterministic_and_a_permutation():
    data = items(50)
    a, b, c = ListDataset(data), ListDataset(data), ListDataset(data)
    a.shuffle(42)
    b.shuffle(42)
    c.shuffle(43)
    order_a = [s["data"] for s in a]
    assert order_a == [s["data"] for s in b]
    assert order_a != [s["data"] for s in c]
    assert order_a != list(range(50)) and sorted(order_a) == list(range(50))
    expected = list(range(50))
    random.Random(42).shuffle(expected)
    assert order_a == expected  # documented: random.Random(seed) over the indices
    assert [s["data"] for s in data] == list(range(50))  # the data itself is not reordered


def test_shuffle_without_seed_is_still_a_permutation():
    ds = ListDataset(items(30))
    ds.shuffle()
    assert sorted(s["data"] for s in ds) == list(range(30))


def test_iteration_restarts_each_time():
    ds = ListDataset(items(6))
    ds.next_batch(4)
    assert [s["data"] for s in ds] == list(range(6))
    assert [s["data"] for s in ds] == list(range(6))
    it = iter(ds)
    next(it), next(it)
    assert [s["data"] for s in ds] == list(range(6))


def test_empty_dataset():
    ds = ListDataset([])
    assert len(ds) == 0 and ds.next() is None and ds.next_batch(0) == [] and list(ds) == []
    ds.shuffle(1)
    ds.seek(5)
    assert ds.tell() == 0


# ------------------------------------------------------------------ pools and transforms


def test_dataset_pool_meta_sizes():
    pool = DatasetPool(train=ListDataset(items(4)), test=ListDataset(items(2)), meta={"type": "table", "x": 1})
    assert pool.meta == {"type": "table", "x": 1, "size": {"train": 4, "test": 2, "valid": 0, "predicted": 0}}
    assert pool.valid is None and pool.predicted is None
    assert DatasetPool().meta == {"type": "general", "size": {"train": 0, "test": 0, "valid": 0, "predicted": 0}}


def test_dataset_pool_does_not_alias_the_callers_meta():
    meta = {"type": "image"}
    DatasetPool(train=ListDataset(items(1)), meta=meta)
    assert meta == {"type": "image"}


def test_from_lists():
    pool = sdk.from_lists(train=items(3), predicted=iter(items(2)), meta={"type": "general"})
    assert len(pool.train) == 3 and len(pool.predicted) == 2 and pool.test is None
    assert pool.meta["size"] == {"train": 3, "test": 0, "valid": 0, "predicted": 2}


def test_transform_is_lazy_and_meta_fn_applies():
    calls = []

    def fn(sample):
        calls.append(sample["data"])
        return {"data": sample["data"] * 10, "label": sample["label"]}

    pool = sdk.from_lists(train=items(5), test=items(2), meta={"type": "general", "categories": [0, 1, 2]})
    out = pool.transform(fn, meta_fn=lambda m: {**m, "type": "table", "categories": ["a", "b", "c"]})
    assert calls == []
    assert len(out.train) == 5 and len(out.test) == 2 and out.valid is None
    assert out.meta["type"] == "table" and out.meta["categories"] == ["a", "b", "c"]
    assert out.meta["size"] == {"train": 5, "test": 2, "valid": 0, "predicted": 0}
    assert pool.meta["categories"] == [0, 1, 2]  # the source pool's meta is untouched
    assert calls == []
    assert out.train.next()["data"] == 0 and calls == [0]
    assert [s["data"] for s in out.train.next_batch(2)] == [10, 20] and calls == [0, 1, 2]
    assert [s["data"] for s in out.train.next_batch(0)] == [30, 40]
    assert out.train.next() is None and out.train.next_batch(0) == []
    out.train.seek(1)
    assert out.train.tell() == 1 and out.train.next()["data"] == 10
    assert [s["data"] for s in out.train] == [0, 10, 20, 30, 40]  # iteration restarts
    assert [s["data"] for s in out.test] == [0, 10]


def test_transform_shuffle_goes_to_the_base_and_stays_lazy():
    calls = []
    pool = sdk.from_lists(train=items(20)).transform(lambda s: calls.append(1) or s)
    pool.train.shuffle(5)
    assert calls == []
    base = ListDataset(items(20))
    base.shuffle(5)
    assert [s["data"] for s in pool.train] == [s["data"] for s in base]


def test_transform_without_meta_fn_keeps_meta_and_chains():
    pool = sdk.from_lists(train=items(3), meta={"type": "text", "k": "v"})
    out = pool.transform(lambda s: {**s, "data": s["data"] + 1}).transform(lambda s: {**s, "data": s["data"] * 2})
    assert out.meta["type"] == "text" and out.meta["k"] == "v"
    assert [s["data"] for s in out.train] == [2, 4, 6]


def test_transform_over_any_pool_like_object():
    class MyPool:  # a script's own pool: no SDK class involved
        meta = {"type": "general"}

        def __init__(self):
            self.train = ListDataset(items(2))
            self.test = None

    out = sdk.transform(MyPool(), lambda s: s["data"])
    assert list(out.train) == [0, 1] and out.test is None and out.valid is None
    assert out.meta["size"]["train"] == 2


def test_transform_exception_surfaces_on_read():
    out = sdk.from_lists(train=items(3)).transform(lambda s: 1 / (s["data"] - 1))
    assert out.train.next() == -1.0
    with pytest.raises(ZeroDivisionError):
        out.train.next()


# ------------------------------------------------------------------ from_image_folder


def png(path: Path, color=(255, 0, 0)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (2, 2), color).save(path)


@pytest.fixture
def image_tree(tmp_path: Path) -> Path:
    root = tmp_path / "flowers"
    for name in ("b.png", "a.PNG", "c.jpg"):
        png(root / "train" / "tulip" / name)
    png(root / "train" / "rose" / "r1.png")
    png(root / "train" / "daisy" / "d1.png")
    png(root / "validation" / "rose" / "v1.png")
    png(root / "validation" / "zinnia" / "z1.png")  # a category seen only in validation
    png(root / "test" / "daisy" / "t1.png")
    # ignored: non-images, dirs in a label dir, stray files in a split dir, symlinked label dirs
    (root / "train" / "tulip" / "notes.txt").write_text("not an image")
    (root / "train" / "tulip" / "labels.csv").write_text("x")
    (root / "train" / "tulip" / "sub.png").mkdir()
    (root / "train" / "README.md").write_text("hello")
    outside = tmp_path / "outside" / "secret"
    png(outside / "s.png")
    os.symlink(outside, root / "train" / "linked")
    return root


def test_image_folder_splits_categories_and_labels(image_tree: Path):
    pool = sdk.from_image_folder(image_tree)
    assert pool.meta["type"] == "image"
    assert pool.meta["categories"] == ["daisy", "rose", "tulip", "zinnia"]
    assert pool.meta["size"] == {"train": 5, "test": 1, "valid": 2, "predicted": 0}
    train = list(pool.train)
    by_label = {}
    for s in train:
        assert os.path.isabs(s["data"]) and os.path.isfile(s["data"])
        by_label.setdefault(s["label"], []).append(os.path.basename(s["data"]))
    assert by_label == {0: ["d1.png"], 1: ["r1.png"], 2: ["a.PNG", "b.png", "c.jpg"]}
    assert all("secret" not in s["data"] and "linked" not in s["data"] for s in train)
    assert sorted((os.path.basename(s["data"]), s["label"]) for s in pool.valid) == [("v1.png", 1), ("z1.png", 3)]
    assert [(os.path.basename(s["data"]), s["label"]) for s in pool.test] == [("t1.png", 0)]
    assert pool.predicted is None
    with Image.open(train[0]["data"]) as im:
        assert im.size == (2, 2)


def test_image_folder_valid_dir_fallback_and_extra_meta(tmp_path: Path):
    png(tmp_path / "train" / "cat" / "1.png")
    png(tmp_path / "valid" / "dog" / "2.png")
    pool = sdk.from_image_folder(tmp_path, meta={"dimension": {"x": 2, "y": 2, "z": 3}})
    assert pool.meta["categories"] == ["cat", "dog"]
    assert [s["label"] for s in pool.valid] == [1]
    assert pool.meta["dimension"] == {"x": 2, "y": 2, "z": 3}
    assert pool.test is None


def test_image_folder_custom_split_dirs(tmp_path: Path):
    png(tmp_path / "imgs" / "a" / "1.png")
    pool = sdk.from_image_folder(tmp_path, splits={"predicted": "imgs"})
    assert len(pool.predicted) == 1 and pool.train is None


def test_image_folder_empty_root_is_a_value_error(tmp_path: Path):
    with pytest.raises(ValueError, match="no image folders"):
        sdk.from_image_folder(tmp_path)
    (tmp_path / "unrelated").mkdir()
    with pytest.raises(ValueError):
        sdk.from_image_folder(tmp_path)


def test_image_folder_symlinked_split_files_are_not_label_dirs(tmp_path: Path):
    png(tmp_path / "train" / "a" / "1.png")
    (tmp_path / "train" / "b").write_text("a file named like a label")
    pool = sdk.from_image_folder(tmp_path)
    assert pool.meta["categories"] == ["a"]


# ------------------------------------------------------------------ from_csv


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_from_csv_numeric_conversion_and_labels(tmp_path: Path):
    train = write(tmp_path / "train.csv",
                  "sepal,petal,name,species\n5.1,3,abc,setosa\n4.9,-2,1e3x,virginica\n7,0.5e1,,setosa\nnan,inf,x,versicolor\n")
    test = write(tmp_path / "test.csv", "sepal,petal,name,species\n6.0,1,q,virginica\n")
    pool = sdk.from_csv(train=train, test=test, label="species")
    rows = list(pool.train)
    assert rows[0] == {"data": {"sepal": 5.1, "petal": 3, "name": "abc"}, "label": "setosa"}
    assert type(rows[0]["data"]["petal"]) is int and type(rows[0]["data"]["sepal"]) is float
    assert rows[1]["data"] == {"sepal": 4.9, "petal": -2, "name": "1e3x"}
    assert rows[2]["data"] == {"sepal": 7, "petal": 5.0, "name": ""}
    assert math.isnan(rows[3]["data"]["sepal"]) and rows[3]["data"]["petal"] == math.inf
    assert pool.meta["type"] == "table"
    assert pool.meta["columns"] == ["sepal", "petal", "name"]
    assert pool.meta["label"] == "species"
    assert pool.meta["categories"] == ["setosa", "versicolor", "virginica"]
    assert pool.meta["dimension"] == {"x": 3}
    assert pool.meta["size"] == {"train": 4, "test": 1, "valid": 0, "predicted": 0}
    assert list(pool.test) == [{"data": {"sepal": 6.0, "petal": 1, "name": "q"}, "label": "virginica"}]


def test_from_csv_numeric_labels_become_categories(tmp_path: Path):
    train = write(tmp_path / "t.csv", "x,y\n1,0\n2,1\n3,0\n")
    pool = sdk.from_csv(train=train, label="y")
    assert [s["label"] for s in pool.train] == [0, 1, 0]
    assert pool.meta["categories"] == [0, 1]


def test_from_csv_float_labels_are_not_categories(tmp_path: Path):
    train = write(tmp_path / "t.csv", "x,price\n1,2.5\n2,3.75\n")
    pool = sdk.from_csv(train=train, label="price")
    assert [s["label"] for s in pool.train] == [2.5, 3.75]
    assert "categories" not in pool.meta


def test_from_csv_missing_label_column_names_it(tmp_path: Path):
    train = write(tmp_path / "train.csv", "a,b\n1,2\n")
    with pytest.raises(ValueError) as info:
        sdk.from_csv(train=train, label="target")
    assert "'target'" in str(info.value) and "train.csv" in str(info.value) and "a, b" in str(info.value)


def test_from_csv_predicted_split_needs_no_labels(tmp_path: Path):
    train = write(tmp_path / "train.csv", "a,b,label\n1,2,yes\n3,4,no\n")
    predicted = write(tmp_path / "new.csv", "a,b\n5,6\n7,8.5\n")
    pool = sdk.from_csv(train=train, predicted=predicted)
    assert list(pool.predicted) == [{"data": {"a": 5, "b": 6}, "label": None}, {"data": {"a": 7, "b": 8.5}, "label": None}]
    assert pool.meta["categories"] == ["no", "yes"]
    assert pool.meta["size"]["predicted"] == 2 and pool.meta["size"]["train"] == 2
    only = sdk.from_csv(predicted=predicted)
    assert len(only.predicted) == 2 and only.train is None


def test_from_csv_without_label_column(tmp_path: Path):
    train = write(tmp_path / "t.csv", "a,b\n1,x\n")
    pool = sdk.from_csv(train=train, label=None)
    assert list(pool.train) == [{"data": {"a": 1, "b": "x"}, "label": None}]
    assert "categories" not in pool.meta


def test_read_csv_other_delimiter_and_unicode(tmp_path: Path):
    path = write(tmp_path / "t.tsv", "wörd\tlabel\nnaïve\t1\n")
    rows, features = sdk.read_csv(path, label="label", delimiter="\t")
    assert features == ["wörd"] and rows == [{"data": {"wörd": "naïve"}, "label": 1}]
