#!/usr/bin/env bash
# Make the Docker backend usable on a CI machine, idempotently:
#   1. install docker.io and debootstrap if missing;
#   2. start dockerd in the background unless an engine already answers
#      (log: /tmp/dockerd.log), and wait up to 60 s for it;
#   3. build the worker image offline (debootstrap from a Debian mirror,
#      `docker import`; no registry needed; cached, seconds when rebuilt).
# Exits non-zero, loudly, when the engine cannot start or the image cannot
# be built: with CI=true the Docker tests then fail instead of skipping.
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive

fail() {
  echo "!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!" >&2
  echo "!!! start-docker: $*" >&2
  echo "!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!" >&2
  exit 1
}

engine_up() {
  # The SDK the backend uses, not the CLI: the docker CLI may be absent or newer than the daemon.
  python3 -c 'import docker; docker.from_env(timeout=5).ping()' >/dev/null 2>&1
}

need=()
command -v dockerd >/dev/null || need+=(docker.io)
command -v debootstrap >/dev/null || need+=(debootstrap)
if [ ${#need[@]} -gt 0 ]; then
  echo "== start-docker: installing ${need[*]}"
  apt-get update -qq || fail "apt-get update failed"
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null || fail "could not install ${need[*]}"
fi

if engine_up; then
  echo "== start-docker: a Docker engine is already running"
else
  echo "== start-docker: starting dockerd (log: /tmp/dockerd.log)"
  nohup dockerd >/tmp/dockerd.log 2>&1 &
  for _ in $(seq 60); do
    engine_up && break
    sleep 1
  done
  if ! engine_up; then
    tail -n 40 /tmp/dockerd.log >&2 || true
    fail "the Docker engine did not come up within 60 s (see /tmp/dockerd.log above)"
  fi
  echo "== start-docker: dockerd is up"
fi

echo "== start-docker: building the worker image offline"
pipcook-sandbox images build --offline || fail "could not build the offline worker image"
