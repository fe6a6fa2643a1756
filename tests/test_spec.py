"""Typed metadata: presets mean what they say, and the model card survives a round trip through ONNX."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

from porter.errors import UsageError
from porter.spec import (ModelCard, OutputFigures, ParityRecord, PartialTraining, PreprocessSpec, TaskTraining,
                         TrainingRecord)


def _apply(spec: PreprocessSpec, pixels: np.ndarray) -> np.ndarray:
    px = pixels[..., ::-1] if spec.channel_order == "BGR" else pixels
    return (px * spec.scale - np.array(spec.mean)) / np.array(spec.std)


@pytest.mark.parametrize("mode, lo, hi", [("raw", 0, 255), ("unit", 0, 1), ("tf", -1, 1)])
def test_presets_map_pixel_range(mode, lo, hi):
    spec = PreprocessSpec.preset(mode)
    out = _apply(spec, np.array([[0.0, 0.0, 0.0], [255.0, 255.0, 255.0]]))
    np.testing.assert_allclose(out[0], lo, atol=1e-9)
    np.testing.assert_allclose(out[1], hi, atol=1e-9)


def test_caffe_is_bgr_mean_subtraction_and_torch_is_imagenet_stats():
    caffe = PreprocessSpec.preset("caffe")
    out = _apply(caffe, np.array([10.0, 20.0, 30.0]))  # RGB pixel
    np.testing.assert_allclose(out, [30 - 103.939, 20 - 116.779, 10 - 123.68])
    torch = PreprocessSpec.preset("torch", layout="NCHW")
    np.testing.assert_allclose(_apply(torch, np.array([255.0, 0.0, 127.5])),
                               [(1 - 0.485) / 0.229, (0 - 0.456) / 0.224, (0.5 - 0.406) / 0.225])


def test_overrides_and_bad_values():
    spec = PreprocessSpec.preset("unit", mean=[0.5], std=[0.25, 0.5, 1.0])
    assert spec.mode == "custom" and spec.mean == (0.5, 0.5, 0.5) and spec.std == (0.25, 0.5, 1.0)
    with pytest.raises(UsageError, match="needs 1 or 3 values"):
        PreprocessSpec.preset("unit", mean=[0.1, 0.2])
    with pytest.raises(UsageError, match="must not contain 0"):
        PreprocessSpec.preset("unit", std=[0.0])
    with pytest.raises(UsageError, match="unknown preprocessing 'imagenet'"):
        PreprocessSpec.preset("imagenet")


def test_spec_built_from_lists_is_a_hashable_value():
    spec = PreprocessSpec(mean=[127.5, 127.5, 127.5], std=[127.5] * 3, size=[224, 224])
    assert spec.mean == (127.5,) * 3 and spec.size == (224, 224)
    assert spec == PreprocessSpec(mean=(127.5,) * 3, std=(127.5,) * 3, size=(224, 224))
    assert len({spec, PreprocessSpec(mean=(127.5,) * 3, std=(127.5,) * 3, size=(224, 224))}) == 1
    with pytest.raises(UsageError, match="preprocessing mean must be a sequence of numbers, got 0.5"):
        PreprocessSpec(mean=0.5)
    with pytest.raises(UsageError, match=r"preprocessing size must be a sequence of numbers, got \('a', 3\)"):
        PreprocessSpec(size=("a", 3))


def test_model_card_round_trip_through_onnx_file(tmp_path):
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", 2])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", 2])])
    model = helper.make_model(graph)
    entry = model.metadata_props.add()
    entry.key, entry.value = "author", "someone"
    card = ModelCard(source="keras:MobileNetV2", framework="keras", porter_version="0.1.0",
                     framework_versions={"keras": "3"}, preprocess=PreprocessSpec.preset("tf", size=(96, 96)),
                     labels=("cat", "dog"), parity=ParityRecord(True, {"y": OutputFigures(max_abs=1e-7)}, 1e-4, 1e-3, (1, 3), 0),
                     provenance={"exporter": "tf2onnx"}, cut="features",
                     training=TrainingRecord(examples={"train": 3, "val": 1}, seed=0, head="linear", method="lbfgs",
                                             l2=0.01))
    card.apply_to(model)
    card.apply_to(model)  # idempotent: no duplicate keys
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    loaded = onnx.load(path)
    keys = [p.key for p in loaded.metadata_props]
    assert len(keys) == len(set(keys)) and "author" in keys
    assert ModelCard.from_onnx(loaded) == card
    assert ModelCard.from_onnx(helper.make_model(graph)) is None


def test_the_parity_record_is_typed_and_read_defensively():
    record = ParityRecord(True, {"probs": OutputFigures(1e-6, 1e-5, 1e-6, 1.0), "label": OutputFigures(equal=True)},
                          1e-4, 1e-3, (1, 3), 0, check=None)
    assert ParityRecord.from_dict(record.to_dict()) == record and record.max_scaled == 1e-6
    # metadata is untrusted: anything that isn't a record is None, wrong-typed fields are dropped, never a crash
    for bad in (None, [], "x", {"passed": "yes"}, {"outputs": {}}):
        assert ParityRecord.from_dict(bad) is None
    odd = ParityRecord.from_dict({"passed": False, "outputs": {"y": {"max_abs": "big"}, "z": 3},
                                  "batch_sizes": [1, "2"], "seed": True, "atol": None})
    assert odd == ParityRecord(False, {"y": OutputFigures()}, None, None, (1,), None)
    huge = ParityRecord.from_dict({"passed": True, "atol": 10 ** 400, "outputs": {"y": {"max_abs": 10 ** 400}}})
    assert huge == ParityRecord(True, {"y": OutputFigures()}, None)  # not an OverflowError
    props = {"porter.source": "keras:x", "porter.parity": "{not json"}
    assert ModelCard.from_metadata(props).parity is None


def test_the_training_record_is_typed_and_reads_what_porter_wrote():
    """porter.training as earlier versions wrote it (one head with partial fine-tuning and augmented views; a
    multi-task model with a shared trunk) reads into the typed record and writes back the same JSON."""
    one_head = {"head": "linear", "method": "lbfgs", "l2": 0.01, "best_epoch": None, "epochs_run": None,
                "val_accuracy": 0.9, "val_loss": 0.25, "train_accuracy": 1.0, "examples": {"train": 30, "val": 6},
                "class_counts": {"cat": 18, "dog": 18}, "features": 1280, "seed": 0, "data": "/data/pets",
                "skipped": 0, "source_parity": ParityRecord(True, {"y": OutputFigures(1e-6, 1e-5, 1e-6)}, 1e-4, 1e-3,
                                                            (1, 3), 0).to_dict(),
                "partial_start": "block_16/add", "partial_layers": 3, "partial_lr": 1e-4, "partial_best_epoch": 4,
                "partial_kept": "partial", "head_only_val_accuracy": 0.85, "augment": "flip,crop", "views": 2}
    record = TrainingRecord.from_dict(one_head)
    assert record.to_dict() == one_head
    assert record.partial == PartialTraining("block_16/add", 3, 1e-4, 4, "partial", 0.85)
    assert record.augment == ("flip", "crop") and record.source_parity.passed and record.l2 == 0.01
    tasks = {"tasks": [{"name": "kind", "type": "classification", "hidden": 64, "weight": 0.5, "accuracy": 0.75},
                       {"name": "age", "type": "regression", "alpha": 2.0, "mae": 1.5, "rmse": 2.0, "r2": -0.25}],
             "examples": {"train": 40, "val": 10}, "seed": 3, "data": "table.csv"}
    record = TrainingRecord.from_dict(tasks)
    assert record.to_dict() == tasks
    assert record.tasks[1] == TaskTraining("age", "regression", alpha=2.0, mae=1.5, rmse=2.0, r2=-0.25)
    # a tail that didn't help: best epoch 0 (the head alone) is a real value, not a malformed one
    head_only = {**one_head, "partial_best_epoch": 0, "partial_kept": "head-only"}
    assert TrainingRecord.from_dict(head_only).partial.best_epoch == 0
    assert TrainingRecord.from_dict(head_only).to_dict() == head_only


def test_the_training_record_reads_malformed_values_as_absent():
    for bad in (None, [], "x", 3):
        assert TrainingRecord.from_dict(bad) is None
    odd = TrainingRecord.from_dict({"head": 3, "method": "sgd", "l2": -1.0, "lr": "big", "best_epoch": 0,
                                    "val_accuracy": 1.5, "train_accuracy": float("nan"), "val_loss": 10 ** 400,
                                    "examples": {"train": -1, "val": True, "test": 2}, "class_counts": [1, 2],
                                    "features": 0, "skipped": 2.5, "seed": True, "source_parity": {"passed": 1},
                                    "partial_layers": "3", "partial_kept": "all", "augment": ["flip"], "views": -2,
                                    "tasks": [{"name": "a", "type": "clustering"}, {"name": "b", "type": "regression",
                                                                                    "r2": 2.0, "mae": -1}, 7]})
    assert odd == TrainingRecord(examples={"test": 2}, partial=PartialTraining(),
                                 tasks=(TaskTraining("b", "regression"),))  # not an OverflowError


@pytest.mark.parametrize("key, value", [
    ("porter.training", "{not json"), ("porter.provenance", "[1, 2]"), ("porter.framework_versions", "{"),
    ("porter.batch", '{"mode": "fixed", "size": "x"}'), ("porter.labels", "[" * 100000),
    ("porter.preprocess", '{"size": [0, 2]}'), ("porter.preprocess", '{"std": [0]}'),
    ("porter.preprocess", '{"mean": ["a"]}'), ("porter.parity", '{"passed": true, "outputs": []}'),
    ("porter.tasks", "[" * 100000),
])
def test_malformed_metadata_reads_as_absent_not_a_crash(tmp_path, key, value, porter_cli):
    """A model file someone sent carries porter.* metadata; a bad value must not crash inspect or load."""
    import porter
    from model_builders import build, save

    model = onnx.load(save(build("gemm", seed=0), tmp_path / "card.onnx"))  # with a porter card
    for p in model.metadata_props:
        if p.key == key:
            p.value = value
            break
    else:
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    card = ModelCard.from_onnx(model)
    assert card.source == "test:gemm"  # the rest of the card still reads
    absent = {"porter.training": ("training", None), "porter.provenance": ("provenance", {}),
              "porter.framework_versions": ("framework_versions", {}), "porter.batch": ("batch", None),
              "porter.labels": ("labels", None), "porter.preprocess": ("preprocess", None),
              "porter.parity": ("parity", ParityRecord(True)), "porter.tasks": ("tasks", None)}[key]
    assert getattr(card, absent[0]) == absent[1]  # the bad field reads as absent
    r = porter_cli("inspect", path)
    assert r.returncode == 0 and "Traceback" not in r.stderr and "porter.source" not in r.stderr, r.stderr
    p = porter.load(path, device="cpu")
    out = p.run(p.example_inputs(2))
    assert {k: v.shape for k, v in out.items()} == {"prob": (2, 5)}
