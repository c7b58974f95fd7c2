import time; print("FIRST datasource", repr(time.time()), flush=True)  # noqa: E401,E702 - the first line is the measurement
"""Start-up benchmark datasource: prints the time as its first line, then serves four samples."""
from sandbox import sdk


def datasource(options, ctx):
    samples = [{"data": [float(i), 1.0], "label": i % 2} for i in range(4)]
    return sdk.from_lists(train=samples, meta={"type": "general", "categories": ["a", "b"]})
