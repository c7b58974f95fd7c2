"""Pre-flight checks: every mistake a pipeline file can hold is reported before any stage starts.

A typo must cost a second, not a training run: unknown keys (top level,
`options`, an artifact entry's options) are errors that name the key and,
where one is close, the key that was probably meant; `type` is checked
against the known task types; every artifact processor must be installed
and is asked which options it reads (its module's `OPTIONS`).
"""
from __future__ import annotations

import difflib
import inspect
from collections.abc import Iterable
from typing import Any

from . import processors
from .errors import SpecError

# Pipcook's task types (CONTRACT section 1 names the first five); predict/serve key on them.
TASK_TYPES = (
    "ImageClassification",
    "ObjectDetection",
    "TextClassification",
    "TabularClassification",
    "TabularRegression",
    "ImageSegmentation",
    "TextGeneration",
    "General",  # anything else: the demo page shows results as JSON (bench/pipelines use it)
)
# What the runner reads from `options`; the whole object still goes to the framework's initialize.
OPTION_KEYS = ("framework", "train")  # the runner reads these; the rest is the framework's


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """' (did you mean 'x'?)' for the closest of `choices`, or '' when none is close."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    if not close:
        # case slips ("imageclassification") are below difflib's ratio for short words
        close = [c for c in choices if c.lower() == word.lower()][:1]
    return f" (did you mean '{close[0]}'?)" if close else ""


def _unknown(key: str, known: Iterable[str], where: str = "") -> str:
    known = list(known)
    return f"unknown key '{where}{key}'{did_you_mean(key, known)}; allowed: {', '.join(known)}"


def _named(err: SpecError, field: str) -> SpecError:
    """The error with `field` set for callers, but not repeated in its text (which names it already)."""
    err.field = field
    return err


def check_raw(raw: Any, source: str | None, top_level_keys: Iterable[str]) -> None:
    """Check the keys and the task type of a decoded pipeline, before its schema is applied.

    Runs before the schema so that `datasorce` is reported as the typo it is,
    not as "datasource is required"."""
    if not isinstance(raw, dict):
        return  # the schema says what is wrong with it
    known = list(top_level_keys)
    for key in raw:
        if key not in known:
            raise _named(SpecError(_unknown(str(key), known), source=source), str(key))
    kind = raw.get("type")
    if isinstance(kind, str) and kind not in TASK_TYPES:
        raise SpecError(f"unknown task type {kind!r}{did_you_mean(kind, TASK_TYPES)}; known types: "
                        f"{', '.join(TASK_TYPES)}", field="type", source=source)
    options = raw.get("options")
    if isinstance(options, dict):
        for key in options:
            # Other keys are the framework's (the whole object goes to its initialize), so only a
            # near miss of a key the runner reads is an error: `trian` is a typo, `seed` is not.
            if key not in OPTION_KEYS and did_you_mean(str(key), OPTION_KEYS):
                raise _named(SpecError(_unknown(str(key), OPTION_KEYS, "options."), source=source), f"options.{key}")


def check_artifacts(entries: list[dict], source: str | None = None) -> None:
    """Every artifact processor installed, loadable, and given only the options it declares."""
    if not entries:
        return
    available = processors.installed()
    for i, entry in enumerate(entries):
        where = f"artifact[{i}]"
        name = str(entry.get("processor"))
        ep = available.get(name)
        if ep is None:
            raise SpecError(f"no artifact processor {name!r} is installed on this host"
                            f"{did_you_mean(str(name), available)} (installed: {', '.join(sorted(available)) or 'none'}); "
                            "an operator installs processors, a pipeline cannot", field=where, source=source)
        try:
            process = ep.load()
        except Exception as exc:  # a broken plugin is the operator's to fix; say which
            raise SpecError(f"artifact processor {name!r} cannot be loaded: {type(exc).__name__}: {exc}",
                            field=where, source=source) from None
        declared = getattr(inspect.getmodule(process), "OPTIONS", None)
        if not isinstance(declared, dict):
            continue  # a third-party processor that declares nothing: its options go unchecked
        for key in entry:
            if key != "processor" and key not in declared:
                takes = ", ".join(declared) or "no options"
                raise SpecError(f"unknown option '{key}' for artifact processor {name!r}{did_you_mean(str(key), declared)}; "
                                f"{name} takes: {takes}", field=where, source=source)


def preflight(pipeline: Any) -> None:
    """The checks that need more than the file itself (installed processors); run before any stage."""
    check_artifacts(pipeline.artifact, pipeline.source)
