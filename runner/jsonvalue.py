"""Values from a stage or a file made plain JSON, or refused with the place that is wrong.

Hostile values used to crash the runner: nesting a thousand levels deep is
a RecursionError in any recursive walk (ours, `json`, `jsonschema`), NaN and
Infinity make `json.dumps` write text no JSON parser accepts, and `bytes`
makes it raise. Everything the runner stores or prints that came from a
stage, a pipeline file or a model passes through here first. The walk
itself never goes deeper than `MAX_DEPTH`.
"""
from __future__ import annotations

import json
import math
import sys
from typing import Any

from .errors import Unfit

# Deeper than any honest meta, result or pipeline; far below Python's recursion limit.
MAX_DEPTH = 64


def _where(path: str) -> str:
    return path or "the value"


def plain(value: Any, *, what: str = "", lenient: bool = False, max_depth: int = MAX_DEPTH) -> Any:
    """`value` as plain JSON types (numpy arrays and scalars become lists and numbers).

    Refused (Unfit): nesting deeper than `max_depth`, objects of other types,
    keys that are neither strings nor numbers, and NaN, Infinity and bytes
    unless `lenient` (then those become null)."""
    # Not imported here: if numpy is not loaded, no value can be an array (the runner need not load it).
    np = sys.modules.get("numpy")

    def walk(v: Any, path: str, depth: int) -> Any:
        if depth > max_depth:
            raise Unfit(f"{_where(path)} is nested deeper than {max_depth} levels")
        if np is not None and isinstance(v, np.ndarray):
            if v.dtype.kind not in "biuf":
                raise Unfit(f"{_where(path)} is an array of {v.dtype}, which JSON cannot hold")
            if v.ndim + depth > max_depth:
                raise Unfit(f"{_where(path)} is nested deeper than {max_depth} levels")
            v = v.tolist()
        elif np is not None and isinstance(v, np.generic):
            v = v.item()
        if v is None or isinstance(v, (bool, str)):
            return v
        if isinstance(v, int):
            return v
        if isinstance(v, float):
            if math.isfinite(v):
                return v
            if lenient:
                return None
            raise Unfit(f"{_where(path)} is {v!r}, which JSON cannot hold")
        if isinstance(v, (list, tuple)):
            return [walk(x, f"{path}[{i}]", depth + 1) for i, x in enumerate(v)]
        if isinstance(v, dict):
            out = {}
            for k, x in v.items():
                if isinstance(k, bool) or not isinstance(k, (str, int, float)):
                    raise Unfit(f"{_where(path)} has a key of type {type(k).__name__}, which JSON cannot hold")
                key = str(k)
                out[key] = walk(x, f"{path}.{key}" if path else key, depth + 1)
            return out
        if isinstance(v, (bytes, bytearray, memoryview)):
            if lenient:
                return None
            raise Unfit(f"{_where(path)} is bytes, which JSON cannot hold (decode it, or send base64 text)")
        raise Unfit(f"{_where(path)} is of type {type(v).__name__}, which JSON cannot hold")

    return walk(value, what, 0)


def depth(value: Any, limit: int = MAX_DEPTH) -> int:
    """How deep `value` nests, counted without recursion and at most to `limit + 1`."""
    deepest = 0
    stack = [(value, 0)]
    while stack:
        v, d = stack.pop()
        deepest = max(deepest, d)
        if d > limit:
            return d
        if isinstance(v, dict):
            stack.extend((x, d + 1) for x in v.values())
        elif isinstance(v, (list, tuple)):
            stack.extend((x, d + 1) for x in v)
    return deepest


def loads(text: str | bytes, limit: int = MAX_DEPTH) -> Any:
    """`json.loads` that refuses (Unfit) nesting deeper than `limit`, NaN and Infinity,
    instead of raising RecursionError or accepting what other parsers refuse."""

    def no_constant(name: str) -> Any:
        raise Unfit(f"{name} is not JSON")

    try:
        value = json.loads(text, parse_constant=no_constant)
    except RecursionError:
        raise Unfit(f"it is nested deeper than {limit} levels") from None
    if depth(value, limit) > limit:
        raise Unfit(f"it is nested deeper than {limit} levels")
    return value
