"""porter export --triton: repositories Triton's own schema accepts, field by field, for each kind of porter model."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper as h

import porter
from porter.errors import UnsupportedError, UsageError
from porter.spec import PreprocessSpec
from runtime_models import _finish, card_for, classifier, save, write_images

model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2",
                                       reason="tritonclient[grpc] (installed by the test setup) is absent")
from google.protobuf import text_format  # noqa: E402


def parse(folder):
    return text_format.Parse((folder / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())


def test_a_classifier_with_dynamic_batch(tmp_path):
    src = save(classifier(size=(8, 8), classes=3, labels=("cat", "dog", "owl")), tmp_path / "pets.onnx")
    result = porter.export_triton(src, tmp_path / "repo", max_batch_size=32, instances=2)
    folder = tmp_path / "repo" / "pets"
    cfg = parse(folder)
    assert cfg.name == "pets" and cfg.platform == "onnxruntime_onnx" and cfg.max_batch_size == 32
    (inp,), outs = cfg.input, {o.name: o for o in cfg.output}
    assert inp.data_type == model_config_pb2.TYPE_FP32 and list(inp.dims) == [3, 8, 8]  # no batch axis
    assert outs["probabilities"].label_filename == "labels.txt" and list(outs["probabilities"].dims) == [3]
    assert (folder / "labels.txt").read_text().split() == ["cat", "dog", "owl"]
    assert list(cfg.dynamic_batching.preferred_batch_size) == [8, 16, 32]
    assert cfg.instance_group[0].count == 2 and cfg.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_CPU
    spec = PreprocessSpec.from_dict(json.loads(cfg.parameters["porter.preprocess"].string_value))
    assert spec.size == (8, 8) and spec.layout == "NCHW"
    assert onnx.load(str(folder / "1" / "model.onnx")).graph.input[0].name == inp.name
    assert result.max_batch_size == 32 and "dynamic batching" in result.summary()


def test_a_fixed_batch_model_keeps_its_full_dims(tmp_path):
    g = h.make_graph([h.make_node("Relu", ["x"], ["y"])], "fixed", [h.make_tensor_value_info("x", T.FLOAT, [1, 4])],
                     [h.make_tensor_value_info("y", T.FLOAT, [1, 4])])
    src = save(_finish(g, card_for(None)), tmp_path / "fixed.onnx")
    result = porter.export_triton(src, tmp_path / "repo")
    cfg = parse(tmp_path / "repo" / "fixed")
    assert cfg.max_batch_size == 0 and list(cfg.input[0].dims) == [1, 4] and list(cfg.output[0].dims) == [1, 4]
    assert not cfg.HasField("dynamic_batching") and "exactly 1" in result.notes[0]


def test_multi_output_and_dynamic_spatial_dims(tmp_path):
    g = h.make_graph([h.make_node("Relu", ["x"], ["a"]), h.make_node("ReduceMean", ["x"], ["m"], axes=[2, 3], keepdims=0)],
                     "multi", [h.make_tensor_value_info("x", T.FLOAT, ["N", 3, "H", "W"])],
                     [h.make_tensor_value_info("a", T.FLOAT, ["N", 3, "H", "W"]),
                      h.make_tensor_value_info("m", T.FLOAT, ["N", 3])])
    model = _finish(g, card_for(PreprocessSpec.preset("unit", layout="NCHW", channels=3)))
    porter.export_triton(save(model, tmp_path / "multi.onnx"), tmp_path / "repo", kind="gpu", tensorrt="fp16")
    cfg = parse(tmp_path / "repo" / "multi")
    assert cfg.max_batch_size == 64 and list(cfg.input[0].dims) == [3, -1, -1]
    assert {o.name: list(o.dims) for o in cfg.output} == {"a": [3, -1, -1], "m": [3]}
    assert cfg.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_GPU
    trt = cfg.optimization.execution_accelerators.gpu_execution_accelerator[0]
    assert trt.name == "tensorrt" and trt.parameters["precision_mode"] == "FP16"


def test_outputs_not_following_the_batch_get_max_batch_size_0(tmp_path):
    g = h.make_graph([h.make_node("Relu", ["x"], ["y"]), h.make_node("NonZero", ["x"], ["idx"])], "nms",
                     [h.make_tensor_value_info("x", T.FLOAT, ["N", 4])],
                     [h.make_tensor_value_info("y", T.FLOAT, ["N", 4]), h.make_tensor_value_info("idx", T.INT64, [2, "k"])])
    porter.export_triton(save(_finish(g, card_for(None)), tmp_path / "sel.onnx"), tmp_path / "repo")
    cfg = parse(tmp_path / "repo" / "sel")
    assert cfg.max_batch_size == 0 and list(cfg.input[0].dims) == [-1, 4]
    assert {o.name: (o.data_type, list(o.dims)) for o in cfg.output} == {
        "y": (model_config_pb2.TYPE_FP32, [-1, 4]), "idx": (model_config_pb2.TYPE_INT64, [2, -1])}


def test_the_client_helper_feeds_what_porter_predict_feeds(tmp_path):
    src = save(classifier(size=(8, 8), classes=3), tmp_path / "m.onnx")
    porter.export_triton(src, tmp_path / "repo")
    paths = write_images(tmp_path / "img", 3, size=(12, 10))
    x = porter.triton.preprocess(paths, tmp_path / "repo" / "m")
    assert x.shape == (3, 3, 8, 8) and x.dtype == np.float32
    p = porter.load(src, device="cpu")
    scores = p.run(x)["probabilities"]
    predicted = p.predict(paths)
    np.testing.assert_allclose(scores.max(axis=1), [r.score for r in predicted], rtol=1e-6)
    assert list(scores.argmax(axis=1)) == [r.index for r in predicted]


def test_cli_export_and_its_mistakes(tmp_path, porter_cli):
    src = save(classifier(size=(8, 8), classes=3), tmp_path / "m.onnx")
    r = porter_cli("export", src, "--triton", tmp_path / "repo", "--name", "clf")
    assert r.returncode == 0 and (tmp_path / "repo" / "clf" / "config.pbtxt").is_file(), r.stderr
    again = porter_cli("export", src, "--triton", tmp_path / "repo", "--name", "clf")
    assert again.returncode != 0 and "--force" in again.stderr and again.stderr.count("\n") == 1
    assert porter_cli("export", src, "--triton", tmp_path / "repo", "--name", "clf", "--force").returncode == 0
    for args, words in ((["--name", "../up"], "bad Triton model name"), (["--tensorrt", "fp16"], "--kind gpu"),
                        (["--max-batch-size", "0"], "positive")):
        r = porter_cli("export", src, "--triton", tmp_path / "repo2", *args)
        assert r.returncode != 0 and words in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert not (tmp_path / "up").exists()


def test_a_scalar_output_is_refused(tmp_path):
    g = h.make_graph([h.make_node("ReduceSum", ["x"], ["s"], keepdims=0)], "s",
                     [h.make_tensor_value_info("x", T.FLOAT, ["N", 4])], [h.make_tensor_value_info("s", T.FLOAT, [])])
    with pytest.raises(UnsupportedError, match="scalar"):
        porter.export_triton(save(_finish(g, None), tmp_path / "s.onnx"), tmp_path / "repo")
    with pytest.raises(UsageError, match="kind"):
        porter.export_triton(save(_finish(g, None), tmp_path / "s.onnx"), tmp_path / "repo", kind="tpu")
