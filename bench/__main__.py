"""Run every benchmark, then write bench/out/report.md from their results.

    python -m bench                 # everything (about an hour on the 2-vCPU VM; e2e is most of it)
    python -m bench --quick         # fewer samples, repeats and epochs (~10 minutes)
    python -m bench --only throughput --only startup
    python -m bench --report        # only re-render bench/out/report.md from bench/out/*.json

Each benchmark also runs alone (python -m bench.throughput, .startup, .e2e,
.scale); see bench/README.md. Results: bench/out/<name>.json (machine,
date, command, every run) and the tables printed on stdout.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = "bench"

from bench import report  # noqa: E402

BENCHES = ("throughput", "startup", "e2e", "scale")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", action="append", choices=BENCHES)
    ap.add_argument("--report", action="store_true", help="only write bench/out/report.md")
    args = ap.parse_args(argv)
    failed = []
    if not args.report:
        for name in args.only or BENCHES:
            print(f"\n===== bench.{name} =====", flush=True)
            t = time.perf_counter()
            module = __import__(f"bench.{name}", fromlist=["main"])
            bench_args: list[str] = []
            if name == "throughput":
                bench_args = ["--sandbox"] + (["--quick"] if args.quick else [])
            elif name == "startup":
                bench_args = ["--repeat", "3"] if args.quick else []
            elif name == "e2e":
                bench_args = ["--quick"] if args.quick else []
            elif name == "scale":
                bench_args = ["--stream-gib", "0.5"] if args.quick else []
            try:
                module.main(bench_args)
            except Exception as exc:  # keep going: the other benchmarks still tell something
                failed.append(name)
                print(f"bench.{name} FAILED: {type(exc).__name__}: {exc}", file=sys.stderr)
            print(f"(bench.{name}: {time.perf_counter() - t:.0f} s)", flush=True)
    path = report.write()
    print(f"\nreport: {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
