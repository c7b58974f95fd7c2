#!/usr/bin/env bash
# Make the Docker backend usable on a CI machine, idempotently:
#   1. install docker.io and debootstrap if missing;
#   2. start dockerd in the background unless an engine already answers
#      (log: /tmp/dockerd.log), and wait up to 60 s for it;
#   3. build the worker image offline (debootstrap from a Debian mirror,
#      `docker import`; no registry needed; cached, seconds when rebuilt);
#   4. register gVisor (`runsc`, Debian package runsc) as the engine's
#      "runsc" runtime in /etc/docker/daemon.json with the flags a stage
#      needs (runner/backends/gvisor.py), make a running dockerd reload it
#      with SIGHUP (never a restart: other runs may be using the engine),
#      and check a container runs under it.
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
command -v runsc >/dev/null || need+=(runsc)
if [ ${#need[@]} -gt 0 ]; then
  echo "== start-docker: installing ${need[*]}"
  apt-get update -qq || fail "apt-get update failed"
  apt-get install -o DPkg::Lock::Timeout=300 -y -qq --no-install-recommends "${need[@]}" >/dev/null \
    || fail "could not install ${need[*]}"
fi

# gVisor's registration. The flags are the ones runner/backends/gvisor.py requires (it refuses a
# runsc runtime without them): --oci-seccomp applies the stage's seccomp profile inside the sandbox,
# --network=none gives the Sentry no network stack, --host-uds=all lets stages reach the unix
# sockets of their run in bind-mounted directories. Merged into daemon.json, other keys kept.
RUNSC=$(command -v runsc) || fail "runsc is not installed"
register_gvisor() {
  python3 - "$RUNSC" <<'PY'
import json, os, sys
path = "/etc/docker/daemon.json"
want = {"path": sys.argv[1], "runtimeArgs": ["--network=none", "--host-uds=all", "--oci-seccomp"]}
try:
    with open(path) as f:
        config = json.load(f)
except FileNotFoundError:
    config = {}
if config.get("runtimes", {}).get("runsc") == want:
    sys.exit(1)  # already registered: nothing to reload
config.setdefault("runtimes", {})["runsc"] = want
os.makedirs(os.path.dirname(path), exist_ok=True)
with open(path + ".pipcook-tmp", "w") as f:
    json.dump(config, f, indent=2)
os.replace(path + ".pipcook-tmp", path)
PY
}
gvisor_registered() {
  python3 -c '
import docker, sys
entry = (docker.from_env(timeout=10).info().get("Runtimes") or {}).get("runsc") or {}
sys.exit(0 if "--oci-seccomp" in (entry.get("runtimeArgs") or []) else 1)' >/dev/null 2>&1
}
changed=0
if register_gvisor; then
  changed=1
  echo "== start-docker: registered gVisor ($RUNSC) as the runtime 'runsc' in /etc/docker/daemon.json"
fi

if engine_up; then
  echo "== start-docker: a Docker engine is already running"
  if [ "$changed" = 1 ] || ! gvisor_registered; then
    # dockerd reloads `runtimes` on SIGHUP; running containers are untouched.
    pid=$(cat /var/run/docker.pid 2>/dev/null) || fail "dockerd runs but /var/run/docker.pid is missing: cannot reload it"
    echo "== start-docker: reloading dockerd (pid $pid, SIGHUP) for the runsc runtime"
    kill -HUP "$pid" || fail "could not send SIGHUP to dockerd (pid $pid)"
    for _ in $(seq 20); do
      gvisor_registered && break
      sleep 0.5
    done
  fi
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

gvisor_registered || fail "dockerd does not list the runsc runtime with --oci-seccomp after the reload (see /tmp/dockerd.log and /etc/docker/daemon.json)"
echo "== start-docker: gVisor is registered as the runtime 'runsc'"

echo "== start-docker: building the worker image offline"
pipcook-sandbox images build --offline || fail "could not build the offline worker image"

echo "== start-docker: checking a stage-like container under gVisor"
PIPCOOK_DOCKER_RUNTIME=runsc python3 - <<'PY' || fail "a container does not run under gVisor (runsc) on this host"
import sys
from pipcook_sandbox.runner.backends import docker as backend
from pipcook_sandbox.runner.images import image_tag

engine = backend.client()
problem = backend.runtime_problem("runsc")
if problem:
    sys.exit(problem)
profile, _ = backend.seccomp_profile("runsc")
out = engine.containers.run(image_tag(), ["python3", "-c", "import os, threading; t = threading.Thread(target=print); "
                                          "t.start(); t.join(); print(os.uname().release, os.getuid())"],
                            runtime="runsc", user="65534:65534", network_mode="none", read_only=True,
                            cap_drop=["ALL"], security_opt=["no-new-privileges:true", profile], remove=True)
release, uid = out.decode().split()[-2:]
# gVisor's kernel reports its own release (4.4.0), never the host's.
import os
if release == os.uname().release or uid != "65534":
    sys.exit(f"not gVisor: kernel {release}, uid {uid}")
print(f"== start-docker: gVisor runs (its kernel says {release}, uid {uid})")
PY
