"""The pipeline file (specVersion "2.0"): parsing, validation, references.

Everything a pipeline names is resolved here, before anything is fetched or
run, so that a bad or hostile pipeline is refused up front with an error that
names the offending field.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import os
import posixpath
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, unquote, unquote_plus, urljoin, urlsplit, urlunsplit

from pipcook_sandbox.runner import jsonvalue, localfiles, validate
from pipcook_sandbox.runner.errors import SpecError

if TYPE_CHECKING:
    import jsonschema
    from jsonschema import Draft202012Validator

SCHEMA_RESOURCE = "pipeline-2.0.schema.json"
REMOTE_SCHEMES = ("http", "https")
FRAMEWORK_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+@[A-Za-z0-9_.+-]+$")
_BARE_NAME_RE = re.compile(r"^[A-Za-z0-9_-]+$")
_SHA256_RE = re.compile(r"^[0-9a-fA-F]{64}$")
_JSON_TYPES = {
    dict: "an object",
    list: "an array",
    str: "a string",
    bool: "a boolean",
    int: "a number",
    float: "a number",
    type(None): "null",
}
_SCHEMA_TYPES = {
    "object": "an object",
    "array": "an array",
    "string": "a string",
    "boolean": "a boolean",
    "number": "a number",
    "integer": "an integer",
    "null": "null",
}


@dataclass(frozen=True)
class ScriptRef:
    """One script (or framework archive) named by a pipeline.

    ``uri`` is absolute: an http(s) URL or a file:// URL, without the query
    (which became ``options``) and without the fragment (which became
    ``sha256``). For a framework archive the query is kept in ``uri``, since
    there it is part of the address (e.g. a signed URL), and ``options`` is
    empty.
    """

    uri: str
    options: dict
    sha256: str | None
    name: str
    raw: str
    # The resolved directories a local (file:) reference may be read from:
    # the pipeline's own directory and the operator's --allow-path dirs.
    roots: tuple[str, ...] = ()

    @property
    def is_local(self) -> bool:
        return self.uri.startswith("file:")


@dataclass(frozen=True)
class Pipeline:
    """A validated pipeline with every reference resolved.

    ``options`` is a copy of the file's options in which a framework URL or
    path has been made absolute (a relative path means nothing once the
    pipeline is copied into a workspace); ``raw`` is the file as written.
    """

    source: str
    base: str
    is_remote: bool
    type: str | None
    datasource: ScriptRef
    dataflow: list[ScriptRef]
    model: ScriptRef
    artifact: list[dict]
    options: dict
    raw: dict
    framework_ref: ScriptRef | None = field(default=None)

    @property
    def train_options(self) -> dict:
        return self.options.get("train", {})

    @property
    def framework(self) -> str | None:
        return self.options.get("framework")


@lru_cache(maxsize=1)
def load_schema() -> dict:
    """The JSON Schema of the pipeline file (shipped as package data)."""
    text = (resources.files("pipcook_sandbox.runner") / "schema" / SCHEMA_RESOURCE).read_text("utf-8")
    return json.loads(text)


def pipeline_types() -> list[str]:
    """The values `type` may take (the schema's enum; docs/pipeline.md "Task types" documents each)."""
    return list(load_schema()["properties"]["type"]["enum"])


@lru_cache(maxsize=1)
def _validator() -> Draft202012Validator:
    from jsonschema import Draft202012Validator  # ~0.1 s to import: only for a pipeline that fails _conforms

    return Draft202012Validator(load_schema())


@lru_cache(maxsize=1)
def _compiled() -> Callable[[Any], Any]:
    import fastjsonschema

    # A copy: fastjsonschema rewrites every "$ref" of the schema it is given into an absolute URI,
    # and load_schema's dict is the one every caller shares (lru_cache).
    return fastjsonschema.compile(copy.deepcopy(load_schema()))


def _conforms(raw: Any) -> bool:
    """Whether `raw` passes the schema, by fastjsonschema's compiled check
    (~0.02 s to import and compile against jsonschema's ~0.1 s to import). A
    pipeline it refuses is checked again by jsonschema, whose errors the
    messages are made from; jsonschema stays the reference
    (tests/test_spec.py holds the two to the same verdicts)."""
    import fastjsonschema

    try:
        _compiled()(raw)
    except fastjsonschema.JsonSchemaException:
        return False
    return True


def _url2pathname(path: str) -> str:
    """urllib.request.url2pathname on POSIX (importing urllib.request costs
    ~0.03 s: http.client, email)."""
    return unquote(path)


def uri_to_path(uri: str) -> Path:
    """The local path of a file:// URI produced by this module."""
    parts = urlsplit(uri)
    if parts.scheme != "file":
        raise ValueError(f"not a file: URI: {uri}")
    return Path(_url2pathname(parts.path))


# ---------------------------------------------------------------- validation


def _field_path(parts: Any) -> str:
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def _json_type(value: Any) -> str:
    return _JSON_TYPES.get(type(value), type(value).__name__)


def _schema_error(err: jsonschema.ValidationError, source: str) -> SpecError:
    path = list(err.absolute_path)
    where = _field_path(path)
    kind = err.validator
    if kind == "required":
        missing = [k for k in err.validator_value if k not in err.instance]
        name = _field_path(path + [missing[0] if missing else "?"])
        return SpecError("is required but missing", field=name, source=source)
    if kind == "additionalProperties":
        known = list(err.schema.get("properties", {}))
        extra = [k for k in err.instance if k not in known]
        name = _field_path(path + [extra[0] if extra else "?"])
        return SpecError(
            f"unknown field (allowed: {', '.join(known)})", field=name, source=source
        )
    if kind == "const":
        return SpecError(
            f"must be {json.dumps(err.validator_value)}, got {json.dumps(err.instance)}",
            field=where or None,
            source=source,
        )
    if kind == "type":
        wanted = err.validator_value if isinstance(err.validator_value, list) else [err.validator_value]
        names = " or ".join(_SCHEMA_TYPES.get(str(w), str(w)) for w in wanted)
        cause = f"must be {names}, got {_json_type(err.instance)}"
        if not where:
            return SpecError(f"the pipeline {cause}", source=source)
        return SpecError(cause, field=where, source=source)
    if kind == "enum":
        shown = json.dumps(err.instance)
        shown = shown if len(shown) <= 80 else shown[:77] + "..."
        close = difflib.get_close_matches(str(err.instance), [str(v) for v in err.validator_value], n=1)
        hint = f" (did you mean {json.dumps(close[0])}?)" if close else ""
        return SpecError(f"must be one of {', '.join(map(str, err.validator_value))}; got {shown}{hint}",
                         field=where or None, source=source)
    if kind == "minLength":
        return SpecError("must not be empty", field=where or None, source=source)
    return SpecError(err.message, field=where or None, source=source)


# ---------------------------------------------------------------- references


def _parse_query(query: str) -> dict:
    """Script options from a query string, per the contract.

    parse_qsl reports both ``a`` and ``a=`` as "", but the contract gives
    ``a`` null and ``a=`` "", so bare keys are found by hand first.
    """
    options: dict[str, Any] = {}
    for piece in query.split("&"):
        if not piece:
            continue
        if "=" in piece:
            pairs = parse_qsl(piece, keep_blank_values=True)
            if not pairs:
                continue
            key, value = pairs[0]
        else:
            key, value = unquote_plus(piece), None
        if key in options:
            prev = options[key]
            options[key] = prev + [value] if isinstance(prev, list) else [prev, value]
        else:
            options[key] = value
    return options


def _parse_pin(fragment: str, field_name: str, source: str) -> str | None:
    if not fragment:
        return None
    key, sep, value = fragment.partition("=")
    if key != "sha256" or not sep:
        raise SpecError(
            f"unsupported fragment '#{fragment}' (only '#sha256=HEX' is allowed)",
            field=field_name, source=source,
        )
    if not _SHA256_RE.match(value):
        raise SpecError(
            "the sha256 pin must be 64 hexadecimal characters", field=field_name, source=source
        )
    return value.lower()


def _resolve_address(raw: str, field_name: str, base: str, is_remote: bool, source: str) -> str:
    """Absolute address of ``raw`` (query and fragment not included)."""
    parts = urlsplit(raw)
    scheme = parts.scheme.lower()
    bare = urlunsplit(("", parts.netloc, parts.path, "", ""))

    if scheme in REMOTE_SCHEMES:
        if not parts.hostname:
            raise SpecError(f"the URL {raw!r} names no host", field=field_name, source=source)
        address = urlunsplit((scheme, parts.netloc, parts.path, "", ""))
    elif scheme == "file":
        if is_remote:
            raise SpecError(
                "a remote pipeline may not name local files", field=field_name, source=source
            )
        if parts.netloc not in ("", "localhost") or not parts.path.startswith("/"):
            raise SpecError(
                f"the file: URL {raw!r} must hold an absolute path "
                "(write a plain relative path instead)",
                field=field_name, source=source,
            )
        address = Path(os.path.normpath(_url2pathname(parts.path))).as_uri()
    elif scheme:
        raise SpecError(
            f"scheme '{scheme}:' is not allowed (use https:, http:, file: or a path)",
            field=field_name, source=source,
        )
    elif not parts.path and not parts.netloc:
        # "?x=1" alone would otherwise resolve to the pipeline file itself.
        raise SpecError(f"{raw!r} names no script", field=field_name, source=source)
    elif is_remote:
        # A relative reference in a remote pipeline means a URL next to it;
        # an absolute path would be read as a host file by any reader, so it
        # is refused rather than quietly reinterpreted.
        if parts.path.startswith("/") and not parts.netloc:
            raise SpecError(
                "a remote pipeline may not name local files "
                "(use a relative path or a full http(s) URL)",
                field=field_name, source=source,
            )
        joined = urlsplit(urljoin(base, bare))
        address = urlunsplit((joined.scheme, joined.netloc, joined.path, "", ""))
    else:
        if parts.netloc:
            raise SpecError(
                f"{raw!r} is neither a URL nor a path", field=field_name, source=source
            )
        # A path is a path: no percent-decoding, so file names keep their '%'.
        base_dir = uri_to_path(base)
        path = Path(os.path.expanduser(parts.path))
        address = Path(os.path.normpath(base_dir / path)).as_uri()

    name = posixpath.basename(unquote(urlsplit(address).path))
    if not name:
        raise SpecError(f"{raw!r} does not name a file", field=field_name, source=source)
    return address


def _confine(address: str, raw: str, field_name: str, roots: tuple[str, ...] | None, source: str) -> None:
    """A local reference must be a regular file under `roots` (runner.localfiles); None: the
    caller applies a rule of its own."""
    if roots is None or not address.startswith("file:"):
        return
    try:
        localfiles.check(uri_to_path(address), roots)
    except localfiles.Refused as exc:
        raise SpecError(f"{raw!r} is refused: {exc}; {localfiles.RULE}", field=field_name, source=source) from None


def resolve_ref(raw: str, field_name: str, base: str, is_remote: bool, source: str,
                roots: tuple[str, ...] | None = ()) -> ScriptRef:
    """Resolve one script URI from the pipeline into a :class:`ScriptRef`.

    A local file must lie under one of `roots` (resolved directories)."""
    address = _resolve_address(raw, field_name, base, is_remote, source)
    _confine(address, raw, field_name, roots, source)
    parts = urlsplit(raw)
    return ScriptRef(
        uri=address,
        options=_parse_query(parts.query),
        sha256=_parse_pin(parts.fragment, field_name, source),
        name=posixpath.basename(unquote(urlsplit(address).path)),
        raw=raw,
        roots=(roots or ()) if address.startswith("file:") else (),
    )


def _resolve_framework(raw: str, base: str, is_remote: bool, source: str,
                       roots: tuple[str, ...] = ()) -> ScriptRef | None:
    if FRAMEWORK_NAME_RE.match(raw):
        return None
    field_name = "options.framework"
    if "@" in raw and "/" not in raw and ":" not in raw:
        raise SpecError(
            f"{raw!r} is not a framework name of the form NAME@VERSION", field=field_name, source=source
        )
    if _BARE_NAME_RE.match(raw):
        # A plain word is a framework name missing its version, not a file.
        raise SpecError(
            f"{raw!r} needs a version, e.g. '{raw}@VERSION' (or give a URL or path of an archive)",
            field=field_name, source=source,
        )
    parts = urlsplit(raw)
    if not parts.scheme and not parts.path:
        raise SpecError(
            f"{raw!r} is neither NAME@VERSION nor a URL or path", field=field_name, source=source
        )
    address = _resolve_address(raw, field_name, base, is_remote, source)
    _confine(address, raw, field_name, roots, source)
    local = address.startswith("file:")
    if parts.query:
        address = f"{address}?{parts.query}"
    return ScriptRef(
        uri=address,
        options={},
        sha256=_parse_pin(parts.fragment, field_name, source),
        name=posixpath.basename(unquote(urlsplit(address).path)),
        raw=raw,
        roots=roots if local else (),
    )


# ---------------------------------------------------------------- loading


def _source_base(source: str) -> tuple[str, str, bool]:
    """(source, base, is_remote) for a pipeline path or URL."""
    parts = urlsplit(source)
    scheme = parts.scheme.lower()
    if scheme in REMOTE_SCHEMES:
        return source, source, True
    if scheme == "file":
        path = Path(_url2pathname(parts.path))
    elif "://" in source:
        raise SpecError(
            f"a pipeline can be loaded from a path or an http(s) URL, not {source!r}",
            source=None,
        )
    else:
        path = Path(source)
    path = Path(os.path.abspath(os.path.expanduser(path)))
    return str(path), path.parent.as_uri() + "/", False


def _decode(data: bytes | str | dict, source: str) -> Any:
    if not isinstance(data, (bytes, str)):
        # Already parsed; the schema check will judge its shape, once it is known to be
        # shallow enough for a recursive walk (jsonschema's, deepcopy's).
        if jsonvalue.depth(data) > jsonvalue.MAX_DEPTH:
            raise SpecError(f"nested deeper than {jsonvalue.MAX_DEPTH} levels", source=source)
        return copy.deepcopy(data)
    if isinstance(data, bytes):
        try:
            data = data.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise SpecError(f"not UTF-8 text (byte {exc.start})", source=source) from None
    try:
        return jsonvalue.loads(data)
    except json.JSONDecodeError as exc:
        raise SpecError(
            f"not valid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}", source=source
        ) from None
    except jsonvalue.Unfit as exc:
        raise SpecError(f"not valid JSON: {exc}", source=source) from None


def parse_pipeline(data: bytes | str | dict, source: str, allow_paths: tuple[str, ...] = (),
                   *, confine: bool = True) -> Pipeline:
    """Validate a pipeline and resolve everything it names.

    ``source`` is where it came from (a path or an http(s) URL); relative
    references resolve against it, and an http(s) source may name only
    http(s) scripts and frameworks. A local source may name only regular
    files under its own directory or one of ``allow_paths`` (the operator's
    --allow-path). ``confine=False`` leaves that check to the caller (a
    model's own rule, in runner.predict); the references still carry their
    roots, so reading them is confined regardless.
    """
    source, base, is_remote = _source_base(source)
    roots = () if is_remote else localfiles.roots_of(os.path.dirname(source), *allow_paths)
    raw = _decode(data, source)
    # typos first, with a suggestion: "datasorce" is not reported as "datasource is required"
    validate.check_raw(raw, source, load_schema()["properties"])
    if not _conforms(raw):
        from jsonschema.exceptions import best_match

        error = best_match(_validator().iter_errors(raw))
        if error is not None:
            raise _schema_error(error, source)

    def ref(value: str, name: str) -> ScriptRef:
        found = resolve_ref(value, name, base, is_remote, source, roots if confine else None)
        return dataclasses.replace(found, roots=roots) if found.is_local else found

    options = copy.deepcopy(raw.get("options") or {})
    framework_ref = None
    if isinstance(options.get("framework"), str):
        framework_ref = _resolve_framework(options["framework"], base, is_remote, source, roots)
        if framework_ref is not None:
            pin = f"#sha256={framework_ref.sha256}" if framework_ref.sha256 else ""
            options["framework"] = framework_ref.uri + pin

    return Pipeline(
        source=source,
        base=base,
        is_remote=is_remote,
        type=raw.get("type"),
        datasource=ref(raw["datasource"], "datasource"),
        dataflow=[ref(v, f"dataflow[{i}]") for i, v in enumerate(raw.get("dataflow") or [])],
        model=ref(raw["model"], "model"),
        artifact=copy.deepcopy(raw.get("artifact") or []),
        options=options,
        raw=raw,
        framework_ref=framework_ref,
    )


def load_pipeline(location: str, *, fetch_bytes: Callable[[str], bytes],
                  allow_paths: tuple[str, ...] = ()) -> Pipeline:
    """Load a pipeline from a path or an http(s) URL (``allow_paths``: see parse_pipeline).

    ``fetch_bytes`` does the download for a URL; it is passed in so that this
    module never touches the network itself (and tests need no server).
    """
    scheme = urlsplit(location).scheme.lower()
    if scheme in REMOTE_SCHEMES:
        return parse_pipeline(fetch_bytes(location), location)
    source, _base, _remote = _source_base(location)
    path = Path(source)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise SpecError(f"pipeline file not found: {path}", source=None) from None
    except IsADirectoryError:
        raise SpecError(f"pipeline path is a directory, not a file: {path}", source=None) from None
    except OSError as exc:
        raise SpecError(f"cannot read pipeline file {path}: {exc.strerror}", source=None) from None
    return parse_pipeline(data, source, allow_paths)


def pipeline_to_json(p: Pipeline) -> dict:
    """The pipeline as written (a copy), e.g. to store in a workspace."""
    return copy.deepcopy(p.raw)
