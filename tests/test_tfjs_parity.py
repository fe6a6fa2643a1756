"""TF.js fixtures -> ONNX, compared with golden outputs computed by the real TF.js runtime under node.

The fixtures and their golden_*.npy were written by fixtures/tfjs/make_fixtures.sh (TF.js 4.22 and
tensorflowjs_converter 4.22); these tests need neither node nor tensorflowjs.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import porter

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "tfjs"
ALL = ["layers_sequential", "layers_functional", "layers_zoo", "layers_uint8", "layers_float16", "layers_keras_h5",
       "graph_convnet", "graph_uint8", "graph_float16"]
TOLERANCE = 1e-4  # max |onnx - tfjs| / max(1, max |tfjs|)


def golden(name: str):
    d = FIXTURES / name
    meta = json.loads((d / "golden.json").read_text())
    ins = {i["name"]: np.load(d / i["file"]) for i in meta["inputs"]}
    outs = {o["name"]: np.load(d / o["file"]) for o in meta["outputs"]}
    return meta, ins, outs


def scaled_diff(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.max(np.abs(got.astype(np.float64) - want)) / max(1.0, float(np.max(np.abs(want)))))


def test_every_fixture_has_golden_outputs_from_tfjs():
    for name in ALL:
        meta, ins, outs = golden(name)
        assert meta["runtime"].startswith("@tensorflow/tfjs 4."), name
        assert ins and outs and all(a.dtype == np.float32 for a in outs.values())
        assert all(a.dtype in (np.float32, np.int32) for a in ins.values())
        assert meta["format"] == ("graph" if name.startswith("graph") else "layers")


@pytest.mark.parametrize("name", ALL)
def test_onnx_matches_tfjs_runtime(tmp_path, name):
    out = tmp_path / f"{name}.onnx"
    result = porter.convert(str(FIXTURES / name / "model.json"), out)
    assert out.is_file() and result.parity.passed
    meta, ins, want = golden(name)
    model = onnx.load(out)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    # ONNX inputs/outputs carry the model's own names, in the model's order
    assert [i.name for i in sess.get_inputs()] == [i["name"] for i in meta["inputs"]]
    assert [o.name for o in sess.get_outputs()] == [o["name"] for o in meta["outputs"]]
    got = sess.run(None, ins)
    for o, g in zip(meta["outputs"], got):
        diff = scaled_diff(g, want[o["name"]])
        assert g.shape == want[o["name"]].shape
        assert diff <= TOLERANCE, f"{name}/{o['name']}: scaled diff {diff:.2e} vs TF.js"
        assert float(np.std(want[o["name"]])) > 1e-3  # the golden output is not a constant
    props = {p.key: p.value for p in model.metadata_props}
    prov = json.loads(props["porter.provenance"])
    assert props["porter.framework"] == "tfjs"
    assert prov["tfjs_format"] == meta["format"]
    assert props["porter.preprocess"] == "unknown"
    versions = json.loads(props["porter.framework_versions"])
    assert {"tensorflow", "keras", "tf2onnx"} <= set(versions)
    if name.startswith("graph"):
        assert prov["convertedBy"] == "TensorFlow.js Converter v4.22.0"
        assert json.loads(prov["userDefinedMetadata"]) == {"fixture": {"classes": 6, "porter_fixture": "graph_convnet"}}
    if name in ("layers_sequential", "layers_functional"):
        assert prov["generatedBy"] == "TensorFlow.js tfjs-layers v4.22.0"
        assert versions["tfjs_generatedBy"] == "TensorFlow.js tfjs-layers v4.22.0"


def test_quantized_fixtures_really_are_quantized_and_differ_from_float():
    """uint8 / float16 weights change the outputs slightly; porter must reproduce TF.js's dequantized numbers."""
    _, _, f32 = golden("layers_sequential")
    _, _, u8 = golden("layers_uint8")
    _, _, f16 = golden("layers_float16")
    assert 1e-6 < scaled_diff(u8["probs"], f32["probs"]) < 0.1
    assert 0 < scaled_diff(f16["probs"], f32["probs"]) < 1e-2
    manifest = json.loads((FIXTURES / "graph_uint8" / "model.json").read_text())["weightsManifest"]
    assert {w.get("quantization", {}).get("dtype") for g in manifest for w in g["weights"]} >= {"uint8"}


def test_graph_fixture_has_tfjs_only_fused_ops():
    topo = json.loads((FIXTURES / "graph_convnet" / "model.json").read_text())["modelTopology"]
    ops = {n["op"] for n in topo["node"]}
    assert {"_FusedConv2D", "FusedDepthwiseConv2dNative", "_FusedMatMul"} <= ops
    fused = {s for n in topo["node"] for s in n.get("attr", {}).get("fused_ops", {}).get("list", {}).get("s", [])}
    import base64

    names = {base64.b64decode(s).decode() for s in fused}
    assert {"BiasAdd", "Relu", "Relu6", "Prelu", "LeakyRelu"} <= names


def test_cli_converts_tfjs_reference(tmp_path, porter_cli):
    out = tmp_path / "seq.onnx"
    r = porter_cli("convert", f"tfjs:{FIXTURES / 'layers_sequential'}", "-o", out)
    assert r.returncode == 0, r.stderr
    assert out.is_file()
    assert "framework tfjs" in r.stdout and "parity passed" in r.stdout
    _, ins, want = golden("layers_sequential")
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert scaled_diff(sess.run(None, ins)[0], want["probs"]) <= TOLERANCE
