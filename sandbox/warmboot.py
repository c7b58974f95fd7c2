"""The worker of a warm sandbox: boot first, learn the stage later, exactly once.

The runner starts a sandbox before it knows which stage will use it
(runner/warm.py). This worker then does what every stage's worker does
before its script runs (the interpreter, numpy, zmq, msgpack, the `sandbox`
package, the framework's site first on sys.path, native thread pools sized
to the sandbox's CPUs) and blocks on the claim FIFO: a named pipe that the
runner made in the stage's control directory, a read-only mount here. The
open() itself blocks until the runner opens the FIFO to write, so waiting
costs no CPU, and the runner knows the worker is ready when that open
succeeds.

The claim is one JSON object {"token", "config"}: the token is a random
secret that the runner put in this sandbox's environment at boot (never on a
command line, which any host user could read), so a claim can come only from
the runner that booted the sandbox; `config` is the StageConfig. A claim that
does not carry the token, or whose config does not match what the sandbox
was booted for (its site dirs, its CPUs), is refused: the worker exits and
the runner discards the sandbox. After one claim the FIFO is never read
again: one sandbox, one stage.

Standard library and the `sandbox` package only, like the worker.
"""
from __future__ import annotations

import hmac
import json
import os
import sys

from . import worker
from .stageconfig import StageConfig

ENV_TOKEN = "PIPCOOK_CLAIM_TOKEN"
MAX_CLAIM = 8 << 20  # a StageConfig is a few KiB; pipeline options could be large, never this
EXIT_REFUSED = 3


def _warm_imports() -> None:
    """Import what every stage imports before its script runs (the cost a warm sandbox saves)."""
    import msgpack  # noqa: F401
    import numpy  # noqa: F401
    import zmq  # noqa: F401

    from . import boundary, context, protocol, sdk, shmring  # noqa: F401


def _refuse(why: str) -> int:
    print(f"pipcook-sandbox warm worker: claim refused: {why}", file=sys.stderr)
    return EXIT_REFUSED


def read_claim(path: str, token: str, site_dirs: list, cpus: str) -> StageConfig | str:
    """Block until the claim arrives; the StageConfig, or why the claim is refused."""
    with open(path, "rb") as f:  # blocks until the runner opens the FIFO to write
        raw = f.read(MAX_CLAIM + 1)
    if len(raw) > MAX_CLAIM:
        return "the claim is larger than any stage configuration"
    try:
        claim = json.loads(raw)
    except ValueError:
        return "the claim is not JSON"
    if not isinstance(claim, dict) or not isinstance(claim.get("token"), str):
        return "the claim carries no token"
    if not token or not hmac.compare_digest(claim["token"].encode(), token.encode()):
        return "the claim's token is not this sandbox's"
    try:
        cfg = StageConfig.parse(claim.get("config"))
    except ValueError as exc:
        return str(exc)
    if list(cfg.site_dirs) != list(site_dirs):
        return "the stage's site directories are not those this sandbox was booted with"
    if str(cfg.hints.get("cpus")) != cpus:
        return "the stage's CPUs are not those this sandbox was booted with"
    return cfg


def take_token() -> str:
    """The claim token, gone from os.environ and wiped from the process's original environment block.

    os.environ.pop alone unsets the variable for libc, but /proc/self/environ (and /proc/PID/environ,
    for whoever may read it) shows the block the kernel gave the process at exec, where the value
    stays. So the value's bytes there are overwritten first. The token stays in this process's memory
    (the script that later runs here could find it), but by then the FIFO is never read again."""
    token = os.environ.get(ENV_TOKEN, "")
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        libc.getenv.restype = ctypes.c_void_p
        libc.getenv.argtypes = [ctypes.c_char_p]
        where = libc.getenv(ENV_TOKEN.encode())
        if where:  # the value in the exec-time block (the runner never changes it before this)
            ctypes.memset(where, ord("-"), len(ctypes.string_at(where)))
    except (ImportError, OSError, AttributeError):
        pass  # no ctypes here: the variable is still unset below, as before
    os.environ.pop(ENV_TOKEN, None)
    return token


def boot(claim_path: str, site_dirs: list, cpus: str) -> int:
    """Warm up, wait for the one claim, run that stage; the worker's exit code."""
    token = take_token()
    worker.setup_process()
    worker.add_site_dirs(site_dirs)
    os.environ["PIPCOOK_CPUS"] = cpus
    worker._size_thread_pools(cpus)
    _warm_imports()
    found = read_claim(claim_path, token, site_dirs, cpus)
    if isinstance(found, str):
        return _refuse(found)
    return worker.run_config(found)
