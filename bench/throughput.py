"""Stage-to-stage throughput through the real worker protocol, against memcpy and a raw socket.

    python -m bench.throughput                 # all cases, 5 repeats, medians
    python -m bench.throughput --quick         # fewer samples and repeats
    python -m bench.throughput --sandbox       # also through two real bwrap sandboxes
    python -m bench.throughput --case 64mib --repeat 9

What one repeat measures, per case (samples served by a `PoolServer` driven
by `serve_until` in one process, read by a `RemotePool` in this process over
ipc:// in /tmp, exactly as between two stages; the server hands out the same
preallocated sample every time, so producing samples costs nothing):

    small   100-byte samples ({"data": 80 bytes, "label": int}), read 256 at a time
    image   224x224x3 uint8 images (150 KB), read 32 at a time (a model's batch)
    1mib    1 MiB float32 tensors, read one at a time
    64mib   64 MiB uint8 tensors, read one at a time

and, interleaved with it in the same run (so the machine's noise hits all):

    memcpy  np.copyto of the same bytes in the same item size, streaming
            through 2 x 128 MiB of memory (more than the L3 cache), i.e. what
            the memory itself can move; the ratio `x memcpy` divides by this
    socket  a raw unix stream socket between two processes, sendall() of
            item-sized buffers, recv_into() one reused buffer: the ceiling
            for anything that goes through a socket

`--sandbox` runs bench/pipelines/stream (a datasource serving the same
cases, a model stage reading them and measuring itself, with its own memcpy
reference) through `pipcook-sandbox run --isolation bwrap`, i.e. between
two real sandboxes, and reports the figures the model stage logged.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = "bench"

from bench.common import REPO_ROOT, Version, fmt_rate, median, save, table, versions  # noqa: E402

CASES: dict[str, dict] = {
    "small": {"what": "100 B samples", "count": 200_000, "quick": 50_000, "read": 256},
    "image": {"what": "224x224x3 uint8 images, batches of 32", "count": 2048, "quick": 512, "read": 32},
    "1mib": {"what": "1 MiB float32 tensors", "count": 768, "quick": 256, "read": 1},
    "64mib": {"what": "64 MiB uint8 tensors", "count": 12, "quick": 6, "read": 1},
}
MEMCPY_REGION = 128 << 20
# issue #17 target 3, between two bwrap sandboxes: (figure, at least)
SANDBOX_TARGETS = {"small": ("samples_per_s", 500_000), "image": ("ratio_memcpy", 0.5),
                   "1mib": ("ratio_memcpy", 0.7), "64mib": ("ratio_memcpy", 0.8)}


def make_sample(case: str):
    """The one sample the server hands out for `case`, and its payload size in bytes."""
    if case == "small":
        return {"data": b"x" * 80, "label": 1}, 95  # 95 bytes of msgpack
    if case == "image":
        arr = np.random.default_rng(0).integers(0, 256, (224, 224, 3), dtype=np.uint8)
    elif case == "1mib":
        arr = np.random.default_rng(0).random(1 << 18, dtype=np.float32)
    elif case == "64mib":
        arr = np.random.default_rng(0).integers(0, 256, 64 << 20, dtype=np.uint8)
    else:
        raise ValueError(case)
    return {"data": arr, "label": 3}, arr.nbytes


class SameSample:
    """A dataset of `n` copies of one sample: serving costs no production time."""

    def __init__(self, sample, n: int) -> None:
        self.sample, self.n, self.pos = sample, n, 0

    def __len__(self) -> int:
        return self.n

    def tell(self) -> int:
        return self.pos

    def seek(self, pos: int) -> None:
        self.pos = max(0, min(int(pos), self.n))

    def shuffle(self, seed=None) -> None:
        pass

    def next(self):
        return self.next_batch(1)[0] if self.pos < self.n else None

    def next_batch(self, k: int) -> list:
        end = self.n if k <= 0 else min(self.n, self.pos + k)
        out = [self.sample] * (end - self.pos)
        self.pos = end
        return out


class Pool:
    def __init__(self, case: str, n: int) -> None:
        sample, _ = make_sample(case)
        self.train = SameSample(sample, n)
        self.test = self.valid = self.predicted = None
        self.meta = {"case": case}


# ----------------------------------------------------------------- the processes


def serve(case: str, count: int, endpoint: str) -> None:
    """The upstream stage: serve `count` samples of `case` until the parent goes away."""
    import zmq
    from pipcook_sandbox.sandbox.boundary import PoolServer, serve_until

    parent = os.getppid()
    zctx = zmq.Context()
    server = PoolServer(zctx, endpoint, Pool(case, count))
    print("ready", flush=True)
    serve_until(server, lambda: os.getppid() != parent or not os.path.exists(endpoint.split("://", 1)[1]))
    server.close()
    zctx.destroy(linger=0)


def raw_send(path: str, item: int, count: int) -> None:
    """The raw-socket ceiling's sender: `count` items per 'go' byte, until EOF."""
    buf = np.random.default_rng(1).integers(0, 256, item, dtype=np.uint8)
    view = memoryview(buf)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    while s.recv(1):
        for _ in range(count):
            s.sendall(view)
    s.close()


def _spawn(*args: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen([sys.executable, "-m", "bench.throughput", *args], env=env, cwd=str(REPO_ROOT),
                            stdout=subprocess.PIPE, text=True)


class RawSocket:
    """Receiving end of the raw unix-socket ceiling, in this process."""

    def __init__(self, tmp: str, item: int, count: int) -> None:
        self.item, self.count = item, count
        path = os.path.join(tmp, f"raw-{item}.sock")
        lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.path = path
        lsock.bind(path)
        lsock.listen(1)
        self.proc = _spawn("--raw-send", path, str(item), str(count))
        self.sock, _ = lsock.accept()
        lsock.close()
        self.buf = np.empty(item, np.uint8)
        self.buf[:] = 0  # fault it in: "a reused buffer"

    def once(self) -> float:
        view = memoryview(self.buf)
        total = self.item * self.count
        t = time.perf_counter()
        self.sock.send(b"g")
        got = 0
        while got < total:
            want = min(self.item - got % self.item, total - got)
            n = self.sock.recv_into(view[got % self.item: got % self.item + want])
            if not n:
                raise RuntimeError("raw sender went away")
            got += n
        return total / (time.perf_counter() - t)

    def close(self) -> None:
        self.sock.close()
        self.proc.wait(timeout=10)
        os.unlink(self.path)


class Memcpy:
    """np.copyto of item-sized chunks streaming through 2 x 128 MiB (more than the L3)."""

    def __init__(self, item: int, count: int) -> None:
        self.item, self.count = item, count
        self.slots = max(1, MEMCPY_REGION // item)
        self.src = np.ones(self.slots * item, np.uint8)
        self.dst = np.zeros(self.slots * item, np.uint8)

    def once(self) -> float:
        src, dst, item, slots = self.src, self.dst, self.item, self.slots
        t = time.perf_counter()
        for k in range(self.count):
            o = (k % slots) * item
            np.copyto(dst[o:o + item], src[o:o + item])
        return item * self.count / (time.perf_counter() - t)


def proc_cpu(pid: int) -> float:
    """CPU seconds (user + system) of process `pid` so far, from /proc."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def read_all(ds, read: int, count: int) -> None:
    ds.seek(0)
    got = 0
    while True:
        batch = ds.next_batch(read)
        if not batch:
            break
        got += len(batch)
    if got != count:
        raise RuntimeError(f"read {got} samples, expected {count}")


def run_case(case: str, count: int, repeat: int, tmp: str) -> dict:
    import zmq
    from pipcook_sandbox.sandbox.boundary import RemotePool

    sample, payload = make_sample(case)
    read = CASES[case]["read"]
    item = payload if case != "image" else payload * read  # the ceiling moves a batch as one buffer
    endpoint = f"ipc://{tmp}/pool-{case}.sock"
    server = _spawn("--serve", case, str(count), endpoint)
    assert server.stdout is not None and server.stdout.readline().strip() == "ready"
    zctx = zmq.Context()
    pool = RemotePool(zctx, endpoint, "bench-upstream", alive=lambda: server.poll() is None)
    ds = pool.train
    raw = RawSocket(tmp, item, max(1, payload * count // item)) if case != "small" else None
    mem = Memcpy(item, max(1, payload * count // item))
    rows: dict[str, list[float]] = {"boundary": [], "memcpy": [], "socket": [], "cpu": []}
    try:
        read_all(ds, read, count)  # warm-up: connections, allocator, page cache
        for _ in range(repeat):
            c = time.process_time()
            rows["memcpy"].append(mem.once())
            memcpy_cpu = time.process_time() - c
            if raw is not None:
                rows["socket"].append(raw.once())
            t, c, sc = time.perf_counter(), time.process_time(), proc_cpu(server.pid)
            read_all(ds, read, count)
            rows["boundary"].append(payload * count / (time.perf_counter() - t))
            # On two idle cores the two sides run in parallel: the busier one sets the pace. Its CPU
            # seconds against memcpy's for the same bytes say that pace whatever the neighbours do.
            busiest = max(time.process_time() - c, proc_cpu(server.pid) - sc)
            rows["cpu"].append(memcpy_cpu / busiest if busiest > 0 else float("nan"))
    finally:
        pool.close()
        zctx.destroy(linger=0)
        os.unlink(endpoint.split("://", 1)[1])
        server.wait(timeout=10)
        if raw is not None:
            raw.close()
    b, m = median(rows["boundary"]), median(rows["memcpy"])
    s = median(rows["socket"]) if rows["socket"] else None
    # the ratio of each repeat, then the median (the noise hits both halves of a repeat alike)
    ratio = median([x / y for x, y in zip(rows["boundary"], rows["memcpy"])])
    sock_ratio = median([x / y for x, y in zip(rows["socket"], rows["memcpy"])]) if s else None
    return {
        "case": case, "what": CASES[case]["what"], "count": count, "payload_bytes": payload,
        "boundary_Bps": b, "samples_per_s": b / payload, "memcpy_Bps": m, "socket_Bps": s,
        "ratio_memcpy": ratio, "socket_ratio_memcpy": sock_ratio, "cpu_ratio_memcpy": median(rows["cpu"]),
        "ratio_socket": median([x / y for x, y in zip(rows["boundary"], rows["socket"])]) if s else None,
        "runs": rows,
    }


# ----------------------------------------------------------------- through two bwrap sandboxes


def sandboxed_once(case: str, count: int, repeat: int, isolation: str, version: Version) -> list[dict] | str:
    """One `pipcook-sandbox run` of bench/pipelines/stream with `version`'s code: the model stage's
    per-repeat figures, or the error's tail."""
    pipeline = REPO_ROOT / "bench" / "pipelines" / "stream" / "pipeline.json"
    ws = Path(tempfile.mkdtemp(prefix="pcsb-bench-ws-"))
    spec = json.loads(pipeline.read_text())
    spec["datasource"] = f"datasource.py?case={case}&count={count}"
    spec["model"] = f"model.py?case={case}&repeat={repeat}&read={CASES[case]['read']}"
    tmp_pipeline = pipeline.parent / f".pipeline-{case}-{os.getpid()}.json"
    tmp_pipeline.write_text(json.dumps(spec))
    cmd = [sys.executable, "-m", "pipcook_sandbox", "run", str(tmp_pipeline), "-o", str(ws), "--isolation", isolation]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=str(REPO_ROOT), timeout=900, env=version.env())
        if proc.returncode != 0:
            return proc.stderr[-2000:]
        return [json.loads(line) for line in (ws / "metrics.jsonl").read_text().splitlines()]
    finally:
        tmp_pipeline.unlink()
        shutil.rmtree(ws, ignore_errors=True)


def run_sandboxed(cases: list[str], repeat: int, quick: bool, isolation: str, base: str | None = None,
                  rounds: int = 1) -> list[dict]:
    """bench/pipelines/stream through `pipcook-sandbox run`: the model stage reports what it measured.

    `rounds` runs of the pipeline per case and version (each measuring `repeat` reads beside its own
    memcpy), the versions alternating (working tree, then `base`, then base first, ...), so that with
    `base` (a git revision) the previous code is measured in the same run as the new."""
    out = []
    vers = versions(base)
    try:
        for case in cases:
            count = CASES[case]["quick" if quick else "count"]
            runs: dict[str, list[dict]] = {v.label: [] for v in vers}
            errors: dict[str, str] = {}
            for r in range(rounds):
                for v in (vers if r % 2 == 0 else vers[::-1]):
                    got = sandboxed_once(case, count, repeat, isolation, v)
                    if isinstance(got, str):
                        errors[v.label] = got
                    else:
                        runs[v.label].extend(got)
            for v in vers:
                label = v.label
                if not runs[label]:
                    out.append({"case": case, "isolation": isolation, "version": label, "error": errors.get(label, "")})
                    continue
                b = [x["boundary_Bps"] for x in runs[label]]
                m = [x["memcpy_Bps"] for x in runs[label]]
                out.append({
                    "case": case, "isolation": isolation, "version": label, "count": count, "boundary_Bps": median(b),
                    "samples_per_s": median([x["samples_per_s"] for x in runs[label]]), "memcpy_Bps": median(m),
                    "ratio_memcpy": median([x / y for x, y in zip(b, m)]),
                    "recv_cpu_ratio": median([x["recv_cpu_Bps"] / x["memcpy_cpu_Bps"] for x in runs[label]
                                              if "recv_cpu_Bps" in x]) if "recv_cpu_Bps" in runs[label][0] else None,
                    "ratio_min": min(x / y for x, y in zip(b, m)), "ratio_max": max(x / y for x, y in zip(b, m)),
                    "runs": runs[label],
                })
    finally:
        for v in vers:
            v.close()
    return out


# ----------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--case", action="append", choices=list(CASES), help="only these cases (repeatable)")
    ap.add_argument("--repeat", type=int, default=None, help="measured repeats per case (default 5, quick 3)")
    ap.add_argument("--quick", action="store_true", help="fewer samples and repeats")
    ap.add_argument("--sandbox", action="store_true", help="also through two real bwrap sandboxes")
    ap.add_argument("--isolation", default="bwrap", help="backend for --sandbox (default bwrap)")
    ap.add_argument("--base", metavar="REV", help="--sandbox: also run git revision REV's code, alternating with "
                    "the working tree's (the previous commit, say), in the same run")
    ap.add_argument("--rounds", type=int, default=None, help="--sandbox: pipeline runs per case and version "
                    "(default 1, or 3 with --base), each measuring --repeat reads")
    ap.add_argument("--no-local", action="store_true", help="skip the one-process-to-another cases")
    ap.add_argument("--serve", nargs=3, metavar=("CASE", "COUNT", "ENDPOINT"), help=argparse.SUPPRESS)
    ap.add_argument("--raw-send", nargs=3, metavar=("PATH", "ITEM", "COUNT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.serve:
        serve(args.serve[0], int(args.serve[1]), args.serve[2])
        return 0
    if args.raw_send:
        raw_send(args.raw_send[0], int(args.raw_send[1]), int(args.raw_send[2]))
        return 0

    cases = args.case or list(CASES)
    repeat = args.repeat or (3 if args.quick else 5)
    results = []
    tmp = tempfile.mkdtemp(prefix="pcsb-tp-", dir="/tmp")
    try:
        for case in ([] if args.no_local else cases):
            count = CASES[case]["quick" if args.quick else "count"]
            r = run_case(case, count, repeat, tmp)
            results.append(r)
            print(f"[throughput] {case}: {fmt_rate(r['boundary_Bps'])}, {r['samples_per_s']:,.0f} samples/s, "
                  f"{r['ratio_memcpy']:.2f}x memcpy", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    rows = []
    for r in results:
        rows.append([r["case"], r["what"], fmt_rate(r["boundary_Bps"]), f"{r['samples_per_s']:,.0f}",
                     fmt_rate(r["memcpy_Bps"]), f"{r['ratio_memcpy']:.2f}",
                     fmt_rate(r["socket_Bps"]) if r["socket_Bps"] else "-",
                     f"{r['socket_ratio_memcpy']:.2f}" if r["socket_ratio_memcpy"] else "-",
                     f"{r['ratio_socket']:.2f}" if r["ratio_socket"] else "-", f"{r['cpu_ratio_memcpy']:.2f}"])
    if rows:
        print(f"\nBoundary throughput, one process to another over ipc:// (medians of {repeat}):")
        print(table(rows, ["case", "what", "boundary", "samples/s", "memcpy", "x memcpy", "raw socket",
                           "socket x memcpy", "x socket", "CPU: memcpy / busier side"]))
    sandboxed = []
    if args.sandbox:
        rounds = args.rounds or (3 if args.base else 1)
        sandboxed = run_sandboxed(cases, repeat, args.quick, args.isolation, args.base, rounds)
        rows = []
        for r in sandboxed:
            if "error" in r:
                tail = (r["error"].strip().splitlines() or ["?"])[-1][:80]
                rows.append([r["case"], r["isolation"], r["version"], "FAILED", "", "", tail, "", ""])
                continue
            target = SANDBOX_TARGETS.get(r["case"])
            met = "" if target is None else ("met" if r[target[0]] >= target[1] else "MISSED")
            rows.append([r["case"], r["isolation"], r["version"], fmt_rate(r["boundary_Bps"]), f"{r['samples_per_s']:,.0f}",
                         fmt_rate(r["memcpy_Bps"]), f"{r['ratio_memcpy']:.2f} ({r['ratio_min']:.2f}-{r['ratio_max']:.2f})",
                         "" if target is None else f">= {target[1]:,}{'' if target[0] == 'ratio_memcpy' else '/s'}", met,
                         "-" if r.get("recv_cpu_ratio") is None else f"{r['recv_cpu_ratio']:.2f}"])
        print(f"\nBetween two real sandboxes (datasource -> model stage of bench/pipelines/stream; medians of "
              f"{rounds} runs x {repeat} reads, each read against memcpy measured just before it in the stage):")
        print(table(rows, ["case", "isolation", "code", "boundary", "samples/s", "memcpy (in stage)",
                           "x memcpy (min-max)", "target", "", "receiver CPU x memcpy CPU"]))
    path = save("throughput", {"repeat": repeat, "quick": args.quick, "results": results, "sandboxed": sandboxed}, argv)
    print(f"\n(saved {path})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
