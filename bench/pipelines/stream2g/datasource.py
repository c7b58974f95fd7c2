"""Scale benchmark datasource: `count` samples of `mib` MiB each, made when read (never all in memory).

Each sample is a uint8 array filled with its index (mod 251), so the model
can check every byte that arrives."""
import numpy as np

from sandbox import sdk


class Generated(sdk.Dataset):
    def __init__(self, n, nbytes):
        super().__init__()
        self.n, self.nbytes = n, nbytes

    def __len__(self):
        return self.n

    def _get(self, index):
        return {"data": np.full(self.nbytes, index % 251, np.uint8), "label": index}


def datasource(options, ctx):
    n = int(options.get("count", "2048"))
    mib = float(options.get("mib", "1"))
    return sdk.DatasetPool(train=Generated(n, int(mib * (1 << 20))), meta={"type": "general"})
