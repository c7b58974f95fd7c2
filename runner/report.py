"""`report.html` in the workspace: a run's curves, parameters, stage timings and test metrics, in one file.

The file is self-contained (inline CSS and SVG, no script, nothing fetched),
so it opens offline in any browser and can be mailed or archived with the
workspace. Everything in it that a script chose (metric names, options,
stage names) is HTML-escaped, and the page carries a Content-Security-Policy
that forbids scripts, so a hostile metric name stays text.

Metrics come from `metrics.jsonl`: `x` and `val_x` share one chart (training
and validation), `test_*` and metrics logged once go to the test table.
"""
from __future__ import annotations

import html
import json
import math
import os
from collections import defaultdict
from pathlib import Path
from typing import Any

REPORT_NAME = "report.html"
SUMMARY_NAME = "summary.json"
MAX_POINTS = 2000  # per series; a longer one is thinned evenly (the file stays small)
WIDTH, HEIGHT, PAD_L, PAD_R, PAD_T, PAD_B = 460, 240, 56, 12, 12, 36
COLOURS = {"training": "#1f77b4", "validation": "#ff7f0e"}
CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:"


def read_metrics(path: Path, cap: int = 64 << 20) -> list[dict]:
    """The records of metrics.jsonl (bad lines skipped: the file is the runner's, but be robust)."""
    records = []
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read(cap)
    except OSError:
        return []
    for line in text.splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict):
            records.append(rec)
    return records


def group_series(records: list[dict]) -> tuple[dict[str, dict[str, list[tuple[float, float]]]], dict[str, float]]:
    """({chart: {"training"|"validation": [(step, value)]}}, {test metric: last value})."""
    series: dict[str, dict[str, list[tuple[float, float]]]] = defaultdict(lambda: defaultdict(list))
    counts: dict[str, int] = defaultdict(int)
    last: dict[str, float] = {}
    for i, rec in enumerate(records):
        step = rec.get("step")
        for key, value in rec.items():
            if key in ("time", "stage", "step") or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            if not math.isfinite(value):
                continue
            counts[key] += 1
            last[key] = float(value)
            if key.startswith("test_"):
                continue
            chart, kind = (key[4:], "validation") if key.startswith("val_") else (key, "training")
            series[chart][kind].append((float(step) if isinstance(step, (int, float)) else float(i), float(value)))
    tests = {k: v for k, v in last.items() if k.startswith("test_")}
    for chart in list(series):
        kinds = series[chart]
        if all(len(points) <= 1 for points in kinds.values()):  # logged once: a number, not a curve
            for kind, points in kinds.items():
                name = chart if kind == "training" else f"val_{chart}"
                tests.setdefault(name, points[-1][1])
            del series[chart]
    return {k: dict(v) for k, v in series.items()}, tests


def _thin(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    if len(points) <= MAX_POINTS:
        return points
    stride = len(points) / MAX_POINTS
    return [points[int(i * stride)] for i in range(MAX_POINTS)] + [points[-1]]


def _tick(value: float) -> str:
    return f"{value:.4g}"


def chart_svg(name: str, kinds: dict[str, list[tuple[float, float]]]) -> str:
    """One line chart (inline SVG) of a metric's training and validation curves."""
    everything = [p for points in kinds.values() for p in points]
    xs, ys = [p[0] for p in everything], [p[1] for p in everything]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    if x1 == x0:
        x1 = x0 + 1
    if y1 == y0:
        y0, y1 = y0 - 0.5, y1 + 0.5
    plot_w, plot_h = WIDTH - PAD_L - PAD_R, HEIGHT - PAD_T - PAD_B

    def sx(x: float) -> float:
        return PAD_L + (x - x0) / (x1 - x0) * plot_w

    def sy(y: float) -> float:
        return PAD_T + (1 - (y - y0) / (y1 - y0)) * plot_h

    out = [f'<svg class="chart" xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
           f'viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-label="{html.escape(name)}">',
           f'<rect x="{PAD_L}" y="{PAD_T}" width="{plot_w}" height="{plot_h}" fill="#fff" stroke="#ccc"/>']
    for frac in (0.0, 0.25, 0.5, 0.75, 1.0):  # horizontal grid and y labels
        y = PAD_T + frac * plot_h
        out.append(f'<line x1="{PAD_L}" x2="{PAD_L + plot_w}" y1="{y:.1f}" y2="{y:.1f}" stroke="#eee"/>')
        out.append(f'<text x="{PAD_L - 6}" y="{y + 4:.1f}" text-anchor="end" class="tick">'
                   f'{_tick(y1 - frac * (y1 - y0))}</text>')
    for x in (x0, (x0 + x1) / 2, x1):
        out.append(f'<text x="{sx(x):.1f}" y="{HEIGHT - PAD_B + 16}" text-anchor="middle" class="tick">{_tick(x)}</text>')
    out.append(f'<text x="{PAD_L + plot_w / 2:.1f}" y="{HEIGHT - 4}" text-anchor="middle" class="tick">step</text>')
    for kind, points in kinds.items():
        points = _thin(sorted(points))
        colour = COLOURS.get(kind, "#333")
        coords = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in points)
        out.append(f'<polyline class="series {kind}" fill="none" stroke="{colour}" stroke-width="2" points="{coords}"/>')
        if len(points) <= 60:
            out += [f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2.5" fill="{colour}"/>' for x, y in points]
    out.append("</svg>")
    legend = " ".join(f'<span class="key" style="color:{COLOURS.get(k, "#333")}">&#9632; {html.escape(k)} '
                      f'(last {_tick(v[-1][1])})</span>' for k, v in kinds.items() if v)
    return f'<figure><figcaption>{html.escape(name)}</figcaption>{"".join(out)}<div class="legend">{legend}</div></figure>'


def _table(rows: list[tuple[str, str]], head: tuple[str, str]) -> str:
    body = "".join(f"<tr><td>{html.escape(a)}</td><td>{html.escape(b)}</td></tr>" for a, b in rows)
    return f"<table><thead><tr><th>{html.escape(head[0])}</th><th>{html.escape(head[1])}</th></tr></thead>" \
           f"<tbody>{body}</tbody></table>"


def _flatten(prefix: str, value: Any, rows: list[tuple[str, str]]) -> None:
    if isinstance(value, dict) and value:
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, rows)
    else:
        rows.append((prefix, value if isinstance(value, str) else json.dumps(value)))


def render(pipeline: dict, records: list[dict], summary: dict) -> str:
    """The report's HTML text."""
    charts, tests = group_series(records)
    params: list[tuple[str, str]] = []
    for key in ("type", "datasource", "dataflow", "model", "options", "artifact"):
        if key in pipeline:
            _flatten(key, pipeline[key], params)
    stages = summary.get("stages") or []
    stage_rows = "".join(
        f"<tr><td>{html.escape(str(s.get('name')))}</td><td>{html.escape(str(s.get('result')))}</td>"
        f"<td>{s.get('wall_s') if s.get('wall_s') is not None else '-'}</td><td>{s.get('samples') or '-'}</td></tr>"
        for s in stages)
    status = "failed" if summary.get("failed") else "succeeded"
    figures = "".join(chart_svg(name, kinds) for name, kinds in sorted(charts.items())) or \
        "<p class=\"none\">The model logged no metric over more than one step (runtime.log_metrics).</p>"
    test_html = _table([(k, _tick(v)) for k, v in sorted(tests.items())], ("metric", "value")) if tests else \
        '<p class="none">No test metrics were logged.</p>'
    title = f"pipcook-sandbox run report: {html.escape(str(pipeline.get('type') or 'pipeline'))}"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{CSP}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>
body{{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:24px auto;max-width:1000px;color:#222;padding:0 16px}}
h1{{font-size:22px}} h2{{font-size:17px;margin-top:28px;border-bottom:1px solid #ddd;padding-bottom:4px}}
.charts{{display:flex;flex-wrap:wrap;gap:16px}} figure{{margin:0;border:1px solid #e3e3e3;padding:8px;border-radius:6px}}
figcaption{{font-weight:600;margin-bottom:4px}} .tick{{font-size:11px;fill:#555}} .legend{{font-size:12px}}
.key{{margin-right:12px}} table{{border-collapse:collapse}} td,th{{border:1px solid #ddd;padding:3px 8px;text-align:left;
vertical-align:top}} td{{font-family:ui-monospace,monospace;word-break:break-all;max-width:640px}} .none{{color:#777}}
.status-failed{{color:#b00}} .status-succeeded{{color:#080}}
</style></head><body>
<h1>{title}</h1>
<p>The run <strong class="status-{status}">{status}</strong>; workspace <code>{html.escape(str(summary.get('workspace', '')))}</code>.</p>
<h2 id="curves">Training and validation curves</h2>
<div class="charts">{figures}</div>
<h2 id="test">Test metrics</h2>
{test_html}
<h2 id="stages">Stages</h2>
<table><thead><tr><th>stage</th><th>result</th><th>wall time (s)</th><th>samples sent</th></tr></thead><tbody>{stage_rows}</tbody></table>
<h2 id="params">Parameters</h2>
{_table(params, ("parameter", "value"))}
</body></html>
"""


def summary_data(tracker: Any, ws: Any, failed: bool) -> dict:
    """What summary.json records: per-stage wall time and samples, final metrics, paths."""
    return {
        "failed": failed,
        "workspace": str(ws.root),
        "model": str(ws.model),
        "wall_s": round((tracker.ended or tracker.started) - tracker.started, 3) if tracker.ended else None,
        "stages": [{"name": st.name, "result": st.status, "wall_s": None if st.wall is None else round(st.wall, 3),
                    "samples": st.samples} for st in tracker.stages.values()],
        "final_metrics": tracker.final_metrics(),
        "artifacts": [str(p) for p in tracker.artifacts],
    }


def _write_new(path: Path, text: str) -> None:
    """Replace path atomically without following a link anywhere on the way (model/ came from a stage)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        os.unlink(tmp)
    except FileNotFoundError:
        pass
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    if path.is_dir() and not path.is_symlink():
        import shutil

        shutil.rmtree(path)
    os.replace(tmp, path)


def write(ws: Any, tracker: Any, failed: bool = False) -> Path:
    """Write summary.json and report.html into the workspace, and a copy of the report into model/
    (so `serve` of the model, or of its zip, can link to it). Returns the report's path."""
    summary = summary_data(tracker, ws, failed)
    try:
        pipeline = json.loads(Path(ws.pipeline).read_text("utf-8"))
    except (OSError, ValueError):
        pipeline = {}
    text = render(pipeline if isinstance(pipeline, dict) else {}, read_metrics(ws.metrics), summary)
    _write_new(ws.root / SUMMARY_NAME, json.dumps(summary, indent=2) + "\n")
    _write_new(ws.root / REPORT_NAME, text)
    if not failed and Path(ws.model).is_dir() and not Path(ws.model).is_symlink():
        _write_new(Path(ws.model) / REPORT_NAME, text)
    return ws.root / REPORT_NAME
