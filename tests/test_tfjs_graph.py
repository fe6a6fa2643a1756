"""Graph-model rewriting of TF.js-only ops, on a hand-written GraphDef in TF.js's JSON layout.

The nodes are written the way older TF.js converters wrote them: fused ops without ``TArgs``,
``explicit_paddings`` or ``use_cudnn_on_gpu``; a ``FusedBatchNorm`` and an ``Elu`` fused into a convolution; a
``Prelu`` fused into a matmul and a standalone ``Prelu`` op; an int32 and a string constant in the weights.
The reference is computed with plain TensorFlow ops and TF.js's definitions of each op.
"""

from __future__ import annotations

import base64
import json
import struct
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

import porter
from porter.errors import ModelLoadError

import tensorflow as tf  # noqa: E402

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "tfjs"


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def attr_list_i(*v):
    return {"list": {"i": [str(x) for x in v]}}


def const(name: str, dtype: str = "DT_FLOAT") -> dict:
    return {"name": name, "op": "Const", "attr": {"dtype": {"type": dtype}, "value": {"tensor": {"dtype": dtype}}}}


def write_graph_model(d: Path, rng) -> dict[str, np.ndarray]:
    w = {
        "w": rng.normal(0, 0.5, (3, 3, 2, 3)).astype("f4"),
        "scale": rng.uniform(0.5, 1.5, 3).astype("f4"), "offset": rng.normal(0, 0.2, 3).astype("f4"),
        "mean": rng.normal(0, 0.2, 3).astype("f4"), "var": rng.uniform(0.5, 1.5, 3).astype("f4"),
        "shape": np.array([-1, 48], "<i4"),
        "mw": rng.normal(0, 0.3, (48, 5)).astype("f4"), "mb": rng.normal(0, 0.3, 5).astype("f4"),
        "alpha": rng.uniform(0.1, 0.3, 5).astype("f4"), "alpha2": rng.uniform(0.1, 0.3, 5).astype("f4"),
    }
    nodes = [
        {"name": "x", "op": "Placeholder", "attr": {"dtype": {"type": "DT_FLOAT"}, "shape": {"shape": {"dim": [
            {"size": "-1"}, {"size": "4"}, {"size": "4"}, {"size": "2"}]}}}},
        *[const(k, "DT_INT32" if k == "shape" else "DT_FLOAT") for k in w],
        const("vocab", "DT_STRING"),
        {"name": "conv", "op": "_FusedConv2D", "input": ["x", "w", "scale", "offset", "mean", "var"], "attr": {
            "T": {"type": "DT_FLOAT"}, "strides": attr_list_i(1, 1, 1, 1), "padding": {"s": b64("SAME")},
            "data_format": {"s": b64("NHWC")}, "dilations": attr_list_i(1, 1, 1, 1), "epsilon": {"f": 0.001},
            "num_args": {"i": "4"}, "fused_ops": {"list": {"s": [b64("FusedBatchNorm"), b64("Elu")]}}}},
        {"name": "flat", "op": "Reshape", "input": ["conv", "shape"],
         "attr": {"T": {"type": "DT_FLOAT"}, "Tshape": {"type": "DT_INT32"}}},
        {"name": "fc", "op": "_FusedMatMul", "input": ["flat", "mw", "mb", "alpha"], "attr": {
            "T": {"type": "DT_FLOAT"}, "transpose_a": {"b": False}, "transpose_b": {"b": False}, "num_args": {"i": "2"},
            "fused_ops": {"list": {"s": [b64("BiasAdd"), b64("Prelu")]}}}},
        {"name": "p2", "op": "Prelu", "input": ["fc", "alpha2"], "attr": {"T": {"type": "DT_FLOAT"}}},
        {"name": "out", "op": "Identity", "input": ["p2"], "attr": {"T": {"type": "DT_FLOAT"}}},
    ]
    vocab = b"".join(struct.pack("<I", len(s)) + s for s in (b"cat", b"dog"))
    data = b"".join(a.tobytes() for a in w.values()) + vocab
    d.mkdir(parents=True, exist_ok=True)
    (d / "weights.bin").write_bytes(data)
    entries = [{"name": k, "shape": list(a.shape), "dtype": "int32" if a.dtype.kind == "i" else "float32"}
               for k, a in w.items()] + [{"name": "vocab", "shape": [2], "dtype": "string"}]
    doc = {"format": "graph-model", "generatedBy": "hand", "convertedBy": "TensorFlow.js Converter v1.7.0",
           "modelTopology": {"node": nodes, "library": {}, "versions": {}},
           "signature": {"inputs": {"pixels": {"name": "x:0"}}, "outputs": {"scores": {"name": "out:0"}}},
           "weightsManifest": [{"paths": ["weights.bin"], "weights": entries}]}
    (d / "model.json").write_text(json.dumps(doc))
    return w


def reference(x: np.ndarray, w: dict[str, np.ndarray]) -> np.ndarray:
    y = tf.nn.conv2d(x, w["w"], strides=1, padding="SAME")
    y = (y - w["mean"]) / np.sqrt(w["var"] + 0.001) * w["scale"] + w["offset"]
    y = tf.nn.elu(y)
    y = tf.reshape(y, [-1, 48]) @ w["mw"] + w["mb"]
    prelu = lambda v, a: tf.where(v > 0, v, a * v)  # noqa: E731 - TF.js's prelu
    return prelu(prelu(y, w["alpha"]), w["alpha2"]).numpy()


def test_fused_ops_rewritten_to_plain_tf(tmp_path):
    rng = np.random.default_rng(3)
    w = write_graph_model(tmp_path / "g", rng)
    out = tmp_path / "g.onnx"
    result = porter.convert(str(tmp_path / "g" / "model.json"), out)
    assert result.parity.passed
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["pixels"] and [o.name for o in sess.get_outputs()] == ["scores"]
    x = rng.normal(size=(4, 4, 4, 2)).astype(np.float32)
    want = reference(x, w)
    assert (want < 0).any() and (want > 0).any()  # both prelu branches exercised
    np.testing.assert_allclose(sess.run(None, {"pixels": x})[0], want, rtol=1e-4, atol=1e-5)


def test_const_without_weight_is_an_error(tmp_path):
    rng = np.random.default_rng(3)
    write_graph_model(tmp_path / "g", rng)
    doc = json.loads((tmp_path / "g" / "model.json").read_text())
    doc["modelTopology"]["node"].append(const("orphan"))
    (tmp_path / "g" / "model.json").write_text(json.dumps(doc))
    with pytest.raises(ModelLoadError, match=r"Const node 'orphan' has no value: it is not in the weights manifest"):
        porter.convert(str(tmp_path / "g" / "model.json"))


def test_signature_naming_a_missing_node(tmp_path):
    rng = np.random.default_rng(3)
    write_graph_model(tmp_path / "g", rng)
    doc = json.loads((tmp_path / "g" / "model.json").read_text())
    doc["signature"]["outputs"]["scores"]["name"] = "nowhere:0"
    (tmp_path / "g" / "model.json").write_text(json.dumps(doc))
    with pytest.raises(ModelLoadError, match=r"the signature's output 'scores' names tensor 'nowhere:0', but the graph "
                                             r"has no node 'nowhere'"):
        porter.convert(str(tmp_path / "g" / "model.json"))


def _mutated_while(tmp_path, mutate):
    import json
    import shutil

    src = FIXTURES / "graph_while"
    dst = tmp_path / "graph_while"
    shutil.copytree(src, dst)
    doc = json.loads((dst / "model.json").read_text())
    mutate(doc["modelTopology"]["node"])
    (dst / "model.json").write_text(json.dumps(doc))
    return dst / "model.json"


@pytest.mark.parametrize("op", ["LoopCond", "NextIteration", "Exit"])
def test_malformed_while_loop_is_one_error_line(tmp_path, porter_cli, op):
    def drop_first(nodes):
        nodes.remove(next(n for n in nodes if n["op"] == op))

    r = porter_cli("convert", _mutated_while(tmp_path, drop_first), "-o", tmp_path / "out.onnx")
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert r.stderr.startswith("porter: error: ") and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "out.onnx").exists()


@pytest.mark.parametrize("fixture", ["graph_convnet", "layers_sequential"])
def test_a_float_weight_declared_int32_is_refused_by_name(tmp_path, fixture):
    """A manifest saying int32 for float bytes converted 'with parity' before (both sides read the same wrong
    numbers, kernels up to 1.7e9)."""
    import shutil

    d = tmp_path / fixture
    shutil.copytree(FIXTURES / fixture, d)
    doc = json.loads((d / "model.json").read_text())
    entry = next(w for g in doc["weightsManifest"] for w in g["weights"] if w["dtype"] == "float32"
                 and len(w["shape"]) >= 2)
    entry["dtype"] = "int32"
    (d / "model.json").write_text(json.dumps(doc))
    with pytest.raises(ModelLoadError, match=rf"weight '{entry['name']}' is declared int32 in weightsManifest.*"
                                             rf"fix the dtype"):
        porter.convert(str(d / "model.json"))
