"""Commands of service mode (CONTRACT section 5): `server` and `tenants` for the operator on the
host; `submit`, `runs`, `status`, `logs`, `cancel` and `download` for a tenant anywhere."""
from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from pipcook_sandbox.runner.errors import PipcookError

DATA_ENV = "PIPCOOK_SANDBOX_DATA"
DEFAULT_PORT = 8765


def default_data() -> Path:
    override = os.environ.get(DATA_ENV)
    if override:
        return Path(override).expanduser()
    import platformdirs

    return Path(platformdirs.user_data_dir("pipcook-sandbox", appauthor=False)) / "service"


def _data_option(fn: Callable) -> Callable:
    return click.option("--data", type=click.Path(path_type=Path), default=None, metavar="DIR",
                        help=f"The service's state directory (default ${DATA_ENV}, else the user's data dir).")(fn)


def _open_db(data: Path | None) -> tuple[Any, Path]:
    from .db import Database

    data = (data or default_data()).absolute()
    return Database(data / "service.db"), data


def _size(value: str | None, what: str) -> int | None:
    if value is None:
        return None
    from pipcook_sandbox.runner.limits import parse_size

    try:
        return parse_size(value, what)
    except PipcookError as exc:
        raise click.BadParameter(str(exc), param_hint=what) from None


def register(main: click.Group, handle_errors: Callable[[Callable], Callable]) -> None:
    """Add the service's commands to the `pipcook-sandbox` group."""
    _register_server(main, handle_errors)
    _register_tenants(main, handle_errors)
    _register_client(main, handle_errors)


def _register_server(main: click.Group, handle_errors: Callable[[Callable], Callable]) -> None:
    """The operator's `server` command."""

    @main.command()
    @click.option("--host", default="127.0.0.1", show_default=True,
                  help="Address to bind. Anything but loopback exposes the API to the network (use TLS in front).")
    @click.option("--port", type=click.IntRange(0, 65535), default=DEFAULT_PORT, show_default=True,
                  help="TCP port (0: any free port; the chosen one is printed).")
    @_data_option
    @click.option("--engine", type=click.Choice(["local", "slurm"]), default="local", show_default=True,
                  help="Where runs execute: on this host, or as Slurm jobs under each tenant's account.")
    @click.option("--isolation", type=click.Choice(["bwrap", "docker"]), default="bwrap", show_default=True,
                  help="Sandbox of every stage of every run.")
    @click.option("--capacity-cpus", type=float, metavar="N", help="CPUs all running runs may hold together "
                  "(default: this host's). A run holds its per-stage CPU limit once.")
    @click.option("--capacity-memory", metavar="SIZE", help="Memory all running runs may hold together "
                  "(default: this host's). A run holds its per-stage memory times its stages.")
    @click.option("--capacity-gpus", type=int, metavar="N", help="GPUs runs may hold (default: /dev/nvidia* count).")
    @click.option("--allow-private", "allow_private", multiple=True, metavar="HOST",
                  help="Let pipelines fetch from this loopback/private host (local mirrors, tests). Repeatable.")
    @click.option("--slurm-partition", metavar="NAME", help="With --engine slurm: the partition jobs go to.")
    @click.option("--slurm-job-memory", metavar="SIZE",
                  help="With --engine slurm: the most memory (--mem) one run's job asks for, shared by its runner "
                       "and stages (default: its per-stage memory times its stages, plus 512m for the runner).")
    @click.option("--warm", type=click.IntRange(0), default=0, show_default=True,
                  help="With --engine local and bwrap: keep N runners started per tenant and kind of run, each "
                       "with its run's sandboxes booted for that tenant; each takes one run (docs/warm.md).")
    @click.option("--warm-total", type=click.IntRange(0), metavar="N",
                  help="Warm runners at once, all tenants together (default 4 x --warm).")
    @click.option("--warm-idle", type=click.FloatRange(1), default=300.0, show_default=True,
                  help="Seconds an unused warm runner lives.")
    @click.option("--debug", is_flag=True, help="Show tracebacks and the server's access log.")
    @handle_errors
    def server(host: str, port: int, data: Path | None, engine: str, isolation: str, capacity_cpus: float | None,
               capacity_memory: str | None, capacity_gpus: int | None, allow_private: tuple[str, ...],
               slurm_partition: str | None, slurm_job_memory: str | None, warm: int, warm_total: int | None,
               warm_idle: float, debug: bool) -> None:
        """Serve the multi-tenant HTTP API: tenants submit runs, each stage runs sandboxed under the tenant's uid."""
        from .server import ServerOptions, serve

        if capacity_cpus is not None and capacity_cpus <= 0:
            raise click.BadParameter("must be positive", param_hint="--capacity-cpus")
        serve(ServerOptions(host=host, port=port, data=(data or default_data()).absolute(), engine=engine,
                            isolation=isolation, capacity_cpus=capacity_cpus,
                            capacity_memory=_size(capacity_memory, "--capacity-memory"), capacity_gpus=capacity_gpus,
                            allow_private=allow_private, slurm_partition=slurm_partition,
                            slurm_job_memory=_size(slurm_job_memory, "--slurm-job-memory"), debug=debug,
                            warm=warm, warm_total=warm_total, warm_idle=warm_idle))


def _register_tenants(main: click.Group, handle_errors: Callable[[Callable], Callable]) -> None:
    """The operator's `tenants add|list|token|remove`."""

    @main.group()
    def tenants() -> None:
        """Manage the service's tenants (on the server's host, with access to --data)."""

    @tenants.command("add")
    @click.argument("name")
    @_data_option
    @click.option("--max-running", type=click.IntRange(1), default=2, show_default=True, help="Runs at once.")
    @click.option("--max-queued", type=click.IntRange(0), default=20, show_default=True,
                  help="Runs waiting; more answer 429.")
    @click.option("--cpus", type=float, default=1.0, show_default=True, help="CPUs per stage, at most.")
    @click.option("--memory", default="2g", show_default=True, help="Memory per stage, at most.")
    @click.option("--disk", default="2g", show_default=True, help="All a stage may write, at most.")
    @click.option("--timeout", type=float, default=3600.0, show_default=True, help="Seconds per stage, at most.")
    @click.option("--gpus", type=click.IntRange(0), default=0, show_default=True, help="GPUs a run may ask for.")
    @click.option("--uid-base", type=click.IntRange(1000), default=200000, show_default=True,
                  help="Host uids for tenants are allocated upwards from here (never reused).")
    @click.option("--slurm-account", is_flag=True,
                  help="Also create (or check and update) the tenant's Slurm account: GrpJobs = max-running, "
                       "GrpSubmitJobs = max-running + max-queued, MaxTRESPerJob from --cpus and --gpus. "
                       "A server with --engine slurm does this itself before the tenant's first run.")
    @click.option("--debug", is_flag=True, help="Show tracebacks.")
    @handle_errors
    def tenants_add(name: str, data: Path | None, max_running: int, max_queued: int, cpus: float, memory: str,
                    disk: str, timeout: float, gpus: int, uid_base: int, slurm_account: bool, debug: bool) -> None:
        """Add tenant NAME and print its token (shown this once; only its hash is kept)."""
        from . import tenants as tenants_mod

        if slurm_account:  # before the tenant exists: a cluster that refuses leaves nothing half made
            from pipcook_sandbox.runner.engines import slurm

            slurm.ensure_account(name, slurm.tenant_quotas(max_running=max_running, max_queued=max_queued,
                                                           cpus=cpus, gpus=gpus))
        db, root = _open_db(data)
        tenant, token = tenants_mod.add(db, root, name, max_running=max_running, max_queued=max_queued, cpus=cpus,
                                        memory=_size(memory, "--memory") or 0, disk=_size(disk, "--disk") or 0,
                                        timeout=timeout, gpus=gpus, uid_base=uid_base)
        if slurm_account:
            click.echo(f"Slurm account {name}: {slurm.account_limits(name)}", err=True)
        click.echo(token)
        click.echo(f"tenant {tenant.name} added (uid {tenant.uid}); give it the token above, it is not shown again",
                   err=True)

    @tenants.command("list")
    @_data_option
    @click.option("--json", "as_json", is_flag=True, help="One JSON object per tenant.")
    @click.option("--debug", is_flag=True, help="Show tracebacks.")
    @handle_errors
    def tenants_list(data: Path | None, as_json: bool, debug: bool) -> None:
        """List tenants and their quotas (never their tokens)."""
        from pipcook_sandbox.runner.units import fmt_bytes

        from . import tenants as tenants_mod

        db, _ = _open_db(data)
        for t in tenants_mod.all_tenants(db):
            if as_json:
                click.echo(json.dumps(t.public()))
            else:
                click.echo(f"{t.name}\tuid {t.uid}\tmax-running {t.max_running}\tmax-queued {t.max_queued}\t"
                           f"cpus {t.cpus:g}\tmemory {fmt_bytes(t.memory)}\tdisk {fmt_bytes(t.disk)}\t"
                           f"timeout {t.timeout:g}s\tgpus {t.gpus}")

    @tenants.command("token")
    @click.argument("name")
    @_data_option
    @click.option("--debug", is_flag=True, help="Show tracebacks.")
    @handle_errors
    def tenants_token(name: str, data: Path | None, debug: bool) -> None:
        """Give NAME a new token (printed once); the old one stops working at once."""
        from . import tenants as tenants_mod

        db, _ = _open_db(data)
        click.echo(tenants_mod.rotate(db, name))

    @tenants.command("remove")
    @click.argument("name")
    @_data_option
    @click.option("--slurm-account", is_flag=True,
                  help="Also delete the tenant's Slurm account (Slurm refuses while it has jobs: retry once the "
                       "server has cancelled them).")
    @click.option("--debug", is_flag=True, help="Show tracebacks.")
    @handle_errors
    def tenants_remove(name: str, data: Path | None, slurm_account: bool, debug: bool) -> None:
        """Remove NAME: its token stops working, its queued runs are canceled, a running server stops
        its running ones; its files go once none runs."""
        from . import tenants as tenants_mod

        db, root = _open_db(data)
        canceled = tenants_mod.remove(db, root, name)
        click.echo(f"tenant {name} removed ({canceled} queued run(s) canceled)", err=True)
        if slurm_account:
            from pipcook_sandbox.runner.engines import slurm

            gone = slurm.remove_account(name)
            click.echo(f"Slurm account {name} {'deleted' if gone else 'did not exist'}", err=True)


def _register_client(main: click.Group, handle_errors: Callable[[Callable], Callable]) -> None:
    """A tenant's `submit`, `runs`, `status`, `logs`, `cancel`, `download`."""

    def client_options(fn: Callable) -> Callable:
        fn = click.option("--server", envvar="PIPCOOK_SANDBOX_SERVER", required=True, metavar="URL",
                          help="The service's URL (or $PIPCOOK_SANDBOX_SERVER); the token comes from "
                               "$PIPCOOK_SANDBOX_TOKEN.")(fn)
        return click.option("--debug", is_flag=True, help="Show tracebacks.")(fn)

    def connect(server: str) -> Any:
        from .client import TOKEN_ENV, Client

        token = os.environ.get(TOKEN_ENV)
        if not token:
            raise click.UsageError(f"set ${TOKEN_ENV} to the token the operator gave you")
        return Client(server, token)

    @main.command()
    @click.argument("pipeline")
    @client_options
    @click.option("--cpus", type=float, help="CPUs per stage (default: the tenant's quota).")
    @click.option("--memory", metavar="SIZE", help="Memory per stage (default: the tenant's quota).")
    @click.option("--disk", metavar="SIZE", help="Disk per stage (default: the tenant's quota).")
    @click.option("--timeout", type=float, metavar="SECONDS", help="Wall-clock limit per stage.")
    @click.option("--gpu", type=click.IntRange(0), default=0, help="GPUs for the model stage.")
    @click.option("-f", "--follow", is_flag=True, help="Then follow its events until it ends (exit status: its verdict).")
    @handle_errors
    def submit(pipeline: str, server: str, debug: bool, cpus: float | None, memory: str | None, disk: str | None,
               timeout: float | None, gpu: int, follow: bool) -> None:
        """Queue a run of PIPELINE (an http(s) URL, or a local file sent inline: it may name only http(s) URLs)."""
        limits = {k: v for k, v in {"cpus": cpus, "memory": memory, "disk": disk, "timeout": timeout}.items()
                  if v is not None}
        with connect(server) as client:
            accepted = client.submit(pipeline, limits or None, gpu)
            click.echo(accepted["id"])
            if follow:
                sys.exit(_follow(client, accepted["id"]))

    @main.command()
    @client_options
    @click.option("--status", "state", type=click.Choice(["queued", "running", "succeeded", "failed", "canceled"]))
    @handle_errors
    def runs(server: str, debug: bool, state: str | None) -> None:
        """List your runs, newest first."""
        from pipcook_sandbox.runner.control import shown

        with connect(server) as client:
            for run in client.runs(state):
                progress = f"{run['progress']:.0f}%" if run.get("progress") is not None else "-"
                click.echo(f"{run['id']}\t{run['status']}\t{progress}\t{shown(run['source'], 120)}")

    @main.command()
    @click.argument("run_id", metavar="ID")
    @client_options
    @handle_errors
    def status(run_id: str, server: str, debug: bool) -> None:
        """Show run ID: state, stages, progress, latest metrics, error (JSON)."""
        with connect(server) as client:
            click.echo(json.dumps(client.status(run_id), indent=2))

    @main.command()
    @click.argument("run_id", metavar="ID")
    @client_options
    @click.option("-f", "--follow", is_flag=True, help="Follow the run's events until it ends.")
    @click.option("--stage", metavar="NAME", help="Print this stage's own output instead (datasource, dataflow-1, "
                  "model, runner).")
    @handle_errors
    def logs(run_id: str, server: str, debug: bool, follow: bool, stage: str | None) -> None:
        """Print run ID's events (progress, metrics, log lines, verdict), or one stage's output."""
        from pipcook_sandbox.runner.control import shown

        with connect(server) as client:
            if stage:
                click.echo(shown(client.log(run_id, stage), 1 << 24), nl=False)
                return
            if follow:
                sys.exit(_follow(client, run_id))
            for kind, event in client.events(run_id):
                click.echo(render(kind, event))

    @main.command()
    @click.argument("run_id", metavar="ID")
    @client_options
    @handle_errors
    def cancel(run_id: str, server: str, debug: bool) -> None:
        """Cancel run ID, whatever its state."""
        with connect(server) as client:
            click.echo(client.cancel(run_id)["status"])

    @main.command()
    @click.argument("run_id", metavar="ID")
    @client_options
    @click.option("-o", "--output", type=click.Path(path_type=Path), help="Where to write (default ID-model.zip).")
    @click.option("--artifact", metavar="NAME", default="model.zip", show_default=True,
                  help="Which artifact to download.")
    @handle_errors
    def download(run_id: str, server: str, debug: bool, output: Path | None, artifact: str) -> None:
        """Download run ID's model.zip (or another artifact)."""
        dest = output or Path(f"{run_id}-{artifact}")
        with connect(server) as client:
            click.echo(str(client.download(run_id, dest, artifact)))


def render(kind: str, event: dict[str, Any]) -> str:
    """One event as a line for a terminal; everything from the run is escaped."""
    from pipcook_sandbox.runner.control import shown

    def s(value: Any, limit: int = 500) -> str:
        return shown(str(value), limit).replace("\n", " ")

    if kind == "stage":
        status = event.get("status")
        return f"[{s(event.get('stage'), 64)}] {status}" + (f" (code {event.get('code')})" if status == "exited" else "")
    if kind == "progress":
        extra = " ".join(f"{s(k, 64)}={s(v, 64)}" for k, v in (event.get("extra") or {}).items())
        return f"progress {float(event.get('value') or 0):.0f}% {extra}".rstrip()
    if kind == "metrics":
        values = " ".join(f"{s(k, 64)}={s(v, 64)}" for k, v in (event.get("metrics") or {}).items())
        return f"[{s(event.get('stage'), 64)}] metrics step={s(event.get('step'))} {values}"
    if kind == "log":
        return (f"[{s(event.get('stage'), 64)}] " if event.get("stage") else "") + s(event.get("message"), 2000)
    if kind == "verdict":
        return f"verdict: {s(event.get('status'))}" + (f": {s(event.get('error'), 4000)}" if event.get("error") else "")
    if kind == "state":
        return f"run {s(event.get('id'))}: {s(event.get('status'))}" + (
            f": {s(event.get('error'), 4000)}" if event.get("error") else "")
    return f"{s(kind, 32)} {s(json.dumps(event), 500)}"


def _follow(client: Any, run_id: str) -> int:
    status = "failed"
    for kind, event in client.events(run_id):
        click.echo(render(kind, event), err=kind != "state")
        if kind == "state":
            status = event.get("status") or status
    return 0 if status == "succeeded" else 1
