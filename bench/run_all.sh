#!/bin/sh
# Every benchmark, from a fresh clone:   bench/run_all.sh [--quick] [--only NAME ...]
#
# Installs what is missing (the project itself, editable; mlflow-skinny, the
# peer for bench/e2e.py), then runs `python -m bench`, which builds the
# TensorFlow framework in the user cache on first use (needs PyPI once),
# skips Docker when `docker info` fails or no pipcook-sandbox-worker image
# exists (`pipcook-sandbox images build`), and writes bench/out/*.json and
# bench/out/report.md. Needs bubblewrap (`pipcook-sandbox doctor`).
set -eu
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
$PY -c "import runner, sandbox, zmq" 2>/dev/null || $PY -m pip install -e .
$PY -c "import mlflow" 2>/dev/null || $PY -m pip install mlflow-skinny || echo "mlflow-skinny not installed: e2e skips the MLflow peer"
exec $PY -m bench "$@"
