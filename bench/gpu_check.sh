#!/usr/bin/env bash
# bench/gpu_check.sh: the GPU path, end to end, on a machine with an NVIDIA GPU. One command, under 10 minutes.
#
#   bench/gpu_check.sh            # as root (bwrap maps the stage to uid 65534; Docker needs the daemon)
#
# 1. refuses at once, saying why, on a machine without an NVIDIA GPU (no driver, no device node);
# 2. builds the CUDA framework (tensorflow[and-cuda], pip, once: cached afterwards);
# 3. under bwrap, a probe pipeline (bench/pipelines/gpu-probe) whose three stages each report the
#    NVIDIA device nodes they can open and the GPUs TensorFlow lists: with --gpu the model stage
#    must see a GPU and the datasource and dataflow stages none; without --gpu, none anywhere;
# 4. trains the image example and the object-detection example (its CI setting) on the CPU and
#    with --gpu, checks TensorFlow saw a GPU in the detection model stage, and prints the speed-up;
# 5. the same probe and detection training under Docker when its NVIDIA runtime is there
#    (`docker info` lists an nvidia runtime); otherwise it says Docker was not checked.
#
# Exit status 0 when every check passed, 1 on the first failure (named), 2 without a GPU.
# Paste the output into bench/RESULTS.md with the machine it ran on.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
PCS=("$PY" -m pipcook_sandbox)
OUT=$(mktemp -d /tmp/gpu-check-XXXXXX)
STARTED=$SECONDS

say() { printf 'gpu_check: %s\n' "$*"; }
fail() { printf 'gpu_check: FAIL: %s\n' "$*" >&2; printf 'gpu_check: workspaces and logs kept in %s\n' "$OUT" >&2; exit 1; }
no_gpu() { printf 'gpu_check: no NVIDIA GPU here: %s. This check needs one; nothing was run.\n' "$*" >&2; rmdir "$OUT"; exit 2; }

# ---------------------------------------------------------------- 1. is there a GPU at all?
command -v nvidia-smi >/dev/null 2>&1 || no_gpu "nvidia-smi is not installed (no NVIDIA driver)"
compgen -G '/dev/nvidia[0-9]*' >/dev/null || no_gpu "no /dev/nvidia0 device node"
GPU_NAME=$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -1) \
  || no_gpu "nvidia-smi fails: $(nvidia-smi 2>&1 | head -1)"
[ -n "$GPU_NAME" ] || no_gpu "nvidia-smi lists no GPU"
say "GPU: $GPU_NAME; CPU: $(nproc) cores; $(uname -sr)"
"$PY" -c 'import pipcook_sandbox' 2>/dev/null || fail "pipcook_sandbox is not installed for $PY (pip install -e .)"

# ---------------------------------------------------------------- 2. the CUDA framework
t0=$SECONDS
"$PY" - <<'EOF' || fail "building the CUDA framework (tensorflow[and-cuda]) failed: see above"
from pipcook_sandbox.runner import frameworks
fw = frameworks.resolve("tensorflow@2.21", cuda=True, log=lambda m: print("gpu_check:", m, flush=True))
print(f"gpu_check: CUDA framework at {fw.dir}")
EOF
say "CUDA framework ready in $((SECONDS - t0)) s"

# ---------------------------------------------------------------- helpers
# run NAME PIPELINE ARGS...: one `pipcook-sandbox run`, its wall time in $OUT/NAME.seconds
run() {
  local name=$1 pipeline=$2; shift 2
  local t=$SECONDS
  if ! "${PCS[@]}" run "$pipeline" -o "$OUT/$name" "$@" >"$OUT/$name.out" 2>&1; then
    tail -20 "$OUT/$name.out" >&2
    fail "run '$name' ($pipeline $*) failed"
  fi
  echo $((SECONDS - t)) >"$OUT/$name.seconds"
  say "run '$name' finished in $(cat "$OUT/$name.seconds") s"
}

# probe_check NAME WANT_MODEL_GPU: the probe's three lines, the GPU in the model stage only (or nowhere)
probe_check() {
  local name=$1 want=$2 stage line nodes tf
  for stage in datasource dataflow model; do
    line=$(grep -h "gpu-probe stage=$stage " "$OUT/$name"/logs/* 2>/dev/null | tail -1)
    [ -n "$line" ] || fail "$name: the $stage stage printed no gpu-probe line (logs in $OUT/$name/logs)"
    say "$name: $line"
    nodes=$(sed -n 's/.*device_nodes=\([0-9]*\).*/\1/p' <<<"$line")
    tf=$(sed -n 's/.*tf_gpus=\([0-9]*\).*/\1/p' <<<"$line")
    if [ "$stage" = model ] && [ "$want" = yes ]; then
      [ "$nodes" -ge 1 ] || fail "$name: --gpu gave the model stage no NVIDIA device node"
      [ "$tf" -ge 1 ] || fail "$name: TensorFlow saw no GPU in the model stage despite --gpu"
    else
      [ "$nodes" -eq 0 ] || fail "$name: the $stage stage can reach $nodes NVIDIA device node(s); it must see none"
      [ "$tf" -eq 0 ] || fail "$name: TensorFlow saw $tf GPU(s) in the $stage stage; it must see none"
    fi
  done
}

# metric WS KEY: the last value of KEY in WS/metrics.jsonl
metric() {
  "$PY" - "$1/metrics.jsonl" "$2" <<'EOF'
import json, sys
last = None
for line in open(sys.argv[1]):
    last = json.loads(line).get(sys.argv[2], last)
print("" if last is None else last)
EOF
}

# gpus NAME: how many GPUs TensorFlow listed in that run's model stage (the example logs `gpus`), -1 if not said
gpus() { local v; v=$(metric "$OUT/$1" gpus); echo "${v%%.*}" | grep -E '^[0-9]+$' || echo -1; }

ratio() { "$PY" -c "import sys; a, b = float(sys.argv[1]), float(sys.argv[2]); print(f'{a / b:.2f}x' if b > 0 else 'n/a')" "$1" "$2"; }

DETECT=examples/object-detection/pipeline-ci.json
IMAGE=examples/image-classification/pipeline.json

# ---------------------------------------------------------------- 3. where the GPU is visible (bwrap)
run probe-bwrap-gpu bench/pipelines/gpu-probe/pipeline.json --isolation bwrap --gpu
probe_check probe-bwrap-gpu yes
run probe-bwrap-cpu bench/pipelines/gpu-probe/pipeline.json --isolation bwrap --no-gpu
probe_check probe-bwrap-cpu no

# ---------------------------------------------------------------- 4. training, CPU against GPU (bwrap)
run image-bwrap-cpu "$IMAGE" --isolation bwrap --no-gpu
run image-bwrap-gpu "$IMAGE" --isolation bwrap --gpu
run detect-bwrap-cpu "$DETECT" --isolation bwrap --no-gpu
run detect-bwrap-gpu "$DETECT" --isolation bwrap --gpu
[ "$(gpus detect-bwrap-gpu)" -ge 1 ] || fail "detect-bwrap-gpu: TensorFlow saw no GPU in the detection model stage"
[ "$(gpus detect-bwrap-cpu)" -eq 0 ] || fail "detect-bwrap-cpu: TensorFlow saw a GPU with --no-gpu"

# ---------------------------------------------------------------- 5. Docker, where its NVIDIA runtime exists
DOCKER=no
if command -v docker >/dev/null 2>&1 && docker info --format '{{json .Runtimes}}' 2>/dev/null | grep -q nvidia; then
  DOCKER=yes
  "${PCS[@]}" images build --cuda >"$OUT/images-build.out" 2>&1 || { tail -20 "$OUT/images-build.out" >&2; fail "building the CUDA worker image failed"; }
  run probe-docker-gpu bench/pipelines/gpu-probe/pipeline.json --isolation docker --gpu
  probe_check probe-docker-gpu yes
  run detect-docker-cpu "$DETECT" --isolation docker --no-gpu
  run detect-docker-gpu "$DETECT" --isolation docker --gpu
  [ "$(gpus detect-docker-gpu)" -ge 1 ] || fail "detect-docker-gpu: TensorFlow saw no GPU in the model stage"
else
  say "Docker NOT checked: no Docker engine with an NVIDIA runtime here (see docs/docker.md)"
fi

# ---------------------------------------------------------------- report
echo
echo "| run | CPU s | GPU s | speed-up | detection mAP@0.5 CPU / GPU |"
echo "|---|---|---|---|---|"
row() {  # row LABEL CPU_NAME GPU_NAME
  local cpu gpu maps=""
  cpu=$(cat "$OUT/$2.seconds"); gpu=$(cat "$OUT/$3.seconds")
  if [ -f "$OUT/$2/metrics.jsonl" ] && [ -n "$(metric "$OUT/$2" test_map50)" ]; then
    maps="$(metric "$OUT/$2" test_map50) / $(metric "$OUT/$3" test_map50)"
  fi
  echo "| $1 | $cpu | $gpu | $(ratio "$cpu" "$gpu") | $maps |"
}
row "image example, bwrap (whole run)" image-bwrap-cpu image-bwrap-gpu
row "detection CI setting, bwrap (whole run)" detect-bwrap-cpu detect-bwrap-gpu
echo "| detection, bwrap (model.fit only) | $(metric "$OUT/detect-bwrap-cpu" train_seconds) | $(metric "$OUT/detect-bwrap-gpu" train_seconds) | $(ratio "$(metric "$OUT/detect-bwrap-cpu" train_seconds)" "$(metric "$OUT/detect-bwrap-gpu" train_seconds)") | |"
if [ "$DOCKER" = yes ]; then
  row "detection CI setting, docker (whole run)" detect-docker-cpu detect-docker-gpu
fi
echo
if [ "$DOCKER" = yes ]; then checked="bwrap and docker"; else checked="bwrap only; docker not checked"; fi
say "all checks passed in $((SECONDS - STARTED)) s ($checked)"
rm -rf "$OUT"
