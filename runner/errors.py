"""Errors the runner reports to the user.

Every failure the user should see is one of these. The CLI prints ``str(err)``
as a single paragraph (no traceback unless --debug), so the message must name
the stage, the script and the cause in plain words.
"""

from __future__ import annotations


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


class PolicyError(FetchError):
    """The network policy refused an address or scheme."""


class IntegrityError(FetchError):
    """A download's sha256 digest differs from the pin in the pipeline."""


class UsageError(PipcookError):
    """A bad command-line value that is only found out after parsing (e.g. `--set dataflow.3.x` for a
    pipeline with one dataflow): reported like click's usage errors, with exit status 2."""
