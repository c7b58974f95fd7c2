"""The `pipcook-sandbox` command line (docs/cli.md).

Every failure reaches the user as one paragraph naming the stage, the script
and the cause; `--debug` adds the traceback. Exit status: 0 success, 1 a
failed run or bad input, 2 a usage error (a bad flag or value), 130
interrupted (SIGINT), 143 terminated (SIGTERM).
"""
from __future__ import annotations

import functools
import logging
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import click

from .errors import PipcookError, UsageError, host_refusal
from .inert import InertFormatter, inert

ISOLATIONS = ("bwrap", "docker", "none")
EXIT_INTERRUPTED, EXIT_TERMINATED = 130, 143


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is so that the same orderly teardown as Ctrl-C runs."""


# Set by the SIGTERM handler: the teardown code turns any signal into `Interrupted`, this says which.
_terminated: list[bool] = []


def _on_sigterm(*_: Any) -> None:
    _terminated.append(True)
    raise Terminated()

# Every line the CLI prints to the terminal goes through `inert` (runner/inert.py): messages quote
# pipelines, scripts, URLs and file names a stage chose, and none may drive the terminal.


def _say(message: str) -> None:
    click.echo(inert(message), err=True)


def _warn(message: str) -> None:
    click.secho(inert(message), err=True, fg="yellow", bold=True)


def _fail(message: str) -> None:
    click.secho(inert(message), err=True, fg="red")


def _traceback() -> None:
    """--debug: the host-side traceback; its messages quote pipeline text too."""
    _say(traceback.format_exc().rstrip())


def _inert_logging() -> None:
    """The runner's log records (a backend's warnings, copy-out notes naming files a stage left)
    reach stderr only through InertFormatter."""
    handler = logging.StreamHandler()
    handler.setFormatter(InertFormatter("%(levelname)s: %(name)s: %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.WARNING)


def handle_errors(fn: Callable) -> Callable:
    """Turn every exception into the one-paragraph message of the contract."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        debug = kwargs.get("debug", False)
        # SIGTERM gets the same orderly teardown as Ctrl-C, and its own status and word
        signal.signal(signal.SIGTERM, _on_sigterm)
        try:
            return fn(*args, **kwargs)
        except UsageError as exc:  # a bad value found after parsing: a usage error like click's
            raise click.UsageError(str(exc)) from None
        except PipcookError as exc:
            from .errors import Interrupted

            if isinstance(exc, Interrupted) or _terminated:
                _stopped(exc.cause if isinstance(exc, Interrupted) else "")
            tb = getattr(exc, "traceback", "")
            if debug:
                _traceback()
                if tb:
                    _say("--- traceback inside the sandbox ---\n" + tb.rstrip())
            _fail(f"error: {exc}")
            if tb and not debug:
                _say("(run with --debug for the script's traceback)")
            sys.exit(1)
        except click.ClickException:
            raise  # usage errors: click prints them with the usage line, exit status 2
        except KeyboardInterrupt:
            _stopped("")
        except Exception as exc:  # the host's refusal, or a bug of ours: one paragraph, traceback on request
            if debug:
                _traceback()
            refused = host_refusal(exc)
            _fail(f"error: {refused}" if refused is not None else
                  f"error: internal error in pipcook-sandbox: {type(exc).__name__}: {exc}"
                  + ("" if debug else " (run with --debug for the traceback)"))
            sys.exit(1)

    return wrapper


def _stopped(cause: str) -> None:
    """Exit for a signal: 130 and "interrupted" for SIGINT (Ctrl-C), 143 and "terminated" for SIGTERM."""
    detail = cause.split(": ", 1)[1] if ": " in cause else ""
    if _terminated:
        _fail("error: terminated (SIGTERM)" + (f": {detail}" if detail else ""))
        sys.exit(EXIT_TERMINATED)
    _fail("error: interrupted (Ctrl-C)" + (f": {detail}" if detail else ""))
    sys.exit(EXIT_INTERRUPTED)


def _limits(memory: str | None, cpus: float | None, pids: int | None, disk: str | None, timeout: float | None,
            downloads: str | None = None) -> Any:
    from .limits import from_options

    try:
        return from_options(memory, cpus, pids, disk, timeout, warn=_warn, downloads=downloads)
    except UsageError as exc:  # exit 2 with click's usage line, like any other bad value
        raise click.UsageError(str(exc)) from None


def limit_options(fn: Callable) -> Callable:
    for option in reversed([
        click.option("--memory", metavar="SIZE", help="Memory per stage, e.g. 2g (default 4g)."),
        click.option("--cpus", type=float, metavar="N", help="CPUs per stage (default: all cores)."),
        click.option("--pids", type=int, metavar="N", help="Processes and threads per stage (default 256)."),
        click.option("--disk", metavar="SIZE", help="All a stage may write, e.g. 10g (default 10g)."),
        click.option("--timeout", type=float, metavar="SECONDS", help="Wall-clock limit per stage (default 3600)."),
        click.option("--downloads", metavar="SIZE",
                     help="All the bytes a run's ctx.download calls may fetch together (default: the --disk size)."),
    ]):
        fn = option(fn)
    return fn


def common_options(fn: Callable) -> Callable:
    for option in reversed([
        click.option("--isolation", type=click.Choice(ISOLATIONS), default="bwrap", show_default=True,
                     help="Sandbox for every stage. 'none' runs scripts unconfined: trusted local code only."),
        click.option("--gpu/--no-gpu", default=None,
                     help="Give the model stage a GPU (CUDA image), or refuse one even if the pipeline's "
                          "options.train.gpu asks. Neither: the pipeline decides."),
        click.option("--nocache", is_flag=True, help="Download scripts and data again instead of using the cache."),
        click.option("--allow-private", "allow_private", multiple=True, metavar="HOST",
                     help="Allow fetching from this loopback/private host (local mirrors, tests). Repeatable."),
        click.option("--debug", is_flag=True, help="Show tracebacks and each stage's events."),
    ]):
        fn = option(fn)
    return fn


def _isolation_check(isolation: str, debug: bool) -> Callable[[], None]:
    """Start checking that `isolation` can confine scripts here; the returned function waits for the
    answer and raises if it cannot. The probe starts a throwaway sandbox (~0.2 s), so it runs in a
    thread while the caller imports and prepares, and every run still checks its own host."""
    if isolation == "none":
        _warn("WARNING: --isolation none: scripts run UNCONFINED with your user's full access to this machine "
              "(files, network, processes). Use it only for code you trust.")
        return lambda: None
    import threading

    from .doctor import require_backend

    failure: list[BaseException] = []

    def check() -> None:
        try:
            require_backend(isolation)
        except BaseException as exc:  # handed to the caller's thread, raised there
            failure.append(exc)

    thread = threading.Thread(target=check, name="backend-probe", daemon=True)
    thread.start()

    def wait() -> None:
        thread.join()
        if failure:
            raise failure[0]

    return wait


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(None, "-V", "--version", package_name="pipcook-sandbox", prog_name="pipcook-sandbox")
def main() -> None:
    """Run machine-learning pipelines whose scripts you do not trust."""
    _inert_logging()


def _stage_owner(value: str | None) -> tuple[int, int] | None:
    if value is None:
        return None
    from .backends import owner

    try:
        ids = owner.parse(value)
        owner.set_stage_owner(*ids)
    except ValueError as exc:
        raise click.BadParameter(f"{value!r}: {exc}" if "range" in str(exc) else f"{value!r} is not UID or UID:GID",
                                 param_hint="--stage-uid") from None
    import os

    if os.geteuid() != 0:
        raise click.BadParameter("needs a root runner (stages of a non-root runner run as the runner's own uid)",
                                 param_hint="--stage-uid")
    return ids


def _private_workspace(output: Path | None, ids: tuple[int, int]) -> Path:
    """The workspace made up front, 0700 and owned by the stage uid (a tenant's), so that no
    other tenant's uid can read it even from outside a sandbox."""
    import os

    from .workspace import default_dir

    root = (output or default_dir()).absolute()
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chown(root, *ids)
    os.chmod(root, 0o700)
    return root


def _parse_set(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> list:
    from .overrides import parse

    try:
        return [parse(v) for v in values]
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


@main.command()
@click.argument("pipeline")
@click.option("-o", "--output", type=click.Path(path_type=Path), help="Workspace directory (default ./pipcook-output-<timestamp>).")
@click.option("--force", is_flag=True,
              help="Replace the -o directory if it is the workspace of an earlier run (never anything else).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", callback=_parse_set,
              help="Override an option: train.NAME (options.train), datasource.NAME, model.NAME or "
                   "dataflow.N.NAME (a script's query option). Repeatable; recorded in the workspace's pipeline.json.")
@click.option("-m", "--mirror", metavar="URL", help="Fetch prebuilt frameworks from this mirror.")
@click.option("--allow-path", "allow_paths", multiple=True, metavar="DIR",
              type=click.Path(exists=True, file_okay=False, dir_okay=True),
              help="Let a local pipeline name files under DIR too (by default only under its own directory). "
                   "Repeatable.")
@click.option("--json", "as_json", is_flag=True,
              help="Print the run's events on stdout, one JSON object per line (see docs/service.md).")
@click.option("--stage-uid", metavar="UID[:GID]",
              help="Operator option (root runner): run every stage as this host uid, own the workspace by it, "
                   "mode 0700. The service gives each tenant its own.")
@click.option("--warm", is_flag=True, envvar="PIPCOOK_WARM",
              help="Boot every stage's sandbox before configuring any, then hand each to its stage "
                   "(bwrap; docs/warm.md; PIPCOOK_WARM=1 the same). Each sandbox still serves one stage only.")
@common_options
@limit_options
@handle_errors
def run(pipeline: str, output: Path | None, force: bool, overrides: list, mirror: str | None, as_json: bool,
        stage_uid: str | None, warm: bool, allow_paths: tuple[str, ...], isolation: str, gpu: bool | None,
        nocache: bool, allow_private: tuple[str, ...], debug: bool, memory: str | None, cpus: float | None,
        pids: int | None, disk: str | None, timeout: float | None, downloads: str | None) -> None:
    """Train: run PIPELINE (a path or an http(s) URL), every stage sandboxed.

    On a terminal a live table shows every stage (samples sent, epoch, latest metrics, ETA); otherwise one
    line per event. A summary follows, and the workspace gets report.html (curves, parameters, timings).
    With --json, stdout carries the run's events as JSON lines and the display goes to stderr only.
    """
    ids = _stage_owner(stage_uid)
    emitter = None
    if as_json:
        from .events import Emitter

        emitter = Emitter(sys.stdout)
    try:
        _run(pipeline, output, force, overrides, mirror, emitter, ids, isolation, gpu, nocache, allow_private,
             debug, memory, cpus, pids, disk, timeout, downloads, allow_paths=allow_paths, warm=warm)
    except BaseException as exc:
        if emitter is not None:
            emitter.verdict(_exit_code(exc), exc if isinstance(exc, PipcookError) else _plain(exc))
        raise
    if emitter is not None:
        emitter.verdict(0)


def _run(pipeline: str, output: Path | None, force: bool, overrides: list, mirror: str | None, emitter: Any,
         ids: tuple[int, int] | None, isolation: str, gpu: bool | None, nocache: bool,
         allow_private: tuple[str, ...], debug: bool, memory: str | None, cpus: float | None, pids: int | None,
         disk: str | None, timeout: float | None, downloads: str | None, allow_paths: tuple[str, ...] = (),
         warm: bool = False) -> None:
    limits = _limits(memory, cpus, pids, disk, timeout, downloads)
    if ids is not None:
        output = _private_workspace(output, ids)
    confined = _isolation_check(isolation, debug)
    from . import report
    from .display import Display, Tracker
    from .training import RunOptions, run_pipeline

    confined()
    tracker = Tracker()
    display = Display(tracker, debug=debug)
    workspaces: list[Any] = []

    def trained(ws: Any) -> None:  # before the artifacts: model/ (and so its zip) carries the report
        tracker.ended = tracker.ended or time.monotonic()
        try:
            report.write(ws, tracker)
        except OSError as exc:  # a report is never worth a failed run
            display.log(f"warning: could not write the report: {exc}")

    def made(ws: Any) -> None:
        workspaces.append(ws)
        if ids is not None:  # again after --force made it anew
            _private_workspace(ws.root, ids)

    log: Callable[[str], None] = display.log
    on_event: Callable[[str, str], None] = display.event
    if emitter is not None:
        def log(message: str) -> None:
            display.log(message)
            emitter.log(message)

        def on_event(stage: str, what: str) -> None:
            display.event(stage, what)
            emitter.stage_event(stage, what)

    display.start()
    failed = True
    try:
        run_pipeline(pipeline, RunOptions(
            output=output, isolation=isolation, gpu=gpu, nocache=nocache, allow_private=allow_private,
            allow_paths=allow_paths, limits=limits, mirror=mirror, log=log, on_event=on_event,
            on_record=display.record,
            on_progress=emitter.progress if emitter is not None else None,
            observers=(emitter.observe,) if emitter is not None else (),
            force=force, overrides=overrides, on_workspace=made, on_trained=trained, warm=warm,
            on_artifact=tracker.artifacts.append, stage_owner=ids))
        failed = False
    finally:
        display.close()
        if workspaces:
            tracker.ended = time.monotonic()
            written: Path | None
            try:
                written = report.write(workspaces[0], tracker, failed=failed)
            except OSError as exc:
                _warn(f"warning: could not write the report: {exc}")
                written = None
            from .workspace import restrict

            restrict(workspaces[0].root)  # the report and summary too: nothing in a workspace is open to others
            display.summary(workspaces[0], written, failed=failed)
    click.secho(inert(f"done: model in {workspaces[0].model}"), err=True, fg="green")


def _exit_code(exc: BaseException) -> int:
    """The exit status handle_errors gives EXC (the verdict event says the same)."""
    from .errors import Interrupted

    if isinstance(exc, (KeyboardInterrupt, Interrupted)):
        return EXIT_TERMINATED if _terminated else EXIT_INTERRUPTED
    if isinstance(exc, UsageError):
        return 2
    if isinstance(exc, SystemExit):
        return exc.code if isinstance(exc.code, int) else 1
    if isinstance(exc, click.ClickException):
        return exc.exit_code
    return 1


def _plain(exc: BaseException) -> BaseException | None:
    if isinstance(exc, KeyboardInterrupt):
        return PipcookError(("terminated (SIGTERM)" if _terminated else "interrupted (Ctrl-C)")
                            + ": every stage was stopped; the workspace is kept")
    if isinstance(exc, click.ClickException):
        return PipcookError(exc.format_message())
    if isinstance(exc, SystemExit):
        return None
    return host_refusal(exc) or PipcookError(f"internal error in pipcook-sandbox: {type(exc).__name__}: {exc}")


@main.command()
@click.argument("model")
@click.option("-s", "--string", "strings", multiple=True, metavar="STRING", help="An input string (one sample each; repeatable).")
@click.option("-u", "--upload", "files", multiple=True, metavar="FILE", help="An input file, sent as bytes (repeatable).")
@click.option("-m", "--mirror", metavar="URL", help="Fetch the model's prebuilt framework from this mirror.")
@click.option("--isolation", type=click.Choice(ISOLATIONS), default="bwrap", show_default=True,
              help="Sandbox for every stage. 'none' runs scripts unconfined: trusted local code only.")
@click.option("--gpu/--no-gpu", default=False, show_default=True,
              help="Give the model stage a GPU (CUDA image). The model's own pipeline never turns one on here.")
@click.option("--allow-private", "allow_private", multiple=True, metavar="HOST",
              help="Allow fetching a model URL (and ctx.download) from this loopback/private host. Repeatable.")
@click.option("--debug", is_flag=True, help="Show tracebacks and each stage's events.")
@limit_options
@handle_errors
def predict(model: str, strings: tuple[str, ...], files: tuple[str, ...], mirror: str | None, isolation: str,
            gpu: bool, allow_private: tuple[str, ...], debug: bool, memory: str | None, cpus: float | None,
            pids: int | None, disk: str | None, timeout: float | None, downloads: str | None) -> None:
    """Predict: run MODEL (a workspace, model dir, model zip or its http(s) URL) on -s/-u inputs.

    Prints {"success": true, "data": [one result per input]} as JSON on stdout.
    """
    limits = _limits(memory, cpus, pids, disk, timeout, downloads)
    if gpu:  # before anything is built: the CUDA framework is gigabytes
        from .training import require_gpu_host

        require_gpu_host("--gpu", isolation)
    confined = _isolation_check(isolation, debug)
    from .predict import PredictOptions, UsageError, render, run_predict, samples_from

    try:
        samples = samples_from(strings, files)
    except UsageError as exc:
        raise click.UsageError(str(exc)) from None
    confined()
    on_event = (lambda stage, what: _say(f"[{stage}] {what}")) if debug else None
    results = run_predict(model, samples, PredictOptions(isolation=isolation, gpu=gpu, allow_private=allow_private,
                                                         limits=limits, log=_say, on_event=on_event, mirror=mirror))
    click.echo(render(results))


@main.command()
@click.argument("model")
@click.option("-p", "--port", type=click.IntRange(0, 65535), default=9091, show_default=True, help="TCP port.")
@click.option("-m", "--mirror", metavar="URL", help="Fetch the model's prebuilt framework from this mirror.")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind. Anything but loopback exposes the model to the network: a warning says so.")
@click.option("--request-timeout", type=float, default=60.0, show_default=True, metavar="SECONDS",
              help="Wall-clock limit of one request; past it the answer is 504 and the worker is restarted.")
@click.option("--max-queue", type=click.IntRange(0, 10_000), default=8, show_default=True,
              help="Requests that may wait for the worker; more get 503 at once.")
@click.option("--isolation", type=click.Choice(ISOLATIONS), default="bwrap", show_default=True,
              help="Sandbox of the worker. 'none' runs scripts unconfined: trusted local code only.")
@click.option("--gpu/--no-gpu", default=False, show_default=True,
              help="Give the worker a GPU (CUDA image). The model's own pipeline never turns one on here.")
@click.option("--allow-private", "allow_private", multiple=True, metavar="HOST",
              help="Allow ctx.download from this loopback/private host. Repeatable.")
@click.option("--access-log/--no-access-log", default=True, show_default=True,
              help="One line per request on stderr: client, method, path, status, time.")
@click.option("--debug", is_flag=True, help="Show tracebacks and the worker's events.")
@limit_options
@handle_errors
def serve(model: str, port: int, mirror: str | None, host: str, request_timeout: float, max_queue: int, isolation: str, gpu: bool,
          allow_private: tuple[str, ...], access_log: bool, debug: bool, memory: str | None, cpus: float | None,
          pids: int | None, disk: str | None, timeout: float | None, downloads: str | None) -> None:
    """Serve MODEL (a workspace, model dir or model zip) over HTTP, one sandboxed worker kept warm.

    POST /predict, a demo page at /, GET /healthz, /info, /report (the training report), /openapi.json, /docs.
    """
    if request_timeout <= 0:
        raise click.BadParameter("must be positive", param_hint="--request-timeout")
    limits = _limits(memory, cpus, pids, disk, timeout, downloads)
    if gpu:  # before anything is built: the CUDA framework is gigabytes
        from .training import require_gpu_host

        require_gpu_host("--gpu", isolation)
    confined = _isolation_check(isolation, debug)
    from .serve import ServeOptions, serve_model

    confined()
    serve_model(model, ServeOptions(host=host, port=port, request_timeout=request_timeout, max_queue=max_queue,
                                    isolation=isolation, gpu=gpu, allow_private=allow_private, limits=limits,
                                    debug=debug, log=_say, warn=_warn, mirror=mirror,
                                    access_log=access_log))


@main.command()
@click.option("--cache", is_flag=True, help="Also prune the download and build caches (scripts, data, frameworks).")
@click.option("--older-than", metavar="DURATION",
              help="With --cache: only entries cached longer ago than this, e.g. 30d, 12h, 90m (default: all).")
@handle_errors
def clean(cache: bool, older_than: str | None, debug: bool = False) -> None:
    """Remove what crashed runs left behind: sandboxes, mounts, cgroups, containers; --cache prunes caches."""
    from .cleanup import clean_all, parse_duration, prune_cache
    from .fetch import cache_dir

    if older_than is not None and not cache:
        raise click.UsageError("--older-than goes with --cache")
    age = parse_duration(older_than) if older_than is not None else None
    removed = clean_all()
    for item in removed:
        _say(f"removed {item}")
    _say(f"clean: {len(removed)} leftover(s) removed")
    if cache:
        pruned = prune_cache(cache_dir(), age)
        for item in pruned:
            _say(f"removed {item}")
        _say(f"clean: {len(pruned)} cache entr{'y' if len(pruned) == 1 else 'ies'} removed from {cache_dir()}")


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the findings as one JSON object (for scripts).")
@handle_errors
def doctor(as_json: bool, debug: bool = False) -> None:
    """Check this host and print what confinement each backend gives here."""
    from .doctor import findings, report

    if as_json:
        import json

        data = findings()
        click.echo(json.dumps(data, indent=2, default=str))
        sys.exit(0 if data["ok"] else 1)
    text, ok = report()
    click.echo(text)
    sys.exit(0 if ok else 1)


@main.group()
def framework() -> None:
    """Build framework archives for a mirror (`run -m URL`)."""


@framework.command("build")
@click.argument("spec", metavar="NAME@VERSION")
@click.option("--cuda", is_flag=True, help="Build the CUDA variant.")
@click.option("-o", "--output", "out_dir", type=click.Path(path_type=Path), required=True,
              help="Mirror directory; the archive goes to DIR/pyXY/ and DIR/pyXY/index.json lists it.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
@handle_errors
def framework_build(spec: str, cuda: bool, out_dir: Path, debug: bool) -> None:
    """Build NAME@VERSION with pip and pack it as a mirror archive."""
    from . import frameworks, mirror

    fw = frameworks.resolve(spec, cuda=cuda, log=_say)
    if fw is None:
        raise UsageError("framework build: an empty NAME@VERSION names no framework (e.g. tensorflow@2.21)")
    archive = mirror.pack(fw.dir, out_dir, fw.name, fw.version, cuda)
    _say(f"wrote {archive} (listed in {archive.parent / 'index.json'}); serve {out_dir} and run with -m URL")


@main.group()
def images() -> None:
    """Build the Docker images of the docker backend (docs/docker.md)."""


@images.command("build")
@click.option("--cuda", is_flag=True, help="The CUDA image, for --gpu.")
@click.option("--offline", is_flag=True,
              help="No registry: debootstrap Debian bookworm from a Debian mirror, then docker import.")
@click.option("--force", is_flag=True, help="Rebuild even if the image for this runner exists.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
@handle_errors
def images_build(cuda: bool, offline: bool, force: bool, debug: bool) -> None:
    """Build the worker image this runner's docker backend uses (tagged with its protocol and pins)."""
    from .images import build

    tag = build(cuda=cuda, offline=offline, force=force, log=_say)
    click.secho(inert(f"done: {tag}"), err=True, fg="green")


def entry() -> None:
    """The `pipcook-sandbox` command (and `python -m pipcook_sandbox`): `main`, then an exit without the
    interpreter's own teardown of the runner's modules (zmq, click, the display: tens of milliseconds
    at the end of every run, measured, that a caller waiting for the command sees). By then the command
    has closed everything it made (its Run, the workspace, the verdict); `leave` still shuts the threads
    down as the interpreter would (waiting for those that are not daemons), runs the atexit handlers and
    flushes every open file, and keeps the normal exit for an interrupted command (130)."""
    from pipcook_sandbox.sandbox.fastexit import leave

    try:
        main()  # click: always ends in SystemExit (standalone mode)
        code: Any = 0
    except SystemExit as exc:
        code = exc.code
    if code is None or isinstance(code, int):
        sys.exit(leave(code or 0))
    sys.exit(code)  # a message: printed by the interpreter, status 1


def _register_service() -> None:
    from .service.cli import register

    register(main, handle_errors)


_register_service()


if __name__ == "__main__":  # pragma: no cover
    main()
