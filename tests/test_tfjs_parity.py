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
       "graph_convnet", "graph_uint8", "graph_float16", "graph_batch1", "graph_while", "graph_detector", "graph_int32"]
TOLERANCE = 1e-4  # max |onnx - tfjs| / max(1, max |tfjs|)
# How each fixture takes batches after conversion (graph.batch): freed = exported at batch 1, proven to run at any
BATCH = {"graph_batch1": ("freed", 1), "graph_detector": ("fixed", 1)}
# TF.js 4.22 (CPU backend) returns zeros for tf.image.non_max_suppression_padded's lowered nested loops, where
# TensorFlow running the same graph-model (and porter's ONNX) select boxes; see test_tfjs_padded_nms_disagreement
TFJS_WRONG = {("graph_detector", "padded"): slice(8, None)}  # columns of the output TF.js gets wrong


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
        assert ins and outs and all(a.dtype in (np.float32, np.int32) for a in outs.values())
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
    # (the converter writes some signature keys as tensor names, 'Identity_4:0': ONNX drops the ':0')
    assert [o.name for o in sess.get_outputs()] == [o["name"].removesuffix(":0") for o in meta["outputs"]]
    got = sess.run(None, ins)
    for o, g in zip(meta["outputs"], got):
        w = want[o["name"]]
        assert g.shape == w.shape, f"{name}/{o['name']}"
        wrong = TFJS_WRONG.get((name, o["name"]))
        if wrong is not None:
            cols = np.arange(g.shape[1])[wrong]
            g, w = np.delete(g, cols, axis=1), np.delete(w, cols, axis=1)
        if w.dtype.kind == "i":  # indices and counts: exactly
            assert g.dtype == w.dtype and np.array_equal(g, w), f"{name}/{o['name']}: {g} vs TF.js {w}"
        else:
            diff = scaled_diff(g, w)
            assert diff <= TOLERANCE, f"{name}/{o['name']}: scaled diff {diff:.2e} vs TF.js"
        assert w.size == 1 or float(np.std(w)) > 1e-3  # the golden output is not a constant
    mode, size = BATCH.get(name, ("dynamic", None))
    assert json.loads({p.key: p.value for p in model.metadata_props}["porter.batch"])["mode"] == mode
    assert result.batch.mode == mode and result.batch.size == size
    dim0 = model.graph.input[0].type.tensor_type.shape.dim[0]
    assert (dim0.dim_param == "batch") == (mode != "fixed") and (mode != "fixed" or dim0.dim_value == size)
    props = {p.key: p.value for p in model.metadata_props}
    prov = json.loads(props["porter.provenance"])
    assert props["porter.framework"] == "tfjs"
    assert prov["tfjs_format"] == meta["format"]
    assert props["porter.preprocess"] == "unknown"
    versions = json.loads(props["porter.framework_versions"])
    assert {"tensorflow", "keras", "tf2onnx"} <= set(versions)
    if name.startswith("graph"):
        assert prov["convertedBy"] == "TensorFlow.js Converter v4.22.0"
    if name in ("graph_convnet", "graph_uint8", "graph_float16"):
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


def test_tfjs_padded_nms_disagreement():
    """Where TF.js and porter differ, porter is right: the padded NMS (lowered nested while loops) selects the boxes
    the plain padded NMS op (NonMaxSuppressionV4, no loops) selects, in the same order; TF.js 4.22 returns zeros."""
    _, ins, want = golden("graph_detector")
    out = porter.convert(str(FIXTURES / "graph_detector" / "model.json")).model
    sess = ort.InferenceSession(out.SerializeToString(), providers=["CPUExecutionProvider"])
    got = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, ins)))
    v4, loops = got["padded"][0, :8], got["padded"][0, 8:]
    n_selected = int(got["counts"][0, 1])
    assert n_selected == 6 and np.array_equal(loops, v4[:6])  # porter: the loop version agrees with V4
    assert np.array_equal(want["padded"][0, :8], v4)  # and TF.js agrees on V4
    assert not want["padded"][0, 8:].any()  # TF.js's loop version: all zeros despite selecting 6


def test_graph_models_with_control_flow_become_onnx_loops(tmp_path):
    """Lowered while loops are raised to While and come out as ONNX Loop (nested for the padded NMS); detector
    outputs whose length depends on the data get named axes, not `batch`."""
    import onnx

    def loops(graph) -> int:
        n = 0
        for node in graph.node:
            n += node.op_type == "Loop"
            for a in node.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    n += loops(a.g)
        return n

    r = porter.convert(str(FIXTURES / "graph_while" / "model.json"))
    assert loops(r.model.graph) == 1 and any("1 lowered while loop raised" in n for n in r.notes)
    r = porter.convert(str(FIXTURES / "graph_detector" / "model.json"))
    assert loops(r.model.graph) == 3 and any("3 lowered while loops raised" in n for n in r.notes)
    ops = {n.op_type for n in r.model.graph.node}
    assert {"NonMaxSuppression", "TopK", "GatherND", "Resize", "ArgMax"} <= ops
    shapes = {o.name: [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim] for o in r.model.graph.output}
    assert shapes["classes"] == [1, "classes_len"] and shapes["counts"] == [1, 3] and shapes["padded"] == [1, 14]
    assert "batch" not in str(shapes)


def test_graph_detector_fixture_has_the_ops_zoo_detectors_use():
    topo = json.loads((FIXTURES / "graph_detector" / "model.json").read_text())["modelTopology"]
    ops = {n["op"] for n in topo["node"]}
    assert {"NonMaxSuppressionV3", "NonMaxSuppressionV4", "NonMaxSuppressionV5", "TopKV2", "Where", "SelectV2",
            "GatherNd", "Range", "ResizeBilinear", "ResizeNearestNeighbor", "ArgMax", "Enter", "Exit", "LoopCond"} <= ops
    topo = json.loads((FIXTURES / "graph_while" / "model.json").read_text())["modelTopology"]
    ops = {n["op"] for n in topo["node"]}
    assert {"TensorListReserve", "TensorListSetItem", "TensorListStack", "Fill", "Enter", "Switch", "Merge"} <= ops
    sig = json.loads((FIXTURES / "graph_batch1" / "model.json").read_text())["signature"]
    assert [d["size"] for d in sig["inputs"]["image"]["tensorShape"]["dim"]] == ["1", "48", "48", "1"]


def test_int32_image_input_keeps_its_dtype_and_gets_raw_pixels(tmp_path):
    """predict feeds an int32-pixel model unscaled 0..255 pixels; bench's example inputs are pixels too."""
    out = tmp_path / "int32.onnx"
    porter.convert(str(FIXTURES / "graph_int32" / "model.json"), out)
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert sess.get_inputs()[0].type == "tensor(int32)"
    images = np.random.default_rng(4).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    want = sess.run(None, {"pixels": images.astype(np.int32)})[0]
    predictor = porter.load(out, device="cpu")
    assert predictor.preprocess.mode == "raw" and predictor.preprocess.scale == 1.0
    got = predictor.predict(list(images))  # raw uint8 arrays, decoded and fed as the model's int32
    assert [p.index for p in got] == list(np.argmax(want, 1))
    np.testing.assert_array_equal(predictor.run_batched(images.astype(np.int32))["logits"], want)
    example = predictor.example_inputs(4)["pixels"]
    assert example.dtype == np.int32 and example.max() > 100 and example.min() >= 0
    with pytest.raises(porter.UsageError, match="scales them itself"):
        porter.load(out, device="cpu", preprocess="tf")
