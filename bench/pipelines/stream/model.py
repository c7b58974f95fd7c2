"""Benchmark model stage: read the whole train split `repeat` times and log what it measured.

Per repeat: np.copyto of the same bytes in item-sized chunks streaming
through 2 x 128 MiB (the memcpy reference, measured here, inside the same
sandbox, just before), then one full read of the stream. Logs
boundary_Bps, samples_per_s, memcpy_Bps and whether a shared-memory ring
was mapped."""
import time

import numpy as np

SIZES = {"small": 95, "image": 224 * 224 * 3, "1mib": 1 << 20, "64mib": 64 << 20}
REGION = 128 << 20


def train(runtime, options, ctx):
    case = options.get("case", "1mib")
    repeat = int(options.get("repeat", "3"))
    read = int(options.get("read", "1"))
    ds = runtime.dataset.train
    n = len(ds)
    payload = SIZES[case]
    item = payload * read if case == "image" else payload
    chunks = max(1, payload * n // item)
    slots = max(1, REGION // item)
    src = np.ones(slots * item, np.uint8)
    dst = np.zeros(slots * item, np.uint8)
    ring = getattr(getattr(runtime.dataset, "_ring", None), "size", 0)

    def read_all():
        ds.seek(0)
        got = 0
        while True:
            batch = ds.next_batch(read)
            if not batch:
                break
            got += len(batch)
        assert got == n, (got, n)

    read_all()  # warm-up
    for r in range(repeat):
        t, c = time.perf_counter(), time.process_time()
        for k in range(chunks):
            o = (k % slots) * item
            np.copyto(dst[o:o + item], src[o:o + item])
        memcpy, memcpy_cpu = item * chunks / (time.perf_counter() - t), item * chunks / (time.process_time() - c)
        t, c = time.perf_counter(), time.process_time()
        read_all()
        dt, cpu = time.perf_counter() - t, time.process_time() - c
        # CPU seconds as well as wall: on a saturated host the wall figures say more about the neighbours;
        # bytes per CPU second of this (receiving) stage against memcpy's is what it costs here
        runtime.log_metrics(step=r, boundary_Bps=payload * n / dt, samples_per_s=n / dt, memcpy_Bps=memcpy,
                            ring_bytes=ring, recv_cpu_Bps=payload * n / cpu, memcpy_cpu_Bps=memcpy_cpu)
