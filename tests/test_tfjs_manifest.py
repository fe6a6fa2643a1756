"""TF.js model.json and weight decoding: formats, dtypes, quantization, shards, and every bad input (no TF needed)."""

from __future__ import annotations

import gzip
import json
import struct
from pathlib import Path

import numpy as np
import pytest

from porter.errors import ModelLoadError, SourceError, UnsupportedError
from porter.importers.tfjs import LocalSource, load_model_json, load_weights
from porter.importers.tfjs.manifest import WeightEntry, WeightGroup, check_shard_path, parse_model_json
from porter.importers.tfjs.weights import decode_group, read_all_weights

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "tfjs"
TOPOLOGY = {"class_name": "Sequential", "config": {"name": "m", "layers": [
    {"class_name": "Dense", "config": {"name": "d", "units": 2, "batch_input_shape": [None, 3]}}]}}


def write_model(d: Path, groups: list[tuple[list[dict], list[bytes]]], topology=TOPOLOGY, **extra) -> Path:
    """Write a model.json with the given (weights, shard bytes) groups; returns its path."""
    d.mkdir(parents=True, exist_ok=True)
    manifest = []
    for gi, (weights, shards) in enumerate(groups, 1):
        paths = []
        for si, data in enumerate(shards, 1):
            name = f"group{gi}-shard{si}of{len(shards)}.bin"
            (d / name).write_bytes(data)
            paths.append(name)
        manifest.append({"paths": paths, "weights": weights})
    doc = {"modelTopology": topology, "format": "layers-model", "generatedBy": "test", "convertedBy": None,
           "weightsManifest": manifest, **extra}
    path = d / "model.json"
    path.write_text(json.dumps(doc))
    return path


def load(path: Path):
    src = LocalSource(str(path))
    mj = load_model_json(src)
    return mj, load_weights(mj, src)


# --- formats ------------------------------------------------------------------------------------------------

def test_reads_every_group_and_joins_shards_in_order(tmp_path):
    a = np.arange(6, dtype="<f4").reshape(2, 3)
    b = np.array([7, -8], dtype="<i4")
    c = np.array([True, False, True])
    data1 = a.tobytes() + b.tobytes()
    path = write_model(tmp_path, [
        ([{"name": "d/kernel", "shape": [2, 3], "dtype": "float32"}, {"name": "d/n", "shape": [2], "dtype": "int32"}],
         [data1[:5], data1[5:17], data1[17:]]),  # shards split mid-value
        ([{"name": "flags", "shape": [3], "dtype": "bool"}], [c.astype("u1").tobytes()]),
    ])
    mj, w = load(path)
    assert mj.kind == "layers" and len(mj.groups) == 2
    np.testing.assert_array_equal(w["d/kernel"], a)
    assert w["d/kernel"].dtype == np.float32
    np.testing.assert_array_equal(w["d/n"], b)
    np.testing.assert_array_equal(w["flags"], c)


def test_quantized_uint8_uint16_float16_decoded_like_tfjs(tmp_path):
    q8 = np.array([0, 1, 255], dtype="u1")
    q16 = np.array([0, 3, 65535], dtype="<u2")
    qi = np.array([0, 1, 2, 3], dtype="u1")  # int32 weight: q*scale+min rounded (JS Math.round: halves up)
    f16 = np.array([1.5, -0.333, 65504.0], dtype="<f2")
    data = q8.tobytes() + q16.tobytes() + qi.tobytes() + f16.tobytes()
    path = write_model(tmp_path, [([
        {"name": "a", "shape": [3], "dtype": "float32", "quantization": {"dtype": "uint8", "scale": 0.5, "min": -1.0}},
        {"name": "b", "shape": [3], "dtype": "float32", "quantization": {"dtype": "uint16", "scale": 0.001, "min": 2.0}},
        {"name": "c", "shape": [4], "dtype": "int32",
         "quantization": {"dtype": "uint8", "scale": 0.5, "min": -0.5, "original_dtype": "int32"}},
        {"name": "e", "shape": [3], "dtype": "float32", "quantization": {"dtype": "float16", "original_dtype": "float32"}},
    ], [data])])
    _, w = load(path)
    np.testing.assert_array_equal(w["a"], np.float32([-1.0, -0.5, 126.5]))
    np.testing.assert_array_equal(w["b"], (q16.astype(np.float64) * 0.001 + 2.0).astype(np.float32))
    assert w["c"].dtype == np.int32
    np.testing.assert_array_equal(w["c"], [0, 0, 1, 1])  # -0.5, 0, 0.5, 1.0 -> Math.round -> 0, 0, 1, 1
    np.testing.assert_array_equal(w["e"], f16.astype(np.float32))


def test_string_weights_are_length_prefixed(tmp_path):
    words = [b"hello", b"", "\u00e9t\u00e9".encode()]
    data = b"".join(struct.pack("<I", len(x)) + x for x in words)
    path = write_model(tmp_path, [([{"name": "vocab", "shape": [3], "dtype": "string"},
                                    {"name": "after", "shape": [1], "dtype": "float32"}],
                                   [data + np.float32([2.5]).tobytes()])])
    _, w = load(path)
    assert list(w["vocab"]) == words
    assert w["after"][0] == np.float32(2.5)


def test_optimizer_group_entries_are_skipped(tmp_path):
    k = np.ones((2, 2), "<f4")
    path = write_model(tmp_path, [([{"name": "k", "shape": [2, 2], "dtype": "float32"},
                                    {"name": "iter", "shape": [], "dtype": "int32", "group": "optimizer"},
                                    {"name": "k/m", "shape": [2, 2], "dtype": "float32", "group": "optimizer"}],
                                   [k.tobytes() + np.int32(3).tobytes() + (2 * k).tobytes()])])
    _, w = load(path)
    assert sorted(w) == ["k"]


def test_gzip_model_json_and_shards_detected_by_content(tmp_path):
    k = np.arange(4, dtype="<f4")
    path = write_model(tmp_path, [([{"name": "k", "shape": [4], "dtype": "float32"}], [gzip.compress(k.tobytes())])])
    raw = path.read_bytes()
    odd = tmp_path / "weights-and-topology.data"  # any file name
    odd.write_bytes(gzip.compress(raw))
    path.unlink()
    mj, w = load(odd)
    assert mj.kind == "layers"
    np.testing.assert_array_equal(w["k"], k)


def test_files_without_format_key_are_recognised(tmp_path):
    path = write_model(tmp_path / "l", [], topology=TOPOLOGY)
    doc = json.loads(path.read_text())
    del doc["format"]
    path.write_text(json.dumps(doc))
    assert load_model_json(LocalSource(str(path))).kind == "layers"
    py_shape = {"keras_version": "2.4.0", "backend": "tensorflow", "model_config": TOPOLOGY}
    assert parse_model_json(json.dumps({"modelTopology": py_shape, "weightsManifest": []}).encode(), "x").kind == "layers"
    graph = {"node": [{"name": "x", "op": "Placeholder"}], "versions": {}}
    assert parse_model_json(json.dumps({"modelTopology": graph, "weightsManifest": []}).encode(), "x").kind == "graph"


@pytest.mark.parametrize("name", ["layers_sequential", "layers_keras_h5", "graph_convnet", "graph_uint8"])
def test_real_fixtures_decode_completely(name):
    """Fixtures written by TF.js / tensorflowjs_converter: every byte accounted for, metadata read."""
    mj, w = load(FIXTURES / name / "model.json")
    expected = sum(1 for g in mj.groups for e in g.weights if e.group != "optimizer")
    assert len(w) == expected > 0
    assert mj.kind == ("graph" if name.startswith("graph") else "layers")
    assert all(np.all(np.isfinite(a)) for a in w.values() if a.dtype.kind == "f")
    if name == "layers_keras_h5":
        assert len(mj.groups) == 6 and "model_config" in mj.topology  # one group per layer, Python converter shape
        assert w["fc1/kernel"].shape == (128, 10)
    if name == "layers_sequential":
        assert mj.user_metadata["porter_fixture"] == "layers_sequential"
        assert any(e.group == "optimizer" for g in mj.groups for e in g.weights)


# --- bad inputs ---------------------------------------------------------------------------------------------

def test_not_json(tmp_path):
    p = tmp_path / "model.json"
    p.write_bytes(b"\x00\x01 definitely not json")
    with pytest.raises(ModelLoadError, match=r"model.json is not JSON"):
        load_model_json(LocalSource(str(p)))


def test_json_but_not_tfjs(tmp_path):
    p = tmp_path / "model.json"
    p.write_text(json.dumps({"name": "package", "version": "1.0"}))
    with pytest.raises(SourceError, match=r"is JSON but not a TF.js model.*found: name, version"):
        load_model_json(LocalSource(str(p)))


def test_missing_shard(tmp_path):
    path = write_model(tmp_path, [([{"name": "k", "shape": [4], "dtype": "float32"}], [bytes(8), bytes(8)])])
    (tmp_path / "group1-shard2of2.bin").unlink()
    with pytest.raises(ModelLoadError, match=r"weight shard 'group1-shard2of2.bin' listed in weightsManifest is missing"):
        load(path)


@pytest.mark.parametrize("size, word", [(15, "shorter"), (17, "longer")])
def test_shard_shorter_or_longer_than_manifest(tmp_path, size, word):
    path = write_model(tmp_path, [([{"name": "k", "shape": [4], "dtype": "float32"}], [bytes(size)])])
    with pytest.raises(ModelLoadError, match=rf"hold {size} bytes but the manifest's 1 weights need 16; a shard is {word}"):
        load(path)


@pytest.mark.parametrize("bad", ["../outside.bin", "sub/../../outside.bin", "/etc/passwd", "\\\\server\\share.bin",
                                 "C:\\weights.bin", "c:weights.bin", "file:///etc/passwd", "//evil.example/x.bin",
                                 "..\\outside.bin"])
def test_shard_path_escaping_model_dir_is_refused(tmp_path, bad):
    d = tmp_path / "model"
    path = write_model(d, [([{"name": "k", "shape": [1], "dtype": "float32"}], [bytes(4)])])
    (tmp_path / "outside.bin").write_bytes(bytes(4))
    doc = json.loads(path.read_text())
    doc["weightsManifest"][0]["paths"] = [bad]
    path.write_text(json.dumps(doc))
    with pytest.raises(ModelLoadError, match=r"shard path .* porter refuses to read it"):
        load(path)


def test_shard_symlink_leaving_model_dir_is_refused(tmp_path):
    d = tmp_path / "model"
    path = write_model(d, [([{"name": "k", "shape": [1], "dtype": "float32"}], [bytes(4)])])
    (tmp_path / "secret.bin").write_bytes(bytes(4))
    (d / "group1-shard1of1.bin").unlink()
    (d / "group1-shard1of1.bin").symlink_to(tmp_path / "secret.bin")
    with pytest.raises(ModelLoadError, match=r"outside the model's directory"):
        load(path)


def test_check_shard_path_allows_ordinary_relative_paths():
    assert check_shard_path("./group1-shard1of1.bin", "m") == "./group1-shard1of1.bin"
    assert check_shard_path("weights\\g1.bin", "m") == "weights/g1.bin"


@pytest.mark.parametrize("entry, message", [
    ({"name": "k", "shape": [1], "dtype": "float64"}, r"weight 'k' has unknown dtype 'float64'"),
    ({"name": "k", "shape": [1], "dtype": "float32", "quantization": {"dtype": "int4", "scale": 1, "min": 0}},
     r"weight 'k' has unknown quantization dtype 'int4'"),
    ({"name": "k", "shape": [1], "dtype": "bool", "quantization": {"dtype": "uint8", "scale": 1, "min": 0}},
     r"weight 'k' is bool quantized to uint8"),
    ({"name": "k", "shape": [1], "dtype": "int32", "quantization": {"dtype": "float16"}},
     r"weight 'k' is int32 quantized to float16"),
])
def test_unknown_dtype_or_quantization(tmp_path, entry, message):
    path = write_model(tmp_path, [([entry], [bytes(4)])])
    with pytest.raises(UnsupportedError, match=message):
        load(path)


def test_quantization_without_scale(tmp_path):
    path = write_model(tmp_path, [([{"name": "k", "shape": [1], "dtype": "float32",
                                     "quantization": {"dtype": "uint8", "min": 0}}], [bytes(1)])])
    with pytest.raises(ModelLoadError, match=r"quantized to uint8 but its quantization has no numeric 'scale'"):
        load(path)


def test_malformed_manifest_entries(tmp_path):
    for manifest, message in (
        ({"paths": []}, r"weightsManifest must be a list"),
        ([{"paths": "a.bin", "weights": []}], r"weight group 1 must be an object with 'paths' and 'weights'"),
        ([{"paths": ["a.bin"], "weights": [{"name": "k", "shape": [-1], "dtype": "float32"}]}], r"invalid shape"),
        ([{"paths": [], "weights": [{"name": "k", "shape": [1], "dtype": "float32"}]}], r"no shard files"),
    ):
        doc = {"modelTopology": TOPOLOGY, "format": "layers-model", "weightsManifest": manifest}
        with pytest.raises(ModelLoadError, match=message):
            parse_model_json(json.dumps(doc).encode(), "m.json")


def test_unknown_format_and_missing_topology():
    with pytest.raises(ModelLoadError, match=r"has format 'tfjs-wasm'"):
        parse_model_json(json.dumps({"modelTopology": {}, "format": "tfjs-wasm", "weightsManifest": []}).encode(), "m")
    with pytest.raises(ModelLoadError, match=r"has no modelTopology"):
        parse_model_json(json.dumps({"weightsManifest": []}).encode(), "m")


def test_truncated_gzip_model_json(tmp_path):
    p = tmp_path / "model.json"
    p.write_bytes(gzip.compress(json.dumps({"modelTopology": TOPOLOGY}).encode())[:20])
    with pytest.raises(ModelLoadError, match=r"starts like gzip but can't be decompressed"):
        load_model_json(LocalSource(str(p)))


def test_duplicate_weight_names_across_groups(tmp_path):
    e = {"name": "k", "shape": [1], "dtype": "float32"}
    path = write_model(tmp_path, [([e], [bytes(4)]), ([e], [bytes(4)])])
    with pytest.raises(ModelLoadError, match=r"weight\(s\) k appear in more than one weight group"):
        load(path)


def test_decode_group_direct():
    g = WeightGroup(("a",), (WeightEntry("x", (2,), "float32"),))
    out = decode_group(g, [np.float32([1, 2]).tobytes()], "m")
    np.testing.assert_array_equal(out["x"], [1, 2])
    assert read_all_weights([WeightGroup((), ())], lambda p: b"", "m") == {}
