"""The workspace's report.html and what `serve` offers around the model, in a real headless Chromium.

The report opens from disk with the network cut off (it must be
self-contained); a screenshot of it is checked for drawn curves. The serve
tests read /openapi.json, /docs, /info, the access log, and the demo page's
column names and report link.
"""
from __future__ import annotations

import io
import json
import re
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import require_bwrap, run_cli, write_pipeline
from test_demo_page import SHOTS, browser, page  # noqa: F401  (fixtures)
from test_serve import serving

pytestmark = pytest.mark.e2e

HOSTILE = '<img src=x onerror="document.title=1">'
CURVES_MODEL = f'''
import json, os
import numpy as np

def train(runtime, options, ctx):
    epochs = int(options.get("epochs", 6))
    for epoch in range(1, epochs + 1):
        runtime.log_metrics(step=epoch, loss=1.0 / epoch, accuracy=1 - 0.5 / epoch,
                            val_loss=1.2 / epoch, val_accuracy=1 - 0.6 / epoch)
        runtime.notify_progress(100 * epoch / epochs, epoch=epoch, epochs=epochs)
    runtime.log_metrics(step=epochs, test_loss=0.25, test_accuracy=0.875)
    runtime.log_metrics(step=1, **{{{HOSTILE!r}: 1.0}})
    runtime.log_metrics(step=2, **{{{HOSTILE!r}: 2.0}})
    xs = [s for s in runtime.dataset.train]
    with open(os.path.join(runtime.read_model(), "weights.json"), "w") as f:
        json.dump({{"n": len(xs), "categories": runtime.dataset.meta.get("categories")}}, f)

def predict(runtime, options, ctx):
    out = []
    for s in runtime.dataset.predicted:
        out.append({{"label": "pos" if float(np.sum(np.asarray(s["data"]))) > 0 else "neg"}})
    return out
'''
COLUMNS_DATASOURCE = '''
import numpy as np
from sandbox import sdk

def datasource(options, ctx):
    rng = np.random.default_rng(0)
    rows = [rng.normal(size=4).astype(np.float32) for _ in range(40)]
    samples = [{"data": x, "label": int(x.sum() > 0)} for x in rows]
    return sdk.from_lists(train=samples, meta={"type": "table", "categories": ["neg", "pos"],
                                               "columns": ["sepal_length", "sepal_width", "petal_length", "petal_width"]})
'''


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    require_bwrap()
    root = tmp_path_factory.mktemp("report")
    pipeline = write_pipeline(root / "p", datasource=COLUMNS_DATASOURCE, model=CURVES_MODEL,
                              extra={"type": "TabularClassification", "options": {"train": {"epochs": 6, "batchSize": 8}},
                                     "artifact": [{"processor": "zip", "target": "model.zip"}]})
    proc = run_cli("run", str(pipeline), "-o", str(root / "ws"))
    assert proc.returncode == 0, proc.stderr
    return root / "ws"


def _coloured_pixels(png: bytes, rgb: tuple[int, int, int]) -> int:
    from PIL import Image

    img = Image.open(io.BytesIO(png)).convert("RGB")
    pixels = img.get_flattened_data() if hasattr(img, "get_flattened_data") else img.getdata()
    return sum(1 for px in pixels if all(abs(a - b) < 40 for a, b in zip(px, rgb)))


def test_report_is_self_contained_and_draws_the_curves(trained, page):
    report = trained / "report.html"
    assert report.is_file() and (trained / "model" / "report.html").is_file()
    requested_outside: list[str] = []
    page.route("**/*", lambda route: (requested_outside.append(route.request.url), route.abort())
               if not route.request.url.startswith("file://") else route.continue_())
    page.goto(report.as_uri())
    assert requested_outside == []  # offline: nothing fetched
    charts = {c: page.locator(f'figure:has(figcaption:text-is("{c}")) polyline').count() for c in ("loss", "accuracy")}
    assert charts == {"loss": 2, "accuracy": 2}  # training and validation, one chart per metric
    points = page.locator('figure:has(figcaption:text-is("loss")) polyline.training').get_attribute("points")
    assert len(points.split()) == 6  # one point per epoch
    tests = page.locator("#test + table").inner_text()
    assert "test_accuracy" in tests and "0.875" in tests
    params = page.locator("#params + table").inner_text()
    assert "options.train.epochs" in params and "options.train.batchSize" in params
    stages = page.locator("#stages + table").inner_text()
    assert re.search(r"datasource\s+done\s+[\d.]+\s+40", stages), stages
    # a hostile metric name stays text: no element injected, no script run
    assert page.locator("img").count() == 0 and page.title() != "1"
    assert HOSTILE in page.locator("body").inner_text()
    SHOTS.mkdir(exist_ok=True)
    png = page.screenshot(path=str(SHOTS / "report.png"), full_page=True)
    assert _coloured_pixels(png, (0x1F, 0x77, 0xB4)) > 300  # the training curves are drawn (blue)
    assert _coloured_pixels(png, (0xFF, 0x7F, 0x0E)) > 300  # and the validation ones (orange)
    summary = json.loads((trained / "summary.json").read_text())
    assert summary["final_metrics"]["test_accuracy"] == 0.875
    assert [s["name"] for s in summary["stages"]] == ["datasource", "dataflow-1", "model"]


def _wait_for_line(path: Path, pattern: str, timeout: float = 30) -> str:
    """The log's text once a line matches (the access line is written as the response ends)."""
    deadline = time.monotonic() + timeout
    while not re.search(pattern, text := path.read_text()):
        assert time.monotonic() < deadline, text
        time.sleep(0.05)
    return text


def test_serve_documents_its_api_and_logs_access(trained, tmp_path):
    with serving(trained, "bwrap", tmp=tmp_path) as server:
        doc = json.loads(urllib.request.urlopen(server.url + "/openapi.json").read())
        assert doc["openapi"].startswith("3.")
        assert {"/predict", "/info", "/healthz", "/report"} <= set(doc["paths"])
        assert "application/json" in doc["paths"]["/predict"]["post"]["requestBody"]["content"]
        assert "sepal_length, sepal_width, petal_length, petal_width" in doc["info"]["description"]
        docs = urllib.request.urlopen(server.url + "/docs").read().decode()
        assert "/predict" in docs and "<script" not in docs
        info = json.loads(urllib.request.urlopen(server.url + "/info").read())
        assert info["columns"] == ["sepal_length", "sepal_width", "petal_length", "petal_width"]
        assert info["report"] == "/report"
        answer = urllib.request.urlopen(urllib.request.Request(
            server.url + "/predict", data=json.dumps({"inputs": ["1,1,1,1"]}).encode(),
            headers={"Content-Type": "application/json"})).read()
        assert json.loads(answer)["success"] is True
        log = _wait_for_line(server.log, r'access: 127\.0\.0\.1 "POST /predict" 200 \d+ms')
        assert re.search(r'access: 127\.0\.0\.1 "GET /openapi.json" 200', log), log


def test_demo_page_names_the_columns_and_links_the_report(trained, tmp_path, page):
    with serving(trained, "bwrap", tmp=tmp_path) as server:
        page.goto(server.url + "/")
        page.wait_for_selector("#columns:not([hidden])")
        assert page.inner_text("#columns") == "Columns, in order: sepal_length, sepal_width, petal_length, petal_width"
        assert page.get_attribute("#row", "placeholder") == "sepal_length,sepal_width,petal_length,petal_width"
        SHOTS.mkdir(exist_ok=True)
        page.screenshot(path=str(SHOTS / "demo-columns.png"), full_page=True)
        page.click("#report-link")
        page.wait_for_selector("figure svg polyline")
        assert {"loss", "accuracy", HOSTILE} <= set(page.locator("figcaption").all_inner_texts())
        csp = urllib.request.urlopen(server.url + "/report").headers["Content-Security-Policy"]
        assert "sandbox" in csp and "default-src 'none'" in csp
