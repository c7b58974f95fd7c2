"""Write the example's synthetic COCO dataset as a zip, on the host: to serve, inspect or reuse.

    python examples/object-detection/make_dataset.py shapes.zip --count 600 --seed 7
    python -m http.server -d . 8000 &
    pipcook-sandbox run pipeline.json --allow-private 127.0.0.1   # datasource.py?url=http://127.0.0.1:8000/shapes.zip

The drawing code is the datasource's own (`generate_coco` in datasource.py, which
draws the same set inside the sandbox when the pipeline names no `url`), so a
zip written here with the same options holds exactly the pixels and boxes the
pipeline generates by itself. Needs numpy and Pillow.
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

HERE = Path(__file__).resolve().parent


def load_datasource() -> ModuleType:
    """datasource.py beside this file, as a module (it imports the sandbox SDK only when run as a stage)."""
    spec = importlib.util.spec_from_file_location("object_detection_datasource", HERE / "datasource.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", type=Path, help="the zip to write")
    parser.add_argument("--count", type=int, default=600, help="train images (default 600)")
    parser.add_argument("--valid-count", type=int, default=None, help="validation images (default count // 6)")
    parser.add_argument("--test-count", type=int, default=None, help="test images (default count // 4)")
    parser.add_argument("--size", type=int, default=96, help="image side in pixels (default 96)")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--max-objects", type=int, default=4, help="objects per image, at most (default 4)")
    args = parser.parse_args(argv)
    counts = {"train": args.count,
              "val": args.valid_count if args.valid_count is not None else max(1, args.count // 6),
              "test": args.test_count if args.test_count is not None else max(1, args.count // 4)}
    datasource = load_datasource()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    datasource.generate_coco(str(args.output), counts, args.size, args.seed, args.max_objects)
    print(f"wrote {args.output}: " + ", ".join(f"{split} {n} images" for split, n in counts.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
