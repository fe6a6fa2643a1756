"""PyTorch Hub importer through the Python API: local hub entry points, TorchScript files, in-memory modules,
exporter fallback, metadata, and every bad input (error class, message, nothing written)."""

from __future__ import annotations

import importlib.util
from collections import namedtuple
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import porter
from porter.errors import ModelLoadError, SourceError, UnsafeModelError, UnsupportedError, UsageError

import torch  # noqa: E402


HUB = Path(__file__).resolve().parent.parent / "fixtures" / "torchhub"


@pytest.fixture(scope="module")
def hub_dir():
    return HUB


@pytest.fixture(scope="module")
def hubconf(hub_dir):
    spec = importlib.util.spec_from_file_location("porter_test_hubconf", hub_dir / "hubconf.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def golden(hub_dir):
    return dict(np.load(hub_dir / "golden.npz"))


def _session(model):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def _dims(value):
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


def _scaled(got, ref):
    return float(np.abs(got - ref).max() / max(1.0, np.abs(ref).max()))


def _torch_run(module, *arrays):
    with torch.no_grad():
        out = module.eval()(*[torch.from_numpy(a) for a in arrays])
    return [t.numpy() for t in (out if isinstance(out, (tuple, list)) else [out])]


# --- parity -------------------------------------------------------------------------------------------------------

def test_local_entry_parity_metadata_and_dynamic_batch(hub_dir, hubconf, golden, tmp_path):
    out = tmp_path / "cnn.onnx"
    result = porter.convert(f"torchhub:{hub_dir}:small_cnn", out, validation_batch_sizes=(1, 2, 5))
    assert result.parity.passed and result.parity.max_scaled <= 1e-4
    assert sorted({r.batch_size for r in result.parity.results}) == [1, 2, 5]
    model = onnx.load(out)
    onnx.checker.check_model(model, full_check=True)
    assert [i.name for i in model.graph.input] == ["x"] and [o.name for o in model.graph.output] == ["output"]
    assert _dims(model.graph.input[0]) == ["batch", 3, 32, 32] and _dims(model.graph.output[0]) == ["batch", 10]
    assert model.opset_import[0].version == 17  # the default opset, honoured although dynamo writes 18
    card = porter.ModelCard.from_onnx(model)
    assert card.framework == "torch" and card.labels == tuple(hubconf.CIFAR_LABELS)
    assert card.preprocess.mode == "torch" and card.preprocess.layout == "NCHW" and card.preprocess.size == (32, 32)
    assert card.preprocess.mean == (0.485, 0.456, 0.406) and card.preprocess.scale == pytest.approx(1 / 255)
    assert card.provenance["exporter"] == "dynamo" and "exporter_fallback_reason" not in card.provenance
    assert card.provenance["hub_entry"] == "small_cnn" and card.framework_versions["torch"] == torch.__version__
    assert any("dynamo exporter" in n for n in result.notes)
    # no exporter stack traces (local paths) left in node metadata
    assert not any(len(n.metadata_props) for n in model.graph.node)
    # the committed weights are the ones converted: golden outputs recorded by the fixture script
    got = _session(model).run(None, {"x": golden["small_cnn.input"]})[0]
    assert _scaled(got, golden["small_cnn.output"]) <= 1e-5
    # a fresh batch size, checked against torch directly
    x = np.random.default_rng(7).standard_normal((7, 3, 32, 32)).astype(np.float32)
    ref = _torch_run(hubconf.small_cnn(), x)[0]
    assert _scaled(_session(model).run(None, {"x": x})[0], ref) <= 1e-4


def test_multiple_outputs_keep_order_and_stable_names(hub_dir, golden, tmp_path):
    out = tmp_path / "heads.onnx"
    result = porter.convert(f"torchhub:{hub_dir}:multi_head", out, input_shapes={None: (3, 24, 32)},
                            validation_batch_sizes=(1, 4))
    assert result.parity.passed and result.parity.max_scaled <= 1e-4
    model = onnx.load(out)
    assert [o.name for o in model.graph.output] == ["output_0", "output_1", "output_2"]
    assert [_dims(o) for o in model.graph.output] == [["batch", 5], ["batch", 4], ["batch", 1, 12, 16]]
    got = _session(model).run(None, {"x": golden["multi_head.input"]})
    for i, g in enumerate(got):
        assert _scaled(g, golden[f"multi_head.output_{i}"]) <= 1e-5, i
    assert porter.ModelCard.from_onnx(model).labels is None


def test_torchscript_file_uses_the_torchscript_exporter(hub_dir, golden, tmp_path):
    out = tmp_path / "scripted.onnx"
    result = porter.convert(str(hub_dir / "torchscript" / "small_cnn_scripted.pt"), out, validation_batch_sizes=(1, 3, 6))
    assert result.parity.passed and result.parity.max_scaled <= 1e-4
    model = onnx.load(out)
    card = porter.ModelCard.from_onnx(model)
    assert card.provenance["exporter"] == "torchscript" and card.provenance["torch_source"] == "torchscript"
    assert "TorchScript" in card.provenance["exporter_fallback_reason"]
    assert card.labels[0] == "airplane" and card.preprocess.size == (32, 32)  # attributes kept by torch.jit.script
    assert _dims(model.graph.input[0]) == ["batch", 3, 32, 32]
    got = _session(model).run(None, {"x": golden["small_cnn.input"]})[0]
    assert _scaled(got, golden["small_cnn_scripted.output"]) <= 1e-5


def test_fallback_to_torchscript_exporter_is_reported(hub_dir, tmp_path):
    out = tmp_path / "legacy.onnx"
    result = porter.convert(f"torchhub:{hub_dir}:legacy_only", out, validation_batch_sizes=(1, 3, 5))
    assert result.parity.passed and result.parity.max_scaled <= 1e-4
    card = porter.ModelCard.from_onnx(onnx.load(out))
    assert card.provenance["exporter"] == "torchscript"
    reason = card.provenance["exporter_fallback_reason"]
    assert reason.startswith("the dynamo exporter failed") and "data-dependent" in reason
    assert any("TorchScript-based exporter" in n and "dynamo exporter failed" in n for n in result.notes)
    assert "TorchScript-based exporter" in result.summary()


def test_opset_18_needs_no_conversion(hub_dir):
    result = porter.convert(f"torchhub:{hub_dir}:small_cnn", opset=18)
    assert result.model.opset_import[0].version == 18 and result.parity.passed
    assert not any("version converter" in n for n in result.notes)


class _TwoInOut(torch.nn.Module):
    """Two named inputs, dict outputs (keys become output names, in order)."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.fc = torch.nn.Linear(4 + 5, 3)

    def forward(self, image, extra):
        f = torch.relu(self.conv(image)).mean(dim=(2, 3))
        return {"logits": self.fc(torch.cat([f, extra], dim=1)), "features": f}


Pair = namedtuple("Pair", "scores boxes")


class _Declared(torch.nn.Module):
    """Declares its input with example_inputs and returns a named tuple."""

    def __init__(self):
        super().__init__()
        self.example_inputs = (torch.zeros(1, 1, 12, 12),)
        self.conv = torch.nn.Conv2d(1, 2, 3)
        self.bn = torch.nn.BatchNorm2d(2)

    def forward(self, image):
        y = self.bn(self.conv(image))
        return Pair(y.amax(dim=(2, 3)), torch.sigmoid(y))


def test_in_memory_module_with_named_inputs_and_dict_outputs(tmp_path):
    torch.manual_seed(0)
    module = _TwoInOut()
    out = tmp_path / "two.onnx"
    result = porter.convert(module, out, input_shapes={"image": (3, 8, 8), "extra": (5,)},
                            validation_batch_sizes=(1, 3, 4))
    assert result.parity.passed and result.parity.max_scaled <= 1e-4
    model = onnx.load(out)
    assert [i.name for i in model.graph.input] == ["image", "extra"]
    assert [o.name for o in model.graph.output] == ["logits", "features"]
    assert all(_dims(v)[0] == "batch" for v in list(model.graph.input) + list(model.graph.output))
    assert result.card.preprocess is None  # two inputs: no image preprocessing to guess
    rng = np.random.default_rng(1)
    feed = {"image": rng.standard_normal((6, 3, 8, 8)).astype(np.float32),
            "extra": rng.standard_normal((6, 5)).astype(np.float32)}
    with torch.no_grad():
        ref = module(*[torch.from_numpy(v) for v in feed.values()])
    for got, name in zip(_session(model).run(None, feed), ("logits", "features")):
        assert _scaled(got, ref[name].numpy()) <= 1e-4


def test_in_memory_module_declaring_example_inputs_and_namedtuple_outputs():
    module = _Declared()
    result = porter.convert(module, validation_batch_sizes=(1, 2, 7))
    assert result.parity.passed
    assert [o.name for o in result.model.graph.output] == ["scores", "boxes"]
    assert _dims(result.model.graph.input[0]) == ["batch", 1, 12, 12]
    assert result.card.preprocess.channels == 1 and len(result.card.preprocess.mean) == 1


@pytest.mark.slow
def test_mobilenet_v2_style_model_from_fixture_hub(hub_dir, tmp_path):
    """MobileNetV2 (inverted residuals, depthwise convs, BatchNorm, ReLU6) as torchvision builds it, BatchNorm
    statistics calibrated so the logits have a realistic scale."""
    out = tmp_path / "mnv2.onnx"
    result = porter.convert(f"torchhub:{hub_dir}:mobilenet_v2", out, input_shapes={None: (3, 224, 224)},
                            hub_args={"calibrate": True})
    assert result.parity.passed and result.parity.max_scaled <= 1e-4 and result.parity.min_top1 == 1.0
    model = onnx.load(out)
    assert _dims(model.graph.output[0]) == ["batch", 1000]
    ops = {n.op_type for n in model.graph.node}
    assert {"Conv", "Clip", "Add"} <= ops  # ReLU6 is a Clip, residuals are Adds
    assert any(n.op_type == "Conv" and any(a.name == "group" and a.i > 1 for a in n.attribute) for n in model.graph.node)


@pytest.mark.slow
def test_torchvision_model_through_a_local_entry_point(hub_dir):
    pytest.importorskip("torchvision")  # PyPI's torchvision wheels need a CUDA build of torch
    result = porter.convert(f"torchhub:{hub_dir}:torchvision_model", input_shapes={None: (3, 224, 224)},
                            hub_args={"name": "mobilenet_v2"})
    assert result.parity.passed and result.parity.max_scaled <= 1e-4
    assert result.card.preprocess.mode == "torch"


# --- bad inputs ---------------------------------------------------------------------------------------------------

def _assert_nothing_written(directory):
    assert [p.name for p in directory.iterdir()] == []


def test_directory_without_hubconf(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "model.py").write_text("x = 1\n")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(SourceError, match=r"has no hubconf\.py, so it is not a PyTorch Hub repo"):
        porter.convert(f"torchhub:{repo}:small_cnn", out_dir / "m.onnx")
    _assert_nothing_written(out_dir)


def test_missing_entry_point_lists_the_real_ones(hub_dir, tmp_path):
    with pytest.raises(SourceError) as err:
        porter.convert(f"torchhub:{hub_dir}:resnet50", tmp_path / "m.onnx")
    msg = str(err.value)
    assert "has no entry point 'resnet50'" in msg
    for entry in ("small_cnn", "multi_head", "mobilenet_v2", "legacy_only"):
        assert entry in msg
    assert "_load_weights" not in msg  # private helpers are not entry points
    assert "SmallCNN" not in msg and "MobileNetV2" not in msg  # nor the classes hubconf builds with
    _assert_nothing_written(tmp_path)


def test_entry_point_that_raises_shows_its_message(hub_dir, tmp_path):
    with pytest.raises(ModelLoadError, match=r"'small_cnn' .* raised ValueError: the pretrained small_cnn has 10 "
                                             r"classes, not 5"):
        porter.convert(f"torchhub:{hub_dir}:small_cnn", tmp_path / "m.onnx", hub_args={"num_classes": 5})
    _assert_nothing_written(tmp_path)


def test_unknown_hub_argument_shows_the_signature(hub_dir, tmp_path):
    with pytest.raises(UsageError, match=r"unexpected keyword argument 'depth'.*small_cnn\(pretrained=True, num_classes=10\)"):
        porter.convert(f"torchhub:{hub_dir}:small_cnn", tmp_path / "m.onnx", hub_args={"depth": 3})
    _assert_nothing_written(tmp_path)


def test_entry_point_returning_something_else(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "hubconf.py").write_text("dependencies = []\n\ndef answer():\n    return 42\n")
    with pytest.raises(SourceError, match=r"'answer' of .* returned a builtins\.int, not a torch\.nn\.Module"):
        porter.convert(f"torchhub:{repo}:answer")


def test_hub_repo_with_missing_dependencies(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "hubconf.py").write_text("dependencies = ['torch', 'no_such_package_xyz']\n\ndef m():\n    pass\n")
    with pytest.raises(ModelLoadError, match=r"needs package\(s\) that are not installed: no_such_package_xyz"):
        porter.convert(f"torchhub:{repo}:m")


def test_plain_state_dict_file_is_explained(hub_dir, tmp_path):
    with pytest.raises(ModelLoadError, match=r"holds a plain state dict \(14 tensors.*weights without the "
                                             r"architecture.*torchhub:DIR:ENTRY.*porter\.convert\(model\)"):
        porter.convert(str(hub_dir / "weights" / "small_cnn.pt"), tmp_path / "m.onnx")
    _assert_nothing_written(tmp_path)


class _Pickled(torch.nn.Module):
    def forward(self, x):
        return x * 2


def test_pickled_whole_module_is_refused_without_unpickling(tmp_path):
    path = tmp_path / "whole.pt"
    torch.save(_Pickled(), path)  # a full pickle: loading it would import and run code
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(UnsafeModelError, match=r"pickled Python object.*weights_only=True.*torch\.jit\.script"):
        porter.convert(str(path), out_dir / "m.onnx")
    _assert_nothing_written(out_dir)


def test_unexportable_model_names_the_op(hub_dir, tmp_path):
    with pytest.raises(UnsupportedError) as err:
        porter.convert(f"torchhub:{hub_dir}:unexportable", tmp_path / "m.onnx")
    msg = str(err.value)
    assert "neither ONNX exporter can convert" in msg and "unsupported op(s) porter_fixture::scramble" in msg
    assert "dynamo exporter:" in msg and "TorchScript-based exporter:" in msg and "\n" not in msg
    _assert_nothing_written(tmp_path)


def test_unknown_input_shape_requires_the_flag(hub_dir, tmp_path):
    with pytest.raises(UsageError, match=r"can't tell the input shape .*multi_head.*--input-shape is required.*"
                                         r"NCHW.*--input-shape 3,224,224"):
        porter.convert(f"torchhub:{hub_dir}:multi_head", tmp_path / "m.onnx")
    _assert_nothing_written(tmp_path)


def test_wrong_input_shape_is_a_usage_error(hub_dir, tmp_path):
    with pytest.raises(UsageError, match=r"on example input\(s\) x: \[batch, 32, 32, 3\] failed.*check --input-shape"):
        porter.convert(f"torchhub:{hub_dir}:small_cnn", tmp_path / "m.onnx", input_shapes={None: (32, 32, 3)})
    _assert_nothing_written(tmp_path)


def test_input_shape_for_a_name_the_model_lacks(tmp_path):
    with pytest.raises(UsageError, match=r"--input-shape names img, but module _TwoInOut takes forward\(image, extra\)"):
        porter.convert(_TwoInOut(), input_shapes={"img": (3, 8, 8)})


# --- units --------------------------------------------------------------------------------------------------------

def test_labels_only_when_they_match_a_class_axis():
    from porter.importers.torchhub import find_labels

    module = torch.nn.Linear(2, 3)
    module.categories = ["a", "b", "c"]
    assert find_labels(module, [(2, 3)]) == ("a", "b", "c")
    assert find_labels(module, [(2, 4)]) is None  # 3 names, 4 logits: not this model's labels
    module.meta = {"categories": ["w", "x", "y", "z"]}
    assert find_labels(module, [(2, 4)]) == ("w", "x", "y", "z")


def test_failing_ops_are_named_from_both_exporters_messages():
    from porter.importers.torchhub.exporting import failing_ops

    dyn = "No ONNX function found for <OpOverload(op='torchvision.nms', overload='default')>"
    ts = "Exporting the operator 'aten::unique_dim' to ONNX opset version 17 is not supported."
    assert failing_ops(dyn, ts) == ["torchvision::nms", "aten::unique_dim"]
