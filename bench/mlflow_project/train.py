"""MLflow entry point: chain a pipeline's scripts in this process, then log its metrics to MLflow.

TensorFlow comes from PYTHONPATH (bench/e2e.py puts the framework's site
there), thread settings from the environment, exactly as for the bare
harness."""
import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # bench/
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))  # the repository: `from sandbox import sdk`

import bare_harness  # noqa: E402
import mlflow  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pipeline", required=True)
    ap.add_argument("--output", required=True)
    args = ap.parse_args()
    code = bare_harness.main([os.path.abspath(args.pipeline), "-o", args.output])
    metrics = os.path.join(args.output, "metrics.jsonl")
    if os.path.isfile(metrics):
        with open(metrics, encoding="utf-8") as f:
            for line in f:
                record = json.loads(line)
                step = record.pop("step", None)
                record.pop("time", None)
                mlflow.log_metrics({k: float(v) for k, v in record.items()}, step=int(step or 0))
    return code


if __name__ == "__main__":
    sys.exit(main())
