"""graph/batch.py and conversion.settle_batch: a fixed-batch export is freed only with proof, else kept fixed;
validation failures are one ValidationError line, never a traceback."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from porter.conversion import settle_batch
from porter.errors import ValidationError
from porter.graph.batch import fixed_batch, free_batch, run_in_chunks
from porter.graph.validate import make_inputs, validate
from porter.graph.inspect import TensorInfo
from porter.options import ConvertOptions

W = np.random.default_rng(0).standard_normal((16, 3)).astype(np.float32)


def reshape_model(batch: int | str, target: list[int]) -> onnx.ModelProto:
    """x[batch, 4, 4, 1] -> Reshape(target) -> MatMul W -> y: what a zoo model exported at batch 1 looks like."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 4, 4, 1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 3])
    nodes = [helper.make_node("Reshape", ["x", "shape"], ["flat"]), helper.make_node("MatMul", ["flat", "w"], ["y"])]
    inits = [numpy_helper.from_array(np.array(target, np.int64), "shape"), numpy_helper.from_array(W, "w")]
    return make_model(helper.make_graph(nodes, "g", [x], [y], inits))


def make_model(graph: onnx.GraphProto) -> onnx.ModelProto:
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def source_at_batch_1(arrays):
    """The framework model: it refuses any batch but the one it was exported at, as TF does."""
    (x,) = arrays
    if x.shape[0] != 1:
        raise ValueError(f"Input to reshape is a tensor with {x.size} values, but the requested shape has 16")
    return [x.reshape(1, 16) @ W]


def test_fixed_batch_read_off_the_inputs():
    assert fixed_batch(reshape_model(1, [1, 16])) == 1
    assert fixed_batch(reshape_model("batch", [-1, 16])) is None


def test_free_batch_rewrites_the_batch_carrying_reshape():
    freed, n = free_batch(reshape_model(1, [1, 16]), 1)
    assert n == 1 and fixed_batch(freed) is None
    shape = {i.name: numpy_helper.to_array(i) for i in freed.graph.initializer}[freed.graph.node[0].input[1]]
    assert shape.tolist() == [-1, 16]
    assert "shape" not in {i.name for i in freed.graph.initializer}  # the replaced constant is gone
    import onnxruntime as ort

    x = np.random.default_rng(1).standard_normal((3, 4, 4, 1)).astype(np.float32)
    got = ort.InferenceSession(freed.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, run_in_chunks(source_at_batch_1, 1)([x])[0], rtol=1e-5, atol=1e-6)


def test_settle_batch_frees_a_batch_1_export_only_with_proof():
    model, report, plan = settle_batch(reshape_model(1, [1, 16]), source_at_batch_1, ConvertOptions(), None)
    assert plan.mode == "freed" and plan.size == 1 and plan.rewrites == 1
    assert report.passed and report.batch_sizes == (1, 3)
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert model.graph.output[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert "proven by parity" in plan.describe()


def test_settle_batch_keeps_a_batch_it_cannot_free_and_says_why():
    # the Reshape target [2, 8] does not carry the batch: at batch 3 the freed graph can't run, so it stays fixed
    def source(arrays):
        (x,) = arrays
        assert x.shape[0] == 1
        return [x.reshape(2, 8)]

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 4, 1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])
    g = helper.make_graph([helper.make_node("Reshape", ["x", "shape"], ["y"])], "g", [x], [y],
                          [numpy_helper.from_array(np.array([2, 8], np.int64), "shape")])
    m = make_model(g)
    model, report, plan = settle_batch(m, source, ConvertOptions(), None)
    assert plan.mode == "fixed" and plan.size == 1
    assert "failed the parity proof" in plan.reason and "batch 3" in plan.reason
    assert report.passed and report.batch_sizes == (1,)
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1
    assert [d.dim_value for d in model.graph.output[0].type.tensor_type.shape.dim] == [2, 8]
    assert "fixed at 1" in plan.describe()


def test_without_validation_a_fixed_batch_stays_fixed():
    model, report, plan = settle_batch(reshape_model(1, [1, 16]), source_at_batch_1,
                                       ConvertOptions(validate=False), None)
    assert report is None and plan.mode == "fixed" and "validation is off" in plan.reason
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1


def test_run_in_chunks_needs_a_batch_axis():
    with pytest.raises(ValueError, match="scalar"):
        run_in_chunks(lambda a: [np.float32(a[0].sum())], 1)([np.ones((2, 3), np.float32)])
    with pytest.raises(ValueError, match="multiple"):
        run_in_chunks(source_at_batch_1, 2)([np.ones((3, 4, 4, 1), np.float32)])


def test_onnxruntime_failure_in_validation_is_one_line():
    """A dynamic-batch model whose Reshape spells out batch 1: onnxruntime fails at batch 3."""
    bad = reshape_model("batch", [1, 16])
    with pytest.raises(ValidationError) as e:
        validate(bad, run_in_chunks(source_at_batch_1, 1), atol=1e-4, rtol=1e-3)
    msg = str(e.value)
    assert "\n" not in msg and "onnxruntime failed on the converted model at batch 3" in msg
    assert "x float32[3, 4, 4, 1]" in msg and "cannot be reshaped" in msg
    assert "onnxruntime_src" not in msg and "[ONNXRuntimeError]" not in msg


def test_source_failure_in_validation_is_one_line():
    good = reshape_model("batch", [-1, 16])
    with pytest.raises(ValidationError) as e:
        validate(good, source_at_batch_1, atol=1e-4, rtol=1e-3)
    msg = str(e.value)
    assert "\n" not in msg and "the source model failed at batch 3" in msg and "requested shape has 16" in msg


def test_integer_outputs_are_compared_exactly():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 5])
    y = helper.make_tensor_value_info("y", TensorProto.INT64, ["batch"])
    g = helper.make_graph([helper.make_node("ArgMax", ["x"], ["y"], axis=1, keepdims=0)], "g", [x], [y])
    m = make_model(g)
    ok = validate(m, lambda a: [np.argmax(a[0], 1)], atol=1e-4, rtol=1e-3)
    assert ok.passed
    off_by_one = validate(m, lambda a: [np.argmax(a[0], 1) + (np.arange(len(a[0])) == 0)], atol=10.0, rtol=1.0,
                          raise_on_failure=False)
    assert not off_by_one.passed  # a tolerance never excuses a wrong index


def test_integer_images_get_pixel_values_and_other_integers_small_ones():
    rng = np.random.default_rng(0)
    image, tokens = make_inputs([TensorInfo("im", "int32", ("batch", 16, 16, 3)),
                                 TensorInfo("tok", "int64", ("batch", 7))], 4, rng)
    assert image.dtype == np.int32 and image.min() >= 0 and image.max() <= 255 and image.max() > 200
    assert tokens.dtype == np.int64 and tokens.max() < 10
    (u8,) = make_inputs([TensorInfo("im", "uint8", ("batch", 8))], 2, rng)
    assert u8.max() > 100


def test_card_records_the_batch_plan():
    from porter.spec import ModelCard

    card = ModelCard("x", "onnx", "0", batch={"mode": "fixed", "size": 1, "reason": "r"})
    assert json.loads(card.to_metadata()["porter.batch"]) == {"mode": "fixed", "size": 1, "reason": "r"}
    assert ModelCard.from_metadata(card.to_metadata()).batch == card.batch


def test_non_finite_weights_are_named_instead_of_a_tolerance_hint():
    w = W.copy()
    w[3, 1] = np.nan
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])
    g = helper.make_graph([helper.make_node("MatMul", ["x", "dense/kernel"], ["y"])], "g", [x], [y],
                          [numpy_helper.from_array(w, "dense/kernel")])
    # the source framework masks the NaN weight (as some do for padding rows); ONNX Runtime does not
    with pytest.raises(ValidationError, match=r"non-finite weights \(dense/kernel\).*fix those weights") as e:
        validate(make_model(g), lambda a: [a[0] @ np.nan_to_num(w)], atol=1e-4, rtol=1e-3)
    assert "loosen" not in str(e.value)
