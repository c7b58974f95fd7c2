import time; print("FIRST model", repr(time.time()), flush=True)  # noqa: E401,E702 - the first line is the measurement
"""Start-up benchmark model: prints the time as its first line, reads the samples, saves nothing much."""
import os


def train(runtime, options, ctx):
    n = sum(1 for _ in runtime.dataset.train)
    with open(os.path.join(runtime.read_model(), "n.txt"), "w") as f:
        f.write(str(n))
