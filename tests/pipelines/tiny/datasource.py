"""Tiny datasource: numbers with a numpy feature vector, written to data/ too."""
import os

import numpy as np

from sandbox import sdk


def datasource(options, ctx):
    n = int(options.get("count", "200"))
    rng = np.random.default_rng(0)
    samples = []
    for i in range(n):
        x = rng.normal(size=4).astype(np.float32)
        samples.append({"data": x, "label": int(x.sum() > 0)})
    with open(os.path.join(ctx.workspace.data_dir, "made.txt"), "w") as f:
        f.write(f"{n} samples\n")
    cut = int(n * 0.8)
    return sdk.from_lists(train=samples[:cut], test=samples[cut:], meta={"type": "general", "categories": ["neg", "pos"]})
