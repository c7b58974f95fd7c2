"""The `tflite` artifact processor: model/model.keras as a TensorFlow Lite flatbuffer.

    {"processor": "tflite", "target": "model.tflite", "model": "model.keras", "framework": "tensorflow@2.21"}

TensorFlow is not a dependency of the runner: the conversion runs on the
framework's own site dir (built once into the cache, the same one the
pipeline's stages used), inside the run's sandbox (`confined.py`: the model
file was written by an untrusted script, and loading it parses it). It reads
a private copy of model/'s regular files, never model/ itself, so a link a
stage planted is never followed; it writes only to the target.

The helpers here (`private_copy`, `keras_file`, `framework_for`,
`inside_model`) are shared with the `tfjs` processor.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from .. import frameworks
from ..errors import PipcookError
from . import ArtifactError, confined, confinement, exportmeta, target_path
from .safefiles import regular_files

DEFAULT_FRAMEWORK = "tensorflow@2.21"
CONVERT_TIMEOUT = 1800.0
MAX_MODEL_BYTES = 8 << 30  # all of model/ that a processor copies

CONVERT = r'''
import os, sys
src, dst, work = sys.argv[1:4]
import keras
import tensorflow as tf

# safe_mode: a config that asks for arbitrary code (Lambda layers) is refused, not run
model = keras.models.load_model(src, compile=False, safe_mode=True)
try:
    data = tf.lite.TFLiteConverter.from_keras_model(model).convert()
except Exception as exc:  # some Keras 3 models only convert through a SavedModel export
    print(f"from_keras_model failed ({type(exc).__name__}); converting through a SavedModel", file=sys.stderr)
    export = os.path.join(work, "saved_model")
    model.export(export, format="tf_saved_model")
    data = tf.lite.TFLiteConverter.from_saved_model(export).convert()
with open(dst, "wb") as f:
    f.write(data)
'''


def private_copy(model_dir: Path, dest: Path, cap: int = MAX_MODEL_BYTES) -> Path:
    """Copy the regular files under model/ into dest (links, fifos and devices left behind)."""
    total = 0
    for rel, fd in regular_files(model_dir):
        with os.fdopen(fd, "rb") as src:
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(target, "xb") as out:
                while chunk := src.read(1 << 20):
                    total += len(chunk)
                    if total > cap:
                        raise ArtifactError(f"model/ holds more than {cap >> 30} GiB; refusing to convert it")
                    out.write(chunk)
    return dest


def keras_file(copy_dir: Path, options: dict, processor: str) -> Path:
    """The Keras model file to convert: option `model` (default model.keras), a path inside model/."""
    name = options.get("model") or "model.keras"
    parts = Path(str(name)).parts if isinstance(name, str) else ()
    if not parts or Path(name).is_absolute() or ".." in parts:
        raise ArtifactError(f"artifact processor {processor!r}: option model={name!r} must name a file inside model/")
    path = copy_dir.joinpath(*parts)
    if not path.is_file():
        raise ArtifactError(
            f"artifact processor {processor!r}: model/ has no regular file {name} (links and special files are "
            "ignored); the model script must save its Keras model there, e.g. model.save('model.keras')")
    return path


def framework_for(options: dict, workspace: Path, processor: str, log: Callable[[str], None]) -> frameworks.Framework:
    """The TensorFlow framework: option `framework`, else the pipeline's if it is TensorFlow, else the default."""
    spec = options.get("framework")
    if not spec:
        try:
            pipeline = json.loads((Path(workspace) / "pipeline.json").read_text("utf-8"))
            spec = (pipeline.get("options") or {}).get("framework")
        except (OSError, ValueError, AttributeError):
            spec = None
        if not isinstance(spec, str) or not spec.startswith("tensorflow@"):
            spec = DEFAULT_FRAMEWORK
    try:
        framework = frameworks.resolve(str(spec), log=log)
    except PipcookError as exc:
        raise ArtifactError(f"artifact processor {processor!r} needs TensorFlow (framework {spec}), "
                            f"which is not available: {exc}") from None
    if framework is None:  # resolve() gives None only for no spec, and spec is never empty here
        raise ArtifactError(f"artifact processor {processor!r} needs TensorFlow; framework {spec!r} named none")
    return framework


def replace_file(produced: Path, target: Path) -> Path:
    """Move a finished file onto target atomically (the zip processor's rule: a file target is replaced)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.is_dir() and not target.is_symlink():
        raise ArtifactError(f"artifact target {target} is a directory; name a file")
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.copyfile(produced, tmp)
    os.replace(tmp, target)
    return target


def inside_model(copy_dir: Path, source: Path) -> str:
    """`source` (a file of the private copy) as a conversion argument: {model}/its path."""
    rel = source.relative_to(copy_dir).as_posix()
    return "{model}/" + rel.replace("{", "{{").replace("}", "}}")


# The options this processor reads besides `processor`; the runner checks a pipeline's artifact
# entries against them before any stage starts (runner/validate.py), so a typo fails in a second.
OPTIONS: dict[str, str] = {
    "target": "where the .tflite file lands, relative to the workspace (default artifacts/model.tflite)",
    "model": "the Keras file inside model/ to convert (default model.keras)",
    "framework": "the TensorFlow framework NAME@VERSION that converts it (default: the pipeline's)",
}


def process(model_dir: Path, options: dict, workspace: Path, log: Callable[[str], None] = print) -> Path:
    target = target_path(Path(workspace), options.get("target"), "model.tflite", log)
    with tempfile.TemporaryDirectory(prefix="pcsb-tflite-") as tmp:
        work = Path(tmp)
        copy = private_copy(Path(model_dir), work / "model")
        source = keras_file(copy, options, "tflite")
        framework = framework_for(options, Path(workspace), "tflite", log)
        out = work / "out"
        out.mkdir()
        isolation, limits = confinement()
        confined.run(confined.Job("tflite", CONVERT, [inside_model(copy, source), "{out}/model.tflite", "{tmp}"],
                                  copy, [framework.site], out, CONVERT_TIMEOUT), isolation, limits)
        produced = out / "model.tflite"
        if not produced.is_file() or produced.is_symlink():
            raise ArtifactError("artifact processor 'tflite': the conversion wrote no model")
        replace_file(produced, target)
        # labels and preprocessing for the mobile app: model.tflite.json beside it (exportmeta.py)
        exportmeta.write(target.with_name(target.name + ".json"), exportmeta.describe(copy, "tflite", target.name))
        return target
