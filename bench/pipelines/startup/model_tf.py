import tensorflow  # noqa: F401 - the import is what is measured
import time; print("FIRST model", repr(time.time()), flush=True)  # noqa: E401,E702
"""Start-up benchmark model: imports TensorFlow, then prints the time (the script's first line after it)."""
import os


def train(runtime, options, ctx):
    n = sum(1 for _ in runtime.dataset.train)
    with open(os.path.join(runtime.read_model(), "n.txt"), "w") as f:
        f.write(str(n))
