"""The pipeline file: schema, rules of docs/pipeline.md, reference resolution."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from jsonschema import Draft202012Validator

from pipcook_sandbox.runner.errors import PipcookError, SpecError
from pipcook_sandbox.runner.spec import (
    Pipeline,
    load_pipeline,
    load_schema,
    parse_pipeline,
    pipeline_to_json,
    uri_to_path,
)

PIN = "9f2c" + "0" * 60

EXAMPLE = {
    "specVersion": "2.0",
    "type": "ImageClassification",
    "datasource": "https://host/scripts/image-cls/datasource.py?url=https://host/data/flowers.zip",
    "dataflow": ["https://host/scripts/image-cls/dataflow.py?size=224&size=224"],
    "model": f"https://host/scripts/image-cls/model.py#sha256={PIN}",
    "artifact": [{"processor": "zip", "target": "/tmp/model.zip"}],
    "options": {
        "framework": "tensorflow@2.21",
        "train": {"epochs": 10, "batchSize": 32, "gpu": False},
    },
}

LOCAL = "/srv/pipelines/pipeline.json"
REMOTE = "https://mirror.example/pipelines/cls/pipeline.json"


def with_(**changes: object) -> dict:
    data = json.loads(json.dumps(EXAMPLE))
    for key, value in changes.items():
        if value is ...:
            data.pop(key)
        else:
            data[key] = value
    return data


def spec_error(data: object, source: str = LOCAL) -> SpecError:
    with pytest.raises(SpecError) as info:
        parse_pipeline(data, source)
    assert isinstance(info.value, PipcookError)
    return info.value


# ---------------------------------------------------------------- the schema


def test_schema_file_is_a_valid_draft_2020_12_schema() -> None:
    schema = load_schema()
    Draft202012Validator.check_schema(schema)
    assert schema["$id"] == "https://pipcook-sandbox.invalid/schema/pipeline-2.0.json"
    assert schema["additionalProperties"] is False
    assert set(schema["required"]) == {"specVersion", "datasource", "model"}


def test_schema_file_ships_beside_the_code() -> None:
    path = Path(__file__).parent.parent / "runner" / "schema" / "pipeline-2.0.schema.json"
    assert json.loads(path.read_text()) == load_schema()


def test_checking_a_pipeline_leaves_the_shared_schema_as_shipped() -> None:
    # The quick check compiles the schema once; that must not change what load_schema gives others.
    path = Path(__file__).parent.parent / "runner" / "schema" / "pipeline-2.0.schema.json"
    parse_pipeline(EXAMPLE, REMOTE)
    assert json.loads(path.read_text()) == load_schema()


# ---------------------------------------------------------------- valid files


def test_contract_example_parses() -> None:
    p = parse_pipeline(EXAMPLE, REMOTE)
    assert isinstance(p, Pipeline)
    assert p.is_remote and p.source == REMOTE and p.type == "ImageClassification"
    assert p.datasource.uri == "https://host/scripts/image-cls/datasource.py"
    assert p.datasource.options == {"url": "https://host/data/flowers.zip"}
    assert p.datasource.name == "datasource.py"
    assert [d.options for d in p.dataflow] == [{"size": ["224", "224"]}]
    assert p.model.uri == "https://host/scripts/image-cls/model.py"
    assert p.model.sha256 == PIN and p.model.options == {}
    assert p.model.raw == EXAMPLE["model"]
    assert p.artifact == [{"processor": "zip", "target": "/tmp/model.zip"}]
    assert p.framework == "tensorflow@2.21" and p.framework_ref is None
    assert p.train_options == {"epochs": 10, "batchSize": 32, "gpu": False}
    assert pipeline_to_json(p) == EXAMPLE


def test_from_json_text_and_bytes() -> None:
    text = json.dumps(EXAMPLE)
    assert parse_pipeline(text, LOCAL).model.sha256 == PIN
    assert parse_pipeline(text.encode(), LOCAL).model.sha256 == PIN


def test_minimal_pipeline_has_defaults() -> None:
    p = parse_pipeline({"specVersion": "2.0", "datasource": "d.py", "model": "m.py"}, LOCAL)
    assert p.type is None and p.dataflow == [] and p.artifact == [] and p.options == {}
    assert p.train_options == {} and p.framework is None


def test_dataflow_may_be_null() -> None:
    assert parse_pipeline(with_(dataflow=None), LOCAL).dataflow == []


def test_same_uri_for_several_stages() -> None:
    uri = "https://host/all.py"
    p = parse_pipeline(with_(datasource=uri + "?a=1", dataflow=[uri], model=uri), LOCAL)
    assert p.datasource.uri == p.dataflow[0].uri == p.model.uri == uri
    assert p.datasource.options == {"a": "1"}


def test_raw_is_not_shared_with_caller() -> None:
    data = with_()
    p = parse_pipeline(data, LOCAL)
    data["artifact"].append({"processor": "x"})
    assert len(p.raw["artifact"]) == 1 and len(p.artifact) == 1


# ---------------------------------------------------------------- errors


def test_bad_spec_version_is_named() -> None:
    err = spec_error(with_(specVersion="1.0"))
    assert err.field == "specVersion"
    assert "field 'specVersion'" in str(err) and '"2.0"' in str(err) and '"1.0"' in str(err)


@pytest.mark.parametrize("kind", ["ImageClassification", "ObjectDetection", "TextClassification",
                                  "TabularClassification", "TabularRegression", "ImageSegmentation",
                                  "TextGeneration", "General"])
def test_every_documented_type_is_accepted(kind: str) -> None:
    assert parse_pipeline(with_(type=kind), LOCAL).type == kind


def test_the_documented_types_are_the_schemas() -> None:
    """docs/pipeline.md's table of task types lists exactly what the schema accepts."""
    from pipcook_sandbox.runner.spec import pipeline_types

    doc = (Path(__file__).resolve().parent.parent / "docs" / "pipeline.md").read_text()
    table = doc.split("## Task types", 1)[1].split("\n## ", 1)[0]
    documented = [line.split("`")[1] for line in table.splitlines() if line.startswith("| `")][1:]  # [0]: header
    assert documented == pipeline_types()
    # the pre-flight check (runner/validate.py) and the schema's enum are one list
    from pipcook_sandbox.runner.validate import TASK_TYPES

    assert list(TASK_TYPES) == pipeline_types()


@pytest.mark.parametrize("bad, hint", [("ObjectDetector", "ObjectDetection"), ("objectdetection", "ObjectDetection"),
                                       ("Detection", None), ("", None)])
def test_an_unknown_type_is_refused_with_the_known_ones(bad: str, hint: str | None) -> None:
    err = spec_error(with_(type=bad))
    assert err.field == "type"
    assert f"unknown task type {bad!r}" in str(err) and "known types: ImageClassification, ObjectDetection," in str(err)
    if hint:
        assert f"did you mean '{hint}'" in str(err)


def test_type_must_be_a_string() -> None:
    err = spec_error(with_(type=["ObjectDetection"]))
    assert err.field == "type" and "must be a string" in str(err)


def test_unknown_top_level_key_is_named() -> None:
    err = spec_error(with_(dataflows=[]))
    assert err.field == "dataflows"
    assert "unknown key 'dataflows' (did you mean 'dataflow'?)" in str(err)
    assert "dataflow" in str(err).split("allowed:")[1]


@pytest.mark.parametrize("missing", ["datasource", "model", "specVersion"])
def test_missing_required_field_is_named(missing: str) -> None:
    err = spec_error(with_(**{missing: ...}))
    assert err.field == missing and "required" in str(err)


def test_artifact_needs_processor() -> None:
    err = spec_error(with_(artifact=[{"target": "x"}]))
    assert err.field == "artifact[0].processor" and "required" in str(err)


def test_wrong_type_in_dataflow_is_named_with_index() -> None:
    err = spec_error(with_(dataflow=["a.py", 3]))
    assert err.field == "dataflow[1]"
    assert str(err).startswith(f"{LOCAL}: field 'dataflow[1]': ")


def test_options_shapes() -> None:
    assert spec_error(with_(options={"train": []})).field == "options.train"
    assert spec_error(with_(options={"framework": 2})).field == "options.framework"
    assert spec_error(with_(options=[])).field == "options"


def test_not_an_object() -> None:
    assert "must be an object" in str(spec_error([1, 2]))


def test_invalid_json_reports_line_and_column() -> None:
    err = spec_error('{\n  "specVersion": "2.0",\n  oops\n}')
    assert "line 3" in str(err) and "column 3" in str(err)


@pytest.mark.parametrize(
    "uri",
    ["ftp://host/m.py", "data:text/x-python,print(1)", "javascript:alert(1)", "gopher://h/m.py"],
)
def test_other_schemes_are_refused(uri: str) -> None:
    err = spec_error(with_(dataflow=["ok.py", uri]))
    assert err.field == "dataflow[1]" and "not allowed" in str(err)


def test_url_without_host_or_file_is_refused() -> None:
    assert "no host" in str(spec_error(with_(model="https:///m.py")))
    assert "does not name a file" in str(spec_error(with_(model="https://host/dir/")))
    assert "names no script" in str(spec_error(with_(model="?epochs=1")))
    assert "names no script" in str(spec_error(with_(model="#sha256=" + PIN), REMOTE))


# ---------------------------------------------------------------- references


def test_relative_refs_resolve_against_local_file() -> None:
    p = parse_pipeline(
        with_(datasource="ds.py?x=1", dataflow=["../shared/flow.py", "/abs/f.py"], model="file:///opt/m/../model.py"),
        LOCAL, allow_paths=("/srv/shared", "/abs", "/opt"),
    )
    assert p.base == "file:///srv/pipelines/" and not p.is_remote
    assert p.datasource.uri == "file:///srv/pipelines/ds.py" and p.datasource.options == {"x": "1"}
    assert p.dataflow[0].uri == "file:///srv/shared/flow.py"
    assert p.dataflow[1].uri == "file:///abs/f.py"
    assert p.model.uri == "file:///opt/model.py" and p.model.is_local
    assert uri_to_path(p.dataflow[0].uri) == Path("/srv/shared/flow.py")


@pytest.mark.parametrize("ref", ["../shared/flow.py", "/abs/f.py", "file:///opt/m/../model.py", "~/m.py"])
def test_local_refs_outside_the_pipelines_directory_need_allow_path(ref: str) -> None:
    err = spec_error(with_(model=ref), LOCAL)
    assert err.field == "model" and "--allow-path" in str(err) and "outside /srv/pipelines" in str(err)


def test_relative_source_path_is_made_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    p = parse_pipeline(with_(model="m.py"), "sub/pipeline.json")
    assert p.source == str(tmp_path / "sub" / "pipeline.json")
    assert uri_to_path(p.model.uri) == tmp_path / "sub" / "m.py"


def test_relative_refs_resolve_against_remote_url() -> None:
    p = parse_pipeline(with_(datasource="ds.py?a=1", dataflow=["../common/flow.py"], model="//cdn.example/m.py"), REMOTE)
    assert p.base == REMOTE
    assert p.datasource.uri == "https://mirror.example/pipelines/cls/ds.py"
    assert p.datasource.options == {"a": "1"}
    assert p.dataflow[0].uri == "https://mirror.example/pipelines/common/flow.py"
    assert p.model.uri == "https://cdn.example/m.py"


@pytest.mark.parametrize("uri", ["file:///etc/passwd", "file:/home/u/m.py", "/etc/passwd"])
def test_remote_pipeline_may_not_name_local_files(uri: str) -> None:
    err = spec_error(with_(model=uri), REMOTE)
    assert err.field == "model" and "a remote pipeline may not name local files" in str(err)


def test_remote_pipeline_may_not_name_local_framework() -> None:
    err = spec_error(with_(options={"framework": "file:///opt/fw.tar.gz"}), REMOTE)
    assert err.field == "options.framework" and "local files" in str(err)


def test_http_source_is_remote_too() -> None:
    err = spec_error(with_(model="file:///x.py"), "http://mirror.example/p.json")
    assert "local files" in str(err)


def test_query_options_follow_the_contract() -> None:
    p = parse_pipeline(with_(model="m.py?bare&empty=&n=1&n=2&n&sp=a%20b+c&url=https%3A%2F%2Fh%2Fx%3Fy%3D1"), LOCAL)
    assert p.model.options == {
        "bare": None,
        "empty": "",
        "n": ["1", "2", None],
        "sp": "a b c",
        "url": "https://h/x?y=1",
    }


def test_pin_is_parsed_and_lowercased() -> None:
    p = parse_pipeline(with_(model="m.py?x=1#sha256=" + "AB" * 32), LOCAL)
    assert p.model.sha256 == "ab" * 32 and p.model.options == {"x": "1"}
    assert p.model.uri == "file:///srv/pipelines/m.py"


@pytest.mark.parametrize("fragment", ["sha256=abc", "sha256=" + "g" * 64, "sha256=", "md5=" + "a" * 32, "top"])
def test_bad_pin_is_refused(fragment: str) -> None:
    err = spec_error(with_(model=f"m.py#{fragment}"))
    assert err.field == "model" and ("sha256" in str(err))


@pytest.mark.parametrize("name", ["tensorflow@2.21", "my_fw@1.0.0+cpu", "torch-lite@0.1"])
def test_framework_names(name: str) -> None:
    p = parse_pipeline(with_(options={"framework": name}), REMOTE)
    assert p.framework == name and p.framework_ref is None


def test_framework_url_and_path_are_resolved() -> None:
    p = parse_pipeline(with_(options={"framework": "fw/tf.tar.gz?sig=1#sha256=" + "c" * 64, "x": 1}), REMOTE)
    ref = p.framework_ref
    assert ref is not None and ref.uri == "https://mirror.example/pipelines/cls/fw/tf.tar.gz?sig=1"
    assert ref.sha256 == "c" * 64 and ref.name == "tf.tar.gz"
    assert p.framework == ref.uri + "#sha256=" + "c" * 64
    assert p.options["x"] == 1 and p.raw["options"]["framework"].startswith("fw/")
    local = parse_pipeline(with_(options={"framework": "./fw.zip"}), LOCAL)
    assert local.framework == "file:///srv/pipelines/fw.zip"


@pytest.mark.parametrize("bad", ["tensorflow", "ftp://h/fw.zip", "tf@", "@2.0"])
def test_bad_framework_is_refused(bad: str) -> None:
    err = spec_error(with_(options={"framework": bad}))
    assert err.field == "options.framework"


# ---------------------------------------------------------------- loading


def test_load_from_path(tmp_path: Path) -> None:
    path = tmp_path / "pipeline.json"
    path.write_text(json.dumps(with_(model="model.py")))
    p = load_pipeline(str(path), fetch_bytes=_no_network)
    assert p.source == str(path) and uri_to_path(p.model.uri) == tmp_path / "model.py"


def test_load_missing_file(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="pipeline file not found"):
        load_pipeline(str(tmp_path / "nope.json"), fetch_bytes=_no_network)


def test_load_from_url_uses_injected_fetcher() -> None:
    seen = []

    def fake_fetch(url: str) -> bytes:
        seen.append(url)
        return json.dumps(with_(model="model.py")).encode()

    p = load_pipeline(REMOTE, fetch_bytes=fake_fetch)
    assert seen == [REMOTE] and p.is_remote
    assert p.model.uri == "https://mirror.example/pipelines/cls/model.py"


def test_load_refuses_other_schemes() -> None:
    with pytest.raises(SpecError, match="path or an http"):
        load_pipeline("ftp://host/p.json", fetch_bytes=_no_network)


def _no_network(url: str) -> bytes:
    raise AssertionError(f"unexpected fetch of {url}")


# --- the quick check (fastjsonschema) and the reference (jsonschema) agree -------------


def _variants() -> list[object]:
    """Every pipeline file of the repo, and each with one field swapped for a
    value of every JSON kind, removed, or joined by an unknown field."""
    repo = Path(__file__).resolve().parent.parent
    files = [p for d in ("tests", "examples", "bench") for p in (repo / d).rglob("pipeline*.json")]
    bases = [json.loads(p.read_text()) for p in files]
    assert len(bases) >= 5, files
    kinds: list[object] = [None, True, 0, 1, 1.0, 2.5, -1, "", "x", "2.0", "model.py", [], [""], ["a.py", 3],
                           {}, {"processor": "zip"}, {"processor": ""}, [{"processor": "zip", "x": 1}],
                           [{"target": "a"}], {"train": []}, {"train": {"epochs": 1}}, [None]]
    out: list[object] = [None, [], "", 3]
    for base in bases:
        out.append(base)
        for key in list(base) + ["framework", "artifact", "dataflow", "options", "type", "extra"]:
            for value in kinds:
                out.append({**base, key: value})
            out.append({k: v for k, v in base.items() if k != key})
        for i, art in enumerate(base.get("artifact") or []):
            for key in ("processor", "target", "extra"):
                for value in kinds:
                    arts = list(base["artifact"])
                    arts[i] = {**art, key: value}
                    out.append({**base, "artifact": arts})
    return out


def test_quick_schema_check_agrees_with_jsonschema() -> None:
    """A pipeline passes the runner's quick check exactly when jsonschema (the
    reference, whose errors the messages come from) passes it."""
    from pipcook_sandbox.runner import spec as spec_module

    reference = Draft202012Validator(load_schema())
    seen = {True: 0, False: 0}
    for raw in _variants():
        expected = reference.is_valid(raw)
        assert spec_module._conforms(raw) == expected, raw
        seen[expected] += 1
    assert seen[True] > 20 and seen[False] > 200, seen
