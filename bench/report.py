"""bench/out/*.json -> bench/out/report.md: every figure with its ratio, target, command and machine."""
from __future__ import annotations

import json
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = "bench"

from bench.common import RESULTS_DIR, fmt_rate  # noqa: E402


def _load(name: str) -> dict | None:
    path = RESULTS_DIR / f"{name}.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _md(rows: list[list], header: list[str]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def _machine(d: dict) -> str:
    m = d.get("machine", {})
    free = " ".join(m.get("free_h", [""])[0].split()[:2]) if m.get("free_h") else ""
    return (f"{m.get('date')}; nproc {m.get('nproc')}; {free}; kernel {m.get('uname_r')}; {m.get('cpu')}; "
            f"load {' '.join(m.get('loadavg', []))}; git {m.get('git')}; `{d.get('command')}`")


def throughput(d: dict) -> str:
    rows = []
    for r in d["results"]:
        small = r["case"] == "small"
        target = ">= 50k samples/s" if small else (">= 0.5x memcpy" if r["case"] in ("1mib", "64mib") else "")
        met = (r["samples_per_s"] >= 50_000) if small else (r["ratio_memcpy"] >= 0.5 if target else None)
        rows.append([r["case"], fmt_rate(r["boundary_Bps"]), f"{r['samples_per_s']:,.0f}",
                     "-" if small else fmt_rate(r["memcpy_Bps"]), "-" if small else f"{r['ratio_memcpy']:.2f}",
                     fmt_rate(r["socket_Bps"]) if r.get("socket_Bps") else "-",
                     f"{r['socket_ratio_memcpy']:.2f}" if r.get("socket_ratio_memcpy") else "-",
                     target + ("" if met is None else (" yes" if met else " NO")) if target else "-"])
    text = _md(rows, ["case", "boundary", "samples/s", "memcpy", "x memcpy", "raw socket", "socket x memcpy", "target"])
    if d.get("sandboxed"):
        rows = []
        for r in d["sandboxed"]:
            if "error" in r:
                rows.append([r["case"], r["isolation"], r.get("version", ""), "FAILED", "", "", ""])
                continue
            rows.append([r["case"], r["isolation"], r.get("version", "working tree"), fmt_rate(r["boundary_Bps"]), f"{r['samples_per_s']:,.0f}",
                         "-" if r["case"] == "small" else fmt_rate(r["memcpy_Bps"]),
                         "-" if r["case"] == "small" else f"{r['ratio_memcpy']:.2f}"])
        text += "\n\nBetween two real sandboxes:\n\n" + _md(rows, ["case", "isolation", "code", "boundary", "samples/s",
                                                                  "memcpy (in the stage)", "x memcpy"])
    return text


def startup(d: dict) -> str:
    rows = []
    targets = {"bwrap": 0.3, "docker": 1.0}
    for label, res in d["backend"].items():
        for b, r in res.items():
            if not isinstance(r, dict):
                continue
            rows.append([label, b, f"{r['s']:.3f}", f"{res['bare_s']:.3f}", f"{r['overhead_s']:+.3f}", f"{r['ratio']:.2f}",
                         f"< {targets[b]} s " + ("yes" if r["overhead_s"] < targets[b] else "NO")])
    text = _md(rows, ["script", "backend", "to first line (s)", "bare python (s)", "overhead (s)", "ratio", "target"])
    if d.get("pipeline"):
        rows = []
        for label, res in d["pipeline"].items():
            b = res["bare"]
            rows.append([label, "bare harness", f"{b['datasource']:.2f}", f"{b['model']:.2f}", f"{b['wall']:.2f}", "", "", ""])
            for iso, r in res.items():
                if iso == "bare":
                    continue
                rows.append([label, iso, f"{r['datasource']:.2f}", f"{r['model']:.2f}", f"{r['wall']:.2f}",
                             f"{r['model_overhead']:+.2f}", f"{r['wall_overhead']:+.2f}", f"{r['wall_ratio']:.2f}"])
        text += "\n\nWhole 2-stage pipeline, from launching the command:\n\n" + _md(
            rows, ["model script", "runner", "datasource 1st line (s)", "model 1st line (s)", "wall (s)",
                   "model overhead (s)", "wall overhead (s)", "wall ratio"])
    return text


def e2e(d: dict) -> str:
    if "results" not in d:
        return f"skipped: {d.get('skipped')}"
    rows = []
    for name, out in d["results"].items():
        for runner, r in out.items():
            acc = [a for a in r["test_accuracy"] if a is not None]
            cpu = "-" if runner == "docker" or "cpu_s" not in r else f"{r['cpu_s']:.0f} ({r['cpu_ratio_bare']:.2f})"
            rows.append([name, runner, f"{r['wall_s']:.1f}", f"{r['ratio_bare']:.2f}",
                         f"{r['ratio_mlflow']:.2f}" if "ratio_mlflow" in r else "-", cpu,
                         f"{sorted(acc)[len(acc) // 2]:.4f}" if acc else "-",
                         " ".join(f"{w:.1f}" for w in r["walls"])])
    return _md(rows, ["pipeline", "runner", "wall (s)", "x bare", "x mlflow", "CPU s (x bare)", "test accuracy",
                      "every run, wall (s)"])


def scale(d: dict) -> str:
    rows = []
    base = d["concurrent"][0]["pipelines_per_min"] if d.get("concurrent") else 1
    for r in d.get("concurrent", []):
        peaks = [v for run in r["stage_peaks"].values() for v in run.values()]
        rows.append([r["n"], f"{r['wall_s']:.1f}", f"{r['pipelines_per_min']:.1f}", f"{r['pipelines_per_min'] / base:.2f}",
                     "yes" if all(c == 0 for c in r["exit_codes"]) else f"NO {r['exit_codes']}",
                     f"{max(peaks) / (1 << 20):.0f} MiB" if peaks else "-",
                     "none" if not r["leftovers"] else "; ".join(r["leftovers"][:3])])
    text = _md(rows, ["N at once", "wall (s)", "pipelines/min", "x N=1", "all exit 0", "max stage memory peak", "leftovers"])
    s = d.get("stream")
    if s and "error" not in s:
        mib = lambda x: f"{x / (1 << 20):.0f} MiB"  # noqa: E731
        text += (f"\n\nStream of {s['bytes'] / (1 << 30):.2f} GiB (datasource -> dataflow -> model): wall {s['wall_s']:.1f} s, "
                 f"the model saw {s['model_Bps'] / 1e9:.2f} GB/s. Runner RSS: start {mib(s['runner_rss_start'])}, peak "
                 f"{mib(s['runner_rss_peak'])}, end {mib(s['runner_rss_end'])}; while the stages ran "
                 f"{mib(s['runner_rss_steady_min'])} .. {mib(s['runner_rss_steady_max'])} ({s['rss_samples']} samples). "
                 "Stage peaks (cgroup): " + ", ".join(f"{k} {mib(v)}" for k, v in s["stage_peaks"].items()) +
                 f". Leftovers: {'none' if not s['leftovers'] else s['leftovers']}.")
    elif s:
        text += f"\n\nStream FAILED: {s.get('error', '')[-300:]}"
    return text


def write() -> Path:
    parts = ["# Benchmark report (generated by `python -m bench --report` from bench/out/*.json)\n"]
    for name, fn in (("throughput", throughput), ("startup", startup), ("e2e", e2e), ("scale", scale)):
        d = _load(name)
        parts.append(f"## {name}\n")
        if d is None:
            parts.append("(not run)\n")
            continue
        parts.append(f"Measured: {_machine(d)}\n")
        try:
            parts.append(fn(d) + "\n")
        except (KeyError, TypeError, ValueError) as exc:
            parts.append(f"(could not render: {exc!r})\n")
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / "report.md"
    path.write_text("\n".join(parts))
    return path


if __name__ == "__main__":
    print(write())
