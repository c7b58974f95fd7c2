"""gVisor benchmark datasource: `count` 128x128 float32 images, the same in every run."""
import numpy as np

from sandbox import sdk


def datasource(options, ctx):
    count = int(options.get("count", "64"))
    rng = np.random.default_rng(0)
    samples = [{"data": rng.random((128, 128), dtype=np.float32), "label": i % 2} for i in range(count)]
    return sdk.from_lists(train=samples, meta={"type": "general", "categories": ["a", "b"]})
