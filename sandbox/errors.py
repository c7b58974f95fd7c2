"""Every exception class of the code that runs inside a stage.

The in-stage package (sandbox/) is the only code mounted into a sandbox and
imports nothing host-side, so it cannot use the runner's error module
(runner/errors.py); these few are its own. The modules that raise them
re-export them, so scripts keep importing, e.g., `sandbox.context.DownloadError`.
"""
from __future__ import annotations


class ProtocolError(Exception):
    """A message that breaks the wire format or the caps (hostile or broken peer)."""


class BoundaryTypeError(TypeError):
    """A value that may not cross a boundary (docs/scripts.md)."""

    def __init__(self, type_name: str, where: str) -> None:
        self.type_name = type_name
        self.where = where
        super().__init__(
            f"{where} is of type {type_name}, which cannot cross a sandbox boundary; samples may hold only "
            "None, bool, int, float, str, bytes, lists, dicts and numpy arrays"
        )


class ConfigError(ValueError):
    """stage.json is not a configuration this worker understands."""


class StageFailure(Exception):
    """An error to report in plain words; `kind` tells the runner whose fault it is."""

    def __init__(self, message: str, kind: str = "script", tb: str = "") -> None:
        super().__init__(message)
        self.kind = kind
        self.tb = tb


class UpstreamError(RuntimeError):
    """The stage before this one failed while producing samples."""


class SampleError(Exception):
    """The pool this stage serves produced something that cannot cross."""


class DownloadError(RuntimeError):
    """The runner refused or failed to fetch a URL for the script."""


class ExtractError(ValueError):
    """An archive entry that may not be unpacked (absolute, `..`, a link, too large, too many)."""
