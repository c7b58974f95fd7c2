"""Issue #17 in one run: every CLI-side target beside its baselines, and a table of met / missed.

    python -m bench.issue17 --quick               # <= 10 minutes on 2 vCPUs (the integrator's rerun)
    python -m bench.issue17 --base 993b723        # also the previous code, alternating with this one
    python -m bench.issue17 --repeat 7 --rounds 3 # the long setting

What it runs, in this order (each part interleaves its variants, so the
machine's noise hits them alike; medians):

1. tests/pipelines/tiny from `pipcook-sandbox run` with bwrap (target: <=
   0.6 s wall), docker when an engine and the worker image are there
   (target: within 2x of bwrap, the ratio of each repeat), `--isolation
   none`, and the bare harness (bench/bare_harness.py: the same scripts in
   one process) - bench.startup.level_tiny.
2. The boundary between two real bwrap sandboxes (bench/pipelines/stream:
   the model stage measures its reads against memcpy in the same stage):
   1 MiB (>= 0.7x memcpy), 64 MiB (>= 0.8x), 224x224x3 image batches (>=
   0.5x), 100-byte samples (> 500k/s) - bench.throughput.run_sandboxed.
3. The same cases from one process to another over ipc:// (no sandbox),
   with the CPU ratio: memcpy's CPU seconds against those of the busier
   side for the same bytes, an estimate of the idle-machine ratio that the
   neighbours disturb far less than the wall ratio.

The service's targets (a warm pipeline <= 0.3 s, >= 150 pipelines a minute)
are measured by bench/service.py and reported in bench/RESULTS.md's "Warm
sandboxes (service)" subsection.

Every wall figure is printed beside a CPU figure and the load average at
the start and end of each part: on a loaded machine read the CPU columns.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = "bench"

from bench import startup, throughput  # noqa: E402
from bench.common import Version, docker_image, fmt_rate, median, save, table  # noqa: E402

TINY_TARGET_S = startup.TINY_TARGET_S
DOCKER_OVER_BWRAP = 2.0


def load() -> str:
    one, five, _ = os.getloadavg()
    return f"{one:.1f}/{five:.1f}"


def tiny_part(repeat: int, base: str | None, docker: bool) -> tuple[list[list[str]], dict[str, Any]]:
    isolations = ["none", "bwrap"] + (["docker"] if docker else [])
    before = load()
    res = startup.level_tiny(isolations, repeat, base)
    span = f"load {before} -> {load()}"
    rows = []
    labels = sorted({k.split(" ", 1)[1] for k in res if k != "bare"}, key=lambda lab: "+" not in lab and lab != "working")
    bare = res["bare"]
    for label in labels:
        bw = res[f"bwrap {label}"]
        rows.append(["1. tiny, bwrap, CLI, <= 0.6 s wall", label,
                     f"bare {bare['wall']:.2f} s wall / {bare['cpu']:.2f} CPU s; none {res[f'none {label}']['wall']:.2f} / "
                     f"{res[f'none {label}']['cpu']:.2f}",
                     f"{bw['wall']:.2f} s wall / {bw['cpu']:.2f} CPU s",
                     "met" if bw["wall"] <= TINY_TARGET_S else "MISSED", span])
        if docker:
            dk = res[f"docker {label}"]
            ratio = median([d["wall"] / b["wall"] for d, b in zip(dk["runs"], bw["runs"])])
            cpu_ratio = median([d["cpu"] / b["cpu"] for d, b in zip(dk["runs"], bw["runs"]) if b["cpu"] > 0])
            rows.append(["1. tiny, docker within 2x of bwrap", label, f"bwrap {bw['wall']:.2f} s wall",
                         f"{dk['wall']:.2f} s wall: {ratio:.2f}x (CPU {cpu_ratio:.2f}x, the command's own)",
                         "met" if ratio <= DOCKER_OVER_BWRAP else "MISSED", span])
    return rows, res


def sandbox_part(cases: list[str], repeat: int, quick: bool, base: str | None,
                 rounds: int) -> tuple[list[list[str]], list[dict]]:
    before = load()
    res = throughput.run_sandboxed(cases, repeat, quick, "bwrap", base, rounds)
    span = f"load {before} -> {load()}"
    rows = []
    for r in res:
        figure, at_least = throughput.SANDBOX_TARGETS[r["case"]]
        name = f"3. {r['case']}, bwrap to bwrap, " + (f">= {at_least}x memcpy" if figure == "ratio_memcpy"
                                                      else f"> {at_least:,}/s")
        if "error" in r:
            tail = (r["error"].strip().splitlines() or ["?"])[-1][:100]
            rows.append([name, r["version"], "", f"FAILED: {tail}", "", span])
            continue
        got = r[figure]
        recv = "-" if r.get("recv_cpu_ratio") is None else f"{r['recv_cpu_ratio']:.2f}x"
        shown = (f"wall {got:.2f}x ({r['ratio_min']:.2f}-{r['ratio_max']:.2f}), receiver CPU {recv}"
                 if figure == "ratio_memcpy" else f"{got:,.0f}/s (receiver CPU {recv} memcpy)")
        rows.append([name, r["version"], f"memcpy in the stage {fmt_rate(r['memcpy_Bps'])}", shown,
                     "met" if got >= at_least else "MISSED", span])
    return rows, res


def local_part(cases: list[str], repeat: int, quick: bool) -> tuple[list[list[str]], list[dict]]:
    before = load()
    tmp = tempfile.mkdtemp(prefix="pcsb-i17-", dir="/tmp")
    res = []
    try:
        for case in cases:
            res.append(throughput.run_case(case, throughput.CASES[case]["quick" if quick else "count"], repeat, tmp))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    span = f"load {before} -> {load()}"
    label = Version().label
    rows = []
    for r in res:
        figure, at_least = throughput.SANDBOX_TARGETS[r["case"]]
        if figure == "ratio_memcpy":
            got, shown = r["cpu_ratio_memcpy"], (f"wall {r['ratio_memcpy']:.2f}x, CPU {r['cpu_ratio_memcpy']:.2f}x")
        else:
            got, shown = r["samples_per_s"], f"{r['samples_per_s']:,.0f}/s"
        rows.append([f"3. {r['case']}, one process to another (CPU estimate)", label,
                     f"memcpy {fmt_rate(r['memcpy_Bps'])}", shown, "met" if got >= at_least else "MISSED", span])
    return rows, res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="short counts, 3 repeats, one round (<= 10 minutes)")
    ap.add_argument("--repeat", type=int, help="tiny runs per variant; reads per pipeline run (default 5, quick 3)")
    ap.add_argument("--rounds", type=int, help="stream pipeline runs per case and code version (default 2, quick 1)")
    ap.add_argument("--base", metavar="REV", help="also git revision REV's code, alternating with the working tree's")
    ap.add_argument("--case", action="append", choices=list(throughput.CASES), help="only these boundary cases")
    ap.add_argument("--no-docker", action="store_true", help="skip docker even where it is available")
    ap.add_argument("--skip", action="append", choices=["tiny", "sandbox", "local"], default=[],
                    help="leave a part out (repeatable)")
    args = ap.parse_args(argv)
    repeat = args.repeat or (3 if args.quick else 5)
    rounds = args.rounds or (1 if args.quick else 2)
    cases = args.case or list(throughput.CASES)
    docker = not args.no_docker and docker_image() is not None
    started, load_start = time.monotonic(), load()
    rows: list[list[str]] = []
    data: dict[str, Any] = {"repeat": repeat, "rounds": rounds, "quick": args.quick, "base": args.base,
                            "cpus": os.cpu_count()}
    if "tiny" not in args.skip:
        part, data["tiny"] = tiny_part(repeat, args.base, docker)
        rows += part
    if "sandbox" not in args.skip:
        part, data["sandboxed"] = sandbox_part(cases, repeat, args.quick, args.base, rounds)
        rows += part
    if "local" not in args.skip:
        part, data["local"] = local_part(cases, repeat, args.quick)
        rows += part
    minutes = (time.monotonic() - started) / 60
    print(f"\nIssue #17 targets ({os.cpu_count()} CPUs, load average {load_start} at the start, {load()} at the end, "
          f"{minutes:.1f} min; medians; docker {'measured' if docker else 'not available: skipped'}):")
    print(table(rows, ["target", "code", "baseline in the same run", "measured", "met?", "load (1/5 min)"]))
    path = save("issue17", data, argv)
    print(f"\n(saved {path})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
