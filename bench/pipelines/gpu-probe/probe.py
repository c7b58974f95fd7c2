"""Every stage says what GPU it can reach: NVIDIA device nodes, and the GPUs TensorFlow lists.

One module for the three stages (datasource, dataflow, model). bench/gpu_check.sh
greps the `gpu-probe` line of each stage's log: with `--gpu`, the model stage
alone must see a GPU.
"""
import glob
import os


def report(stage):
    nodes = sorted(p for p in glob.glob("/dev/nvidia*") if p[len("/dev/nvidia"):].isdigit())
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    print(f"gpu-probe stage={stage} device_nodes={len(nodes)} tf_gpus={len(gpus)} "
          f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '')}", flush=True)
    return len(gpus)


def datasource(options, ctx):
    from sandbox import sdk

    report("datasource")
    return sdk.from_lists(train=[{"data": [0.0], "label": 0}], meta={"type": "general", "categories": [0]})


def dataflow(pool, options, ctx):
    report("dataflow")
    return pool


def train(runtime, options, ctx):
    runtime.log_metrics(step=0, model_tf_gpus=report("model"))
