"""gVisor benchmark model: reads every sample `epochs` times and logs the time it took."""
import time


def train(runtime, options, ctx):
    epochs = int(options.get("epochs", "1"))
    ds = runtime.dataset.train
    t = time.perf_counter()
    n = 0
    for _ in range(epochs):
        ds.seek(0)
        while True:
            batch = ds.next_batch(8)
            if not batch:
                break
            n += len(batch)
    runtime.log_metrics(step=0, samples=n, read_s=time.perf_counter() - t)
