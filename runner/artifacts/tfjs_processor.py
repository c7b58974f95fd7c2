"""The `tfjs` artifact processor: model/model.keras as a TensorFlow.js layers model.

    {"processor": "tfjs", "target": "web-model", "model": "model.keras"}

writes `web-model/model.json` and `group1-shard*.bin`, loadable in a browser or
node with `tf.loadLayersModel(".../model.json")` (@tensorflow/tfjs 4.x).

Why not `pip install tensorflowjs` into the runner: tensorflowjs 4.22 requires
jax, flax, tensorflow-decision-forests (which pins an older TensorFlow), tf-keras,
tensorflow-hub and packaging~=23.1, none of which fit next to TensorFlow 2.21 /
Keras 3 (and the runner has no TensorFlow at all). So tensorflowjs is installed
without its dependencies into its own directory in the cache (once), and used
in the run's sandbox on the framework's site dir for what needs none of those: its
writer of the layers-model format (model.json + weight shards, quantisation).

Its own Keras 3 reader is not used: it writes Keras 3 configs (`batch_shape`,
dtype policies, the new `inbound_nodes`) and weight names (`layers/dense/vars/0`)
that @tensorflow/tfjs 4.22 cannot load ("An InputLayer should be passed either
a batchInputShape or an inputShape"). Keras itself reads the model instead
(safe_mode: no Lambda code is run), and the topology is translated to the
Keras 2 form tfjs-layers reads, weights named `layer/variable` as it expects.
Models of built-in layers convert; custom layers and nested models do not.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from ..cachebuild import build_once, pip_install
from ..fetch import cache_dir
from ..frameworkid import platform_tag, python_tag
from . import ArtifactError, confined, confinement, exportmeta, target_path
from .tflite_processor import CONVERT_TIMEOUT, framework_for, inside_model, keras_file, private_copy

TFJS_VERSION = "4.22.0"
SIDECAR = "pipcook.json"  # labels and preprocessing, beside model.json
SHARD_BYTES = 4 << 20

CONVERT = r'''
import os, sys, types
tfjs_site, src, out_dir, shard_bytes = sys.argv[1:5]
# Only tensorflowjs's writer modules: its package __init__ imports the JAX, TF-DF
# and TF-Hub converters, whose dependencies are not installed.
for name, sub in (("tensorflowjs", ""), ("tensorflowjs.converters", "converters")):
    module = types.ModuleType(name)
    module.__path__ = [os.path.join(tfjs_site, "tensorflowjs", sub)]
    sys.modules[name] = module
import keras
from tensorflowjs.converters import keras_h5_conversion as conversion

DROP = {"module", "registered_name", "build_config", "compile_config", "shared_object_id", "quantization_config",
        "optional", "build_input_shape"}


def tensors(obj):
    """(layer, node, tensor) of every Keras 3 tensor reference inside a node's args."""
    if isinstance(obj, dict):
        if obj.get("class_name") == "__keras_tensor__":
            return [list(obj["config"]["keras_history"])]
        return [t for v in obj.values() for t in tensors(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in tensors(v)]
    return []


def keras2(obj, key=None):
    """A Keras 3 config in the Keras 2 form that tfjs-layers deserialises."""
    if isinstance(obj, list):
        if key in ("input_layers", "output_layers") and obj and isinstance(obj[0], str):
            obj = [obj]  # Keras 3 writes a single input/output unnested
        if key == "inbound_nodes":
            return [[[*t, {}] for t in tensors(node.get("args", []))] if isinstance(node, dict) else keras2(node)
                    for node in obj]
        return [keras2(v) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if obj.get("class_name") in ("DTypePolicy", "FloatDTypePolicy"):
        return obj["config"]["name"]
    out = {k: keras2(v, k) for k, v in obj.items() if k not in DROP}
    if obj.get("class_name") == "InputLayer":
        config = out["config"]
        if "batch_shape" in config:
            config["batch_input_shape"] = config.pop("batch_shape")
    return out


model = keras.models.load_model(src, compile=False, safe_mode=True)
topology = {"class_name": model.__class__.__name__ if model.__class__.__name__ == "Sequential" else "Model",
            "config": keras2(model.get_config()), "keras_version": keras.__version__, "backend": "tensorflow"}
weights = [{"name": f"{layer.name}/{w.name}", "data": w.numpy()} for layer in model.layers for w in layer.weights]
conversion.write_artifacts({"model_config": topology, "keras_version": keras.__version__, "backend": "tensorflow"},
                           [weights], out_dir, weight_shard_size_bytes=int(shard_bytes))
'''


def ensure_tensorflowjs(log: Callable[[str], None] = print) -> Path:
    """tensorflowjs (no dependencies) in its own dir under the cache, installed once under a lock."""
    target = cache_dir() / "tools" / f"tensorflowjs-{TFJS_VERSION}-{python_tag()}-{platform_tag()}"

    def build(staging: Path) -> None:
        log(f"installing tensorflowjs=={TFJS_VERSION} for the tfjs processor (once; cached in {target.parent})")
        failure = pip_install(staging, [f"tensorflowjs=={TFJS_VERSION}"], no_deps=True)
        if failure:
            raise ArtifactError(f"artifact processor 'tfjs' needs the Python package tensorflowjs=={TFJS_VERSION}, "
                                f"which could not be installed: pip said: {' '.join(failure.splitlines()[-3:])}")
        (staging / ".complete").write_text(f"tensorflowjs=={TFJS_VERSION}\n")

    return build_once(target, ".complete", build)


def install_dir(produced: Path, target: Path) -> Path:
    """Put the export at `target`: a new or empty dir, or an earlier tfjs export (replaced whole)."""
    if target.is_symlink() or target.is_file():
        raise ArtifactError(f"artifact target {target} exists and is not a directory; the tfjs export is a directory")
    if target.is_dir():
        names = {p.name for p in target.iterdir()}
        earlier = "model.json" in names and all(n in ("model.json", SIDECAR) or n.endswith(".bin") for n in names)
        if names and not earlier:
            raise ArtifactError(f"artifact target {target} is a directory holding other files; "
                                "name a new directory for the tfjs export")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        for path in produced.iterdir():
            shutil.copyfile(path, staging / path.name)
        os.chmod(staging, 0o755)
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


# The options this processor reads besides `processor`; the runner checks a pipeline's artifact
# entries against them before any stage starts (runner/validate.py), so a typo fails in a second.
OPTIONS: dict[str, str] = {
    "target": "the directory the TensorFlow.js model lands in, relative to the workspace (default artifacts/tfjs)",
    "model": "the Keras file inside model/ to convert (default model.keras)",
    "framework": "the TensorFlow framework NAME@VERSION that converts it (default: the pipeline's)",
}


def process(model_dir: Path, options: dict, workspace: Path, log: Callable[[str], None] = print) -> Path:
    target = target_path(Path(workspace), options.get("target"), "tfjs", log)
    with tempfile.TemporaryDirectory(prefix="pcsb-tfjs-") as tmp:
        work = Path(tmp)
        copy = private_copy(Path(model_dir), work / "model")
        source = keras_file(copy, options, "tfjs")
        framework = framework_for(options, Path(workspace), "tfjs", log)
        tfjs_site = ensure_tensorflowjs(log)
        produced = work / "out"
        produced.mkdir()
        isolation, limits = confinement()
        confined.run(confined.Job("tfjs", CONVERT, ["{site1}", inside_model(copy, source), "{out}", str(SHARD_BYTES)],
                                  copy, [framework.site, tfjs_site], produced, CONVERT_TIMEOUT), isolation, limits)
        if not (produced / "model.json").is_file():
            raise ArtifactError("artifact processor 'tfjs': the conversion wrote no model.json")
        # labels and preprocessing for the web app, beside model.json (exportmeta.py)
        exportmeta.write(produced / SIDECAR, exportmeta.describe(copy, "tfjs", "model.json"))
        return install_dir(produced, target)
