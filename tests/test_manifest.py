"""The manifest reader: valid manifests parse, anything else is a ManifestError."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from savepoints import ManifestError, SavePoints, UnsupportedFormatError
from savepoints.manifest import MAX_MANIFEST_BYTES, parse_manifest, read_manifest


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> dict:
    run = tmp_path_factory.mktemp("m") / "run"
    with SavePoints(run) as points:
        sp = points.save(7, metrics={"loss": 0.5}, state={"a": [1, {"b": None}]}, tags=["x"])
    return json.loads((sp.path / "savepoint.json").read_text())


def test_a_written_manifest_parses_back_to_the_same_json(good):
    m = parse_manifest(good, Path("x"))
    assert m.step == 7 and m.tags == ("x",) and m.state == {"a": [1, {"b": None}]}
    # everything but the manifest's own hash, which the writer adds over the bytes
    assert json.loads(json.dumps(m.to_json())) == {
        k: v for k, v in good.items() if k != "manifest_hash"
    }
    assert len(good["manifest_hash"]) == 64 and list(good)[-1] == "manifest_hash"


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"format": "other"}, "'format'"),
        ({"format_version": "1"}, "format_version"),
        ({"step": -3}, "'step'"),
        ({"step": True}, "'step'"),
        ({"created": "yesterday"}, "ISO 8601"),
        ({"metrics": {"loss": "low"}}, "'metrics'"),
        ({"tags": "x"}, "'tags'"),
        ({"state": []}, "'state'"),
        ({"hash_algorithm": "md5"}, "hash_algorithm"),
        ({"files": {"a": {"size": -1, "hash": "x"}}}, "'a'"),
        ({"files": {"../a": {"size": 1, "hash": "x"}}}, "leaves the folder"),
        ({"files": {"/etc/passwd": {"size": 1, "hash": "x"}}}, "absolute"),
        ({"parent": 3}, "'parent'"),
    ],
)
def test_malformed_fields_are_named(good, change, fragment):
    with pytest.raises(ManifestError, match=fragment):
        parse_manifest({**good, **change}, Path("x"))


_FILE = {"w.safetensors": {"size": 1, "hash": "x"}}


@pytest.mark.parametrize(
    ("contents", "fragment"),
    [
        ({"model": []}, "'contents.model' is not an object"),
        ({"model": {"files": "w.safetensors"}}, "'contents.model.files'"),
        ({"model": {"files": [1]}}, "'contents.model.files'"),
        ({"model": {"files": ["w.safetensors"], "kind": "onnx"}}, "'contents.model.kind'"),
        ({"model": {"files": ["w.safetensors"], "tied": ["a"]}}, "'contents.model.tied'"),
        ({"optimizer": {"files": ["w.safetensors"], "class": 3}}, "'contents.optimizer.class'"),
        ({"rng": {"files": ["w.safetensors"], "generators": "torch"}}, "'contents.rng.generators'"),
        ({"extra": []}, "'contents.extra' is not an object"),
        ({"extra": {"ema": {"files": "x"}}}, "'contents.extra.ema.files'"),
        ({"files": "notes.json"}, "'contents.files'"),
        ({"compacted": []}, "'contents.compacted'"),
        ({"tokenizer": {"files": ["elsewhere.json"]}}, "not among its files"),
        ({"optimizer": {"files": ["w.safetensors"], "keys": "ids"}}, "'contents.optimizer.keys'"),
        ({"ranks": []}, "'contents.ranks' is not an object"),
        ({"ranks": {"world_size": 0}}, "'contents.ranks.world_size'"),
        ({"ranks": {"world_size": True}}, "'contents.ranks.world_size'"),
        ({"ranks": {"world_size": 2, "rng": [{"files": []}]}}, "one entry per rank"),
        ({"ranks": {"world_size": 1, "written": [{"files": "w"}]}}, "'contents.ranks.written"),
        ({"ranks": {"world_size": 1, "written": [{"files": ["/etc/passwd"]}]}}, "not among"),
        ({"ranks": {"world_size": 1, "extra": [[]]}}, r"'contents\.ranks\.extra\[0\]'"),
        ({"ranks": {"world_size": 1, "rng": [{"files": ["x.json"]}]}}, "not among its files"),
    ],
)
def test_contents_that_do_not_fit_the_schema_are_named(good, contents, fragment):
    with pytest.raises(ManifestError, match=fragment):
        parse_manifest({**good, "files": _FILE, "contents": contents}, Path("x"))


def test_contents_that_fit_the_schema_parse_including_unknown_components(good):
    contents = {
        "model": {"files": ["w.safetensors"], "kind": "torch", "class": "m.M", "tied": {}},
        "rng": {"files": ["w.safetensors"], "generators": ["torch"]},
        "extra": {"ema": {"files": ["w.safetensors"]}},
        "data_loader": {"files": ["w.safetensors"], "position": 5},  # from a newer writer
        "optimizer": {"files": ["w.safetensors"], "keys": "names"},
        "ranks": {
            "world_size": 2,
            "written": [{"files": ["w.safetensors"]}, {"files": []}],
            "rng": [{"files": ["w.safetensors"], "generators": ["torch"]}, {"files": []}],
            "extra": [{"sampler": {"files": ["w.safetensors"]}}, {}],
        },
    }
    m = parse_manifest({**good, "files": _FILE, "contents": contents}, Path("x"))
    assert m.contents["model"]["kind"] == "torch" and "data_loader" in m.contents
    assert m.contents["ranks"]["world_size"] == 2


def test_newer_version_is_unsupported_not_malformed(good):
    with pytest.raises(UnsupportedFormatError):
        parse_manifest({**good, "format_version": 2}, Path("x"))


def test_huge_deeply_nested_or_non_json_files_are_refused(tmp_path):
    big = tmp_path / "big.json"
    with open(big, "wb") as f:
        f.truncate(MAX_MANIFEST_BYTES + 1)
    with pytest.raises(ManifestError, match="byte limit"):
        read_manifest(big)
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ManifestError, match="not valid JSON"):
        read_manifest(deep)
    for raw in (b"\xff\xfe", b"NaN", b'{"a": Infinity}', b""):
        (tmp_path / "x.json").write_bytes(raw)
        with pytest.raises(ManifestError):
            read_manifest(tmp_path / "x.json")


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=6),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=3),
    max_leaves=12,
)
keys = st.sampled_from(
    [
        "format",
        "format_version",
        "step",
        "created",
        "metrics",
        "tags",
        "state",
        "parent",
        "contents",
        "versions",
        "keep",
        "hash_algorithm",
        "files",
    ]
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_fuzzed_manifests_parse_or_raise_manifest_errors_only(good, data):
    doc = dict(good)
    for _ in range(data.draw(st.integers(1, 4))):
        key = data.draw(keys)
        if data.draw(st.booleans()):
            doc.pop(key, None)
        else:
            doc[key] = data.draw(json_values)
    with contextlib.suppress(ManifestError, UnsupportedFormatError):
        parse_manifest(doc, Path("fuzz"))


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_fuzzed_bytes_never_crash_the_reader(tmp_path_factory, raw):
    path = tmp_path_factory.mktemp("fz") / "savepoint.json"
    path.write_bytes(raw)
    with pytest.raises((ManifestError, UnsupportedFormatError)):
        read_manifest(path)


def test_manifests_of_0_1_without_their_own_hash_still_verify_later_ones_must_have_it(tmp_path):
    with SavePoints(tmp_path / "run") as points:
        sp = points.save(3, state={"k": 1})
    path = sp.path / "savepoint.json"
    data = json.loads(path.read_text())
    del data["manifest_hash"]
    data["versions"]["savepoints"] = "0.1.0"
    path.write_text(json.dumps(data, indent=1))
    assert sp.verify().ok  # as 0.1.0 wrote it
    data["versions"]["savepoints"] = "0.2.0"
    path.write_text(json.dumps(data, indent=1))
    assert [p.kind for p in sp.verify().problems] == ["manifest"]
