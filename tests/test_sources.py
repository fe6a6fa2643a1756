"""Source references: every spelling parses to the right importer; files are recognised by content."""

from __future__ import annotations

import gzip
import json
import shutil

import pytest

from porter.errors import SourceError
from porter.sources import parse_source, sniff_file


def test_prefixed_forms(tmp_path):
    hub = tmp_path / "hub"
    hub.mkdir()
    (hub / "hubconf.py").write_text("")
    cases = {
        "keras:MobileNetV2": ("keras", "application", "MobileNetV2", None, None),
        "torchhub:pytorch/vision:v0.10.0:resnet18": ("torchhub", "hub-remote", "pytorch/vision", "resnet18", "v0.10.0"),
        "torchhub:pytorch/vision:resnet18": ("torchhub", "hub-remote", "pytorch/vision", "resnet18", None),
        f"torchhub:{hub}:cnn": ("torchhub", "hub-local", str(hub), "cnn", None),
        "tfjs:https://example.com/m/model.json": ("tfjs", "url", "https://example.com/m/model.json", None, None),
        "https://example.com/m/model.json": ("tfjs", "url", "https://example.com/m/model.json", None, None),
    }
    for text, (importer, form, location, entry, ref) in cases.items():
        r = parse_source(text)
        assert (r.importer, r.form, r.location, r.entry, r.ref) == (importer, form, location, entry, ref), text
        assert str(r) == text


def test_detects_keras_files_by_content_not_name(fixtures_dir, tmp_path):
    assert parse_source(str(fixtures_dir / "keras" / "cnn_bn.keras")).form == "keras-file"
    assert parse_source(str(fixtures_dir / "keras" / "two_outputs.h5")).form == "h5-file"
    assert parse_source(str(fixtures_dir / "keras" / "savedmodel")).form == "savedmodel"
    # an HDF5 model named .bin is still found by its magic bytes
    odd = tmp_path / "model.bin"
    shutil.copy(fixtures_dir / "keras" / "two_outputs.h5", odd)
    assert parse_source(str(odd)).form == "h5-file"


def test_detects_tfjs_json_even_gzipped(tmp_path):
    doc = {"modelTopology": {}, "weightsManifest": []}
    plain = tmp_path / "anything.json"
    plain.write_text(json.dumps(doc))
    zipped = tmp_path / "model.bin"
    zipped.write_bytes(gzip.compress(json.dumps(doc).encode()))
    assert parse_source(str(plain)).importer == "tfjs"
    assert parse_source(str(zipped)).importer == "tfjs"
    assert sniff_file(zipped) == "tfjs-json"


@pytest.mark.parametrize("text, message", [
    ("no/such/model.keras", "model not found: no/such/model.keras"),
    ("keras:", "keras: needs an application name or a path"),
    ("torchhub:pytorch/vision", "needs an entry point"),
    ("torchhub:a/b/c:entry", "expected torchhub:OWNER/REPO[:REF]:ENTRY"),
    ("tfjs:ftp://host/model.json", "only http(s) URLs"),
    ("Keras:MobileNetV2", "prefixes are lower case"),
    ("owner/repo:entry", "did you mean torchhub:owner/repo:entry"),
    ("", "empty source reference"),
])
def test_bad_references_name_the_problem(text, message):
    with pytest.raises(SourceError) as err:
        parse_source(text)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_wrong_content_for_extension(tmp_path):
    fake = tmp_path / "model.keras"
    fake.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 100)
    with pytest.raises(SourceError, match=r"is not a Keras zip archive holding config.json"):
        parse_source(str(fake))
    empty = tmp_path / "empty.h5"
    empty.write_bytes(b"")
    with pytest.raises(SourceError, match="it is an empty file"):
        parse_source(str(empty))


def test_hub_directory_without_entry_point_and_plain_directory(tmp_path):
    (tmp_path / "hubconf.py").write_text("")
    with pytest.raises(SourceError, match="name the entry point: torchhub:"):
        parse_source(str(tmp_path))
    plain = tmp_path / "plain"
    plain.mkdir()
    with pytest.raises(SourceError, match="is a directory but not a model"):
        parse_source(str(plain))
