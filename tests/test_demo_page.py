"""The demo page of `serve`, in a real headless Chromium (Debian's `chromium`, driven by Playwright).

One model per kind of page: an image classifier (drop zone + preview), a
text classifier (textarea) and a tabular one (a row field). Each test types
or drops an input, clicks Predict and reads the result off the page; a
screenshot of each lands in tests/artifacts/ (gitignored) for a human look.
"""
from __future__ import annotations

import io
import json
import shutil
from pathlib import Path
from typing import Iterator

import pytest
from conftest import REPO, TINY, run_cli, write_pipeline
from test_serve import serving

pytestmark = pytest.mark.e2e

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--no-first-run"]
SHOTS = REPO / "tests" / "artifacts"

IMAGE_DATASOURCE = '''
import os
from PIL import Image
from sandbox import sdk

COLOURS = {"red": (220, 30, 30), "blue": (30, 40, 220)}

def datasource(options, ctx):
    samples = []
    for label, (name, rgb) in enumerate(sorted(COLOURS.items())):
        for i in range(4):
            path = os.path.join(ctx.workspace.data_dir, f"{name}-{i}.png")
            Image.new("RGB", (8, 8), tuple(min(255, c + 6 * i) for c in rgb)).save(path)
            samples.append({"data": path, "label": label})
    return sdk.from_lists(train=samples, meta={"type": "image", "categories": sorted(COLOURS)})
'''

IMAGE_DATAFLOW = '''
import io
import numpy as np
from PIL import Image

def dataflow(pool, options, ctx):
    def fn(sample):
        data = sample["data"]
        img = Image.open(io.BytesIO(data) if isinstance(data, bytes) else data).convert("RGB")
        return {"data": np.asarray(img, dtype=np.float32).reshape(-1, 3).mean(axis=0) / 255.0, "label": sample["label"]}
    return pool.transform(fn)
'''

IMAGE_MODEL = '''
import json, os
import numpy as np

def train(runtime, options, ctx):
    sums = {}
    for s in runtime.dataset.train:
        sums.setdefault(s["label"], []).append(s["data"])
    centroids = {int(k): np.mean(v, axis=0).tolist() for k, v in sums.items()}
    with open(os.path.join(runtime.read_model(), "centroids.json"), "w") as f:
        json.dump({"centroids": centroids, "categories": runtime.dataset.meta["categories"]}, f)

def predict(runtime, options, ctx):
    with open(os.path.join(runtime.read_model(), "centroids.json")) as f:
        model = json.load(f)
    out = []
    for s in runtime.dataset.predicted:
        d = {int(k): float(np.linalg.norm(np.asarray(s["data"]) - np.asarray(c))) for k, c in model["centroids"].items()}
        w = {k: np.exp(-10 * v) for k, v in d.items()}
        best = min(d, key=d.get)
        out.append({"label": model["categories"][best], "score": float(w[best] / sum(w.values()))})
    return out
'''


def _png(rgb: tuple[int, int, int]) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (16, 16), rgb).save(buf, format="PNG")
    return buf.getvalue()


def _train(pipeline: Path, out: Path) -> Path:
    proc = run_cli("run", str(pipeline), "-o", str(out), "--isolation", "none")
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.fixture(scope="module")
def browser() -> Iterator:
    if not Path(CHROMIUM).exists():
        pytest.fail("Debian's chromium is not installed (apt-get install -y chromium); .ci/run installs it")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser) -> Iterator:
    context = browser.new_context(viewport={"width": 900, "height": 900})
    pg = context.new_page()
    pg.requested = []
    pg.on("request", lambda r: pg.requested.append(r.url))
    try:
        yield pg
    finally:
        context.close()


def _shot(page, name: str) -> None:
    SHOTS.mkdir(exist_ok=True)
    page.screenshot(path=str(SHOTS / f"demo-{name}.png"), full_page=True)
    assert (SHOTS / f"demo-{name}.png").stat().st_size > 1000


def _only_local(page, url: str) -> None:
    outside = [u for u in page.requested if not u.startswith(url) and not u.startswith(("blob:", "data:"))]
    assert not outside, outside  # no CDN, no font service: nothing beyond the server


def _predict_and_read(page) -> list[str]:
    page.click("#predict")
    page.wait_for_selector("#results li.result, #error:not([hidden])", timeout=30_000)
    return page.locator("#results li.result").all_inner_texts()


def test_tabular_page(page, tmp_path):
    ws = _train(TINY / "pipeline.json", tmp_path / "ws")  # type TabularClassification
    with serving(ws, "none", tmp=tmp_path) as server:
        page.goto(server.url + "/")
        page.wait_for_selector("#input-table:not([hidden])")
        assert page.locator("#model-type").inner_text() == "TabularClassification"
        assert page.locator("#input-image").is_hidden() and page.locator("#input-text").is_hidden()
        page.fill("#row", "1,2,3,4")
        results = _predict_and_read(page)
        assert len(results) == 1 and results[0].startswith("pos") and "score" in results[0]
        assert json.loads(page.locator("#raw").text_content())["data"][0]["label"] == "pos"
        page.wait_for_function("document.getElementById('health').textContent === 'worker ready'")
        _shot(page, "tabular")

        page.fill("#row", "not,numbers")
        page.click("#predict")
        page.wait_for_selector("#error:not([hidden])")
        error = page.locator("#error").inner_text()
        assert error.startswith("422:") and "could not convert string to float" in error
        assert "Traceback" not in error
        _shot(page, "tabular-error")
        _only_local(page, server.url)


def test_text_page(page, tmp_path):
    root = tmp_path / "p"
    shutil.copytree(TINY, root)
    spec = json.loads((root / "pipeline.json").read_text())
    spec["type"] = "TextClassification"
    (root / "pipeline.json").write_text(json.dumps(spec))
    ws = _train(root / "pipeline.json", tmp_path / "ws")
    with serving(ws, "none", tmp=tmp_path) as server:
        page.goto(server.url + "/")
        page.wait_for_selector("#input-text:not([hidden])")
        page.fill("#text", "1,1,1,1")
        results = _predict_and_read(page)
        assert len(results) == 1 and results[0].startswith("pos")
        page.check("#per-line")
        page.fill("#text", "1,1,1,1\n-2,-2,-2,-2\n")
        page.click("#predict")
        page.wait_for_function("document.querySelectorAll('#results li.result').length === 2")
        labels = page.locator("#results li.result .label").all_inner_texts()
        assert labels == ["pos", "neg"]
        _shot(page, "text")
        _only_local(page, server.url)


def test_image_page_choose_and_drop(page, tmp_path):
    pipeline = write_pipeline(tmp_path / "p", datasource=IMAGE_DATASOURCE, dataflow=[IMAGE_DATAFLOW], model=IMAGE_MODEL,
                              extra={"type": "ImageClassification"})
    ws = _train(pipeline, tmp_path / "ws")
    red, blue = tmp_path / "red.png", tmp_path / "blue.png"
    red.write_bytes(_png((230, 20, 25)))
    blue.write_bytes(_png((25, 30, 235)))
    with serving(ws, "none", tmp=tmp_path) as server:
        page.goto(server.url + "/")
        page.wait_for_selector("#input-image:not([hidden])")
        assert page.locator("#preview").is_hidden()

        # choose a file: the preview shows it, then the result
        page.set_input_files("#file", str(red))
        page.wait_for_function("document.getElementById('preview').naturalWidth === 16")
        assert "red.png" in page.locator("#file-name").inner_text()
        results = _predict_and_read(page)
        assert results[0].startswith("red") and "input: red.png" in results[0]
        score = float(page.locator("#results li.result .score").first.inner_text().rstrip("%"))
        assert 50 < score <= 100
        _shot(page, "image-chosen")

        # drop a file onto the drop zone, as a person drags one from the desktop
        page.evaluate("""async (b64) => {
            const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
            const dt = new DataTransfer();
            dt.items.add(new File([bytes], "blue.png", { type: "image/png" }));
            const drop = document.getElementById("drop");
            drop.dispatchEvent(new DragEvent("dragover", { dataTransfer: dt, bubbles: true, cancelable: true }));
            drop.dispatchEvent(new DragEvent("drop", { dataTransfer: dt, bubbles: true, cancelable: true }));
        }""", __import__("base64").b64encode(blue.read_bytes()).decode())
        page.wait_for_function("document.getElementById('file-name').textContent.startsWith('blue.png')")
        page.wait_for_function("document.getElementById('preview').naturalWidth === 16")
        page.click("#predict")
        page.wait_for_function("document.querySelector('#results li.result .label')?.textContent === 'blue'")
        assert "input: blue.png" in page.locator("#results li.result").first.inner_text()
        _shot(page, "image-dropped")
        _only_local(page, server.url)


DETECT_DATASOURCE = '''
import os
from PIL import Image
from sandbox import sdk

def datasource(options, ctx):
    path = os.path.join(ctx.workspace.data_dir, "blank.png")
    Image.new("RGB", (8, 8), (128, 128, 128)).save(path)
    return sdk.from_lists(train=[{"data": path, "label": None}], meta={"type": "image", "categories": ["blue", "red"]})
'''

# Finds the red and the blue pixels: a "detector" whose boxes are known exactly, in the image's pixels.
DETECT_DATAFLOW = '''
import io
import numpy as np
from PIL import Image

def dataflow(pool, options, ctx):
    def fn(sample):
        data = sample["data"]
        img = np.asarray(Image.open(io.BytesIO(data) if isinstance(data, bytes) else data).convert("RGB")).astype(int)
        boxes = []
        for mask in ((img[..., 0] > 200) & (img[..., 2] < 80), (img[..., 2] > 200) & (img[..., 0] < 80)):
            ys, xs = np.nonzero(mask)
            boxes.append([float(xs.min()), float(ys.min()), float(xs.max() + 1 - xs.min()), float(ys.max() + 1 - ys.min())]
                         if len(xs) else [])
        return {"data": boxes, "label": sample["label"]}
    return pool.transform(fn)
'''

DETECT_MODEL = '''
def train(runtime, options, ctx):
    pass

def predict(runtime, options, ctx):
    out = []
    for s in runtime.dataset.predicted:
        red, blue = s["data"]
        out.append([d for d in ({"label": "red", "score": 0.93, "box": red}, {"label": "blue", "score": 0.71, "box": blue})
                    if d["box"]])
    return out
'''


def test_object_detection_page_draws_the_boxes(page, tmp_path):
    """An ObjectDetection model: the page draws each box over the uploaded image, in its label's colour."""
    from PIL import Image

    pipeline = write_pipeline(tmp_path / "p", datasource=DETECT_DATASOURCE, dataflow=[DETECT_DATAFLOW],
                              model=DETECT_MODEL, extra={"type": "ObjectDetection"})
    ws = _train(pipeline, tmp_path / "ws")
    img = Image.new("RGB", (120, 90), (150, 150, 150))
    img.paste((230, 20, 20), (30, 20, 70, 60))   # red: box [30, 20, 40, 40]
    img.paste((20, 30, 235), (85, 50, 105, 80))  # blue: box [85, 50, 20, 30]
    path = tmp_path / "two.png"
    img.save(path)
    with serving(ws, "none", tmp=tmp_path) as server:
        page.goto(server.url + "/")
        page.wait_for_selector("#input-image:not([hidden])")
        assert page.locator("#model-type").inner_text() == "ObjectDetection"
        assert page.locator("#detections").is_hidden()
        page.set_input_files("#file", str(path))
        page.wait_for_function("document.getElementById('preview').naturalWidth === 120")
        page.click("#predict")
        page.wait_for_selector("#detections:not([hidden])", timeout=30_000)
        text = page.locator("#results li.result").first.inner_text()
        assert "2 objects" in text and "red 93.0% at [30, 20, 40, 40]" in text and "blue 71.0% at [85, 50, 20, 30]" in text
        assert json.loads(page.locator("#raw").text_content())["data"][0][0]["box"] == [30.0, 20.0, 40.0, 40.0]
        size = page.evaluate("[document.getElementById('detections').width, document.getElementById('detections').height]")
        scale = size[0] / 120
        assert size == [round(120 * scale), round(90 * scale)] and scale > 2  # a small image is shown larger

        shot = Image.open(io.BytesIO(page.locator("#detections").screenshot())).convert("RGB")
        assert abs(shot.size[0] - size[0]) <= 1 and abs(shot.size[1] - size[1]) <= 1  # sub-pixel layout
        px = shot.load()

        def colour_near(x: float, y: float, rgb: tuple[int, int, int]) -> bool:
            """Any pixel within 2 of (x, y) close to `rgb` (the stroke is 3 wide, antialiased)."""
            return any(sum(abs(a - b) for a, b in zip(px[int(x) + dx, int(y) + dy], rgb)) < 60
                       for dx in range(-2, 3) for dy in range(-2, 3))

        cyan, magenta = (0, 229, 255), (255, 43, 214)  # the first two box colours: red's box, then blue's
        x, y, w, h = (v * scale for v in (30, 20, 40, 40))
        for ex, ey in ((x, y + h / 2), (x + w, y + h / 2), (x + w / 2, y + h), (x + w * 0.75, y)):  # the 4 edges
            assert colour_near(ex, ey, cyan), (ex, ey)
        assert not colour_near(x + w / 2, y + h / 2, cyan)  # a box, not a filled square: the image shows inside
        assert sum(abs(a - b) for a, b in zip(px[int(x + w / 2), int(y + h / 2)], (230, 20, 20))) < 40
        x, y, w, h = (v * scale for v in (85, 50, 20, 30))
        for ex, ey in ((x, y + h / 2), (x + w, y + h / 2), (x + w / 2, y + h)):
            assert colour_near(ex, ey, magenta), (ex, ey)
        assert not colour_near(10 * scale, 80 * scale, cyan) and not colour_near(10 * scale, 80 * scale, magenta)
        _shot(page, "object-detection")
        _only_local(page, server.url)
