"""The tfjs and tflite artifact processors, on a real small Keras model.

The model is the image example's CNN (`build` from examples/image-classification/model.py),
fitted briefly on random data with the TensorFlow framework (built once into the
cache). The TF Lite export runs in TensorFlow's interpreter, the TF.js export in
node with @tensorflow/tfjs (installed once into pytest's cache dir); both must
predict what Keras predicts.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, run_cli, write_pipeline

from pipcook_sandbox.runner import artifacts
from pipcook_sandbox.runner.artifacts import ArtifactError, tfjs_processor, tflite_processor

TFJS_NPM = "@tensorflow/tfjs@4.22.0"
LABELS = ["daisy", "rose", "sunflower", "tulip"]

BUILD = r'''
import sys, importlib.util
import numpy as np, keras
spec = importlib.util.spec_from_file_location("image_model", sys.argv[1])
example = importlib.util.module_from_spec(spec); spec.loader.exec_module(example)
keras.utils.set_random_seed(3)
model = example.build(keras, 16, 16, 4, 0.01)
rng = np.random.default_rng(0)
model.fit(rng.random((32, 16, 16, 3), dtype=np.float32), rng.integers(0, 4, 32), epochs=1, verbose=0)
model.save(sys.argv[2])
x = rng.random((3, 16, 16, 3), dtype=np.float32)
np.save(sys.argv[3], x)
np.save(sys.argv[4], model.predict(x, verbose=0))
'''

TFLITE_RUN = r'''
import sys, warnings
import numpy as np, tensorflow as tf
warnings.simplefilter("ignore")
x = np.load(sys.argv[2])
it = tf.lite.Interpreter(model_path=sys.argv[1])
inp, out = it.get_input_details()[0], it.get_output_details()[0]
it.resize_tensor_input(inp["index"], x.shape)
it.allocate_tensors()
it.set_tensor(inp["index"], x)
it.invoke()
np.save(sys.argv[3], it.get_tensor(out["index"]))
'''

NODE_RUN = r'''
const fs = require("fs"), path = require("path");
const tf = require("@tensorflow/tfjs");
(async () => {
  const [dir, inputJson] = process.argv.slice(2);
  const manifest = JSON.parse(fs.readFileSync(path.join(dir, "model.json"), "utf8"));
  const specs = [], parts = [];
  for (const group of manifest.weightsManifest) {
    specs.push(...group.weights);
    for (const p of group.paths) parts.push(fs.readFileSync(path.join(dir, p)));
  }
  const all = Buffer.concat(parts);
  const weightData = all.buffer.slice(all.byteOffset, all.byteOffset + all.byteLength);
  const model = await tf.loadLayersModel(tf.io.fromMemory({ modelTopology: manifest.modelTopology, weightSpecs: specs, weightData }));
  const input = JSON.parse(fs.readFileSync(inputJson, "utf8"));
  const y = model.predict(tf.tensor(input.data, input.shape));
  process.stdout.write("RESULT " + JSON.stringify({ shape: y.shape, data: Array.from(await y.data()) }) + "\n");
})().catch((e) => { console.error(String((e && e.stack) || e)); process.exit(1); });
'''


def tf_python(code: str, *args: str, timeout: float = 600) -> None:
    from pipcook_sandbox.runner import frameworks

    site = frameworks.resolve("tensorflow@2.21").site
    boot = f"import site, sys, runpy; site.addsitedir({str(site)!r}); sys.argv = ['x'] + sys.argv[1:]; exec(compile({code!r}, 'tf', 'exec'))"
    env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp"), "TF_CPP_MIN_LOG_LEVEL": "2",
           "CUDA_VISIBLE_DEVICES": "-1"}
    proc = subprocess.run([sys.executable, "-I", "-S", "-c", boot, *args], capture_output=True, text=True,
                          timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.fixture(scope="module")
def keras_ws(tmp_path_factory) -> Path:
    """A workspace whose model/ holds the image example's CNN as model.keras; x.npy, y.npy beside it."""
    ws = tmp_path_factory.mktemp("keras-ws")
    (ws / "model").mkdir()
    tf_python(BUILD, str(REPO / "examples" / "image-classification" / "model.py"), str(ws / "model" / "model.keras"),
              str(ws / "x.npy"), str(ws / "y.npy"))
    # what `run` leaves beside the model: labels, the dataset meta, the pipeline (exportmeta.py reads them)
    (ws / "model" / "labels.json").write_text(json.dumps(LABELS))
    (ws / "model" / "meta.json").write_text(json.dumps({"type": "image", "dimension": {"x": 16, "y": 16, "z": 3},
                                                        "categories": LABELS, "size": {"train": 32}}))
    (ws / "model" / "pipeline.json").write_text(json.dumps({
        "specVersion": "2.0", "type": "ImageClassification", "datasource": "scripts/datasource.py#sha256=" + "0" * 64,
        "dataflow": ["scripts/dataflow.py?size=16&size=16#sha256=" + "1" * 64], "model": "scripts/model.py"}))
    return ws


def _assert_sidecar(path: Path, fmt: str, model_name: str) -> None:
    """The labels and preprocessing shipped beside an export."""
    side = json.loads(path.read_text())
    assert side["format"] == fmt and side["model"] == model_name and side["type"] == "ImageClassification"
    assert side["labels"] == LABELS
    assert side["input"] == {"type": "image", "dimension": {"x": 16, "y": 16, "z": 3}}
    assert side["dataflow"] == [{"script": "dataflow.py", "options": {"size": ["16", "16"]}}]


@pytest.fixture(scope="module")
def tfjs_node() -> Path:
    """A node_modules with @tensorflow/tfjs (pure JS: no native download), installed once per user
    (under the user cache dir: pytest's own cache is not there when its cacheprovider is off)."""
    import platformdirs

    root = Path(platformdirs.user_cache_dir("pipcook-sandbox")) / "tests" / "tfjs-node-4.22.0"
    root.mkdir(parents=True, exist_ok=True)
    if not (root / "node_modules" / "@tensorflow" / "tfjs" / "package.json").is_file():
        proc = subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--silent", "--prefix", str(root), TFJS_NPM],
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"npm install {TFJS_NPM} failed: {proc.stderr[-2000:]}"
    (root / "run.js").write_text(NODE_RUN)
    return root


@pytest.mark.tf
def test_tflite_predicts_like_keras(keras_ws):
    out = tflite_processor.process(keras_ws / "model", {"processor": "tflite"}, keras_ws, log=lambda _: None)
    assert out == keras_ws / "artifacts" / "model.tflite"
    assert out.read_bytes()[4:8] == b"TFL3"  # the flatbuffer's file identifier
    tf_python(TFLITE_RUN, str(out), str(keras_ws / "x.npy"), str(keras_ws / "tflite-y.npy"))
    expected, got = np.load(keras_ws / "y.npy"), np.load(keras_ws / "tflite-y.npy")
    assert got.shape == expected.shape == (3, 4)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    _assert_sidecar(out.with_name("model.tflite.json"), "tflite", "model.tflite")


@pytest.mark.tf
def test_tfjs_export_loads_in_node_and_predicts_like_keras(keras_ws, tfjs_node):
    out = tfjs_processor.process(keras_ws / "model", {"processor": "tfjs", "target": "web"}, keras_ws,
                                 log=lambda _: None)
    assert out == keras_ws / "web"
    manifest = json.loads((out / "model.json").read_text())
    assert manifest["format"] == "layers-model"
    shards = [p for group in manifest["weightsManifest"] for p in group["paths"]]
    assert shards and all((out / p).is_file() for p in shards)
    x = np.load(keras_ws / "x.npy")
    (keras_ws / "x.json").write_text(json.dumps({"data": x.ravel().tolist(), "shape": list(x.shape)}))
    proc = subprocess.run(["node", str(tfjs_node / "run.js"), str(out), str(keras_ws / "x.json")], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "NODE_PATH": str(tfjs_node / "node_modules")},
                          cwd=tfjs_node)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])
    expected = np.load(keras_ws / "y.npy")
    assert result["shape"] == list(expected.shape)
    np.testing.assert_allclose(np.array(result["data"]).reshape(expected.shape), expected, atol=1e-4)

    _assert_sidecar(out / "pipcook.json", "tfjs", "model.json")

    # run again: an earlier export at the target is replaced whole
    assert tfjs_processor.process(keras_ws / "model", {"target": "web"}, keras_ws, log=lambda _: None) == out


@pytest.mark.tf
@pytest.mark.e2e
def test_a_pipeline_names_both_processors(tmp_path):
    """From `run`: the model stage saves model.keras, the host converts it after training."""
    model = '''
        import os
        import numpy as np

        def train(runtime, options, ctx):
            import keras
            xs = np.stack([s["data"] for s in runtime.dataset.train]).astype("float32")
            ys = np.array([s["label"] for s in runtime.dataset.train])
            m = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation="relu"),
                                  keras.layers.Dense(2, activation="softmax")])
            m.compile("adam", "sparse_categorical_crossentropy")
            m.fit(xs, ys, epochs=1, verbose=0)
            m.save(os.path.join(runtime.read_model(), "model.keras"))
    '''
    pipeline = write_pipeline(tmp_path / "p", dataflow=[], model=model, extra={
        "options": {"framework": "tensorflow@2.21", "train": {"epochs": 1}},
        "artifact": [{"processor": "tflite", "target": "model.tflite"}, {"processor": "tfjs", "target": "web"}]})
    proc = run_cli("run", str(pipeline), "-o", str(tmp_path / "ws"), "--isolation", "none", timeout=900)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "ws" / "model.tflite").read_bytes()[4:8] == b"TFL3"
    assert json.loads((tmp_path / "ws" / "web" / "model.json").read_text())["format"] == "layers-model"


def test_processors_are_installed_entry_points():
    assert {"zip", "tfjs", "tflite"} <= set(artifacts.installed())


@pytest.mark.parametrize("processor", [tflite_processor, tfjs_processor])
def test_a_symlinked_model_file_is_not_followed(processor, tmp_path):
    """A stage may plant model.keras -> some host file: processors see no model at all."""
    host_file = tmp_path / "host-secret.keras"
    host_file.write_bytes(b"PK\x03\x04 not yours")
    ws = tmp_path / "ws"
    (ws / "model").mkdir(parents=True)
    (ws / "model" / "model.keras").symlink_to(host_file)
    (ws / "model" / "etc").symlink_to("/etc", target_is_directory=True)
    with pytest.raises(ArtifactError, match="no regular file model.keras"):
        processor.process(ws / "model", {}, ws, log=lambda _: None)
    assert not (ws / "artifacts").exists()


def test_private_copy_keeps_regular_files_only(tmp_path):
    model = tmp_path / "model"
    (model / "sub").mkdir(parents=True)
    (model / "model.keras").write_bytes(b"real")
    (model / "sub" / "labels.json").write_text("{}")
    (model / "passwd").symlink_to("/etc/passwd")
    (model / "linked-dir").symlink_to("/etc", target_is_directory=True)
    os.mkfifo(model / "fifo")
    copy = tflite_processor.private_copy(model, tmp_path / "copy")
    found = sorted(str(p.relative_to(copy)) for p in copy.rglob("*") if not p.is_dir())
    assert found == ["model.keras", "sub/labels.json"]
    assert not any(p.is_symlink() for p in copy.rglob("*"))


def test_a_missing_library_is_named(tmp_path, monkeypatch):
    """No TensorFlow where the processor looks for it: the error names the library."""
    from pipcook_sandbox.runner import frameworks

    empty = tmp_path / "fw"
    (empty / "site").mkdir(parents=True)
    monkeypatch.setattr(frameworks, "resolve", lambda spec, **kw: frameworks.Framework("tensorflow", "2.21", empty))
    ws = tmp_path / "ws"
    (ws / "model").mkdir(parents=True)
    (ws / "model" / "model.keras").write_bytes(b"PK")
    with pytest.raises(ArtifactError, match="needs the Python library 'keras'"):
        tflite_processor.process(ws / "model", {}, ws, log=lambda _: None)


def test_option_model_must_stay_inside_model_dir(tmp_path):
    ws = tmp_path / "ws"
    (ws / "model").mkdir(parents=True)
    for bad in ("../pipeline.json", "/etc/passwd"):
        with pytest.raises(ArtifactError, match="must name a file inside model/"):
            tflite_processor.process(ws / "model", {"model": bad}, ws, log=lambda _: None)


def test_tfjs_refuses_to_overwrite_a_foreign_directory(tmp_path):
    target = tmp_path / "scripts"
    target.mkdir()
    (target / "keep.py").write_text("x")
    produced = tmp_path / "out"
    produced.mkdir()
    (produced / "model.json").write_text("{}")
    with pytest.raises(ArtifactError, match="holding other files"):
        tfjs_processor.install_dir(produced, target)
    assert (target / "keep.py").read_text() == "x"
