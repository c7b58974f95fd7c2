"""gVisor benchmark dataflow: CPU-heavy work per sample, few system calls.

`rounds` times per image: a 2-D FFT, a low-pass mask, the inverse, and a
pure-Python reduction over a row (interpreter time, as hand-written
augmentation has). What a user-space kernel costs here is the compute path,
not system calls: the ratio to runc should be near 1."""
import numpy as np


def dataflow(pool, options, ctx):
    rounds = int(options.get("rounds", "6"))

    def fn(sample):
        x = np.asarray(sample["data"], dtype=np.float32)
        for _ in range(rounds):
            f = np.fft.fft2(x)
            f[16:-16, 16:-16] = 0
            x = np.real(np.fft.ifft2(f)).astype(np.float32)
            acc = 0.0
            for v in x[0].tolist():
                acc += v * v
            x = x / (1.0 + acc / 1e6)
        return {"data": x, "label": sample["label"]}

    return pool.transform(fn)
