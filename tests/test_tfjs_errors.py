"""TF.js bad inputs through porter.convert: each gives its one-line error class and message, and writes nothing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

import porter
from porter.errors import ModelLoadError, SourceError, UnsupportedError, UsageError

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "tfjs"


def copy_fixture(tmp_path: Path, name: str) -> tuple[Path, dict]:
    d = tmp_path / name
    shutil.copytree(FIXTURES / name, d)
    return d / "model.json", json.loads((d / "model.json").read_text())


def save(path: Path, doc: dict) -> None:
    path.write_text(json.dumps(doc))


def convert_fails(tmp_path: Path, source, error, match: str):
    out = tmp_path / "out" / "model.onnx"
    out.parent.mkdir(exist_ok=True)
    with pytest.raises(error, match=match) as info:
        porter.convert(str(source), out)
    assert list(out.parent.iterdir()) == [], "nothing may be written on failure"
    assert "\n" not in str(info.value)
    return info.value


def test_unsupported_layers_named_with_positions(tmp_path):
    path, doc = copy_fixture(tmp_path, "layers_sequential")
    layers = doc["modelTopology"]["config"]["layers"]
    layers[2]["class_name"] = "MyCustomLayer"
    layers[11]["class_name"] = "TransformerBlock"
    save(path, doc)
    err = convert_fails(tmp_path, path, UnsupportedError,
                        r"TF.js layers 'MyCustomLayer' \(layer 3 of 14, named 'bn1'\), 'TransformerBlock' \(layer 12 "
                        r"of 14, named 'gap'\) have no converter\. Supported: .*Conv2D.*DepthwiseConv2D")
    assert "SeparableConv2D" in str(err) and "BatchNormalization" in str(err)


def test_single_unsupported_layer_message(tmp_path):
    path, doc = copy_fixture(tmp_path, "layers_functional")
    doc["modelTopology"]["config"]["layers"][5]["class_name"] = "MyCustomLayer"
    save(path, doc)
    convert_fails(tmp_path, path, UnsupportedError,
                  r"^TF.js layer 'MyCustomLayer' \(layer 6 of 23, named 'shared_1x1'\) has no converter\. Supported: ")


def test_unsupported_graph_ops_all_named(tmp_path):
    path, doc = copy_fixture(tmp_path, "graph_convnet")
    nodes = doc["modelTopology"]["node"]
    softmax = next(n for n in nodes if n["op"] == "Softmax")
    pool = next(n for n in nodes if n["op"] == "MaxPool")
    softmax["op"], pool["op"] = "MyFancySoftmax", "TfjsOnlyPool"
    save(path, doc)
    convert_fails(tmp_path, path, UnsupportedError,
                  r"TF.js graph ops 'MyFancySoftmax' \(1 node: .*probs_1/Softmax\); 'TfjsOnlyPool' \(1 node: "
                  r".*pool_1/MaxPool2d\) have no converter")


def test_unknown_fused_activation(tmp_path):
    path, doc = copy_fixture(tmp_path, "graph_convnet")
    node = next(n for n in doc["modelTopology"]["node"] if n["op"] == "_FusedMatMul")
    node["attr"]["fused_ops"]["list"]["s"] = ["Qmlhc0FkZA==", "U29mdHBsdXM="]  # BiasAdd, Softplus
    save(path, doc)
    convert_fails(tmp_path, path, UnsupportedError,
                  r"TF.js graph op '_FusedMatMul' with fused activation 'Softplus' \(node .*\) has no converter")


def test_weight_shape_not_matching_layer(tmp_path):
    path, doc = copy_fixture(tmp_path, "layers_sequential")
    entry = next(w for w in doc["weightsManifest"][0]["weights"] if w["name"] == "probs/kernel")
    entry["shape"] = [5, 12]  # same byte count, wrong shape
    save(path, doc)
    convert_fails(tmp_path, path, ModelLoadError,
                  r"weight 'probs/kernel' has shape \[5, 12\] but layer 'probs' \(Dense, layer 14 of 14\) expects "
                  r"\[12, 5\]")


def test_graph_weight_shape_not_matching_const(tmp_path):
    path, doc = copy_fixture(tmp_path, "graph_convnet")
    entry = next(w for w in doc["weightsManifest"][0]["weights"] if w["name"].endswith("conv1_1/convolution/merged_input"))
    entry["shape"] = [3, 3, 3, 4, 2]
    # the Const node declares [3, 3, 3, 8]: same count of values, other shape -> refused
    save(path, doc)
    convert_fails(tmp_path, path, ModelLoadError, r"weight '.*merged_input' has shape \[3, 3, 3, 4, 2\] but its "
                                                  r"Const node declares \[3, 3, 3, 8\]")


def test_weight_missing_for_layer(tmp_path):
    path, doc = copy_fixture(tmp_path, "layers_functional")
    entry = next(w for w in doc["weightsManifest"][0]["weights"] if w["name"] == "stem/kernel")
    entry["name"] = "stem/kernel_renamed"
    save(path, doc)
    convert_fails(tmp_path, path, ModelLoadError,
                  r"layer 'stem' \(Conv2D, layer 2 of 23\) needs weight 'stem/kernel', which model.json's "
                  r"weightsManifest does not list")


@pytest.mark.parametrize("case", ["missing", "short", "long"])
def test_shard_problems_through_convert(tmp_path, case):
    path, _ = copy_fixture(tmp_path, "layers_sequential")
    shard = path.parent / "group1-shard5of8.bin"
    if case == "missing":
        shard.unlink()
        convert_fails(tmp_path, path, ModelLoadError, r"weight shard 'group1-shard5of8.bin' .* is missing")
    else:
        data = shard.read_bytes()
        shard.write_bytes(data[:-3] if case == "short" else data + b"\0\0")
        word = "shorter" if case == "short" else "longer"
        convert_fails(tmp_path, path, ModelLoadError, rf"a shard is {word} than the manifest says")


def test_shard_path_escape_through_convert(tmp_path):
    path, doc = copy_fixture(tmp_path, "layers_functional")
    doc["weightsManifest"][0]["paths"] = ["../layers_functional/group1-shard1of1.bin"]
    save(path, doc)
    convert_fails(tmp_path, path, ModelLoadError, r"shard path '\.\./layers_functional/group1-shard1of1.bin' climbs out")


def test_json_not_tfjs_and_not_json(tmp_path):
    p = tmp_path / "model.json"
    p.write_text('{"dependencies": {}}')
    convert_fails(tmp_path, f"tfjs:{p}", SourceError, r"JSON but not a TF.js model")
    p.write_text("<html>404</html>")
    convert_fails(tmp_path, f"tfjs:{p}", ModelLoadError, r"is not JSON")


def test_graph_model_with_unknown_dims_needs_input_shape(tmp_path):
    path, doc = copy_fixture(tmp_path, "graph_convnet")
    for d in doc["signature"]["inputs"]["image"]["tensorShape"]["dim"][1:3]:
        d["size"] = "-1"
    ph = next(n for n in doc["modelTopology"]["node"] if n["op"] == "Placeholder")
    for d in ph["attr"]["shape"]["shape"]["dim"][1:3]:
        d["size"] = "-1"
    save(path, doc)
    convert_fails(tmp_path, path, UsageError, r"graph-model input 'image' has unknown dims \['\?', '\?', '\?', 3\]; give "
                                              r"concrete dims .* --input-shape image:224,224,3")
    result = porter.convert(str(path), input_shapes={None: (16, 16, 3)})
    assert result.parity.passed


def test_cli_prints_one_line_error(tmp_path, porter_cli):
    path, doc = copy_fixture(tmp_path, "layers_sequential")
    doc["modelTopology"]["config"]["layers"][4]["class_name"] = "MyCustomLayer"
    save(path, doc)
    out = tmp_path / "x.onnx"
    r = porter_cli("convert", f"tfjs:{path}", "-o", out)
    assert r.returncode != 0
    assert r.stderr.strip().count("\n") == 0
    assert r.stderr.startswith("porter: error: TF.js layer 'MyCustomLayer' (layer 5 of 14, named 'dw') has no converter")
    assert not out.exists()


# --- hand-written topologies: nested models, the Python converter's shapes, old files ---------------------------

def _write(d: Path, topology: dict, weights: dict[str, np.ndarray], fmt: str | None = "layers-model") -> Path:
    d.mkdir(parents=True, exist_ok=True)
    data = b"".join(np.ascontiguousarray(a, "<f4").tobytes() for a in weights.values())
    (d / "w.bin").write_bytes(data)
    doc = {"modelTopology": topology, "weightsManifest": [{"paths": ["w.bin"], "weights": [
        {"name": k, "shape": list(a.shape), "dtype": "float32"} for k, a in weights.items()]}]}
    if fmt:
        doc["format"] = fmt
    (d / "model.json").write_text(json.dumps(doc))
    return d / "model.json"


def test_nested_sequential_keras2_layout_without_format_key(tmp_path):
    """Keras-2 JSON as the Python converter writes it (model_config), a nested Sequential, an old file."""
    rng = np.random.default_rng(0)
    w = {"d1/kernel": rng.normal(size=(4, 5)), "d1/bias": rng.normal(size=5),
         "d2/kernel": rng.normal(size=(5, 3)), "d2/bias": rng.normal(size=3)}
    inner = {"class_name": "Sequential", "config": {"name": "inner", "layers": [
        {"class_name": "Dense", "config": {"name": "d1", "units": 5, "activation": "hard_sigmoid",
                                           "batch_input_shape": [None, 4], "dtype": "float32"}}]}}
    inner_node = dict(inner, name="inner", inbound_nodes=[[["x", 0, 0, {}]]])
    topo = {"keras_version": "2.2.4", "backend": "tensorflow", "model_config": {"class_name": "Model", "config": {
        "name": "outer", "layers": [
            {"name": "x", "class_name": "InputLayer", "config": {"batch_input_shape": [None, 4], "name": "x"},
             "inbound_nodes": []},
            inner_node,
            {"name": "d2", "class_name": "Dense", "config": {"name": "d2", "units": 3, "activation": "linear"},
             "inbound_nodes": [[["inner", 0, 0, {}]]]}],
        "input_layers": [["x", 0, 0]], "output_layers": [["d2", 0, 0]]}}}
    path = _write(tmp_path / "nested", topo, w, fmt=None)
    out = tmp_path / "nested.onnx"
    result = porter.convert(str(path), out)
    assert result.parity.passed
    x = rng.normal(size=(3, 4)).astype(np.float32)
    h = np.clip(0.2 * (x @ w["d1/kernel"] + w["d1/bias"]) + 0.5, 0, 1)  # Keras-2 / TF.js hard sigmoid
    want = h @ w["d2/kernel"] + w["d2/bias"]
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_layer_config_option_without_equivalent(tmp_path):
    topo = {"class_name": "Sequential", "config": {"name": "s", "layers": [
        {"class_name": "Dense", "config": {"name": "d", "units": 2, "batch_input_shape": [None, 3],
                                           "kernel_quantizer": "int4"}}]}}
    path = _write(tmp_path / "opt", topo, {"d/kernel": np.zeros((3, 2)), "d/bias": np.zeros(2)})
    convert_fails(tmp_path, path, UnsupportedError, r"layer 'd' \(Dense, layer 1 of 1\): config option "
                                                    r"kernel_quantizer='int4' has no Keras 3 equivalent")


def test_unknown_activation(tmp_path):
    topo = {"class_name": "Sequential", "config": {"name": "s", "layers": [
        {"class_name": "Dense", "config": {"name": "d", "units": 2, "batch_input_shape": [None, 3],
                                           "activation": "myActivation"}}]}}
    path = _write(tmp_path / "act", topo, {"d/kernel": np.zeros((3, 2)), "d/bias": np.zeros(2)})
    convert_fails(tmp_path, path, UnsupportedError, r"layer 'd' \(Dense, layer 1 of 1\) uses activation "
                                                    r"'myActivation', which porter can't convert")
