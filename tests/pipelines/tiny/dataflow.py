"""Tiny dataflow: scale features; in predict mode parse '-s' strings."""
import numpy as np


def dataflow(pool, options, ctx):
    factor = float(options.get("factor", "2"))

    def fn(sample):
        data = sample["data"]
        if isinstance(data, str):
            data = np.array([float(v) for v in data.split(",")], dtype=np.float32)
        return {"data": np.asarray(data, dtype=np.float32) * factor, "label": sample.get("label")}

    return pool.transform(fn, lambda meta: {**meta, "factor": factor})
