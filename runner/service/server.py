"""`pipcook-sandbox server`: one process, the API on uvicorn and the scheduler thread.

One server per data directory (an exclusive lock on DATA/server.lock): two
schedulers over one database would start the same run twice. The socket is
bound before anything else so that `--port 0` can say which port it got
(on stderr, and in DATA/server.json for tools and tests).
"""
from __future__ import annotations

import fcntl
import ipaddress
import json
import logging
import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

from pipcook_sandbox.runner.errors import PipcookError


@dataclass
class ServerOptions:
    host: str = "127.0.0.1"
    port: int = 8765
    data: Path = Path(".")
    engine: str = "local"
    isolation: str = "bwrap"
    capacity_cpus: float | None = None
    capacity_memory: int | None = None
    capacity_gpus: int | None = None
    allow_private: tuple[str, ...] = ()
    slurm_partition: str | None = None
    slurm_job_memory: int | None = None  # at most this --mem per job (default: stages x memory + the runner)
    debug: bool = False
    warm: int = 0  # local engine: warm runners kept per tenant and kind of run (engines/warmpool.py)
    warm_total: int | None = None  # all warm runners at once (default 4 x warm)
    warm_idle: float = 300.0  # seconds an unused warm runner lives


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _lock(data: Path) -> int:
    try:
        fd = os.open(data / "server.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise PipcookError(f"cannot use {data} as the service's state directory (--data): cannot create "
                           f"server.lock there: {exc.strerror}; give a directory this user may write") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise PipcookError(f"another server is running on {data} (it holds {data / 'server.lock'}); "
                           "stop it first, or give this one another --data") from None
    return fd


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise PipcookError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.listen(256)
    sock.set_inheritable(False)
    return sock


def _engine_options(opts: ServerOptions) -> dict[str, object]:
    if opts.engine == "local":
        gpus = opts.capacity_gpus
        if gpus is None:
            gpus = len(list(Path("/dev").glob("nvidia[0-9]*")))
        return {"cpus": opts.capacity_cpus, "memory": opts.capacity_memory, "gpus": gpus, "warm": opts.warm,
                "warm_total": opts.warm_total, "warm_idle": opts.warm_idle}
    options: dict[str, object] = {}
    if opts.slurm_partition:
        options["partition"] = opts.slurm_partition
    if opts.slurm_job_memory:
        options["job_memory_cap"] = opts.slurm_job_memory
    return options


def serve(opts: ServerOptions) -> None:
    import uvicorn

    from pipcook_sandbox.runner.doctor import require_backend
    from pipcook_sandbox.runner.engines import get_engine

    from .api import Service, create_app
    from .db import Database, data_dir

    data_dir(opts.data, 0o711)  # tenants' run dirs below are 0700 and their own; nothing else is listable
    lock = _lock(opts.data)
    if opts.engine == "local":
        require_backend(opts.isolation)
    if os.geteuid() != 0:
        _say("WARNING: the server is not root: every tenant's stages run as this user's uid, "
             "not a uid of their own (run it as root for per-tenant uids)")
    try:
        if not ipaddress.ip_address(opts.host).is_loopback:
            _say(f"WARNING: listening on {opts.host}: the API is reachable from the network; put TLS in front of it")
    except ValueError:
        _say(f"WARNING: listening on {opts.host}: the API may be reachable from the network")
    sock = _bind(opts.host, opts.port)
    engine = get_engine(opts.engine, **_engine_options(opts))
    service = Service(db=Database(opts.data / "service.db"), engine=engine, data=opts.data,
                      isolation=opts.isolation, allow_private=opts.allow_private)
    service.start()  # recovery first: runs left by a server that died are settled before anything is served
    app = create_app(service)
    port = sock.getsockname()[1]
    url = f"http://{opts.host if ':' not in opts.host else '[' + opts.host + ']'}:{port}"
    (opts.data / "server.json").write_text(json.dumps({"url": url, "pid": os.getpid()}) + "\n")
    _say(f"pipcook-sandbox server: listening on {url} (data {opts.data}, engine {opts.engine}, "
         f"isolation {opts.isolation})")
    logging.basicConfig(level=logging.INFO if opts.debug else logging.WARNING)
    config = uvicorn.Config(app, log_level="info" if opts.debug else "warning", access_log=opts.debug,
                            timeout_graceful_shutdown=5)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    except KeyboardInterrupt:
        pass  # uvicorn re-raises the SIGINT/SIGTERM it stopped for; the stop below is the orderly end: exit 0
    finally:
        _say("pipcook-sandbox server: stopping " + ("(running jobs go on; the next start watches them again)"
                                                     if engine.jobs_outlive_server else
                                                     "(running runs are stopped and marked failed)"))
        service.stop()
        service.db.close()
        sock.close()
        os.close(lock)
