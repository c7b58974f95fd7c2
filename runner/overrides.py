"""`run --set KEY=VALUE`: change a pipeline's options from the command line, for a quick rerun.

    train.epochs=3          options.train.epochs (a JSON value: 3 is a number, true a boolean)
    datasource.count=100    the datasource script's query option count (a string, as every query value)
    model.x=..  dataflow.0.size=..   the model's, the first dataflow's

The changed pipeline is what the workspace's pipeline.json records, so a run
says how it was made.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import re
from typing import Any
from urllib.parse import quote_plus, urlencode, urlsplit, urlunsplit

from .errors import UsageError
from .spec import Pipeline, ScriptRef

_KEY_RE = re.compile(r"^(train|datasource|model|dataflow\.(\d+))\.([^=]+)$")


@dataclasses.dataclass(frozen=True)
class Override:
    target: str  # "train", "datasource", "model", "dataflow"
    index: int | None  # for dataflow
    key: str
    value: str

    def __str__(self) -> str:
        where = f"dataflow.{self.index}" if self.target == "dataflow" else self.target
        return f"{where}.{self.key}={self.value}"


def parse(item: str) -> Override:
    """One `KEY=VALUE`; ValueError (a usage error) names what is wrong."""
    key, sep, value = item.partition("=")
    m = _KEY_RE.match(key.strip()) if sep else None
    if not m:
        raise ValueError(f"{item!r} is not KEY=VALUE with KEY one of train.NAME, datasource.NAME, model.NAME, "
                         "dataflow.N.NAME")
    target = "dataflow" if m.group(2) is not None else m.group(1)
    return Override(target, int(m.group(2)) if m.group(2) is not None else None, m.group(3), value)


def _train_value(text: str) -> Any:
    """A JSON value where the text is one (3, 0.5, true, [1,2]); the text itself otherwise."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def _with_query(raw_uri: str, options: dict) -> str:
    """raw_uri with its query rebuilt from `options` (CONTRACT: a bare key is null, a list repeats)."""
    parts = urlsplit(raw_uri)
    pieces = []
    for key, value in options.items():
        for one in value if isinstance(value, list) else [value]:
            pieces.append(quote_plus(key) if one is None else urlencode([(key, one)]))
    return urlunsplit((parts.scheme, parts.netloc, parts.path, "&".join(pieces), parts.fragment))


def apply(pipeline: Pipeline, overrides: list[Override]) -> Pipeline:
    """The pipeline with every override applied to its options and to its raw form (recorded)."""
    if not overrides:
        return pipeline
    raw = copy.deepcopy(pipeline.raw)
    options = copy.deepcopy(pipeline.options)
    refs: dict[str, Any] = {"datasource": pipeline.datasource, "model": pipeline.model}
    dataflow = list(pipeline.dataflow)
    for o in overrides:
        if o.target == "train":
            value = _train_value(o.value)
            options.setdefault("train", {})[o.key] = value
            raw.setdefault("options", {}).setdefault("train", {})[o.key] = value
            continue
        if o.target == "dataflow":
            if o.index is None or o.index >= len(dataflow):
                raise UsageError(f"--set {o}: the pipeline has {len(dataflow)} dataflow script(s), "
                                 f"numbered from 0")
            index = o.index
            ref: ScriptRef = dataflow[index]
        else:
            ref = refs[o.target]
        new_options = dict(ref.options)
        new_options[o.key] = o.value
        new_raw = _with_query(ref.raw, new_options)
        ref = dataclasses.replace(ref, options=new_options, raw=new_raw)
        if o.target == "dataflow":
            dataflow[index] = ref
            raw["dataflow"][index] = new_raw
        else:
            refs[o.target] = ref
            raw[o.target] = new_raw
    return dataclasses.replace(pipeline, raw=raw, options=options, datasource=refs["datasource"],
                               model=refs["model"], dataflow=dataflow)
