"""Every exception class of the host side: the errors the runner reports to the user, and the few
internal ones that are always caught and turned into one of them.

Every failure the user should see is a `PipcookError`. The CLI prints ``str(err)``
as a single paragraph (no traceback unless --debug), so the message must name
the stage, the script and the cause in plain words.

This module is the bottom layer: it imports nothing from the package, so the
backends (runner/backends/) use it without importing upwards. The code that
runs inside a stage (sandbox/) cannot import host code and keeps its own
small set of exceptions in sandbox/errors.py.
"""

from __future__ import annotations

import errno


class PipcookError(Exception):
    """Base of every error the runner reports; renders as one paragraph."""

    def __init__(self, cause: str, *, stage: str | None = None, script: str | None = None) -> None:
        super().__init__(cause)
        self.cause = cause
        self.stage = stage
        self.script = script

    def __str__(self) -> str:
        where = ""
        if self.stage and self.script:
            where = f"stage '{self.stage}' ({self.script})"
        elif self.stage:
            where = f"stage '{self.stage}'"
        elif self.script:
            where = self.script
        return f"{where}: {self.cause}" if where else self.cause


class SpecError(PipcookError):
    """The pipeline file is malformed or breaks a rule of the contract."""

    def __init__(
        self,
        cause: str,
        *,
        field: str | None = None,
        source: str | None = "pipeline.json",
        stage: str | None = None,
        script: str | None = None,
    ) -> None:
        # The field goes into the cause itself so that str() names it even
        # when a caller later attaches a stage or script.
        self.field = field
        self.source = source
        where = f"{source}: " if source else ""
        if field:
            where += f"field '{field}': "
        super().__init__(where + cause, stage=stage, script=script)


class FetchError(PipcookError):
    """A script, framework or download could not be fetched."""


class FrameworkError(PipcookError):
    """A framework (options.framework) is unknown, unsupported here, or failed to build or fetch."""


class PolicyError(FetchError):
    """The network policy refused an address or scheme."""


class IntegrityError(FetchError):
    """A download's sha256 digest differs from the pin in the pipeline."""


class StageError(PipcookError):
    """A stage failed; `traceback` holds the script's traceback for --debug."""

    def __init__(self, cause: str, stage: str | None = None, script: str | None = None, traceback: str = "") -> None:
        super().__init__(cause, stage=stage, script=script)
        self.traceback = traceback


class Interrupted(PipcookError):
    """The run was stopped by Ctrl-C or SIGTERM; every stage was stopped."""


class UsageError(PipcookError):
    """A bad command-line value that is only found out after parsing (e.g. `--set dataflow.3.x` for a
    pipeline with one dataflow): reported like click's usage errors, with exit status 2."""


# What the host's filesystems and limits can refuse, whatever the code that asked: not a bug of ours,
# so the user is told which file and why, not "internal error".
_HOST_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EMFILE, errno.ENFILE, errno.EIO})


def host_refusal(exc: BaseException) -> PipcookError | None:
    """The one-paragraph error for an OSError the host caused (a full disk, a read-only or unreadable
    path, too many open files), or None for anything else."""
    if not isinstance(exc, OSError) or exc.errno not in _HOST_ERRNOS:
        return None
    where = ""
    if exc.filename:
        where = f" on {exc.filename}" + (f" -> {exc.filename2}" if exc.filename2 else "")
    return PipcookError(f"the host refused a file operation{where or ' of the runner'}: {exc.strerror or exc}; "
                        "free space on that filesystem or fix its permissions, then run again")


# --- what a command meets ------------------------------------------------------


class BackendUnavailable(PipcookError):
    """The chosen --isolation cannot confine scripts on this host (bwrap missing, no Docker engine)."""


class UnknownBackend(PipcookError):
    """--isolation names no registered backend."""


class DockerError(PipcookError):
    """Docker cannot run a stage here (no engine, no image, no GPU runtime)."""


class ImageError(PipcookError):
    """The Docker worker image could not be built or checked."""


class ModelError(PipcookError):
    """The model (workspace, dir or zip) cannot be used for prediction."""


class ArtifactError(PipcookError):
    """An artifact processor (options.artifacts) is unknown, misconfigured or failed."""


# --- serve -----------------------------------------------------------------------


class WorkerError(PipcookError):
    """The worker failed: it could not start, died, or broke the protocol (5xx)."""


class WorkerUnavailable(WorkerError):
    """The worker could not be (re)started for this request (503)."""


class RequestFailed(PipcookError):
    """The pipeline's scripts raised an error on these inputs; the worker is still up (422)."""


class RequestTimeout(PipcookError):
    """The request ran past --request-timeout; the worker was stopped (504)."""


# --- the service ---------------------------------------------------------------


class EngineError(PipcookError):
    """An engine could not submit, watch or stop a run (one paragraph, says why)."""


class TenantError(PipcookError):
    """The tenants file is malformed, or names a tenant or uid that cannot be used."""


class Rejected(PipcookError):
    """A submission refused; `status` is the HTTP status that says why (422 invalid, 429 over quota)."""

    def __init__(self, status: int, cause: str) -> None:
        super().__init__(cause)
        self.status = status


class ClientError(PipcookError):
    """The server refused or could not be reached; `status` is the HTTP status (0: no answer)."""

    def __init__(self, cause: str, status: int = 0) -> None:
        super().__init__(cause)
        self.status = status


# --- internal: always caught and reported as one of the above ---------------------


class Refused(Exception):
    """A local path may not be used; the message says why (without the rule). Callers report it as a
    SpecError, FetchError or ModelError naming what they were reading."""


class Unfit(ValueError):
    """The value cannot be plain JSON; the message names where (e.g. `data[0].score`). A ValueError, so
    callers that read JSON catch it with the rest of their bad-value errors."""


class BadRequest(Exception):
    """serve: an HTTP request that cannot be answered; `status` is the HTTP status, the message the body."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
