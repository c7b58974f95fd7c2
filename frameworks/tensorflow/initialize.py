"""Runs inside every stage's sandbox before the script, with the pipeline's
`options`. It must stay cheap: TensorFlow itself is imported only by the
scripts that need it, so these settings go through environment variables that
TensorFlow reads when (and if) it is imported."""
import os


def initialize(options: dict) -> None:
    cpus = max(1, int(float(os.environ.get("PIPCOOK_CPUS", "1")) + 0.5))
    # Size thread pools to the stage's CPU quota, not the host's core count:
    # a pool of 64 threads under a 2-CPU quota only thrashes.
    os.environ.setdefault("TF_NUM_INTRAOP_THREADS", str(cpus))
    os.environ.setdefault("TF_NUM_INTEROP_THREADS", str(min(2, cpus)))
    os.environ.setdefault("OMP_NUM_THREADS", str(cpus))
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    train = options.get("train") or {}
    if os.environ.get("PIPCOOK_GPU") == "1" and train.get("gpu", True) is not False:
        os.environ.setdefault("TF_FORCE_GPU_ALLOW_GROWTH", "true")
    else:
        # Hide GPUs from TensorFlow: no CUDA probing, no driver surface.
        os.environ["CUDA_VISIBLE_DEVICES"] = "-1"
