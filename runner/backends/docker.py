"""The Docker backend: every stage in its own hardened container.

What a stage gets (tests/test_docker_backend.py checks each line):

    image       pipcook-sandbox-worker:{cpu|cuda}-p<protocol>-<deps hash>
                (runner/images.py): Python 3.11 and the worker's pinned
                dependencies at /pipcook/site, nothing else
    user        65534:65534 (nobody), cap_drop ALL, no-new-privileges
    seccomp     seccomp.docker_profile() where available (bwrap's policy as
                an allow list: at least as strict as Docker's default, which
                it replaces), else Docker's default profile
    network     network_mode "none": only `lo`; the host's loopback and the
                metadata address are unreachable
    filesystem  read-only root; /tmp a private tmpfs of limits.tmp (1777);
                /dev/shm sized 64..256 MiB; spec.mounts as binds, read-only
                unless Mount.writable
    limits      memory = memory+swap = limits.memory (no swap), nano_cpus,
                pids_limit, ulimits nofile / fsize (= limits.disk) / core 0,
                the daemon's own copy of the log capped
    processes   init=True: Docker's tini is pid 1 and reaps zombies
    runtime     runc, or another registered runtime (runsc for gVisor) from
                spec.options.runtime or $PIPCOOK_DOCKER_RUNTIME
    GPU         spec.gpu (the model stage only): the GPUs this runner was
                given (gpus.py: a Slurm job's allocation) through the
                NVIDIA Container Toolkit, the CUDA image; a clear error where
                the host has no NVIDIA runtime. UNTESTED without a GPU.

Every container carries the labels pipcook-sandbox.run/.stage/.runner-pid
(+ .runner-start, .runner-host) and is removed by cleanup() whatever
happened; `clean_leftovers()` removes those whose runner is gone (a crash,
SIGKILL). Outcome: OOMKilled -> REASON_MEMORY; a fork refused by the pids
limit stops the stage with REASON_PIDS (the pids cgroup's `events` counter);
SIGXFSZ -> REASON_DISK; the first reason recorded by terminate() wins.

Host-side code: never mounted into a sandbox.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import stat
import threading
import time
from functools import lru_cache
from pathlib import Path
from typing import Any

from pipcook_sandbox.runner import gpus, workerpins
from pipcook_sandbox.runner.errors import DockerError
from pipcook_sandbox.runner.statedir import new_state_dir

from . import base, gvisor, owner, quota
from .output import capture

NAME = "docker"

SANDBOX_UID, SANDBOX_GID = base.SANDBOX_UID, base.SANDBOX_GID
SANDBOX_USER = f"{SANDBOX_UID}:{SANDBOX_GID}"


def stage_user(chosen: tuple[int, int] | None = None) -> str:
    """The container's `user`: 65534, or the tenant's own uid (`run --stage-uid`, StageOptions.stage_owner)."""
    return "%d:%d" % owner.resolve(chosen)

LABEL = "pipcook-sandbox"
LABEL_RUN, LABEL_STAGE = f"{LABEL}.run", f"{LABEL}.stage"
LABEL_PID, LABEL_START, LABEL_HOST = f"{LABEL}.runner-pid", f"{LABEL}.runner-start", f"{LABEL}.runner-host"
ENV_RUNTIME = "PIPCOOK_DOCKER_RUNTIME"
ENV_IMAGE = "PIPCOOK_DOCKER_IMAGE"  # operator override: run this image instead of the built one
SHM_MIN, SHM_MAX = 64 << 20, 256 << 20
PIDS_CHECK_PERIOD = 0.25
OOM_EVENT_GRACE = 3.0  # how long an unexplained SIGKILL waits for the engine's OOM event
API_TIMEOUT = 60


# --- the engine ----------------------------------------------------------------------


@lru_cache(maxsize=1)
def client():
    """One client for the runner; a big pool because every stage holds two
    streaming connections (logs, wait) at once."""
    import docker

    try:
        engine = docker.from_env(timeout=API_TIMEOUT, max_pool_size=64)
        engine.ping()
        return engine
    except Exception as exc:
        raise DockerError(f"cannot reach the Docker engine ({exc}); start dockerd or set DOCKER_HOST "
                          "(see docs/docker.md)") from None


@lru_cache(maxsize=1)
def _info() -> dict:
    return client().info()


def runtime_for(spec: base.StageSpec | None = None) -> str | None:
    return (spec.options.runtime if spec else None) or os.environ.get(ENV_RUNTIME) or None


def runtime_entry(runtime: str | None) -> dict[str, Any] | None:
    """The engine's registration of `runtime` (path, runtimeArgs), None if unknown or the default."""
    if not runtime:
        return None
    entry = (_info().get("Runtimes") or {}).get(runtime)
    return entry if isinstance(entry, dict) else None


def uses_gvisor(runtime: str | None = None) -> bool:
    """Do stages run under gVisor (the chosen runtime, else $PIPCOOK_DOCKER_RUNTIME, is runsc)?"""
    return gvisor.is_gvisor(runtime_entry(runtime or runtime_for()))


def runtime_problem(runtime: str | None) -> str | None:
    """Why the engine cannot run stages under `runtime`, or None."""
    if not runtime:
        return None
    runtimes = _info().get("Runtimes") or {}
    if runtime not in runtimes:
        return (f"the Docker runtime {runtime!r} (${ENV_RUNTIME}) is not registered with the engine "
                f"(known: {', '.join(sorted(runtimes))}); see docs/docker.md")
    entry = runtime_entry(runtime)
    if gvisor.is_gvisor(entry):
        return gvisor.registration_problem(runtime, entry)
    return None


def gpu_refusal(runtime: str | None = None) -> str | None:
    """Why a GPU cannot be given under the chosen runtime, or None."""
    runtime = runtime or runtime_for()
    if uses_gvisor(runtime):
        return (f"the Docker runtime {runtime!r} (${ENV_RUNTIME}) is gVisor, which cannot give a stage a GPU "
                "here (this runsc has no nvproxy)")
    return None


def image_for(gpu: bool) -> str:
    override = os.environ.get(ENV_IMAGE)
    if override:
        return override
    return workerpins.image_tag(cuda=gpu)  # the tag follows the runner's pins


def nvidia_runtime() -> tuple[bool, str]:
    """Can the engine hand out GPUs? (Docker's --gpus needs the NVIDIA Container Toolkit.)"""
    runtimes = set((_info().get("Runtimes") or {}).keys())
    if "nvidia" in runtimes:
        return True, "nvidia runtime registered"
    for tool in ("nvidia-container-runtime-hook", "nvidia-container-runtime", "nvidia-ctk"):
        if shutil.which(tool):
            return True, f"{tool} found"
    return False, ("no NVIDIA runtime: `docker info` lists no 'nvidia' runtime and no nvidia-container-runtime "
                   "is installed; install the NVIDIA Container Toolkit (docs/docker.md) or run without --gpu")


def seccomp_profile(runtime: str | None = None) -> tuple[str | None, str]:
    """(security_opt value, what it is). Docker's default profile when ours is missing;
    under gVisor the profile as gVisor applies it (gvisor.adapt_profile)."""
    try:
        from .seccomp import docker_profile
    except ImportError:
        return None, "docker default"
    profile, what = docker_profile(), "pipcook-sandbox allow list"
    if uses_gvisor(runtime):
        profile = gvisor.adapt_profile(profile)
        what += ", applied inside gVisor (--oci-seccomp; every refusal is EPERM)"
    return "seccomp=" + json.dumps(profile, separators=(",", ":")), what


# --- the runner's identity, for leftovers ---------------------------------------------


def _process_start(pid: int) -> str:
    """Start time of a process in clock ticks since boot: a recycled pid differs."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


@lru_cache(maxsize=1)
def runner_host() -> str:
    """This machine and boot: a runner on another host (a shared daemon) or
    before a reboot is never judged by our pid table."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = "?"
    return f"{socket.gethostname()}/{boot}"


def _runner_alive(labels: dict) -> bool:
    try:
        pid = int(labels.get(LABEL_PID, ""))
    except ValueError:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    recorded = labels.get(LABEL_START)
    return not recorded or _process_start(pid) == recorded


# --- the host files a stage uses ------------------------------------------------------


def grant_access(spec: base.StageSpec) -> None:
    """The runner (root) made the stage's directories and bound the control
    sockets; the stage runs as 65534. A writable mount's directory is handed
    to 65534 (only the directory itself: it is fresh, and a recursive chown
    of a big tree is slow and would follow what a stage planted), and unix
    sockets directly inside a mounted directory become connectable (0666;
    the directory is private to the run)."""
    for mount in spec.mounts:
        src = Path(mount.source)
        try:
            st = os.lstat(src)
        except OSError:
            continue  # Docker names a missing bind source itself
        if not stat.S_ISDIR(st.st_mode):
            continue
        ids = owner.resolve(spec.options.stage_owner)
        if mount.writable and (st.st_uid, st.st_gid) != ids:
            try:
                os.chown(src, *ids, follow_symlinks=False)
            except PermissionError:  # a runner in the docker group, not root
                os.chmod(src, 0o777)
        with os.scandir(src) as entries:
            for entry in entries:
                mode = entry.stat(follow_symlinks=False).st_mode
                if stat.S_ISSOCK(mode) and stat.S_IMODE(mode) != 0o666:
                    os.chmod(entry.path, 0o666)


def _shm_size(memory: int) -> int:
    return max(SHM_MIN, min(SHM_MAX, memory // 16))


def _name(spec: base.StageSpec) -> str:
    safe = "".join(c if c.isalnum() or c in "_.-" else "_" for c in f"{spec.run_id}-{spec.name}")
    return f"pcsb-{safe}"[:120]


def container_config(spec: base.StageSpec) -> dict[str, Any]:
    """The keyword arguments of `containers.create` for a stage (no side effects)."""
    import docker

    limits = spec.limits
    ncpu = _info().get("NCPU") or os.cpu_count() or 1
    argv = spec.argv if spec.argv is not None else base.WORKER_ARGS
    env = {"HOME": "/tmp", "LANG": "C.UTF-8", "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
           "PYTHONDONTWRITEBYTECODE": "1", **spec.env}
    security = ["no-new-privileges:true"]
    runtime = runtime_for(spec)
    profile, _ = seccomp_profile(runtime)
    if profile:
        security.append(profile)
    config: dict[str, Any] = dict(
        image=image_for(spec.gpu),
        command=["python3", *argv],
        name=_name(spec),
        user=stage_user(spec.options.stage_owner),
        working_dir="/tmp",
        environment=env,
        labels={LABEL_RUN: spec.run_id, LABEL_STAGE: spec.name, LABEL_PID: str(os.getpid()),
                LABEL_START: _process_start(os.getpid()), LABEL_HOST: runner_host()},
        hostname="pipcook",
        network_mode="none",
        read_only=True,
        cap_drop=["ALL"],
        security_opt=security,
        mem_limit=limits.memory,
        memswap_limit=limits.memory,  # equal: no swap
        nano_cpus=int(min(limits.cpus, ncpu) * 1e9),  # Docker refuses more CPUs than the host has
        pids_limit=limits.pids,
        ulimits=[docker.types.Ulimit(name="nofile", soft=limits.nofile, hard=limits.nofile),
                 docker.types.Ulimit(name="fsize", soft=limits.disk, hard=limits.disk),
                 docker.types.Ulimit(name="core", soft=0, hard=0)],
        tmpfs={"/tmp": f"size={limits.tmp},mode=1777"},
        shm_size=_shm_size(limits.memory),
        ipc_mode="private",
        init=True,
        oom_score_adj=500,  # under host memory pressure the stage goes before the runner
        mounts=[docker.types.Mount(m.target, str(m.source), type="bind", read_only=not m.writable)
                for m in spec.mounts],
        # The daemon keeps its own copy of the output: cap it too (we stream and cap ours).
        log_config=docker.types.LogConfig(type="json-file", config={"max-size": str(max(limits.output, 1 << 20)),
                                                                     "max-file": "2"}),
        auto_remove=False,  # we need the exit state; cleanup() removes it
        stdin_open=False,
        tty=False,
    )
    if runtime:
        config["runtime"] = runtime
    if uses_gvisor(runtime):
        # The script's processes and threads are tasks of gVisor's kernel, not host processes: the
        # Sentry enforces --pids per sandbox (RLIMIT_NPROC counts this sandbox's uid 65534 only), and the
        # host's pids cgroup bounds the Sentry's own threads and stubs (gvisor.host_pids).
        config["pids_limit"] = gvisor.host_pids(limits.pids)
        config["ulimits"].append(docker.types.Ulimit(name="nproc", soft=limits.pids, hard=limits.pids))
    if spec.gpu:
        # compute,utility: what CUDA and nvidia-smi need from the driver.
        # Only the GPUs this runner was given (a Slurm job's allocation): gpus.py.
        ids = gpus.docker_device_ids(gpus.given())
        config["device_requests"] = [docker.types.DeviceRequest(
            count=-1 if ids is None else 0, device_ids=ids, capabilities=[["gpu", "compute", "utility"]])]
        env.setdefault("NVIDIA_DRIVER_CAPABILITIES", "compute,utility")
    return config


# --- one stage ------------------------------------------------------------------------


def _is_not_running(exc: Exception) -> bool:
    import docker

    if isinstance(exc, docker.errors.NotFound):
        return True
    return isinstance(exc, docker.errors.APIError) and exc.status_code == 409  # "is not running"


def _pids_events(pid: int) -> Path | None:
    """The pids cgroup `events` file of a container's init (cgroup v1 or v2)."""
    try:
        lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if "pids" in controllers.split(","):
            candidate = Path("/sys/fs/cgroup/pids") / path.lstrip("/") / "pids.events"
        elif controllers == "":
            candidate = Path("/sys/fs/cgroup") / path.lstrip("/") / "pids.events"
        else:
            continue
        if candidate.is_file():
            return candidate
    return None


def _pids_refused(events: Path | None) -> bool:
    try:
        return events is not None and any(
            line.split()[0] == "max" and int(line.split()[1]) > 0 for line in events.read_text().splitlines())
    except (OSError, IndexError, ValueError):
        return False


class DockerStage:
    def __init__(self, spec: base.StageSpec, container: Any, volume: "_Writable | None" = None) -> None:
        self.name = spec.name
        self.spec = spec
        self.container = container
        self.volume = volume
        self.skipped: list[str] = []  # what copy-out refused
        self._lock = threading.Lock()
        self._code: int | None = None
        self._reason: str | None = None
        self._detail = ""
        self._cleaned = False
        self._pids_file: Path | None = None
        self._pids_checked = 0.0
        self._log = capture(self._log_chunks(), spec.log_path, spec.limits.output, self._output_exceeded)
        self._waiter = threading.Thread(target=self._wait, name=f"docker-wait-{spec.name}", daemon=True)
        self._waiter.start()
        try:
            container.reload()
            self._pids_file = _pids_events(int(container.attrs["State"]["Pid"]))
        except Exception:
            self._pids_file = None  # the stage may already be over; nothing to watch

    def _output_exceeded(self) -> None:
        try:
            self.terminate(base.REASON_OUTPUT)
        except Exception:
            pass  # the log thread must keep draining; cleanup() removes the container

    def _log_chunks(self):
        try:
            yield from self.container.logs(stream=True, follow=True, stdout=True, stderr=True)
        except Exception:
            return  # the container went away: the stream is simply over

    def _wait(self) -> None:
        import requests

        while True:
            try:
                result = self.container.wait(timeout=API_TIMEOUT)
                break
            except (requests.exceptions.ReadTimeout, requests.exceptions.ConnectionError):
                continue  # still running: the HTTP call timed out, not the stage
            except Exception as exc:  # removed under us (cleanup after a crash): unknown end
                result = {"StatusCode": -int(signal.SIGKILL), "Error": {"Message": str(exc)}}
                break
        state: dict = {}
        try:
            self.container.reload()
            state = self.container.attrs.get("State") or {}
        except Exception:
            pass
        code = int(state.get("ExitCode", result.get("StatusCode", -1)))
        # init (tini) reports a child killed by signal N as 128+N, as a shell would
        if 128 < code <= 128 + 64:
            code = -(code - 128)
        if code == -int(signal.SIGKILL) and not state.get("OOMKilled") and self._reason is None:
            state = self._late_oom(state)
        with self._lock:
            if self._reason is None:
                if state.get("OOMKilled"):
                    self._reason = base.REASON_MEMORY
                    self._detail = "the kernel's OOM killer stopped it"
                elif code == -int(signal.SIGXFSZ):
                    self._reason = base.REASON_DISK
                    self._detail = "a file grew past the quota (SIGXFSZ)"
            self._code = code

    def _late_oom(self, state: dict) -> dict:
        """The state once the engine has had OOM_EVENT_GRACE to mark an unexplained SIGKILL as an OOM.

        Under gVisor the OOM killer kills the Sentry, and the engine may learn of the exit before it
        learns of the OOM (measured: the first inspect said OOMKilled false, a later one true)."""
        deadline = time.monotonic() + OOM_EVENT_GRACE
        while time.monotonic() < deadline and self._reason is None:
            time.sleep(0.1)
            try:
                self.container.reload()
            except Exception:
                break  # removed: nothing more to learn
            state = self.container.attrs.get("State") or state
            if state.get("OOMKilled"):
                break
        return state

    def poll(self) -> int | None:
        code = self._code
        if code is None and self.volume is not None and self.volume.exceeded():
            try:
                self.terminate(base.REASON_DISK)
            except Exception:
                pass  # poll() never raises
        if code is None and self._pids_file is not None:
            now = time.monotonic()
            if now - self._pids_checked >= PIDS_CHECK_PERIOD:
                self._pids_checked = now
                if _pids_refused(self._pids_file):
                    try:
                        self.terminate(base.REASON_PIDS)
                    except Exception:
                        pass  # poll() never raises; the reason is kept and cleanup() removes it
        return code

    def terminate(self, reason: str | None = None) -> None:
        with self._lock:  # outcome() waits for a kill in flight, so it never misses the reason
            if self._code is not None:
                return
            try:
                self.container.kill()
            except Exception as exc:
                if _is_not_running(exc):
                    return  # it had already exited: no reason to record
                # The engine hiccuped: keep the reason (we meant to stop it); cleanup() forces removal.
                if self._reason is None:
                    self._reason = reason
                raise
            if self._reason is None:
                self._reason = reason

    def wait(self, timeout: float | None = None) -> int | None:
        self._waiter.join(timeout)
        return self._code

    def outcome(self) -> base.Outcome:
        with self._lock:
            return base.Outcome(self._code, self._reason, self._detail)

    def cleanup(self) -> None:
        if self._cleaned:
            return
        try:
            self.terminate(base.REASON_CANCELLED)
        except Exception:
            pass  # removal below kills it anyway
        self._waiter.join(timeout=15)
        self._log.join(timeout=5)
        remove(self.container)
        if self.volume is not None:
            self.skipped = self.volume.close()
        self._cleaned = True


def remove(container: Any) -> None:
    import docker

    try:
        container.remove(force=True, v=True)
    except docker.errors.NotFound:
        pass
    except docker.errors.APIError as exc:
        if "already in progress" not in str(exc):
            raise


def start(spec: base.StageSpec) -> DockerStage:
    import docker

    engine = client()
    runtime = runtime_for(spec)
    problem = runtime_problem(runtime)
    if problem:
        raise DockerError(f"Docker cannot start stage {spec.name}: {problem}")
    if spec.gpu:
        refused = gpu_refusal(runtime)
        if refused:
            raise DockerError(f"stage {spec.name} asks for a GPU (--gpu) but {refused}")
        ok, why = nvidia_runtime()
        if not ok:
            raise DockerError(f"stage {spec.name} asks for a GPU (--gpu) but this Docker host cannot provide one: {why}")
    volume = _Writable(spec) if spec.writable else None
    try:
        container = _create(engine, spec, volume)
    except BaseException:
        if volume is not None:
            volume.close(copy=False)
        raise
    try:
        container.start()
        return DockerStage(spec, container, volume)
    except BaseException as exc:  # Ctrl-C or a refused start: never leave the container behind
        import requests

        try:
            remove(container)
        except Exception:
            pass  # labelled with this runner's pid: `clean` (and the next docker run) removes it
        if volume is not None:
            volume.close(copy=False)
        if isinstance(exc, docker.errors.APIError):
            raise DockerError(f"Docker could not start stage {spec.name}: {exc.explanation or exc}") from None
        if isinstance(exc, requests.exceptions.RequestException):  # the engine or runtime hung
            raise DockerError(f"Docker did not start stage {spec.name} within {API_TIMEOUT} s "
                              f"(runtime {runtime or 'runc'}): {exc}") from None
        raise


def _create(engine: Any, spec: base.StageSpec, volume: "_Writable | None") -> Any:
    import dataclasses

    import docker

    if volume is not None:  # the writable targets: bind mounts of the volume's subdirectories
        spec = dataclasses.replace(spec, mounts=[*spec.mounts, *volume.mounts()])
    grant_access(spec)
    config = container_config(spec)
    try:
        return engine.containers.create(**config)
    except docker.errors.ImageNotFound:
        raise DockerError(f"the Docker image {config['image']} is not built for this runner; run "
                          f"`pipcook-sandbox images build{' --cuda' if spec.gpu else ''}` "
                          "(add --offline where no registry is reachable)") from None


class _Writable:
    """spec.writable on a quota volume of --disk, copied out to the host dirs when the stage is cleaned up."""

    def __init__(self, spec: base.StageSpec) -> None:
        import tempfile

        self.spec = spec
        self.own_dir = spec.options.state_dir is None
        parent = spec.options.state_dir or new_state_dir("pcsb-", spec.run_id, parent=tempfile.gettempdir())
        self.dir = Path(tempfile.mkdtemp(prefix=f"dw-{spec.name[:40]}-", dir=parent))
        self.subs = {target: f"w{i}" for i, target in enumerate(spec.writable)}
        self.volume = quota.create_volume(self.dir / "vol", spec.limits.disk, list(self.subs.values()),
                                          owner=(SANDBOX_UID, SANDBOX_GID), kind=spec.options.disk_quota)
        self._closed = False

    def mounts(self) -> list[base.Mount]:
        return [base.Mount(self.volume.path(sub), target, writable=True) for target, sub in self.subs.items()]

    def exceeded(self) -> bool:
        return not self._closed and self.volume.exceeded()

    def close(self, copy: bool = True) -> list[str]:
        """Copy the writable dirs out (links never followed), then remove the volume. Idempotent."""
        if self._closed:
            return []
        self._closed = True
        try:
            return self.volume.copy_out({self.subs[t]: host for t, host in self.spec.writable.items()}) if copy else []
        finally:
            self.volume.destroy()
            shutil.rmtree(self.dir.parent if self.own_dir else self.dir, ignore_errors=True)


class DockerBackend(base.Backend):
    """A hardened container per stage (no network, read-only root, no capabilities, seccomp)."""

    name = NAME
    # The image carries the worker's dependencies at base.IN_SITE: the
    # runner mounts no worker site but still lists the path for the worker.
    image_has_site = True

    def start(self, spec: base.StageSpec) -> DockerStage:
        return start(spec)

    def probe(self) -> dict:
        return probe()

    def clean_leftovers(self) -> list[str]:
        return clean_leftovers()


# --- doctor and clean -----------------------------------------------------------------


def probe() -> dict:
    found: dict[str, Any] = {"engine": False, "image": False}
    try:
        engine = client()
        info = _info()
    except Exception as exc:
        found["engine_why"] = str(exc)
        return found
    found["engine"] = f"Docker {info.get('ServerVersion', '?')} (cgroup v{info.get('CgroupVersion', '?')})"
    runtime = runtime_for()
    runtimes = info.get("Runtimes") or {}
    found["runtime"] = runtime or f"{info.get('DefaultRuntime', 'runc')} (default)"
    problem = runtime_problem(runtime)
    if problem:
        found["engine"] = False
        found["engine_why"] = f"${ENV_RUNTIME}={runtime}: {problem}"
    found.update(_gvisor_lines(runtime, runtimes))
    try:
        tag = image_for(False)
        engine.images.get(tag)
        found["image"] = tag
    except Exception:
        found["image_why"] = (f"the image {image_for(False)} is not built: run `pipcook-sandbox images build` "
                              "(or `images build --offline` without a registry)")
    found["seccomp"] = seccomp_profile()[1]
    found["user"] = stage_user()
    found["network"] = "none"
    found["root_filesystem"] = "read-only"
    gpu, why = nvidia_runtime()
    refused = gpu_refusal(runtime)
    found["gpu"] = gpu and not refused
    found["gpu_why"] = refused or why
    return found


def _gvisor_lines(runtime: str | None, runtimes: dict) -> dict[str, Any]:
    """doctor's gVisor lines: whether it is available, whether stages use it, what it adds and costs."""
    names = sorted(name for name, entry in runtimes.items() if isinstance(entry, dict) and gvisor.is_gvisor(entry))
    in_use = bool(runtime) and runtime in names
    if not names:
        available = f"no (no runsc runtime registered; see docs/docker.md, then {ENV_RUNTIME}=runsc)"
    else:
        broken = [p for p in (gvisor.registration_problem(n, runtimes[n]) for n in names) if p]
        available = (f"yes ({', '.join(names)}: {' '.join(gvisor.runtime_args(runtimes[names[0]]))})"
                     if not broken else "registered but unusable: " + "; ".join(broken))
    lines: dict[str, Any] = {"gvisor": available,
                             "gvisor_in_use": (f"yes ({ENV_RUNTIME}={runtime})" if in_use else
                                               f"no (set {ENV_RUNTIME}=runsc to use it)" if names else "no")}
    if names:
        lines["gvisor_adds"] = gvisor.ADDS
        lines["gvisor_costs"] = gvisor.COSTS
    return lines


def clean_leftovers() -> list[str]:
    """Remove containers of runners that are gone (crashed, killed). Only
    containers started from this host and boot are judged: another host's
    runner (a shared daemon) is not ours to declare dead."""
    try:
        engine = client()
    except DockerError:
        return []
    removed = []
    # sparse: no inspect per container, which would race with runs removing theirs right now
    for container in engine.containers.list(all=True, sparse=True, filters={"label": LABEL_RUN}):
        labels = container.attrs.get("Labels") or {}
        if labels.get(LABEL_HOST) != runner_host() or _runner_alive(labels):
            continue
        remove(container)
        name = (container.attrs.get("Names") or [container.short_id])[0].lstrip("/")
        removed.append(f"docker container {name} (run {labels.get(LABEL_RUN)}, "
                       f"stage {labels.get(LABEL_STAGE)}, runner pid {labels.get(LABEL_PID)} is gone)")
    return removed
