"""Benchmark datasource: `count` copies of one sample of `case` (bench/throughput.py's cases).

Every sample is the same preallocated object, so producing samples costs
nothing and the model stage measures the boundary alone."""
import numpy as np


class SameSample:
    def __init__(self, sample, n):
        self.sample, self.n, self.pos = sample, n, 0

    def __len__(self):
        return self.n

    def tell(self):
        return self.pos

    def seek(self, pos):
        self.pos = max(0, min(int(pos), self.n))

    def shuffle(self, seed=None):
        pass

    def next(self):
        return self.next_batch(1)[0] if self.pos < self.n else None

    def next_batch(self, k):
        end = self.n if k <= 0 else min(self.n, self.pos + k)
        out = [self.sample] * (end - self.pos)
        self.pos = end
        return out


class Pool:
    def __init__(self, sample, n, case):
        self.train = SameSample(sample, n)
        self.test = self.valid = self.predicted = None
        self.meta = {"case": case}


def make_sample(case):
    rng = np.random.default_rng(0)
    if case == "small":
        return {"data": b"x" * 80, "label": 1}, 95
    if case == "image":
        arr = rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)
    elif case == "1mib":
        arr = rng.random(1 << 18, dtype=np.float32)
    elif case == "64mib":
        arr = rng.integers(0, 256, 64 << 20, dtype=np.uint8)
    else:
        raise ValueError(f"unknown case {case!r}")
    return {"data": arr, "label": 3}, arr.nbytes


def datasource(options, ctx):
    case = options.get("case", "1mib")
    sample, _ = make_sample(case)
    return Pool(sample, int(options.get("count", "256")), case)
