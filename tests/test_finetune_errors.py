"""Every bad input of issue 5: the error class, a clear one-line message, and nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper
from PIL import Image

from porter.errors import DataError, OutputError, SourceError, UsageError
from porter.transfer import finetune

from model_builders import COLORS, build, make_folder, report_files, save, vector_model


pytestmark = pytest.mark.usefixtures("isolated_cache")


@pytest.fixture
def out(tmp_path) -> Path:
    d = tmp_path / "out"
    d.mkdir()
    return d / "model.onnx"


@pytest.fixture
def src(tmp_path) -> Path:
    return save(build("gemm"), tmp_path / "gemm.onnx")


def fails(exc, pattern, source, data, out, **kw):
    with pytest.raises(exc) as e:
        finetune(source, data, out, epochs=2, progress=False, **kw)
    msg = str(e.value)
    assert "\n" not in msg
    import re

    assert re.search(pattern, msg), msg
    assert list(out.parent.iterdir()) == [], "nothing may be written on failure"
    return msg


def test_data_folder_missing(src, out, tmp_path):
    fails(DataError, r"data not found: .*nope \(no such file or directory\)", src, tmp_path / "nope", out)


def test_data_folder_empty(src, out, tmp_path):
    (tmp_path / "empty").mkdir()
    fails(DataError, r"has no class subfolders; put each class's images in a subfolder", src, tmp_path / "empty", out)


def test_images_without_class_folders(src, out, tmp_path):
    d = tmp_path / "flat"
    d.mkdir()
    Image.new("RGB", (8, 8)).save(d / "a.png")
    fails(DataError, r"has 1 images but no class subfolders", src, d, out)


def test_one_class_only(src, out, tmp_path):
    data = make_folder(tmp_path / "data", n=4, classes={"red": COLORS["red"]})
    fails(DataError, r"one class \('red'\); fine-tuning a classifier needs at least 2", src, data, out)


def test_class_folder_without_images_is_named(src, out, tmp_path):
    data = make_folder(tmp_path / "data", n=4)
    (data / "zebra").mkdir()
    (data / "zebra" / "notes.txt").write_text("not an image")
    fails(DataError, r"class folder 'zebra' in .* has no readable image", src, data, out)


def test_corrupt_images_are_skipped_counted_and_listed(src, out, tmp_path):
    data = make_folder(tmp_path / "data", n=6)
    (data / "red" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    (data / "green" / "empty.jpg").write_bytes(b"")
    r = finetune(src, data, out, epochs=2, progress=False)
    skipped = r.metrics.data.skipped
    assert sorted(s.file for s in skipped) == ["green/empty.jpg", "red/broken.png"]
    assert all(s.error for s in skipped)
    assert json.loads(report_files(out)[1].read_text())["data"]["skipped"] == [s.to_dict() for s in skipped]
    assert r.card.training.skipped == 2
    assert r.metrics.features.examples == 18
    assert "skipped: 2 unreadable file(s)" in r.summary()


def test_class_with_only_corrupt_images_fails_and_names_it(src, out, tmp_path):
    data = make_folder(tmp_path / "data", n=4, classes={"blue": COLORS["blue"], "red": COLORS["red"]})
    (data / "grey").mkdir()
    for i in range(3):
        (data / "grey" / f"{i}.png").write_bytes(b"not a png")
    fails(DataError, r"class 'grey' has no readable image: all 3 of its files failed to decode \(e\.g\. .*grey/0\.png",
          src, data, out)


def test_fewer_examples_than_the_validation_split_needs(src, out, tmp_path):
    data = make_folder(tmp_path / "data", n=4, classes={"blue": COLORS["blue"], "red": COLORS["red"]})
    (data / "green").mkdir()
    Image.new("RGB", (8, 8), COLORS["green"]).save(data / "green" / "only.png")
    fails(DataError, r"class 'green' has 1 usable example; the validation split needs at least 2 per class", src, data,
          out)


def test_cut_that_does_not_exist_lists_candidates(src, out, tmp_path):
    data = make_folder(tmp_path / "data", n=4)
    msg = fails(UsageError, r"--cut 'fc7' is not a tensor of this model; candidates: pool \[batch, 4, 1, 1\]", src,
                data, out, cut="fc7")
    assert "pool [batch, 4, 1, 1] (backbone)" in msg and len(msg) < 300  # one readable line


def test_cut_that_is_not_batch_by_features_says_its_shape(out, tmp_path):
    data = make_folder(tmp_path / "data", n=4)
    src = tmp_path / "seq.onnx"
    onnx.save(build("sequence"), src)
    fails(UsageError, r"cut tensor 'tokens' has shape \[\?, 4, 64\], not batch x features and not a rank-4 "
          r"feature map porter can pool", src, data, out, cut="tokens")


def csv_file(tmp_path, rows) -> Path:
    p = tmp_path / "d.csv"
    p.write_text("\n".join(rows) + "\n")
    return p


@pytest.fixture
def vsrc(tmp_path) -> Path:
    p = tmp_path / "vec.onnx"
    onnx.save(vector_model(), p)
    return p


def test_csv_missing_value_names_row_and_column(vsrc, out, tmp_path):
    data = csv_file(tmp_path, ["a,b,c,d,label", "1,2,3,4,x", "1,2,3,4,y", "1,,3,4,x"])
    fails(DataError, r"row 3 \(line 4\), column 'b': missing value", vsrc, data, out)


def test_csv_non_numeric_value_names_row_and_column(vsrc, out, tmp_path):
    data = csv_file(tmp_path, ["a,b,c,d,label", "1,2,3,4,x", "1,2,three,4,y"])
    fails(DataError, r"row 2 \(line 3\), column 'c': 'three' is not a number", vsrc, data, out)


def test_csv_without_the_label_column(vsrc, out, tmp_path):
    data = csv_file(tmp_path, ["a,b,c,d,kind", "1,2,3,4,x"])
    fails(DataError, r"has no column 'label' \(columns: a, b, c, d, kind\); name the label column with --label-column",
          vsrc, data, out)


def test_csv_with_the_wrong_number_of_features(vsrc, out, tmp_path):
    rows = ["a,b,c,label"] + [f"{i},{i},{i},{'xy'[i % 2]}" for i in range(10)]
    fails(DataError, r"CSV has 3 feature columns but the model takes 4 features", vsrc, csv_file(tmp_path, rows), out)


def test_csv_for_an_image_model(src, out, tmp_path):
    rows = ["a,b,c,d,label"] + [f"{i},{i},{i},{i},{'xy'[i % 2]}" for i in range(10)]
    fails(DataError, r"the data are vectors of 4 numbers but the model takes images", src, csv_file(tmp_path, rows), out)


def test_image_folder_for_a_vector_model(vsrc, out, tmp_path):
    fails(DataError, r"the data are images but the model input 'x' is \[\?, 4\], not an image", vsrc,
          make_folder(tmp_path / "data", n=4), out)


def test_image_size_that_does_not_fit_a_fixed_backbone(src, out, tmp_path):
    fails(UsageError, r"image size 16x16 doesn't fit the backbone: its input image: float32\[batch, 3, 8, 8\] takes 8x8",
          src, make_folder(tmp_path / "data", n=4), out, image_size=(16, 16))


def test_image_size_too_small_for_a_dynamic_backbone(out, tmp_path):
    model = build("gemm")
    for d in model.graph.input[0].type.tensor_type.shape.dim[2:]:
        d.Clear()
        d.dim_param = "side"
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    del conv.attribute[:]
    conv.attribute.append(helper.make_attribute("pads", [0, 0, 0, 0]))  # a 3x3 valid conv needs at least 3x3
    src = save(model, tmp_path / "dyn.onnx", preprocess=None)
    fails(UsageError, r"image size 2x2 doesn't fit the backbone \(input 'image' \[\?, 3, \?, \?\]\): .*; give "
                      r"--image-size with a size the model accepts", src, make_folder(tmp_path / "data", n=4), out,
          image_size=(2, 2), preprocess="unit")


def test_output_exists_without_force(src, out, tmp_path):
    data = make_folder(tmp_path / "data", n=4)
    out.write_bytes(b"precious")
    with pytest.raises(OutputError, match="already exists; use --force"):
        finetune(src, data, out, epochs=2, progress=False)
    assert out.read_bytes() == b"precious" and sorted(out.parent.iterdir()) == [out]
    finetune(src, data, out, epochs=2, progress=False, force=True)
    assert all(p.is_file() for p in report_files(out)) and out.read_bytes() != b"precious"


def test_an_existing_report_file_blocks_without_force(src, out, tmp_path):
    data = make_folder(tmp_path / "data", n=4)
    metrics = report_files(out)[1]
    metrics.write_text("{}")
    with pytest.raises(OutputError, match=r"model\.metrics\.json already exists"):
        finetune(src, data, out, epochs=2, progress=False)
    assert sorted(out.parent.iterdir()) == [metrics]


def test_missing_source(out, tmp_path):
    fails(SourceError, r"model not found", tmp_path / "nope.onnx", make_folder(tmp_path / "data", n=4), out)


def test_label_arrays_that_do_not_match(src, out):
    fails(DataError, r"x has 3 examples but y has 2 labels", src, (np.zeros((3, 8, 8, 3), np.uint8), [0, 1]), out)


def test_model_with_two_inputs(out, tmp_path):
    from onnx import TensorProto

    nodes = [helper.make_node("Add", ["a", "b"], ["s"]), helper.make_node("Softmax", ["s"], ["p"], axis=1)]
    g = helper.make_graph(nodes, "two", [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", 4]) for n in "ab"],
                          [helper.make_tensor_value_info("p", TensorProto.FLOAT, ["batch", 4])])
    src = tmp_path / "two.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), src)
    fails(UsageError, r"needs a model with one input; this one has 2 \(a, b\)", src,
          make_folder(tmp_path / "data", n=4), out)


def test_integer_image_input_says_what_to_do(out, tmp_path):
    """Published detectors and TF.js graph-models often take int32/uint8 pixels; say it isn't fed yet and how."""
    model = build("gemm")
    g = model.graph
    g.input[0].type.tensor_type.elem_type = onnx.TensorProto.INT32
    for node in g.node:
        node.input[:] = ["image_f" if i == "image" else i for i in node.input]
    g.node.insert(0, helper.make_node("Cast", ["image"], ["image_f"], to=onnx.TensorProto.FLOAT))
    del g.value_info[:]
    src = tmp_path / "int32.onnx"
    onnx.save(model, src)
    fails(UsageError, r"the model input image: int32\[batch, 3, 8, 8\] is int32; porter finetune feeds float32 images"
          r".*re-export the model with a float32 image input", src, make_folder(tmp_path / "data", n=4), out)


def test_a_bad_device_is_refused_before_any_data_is_read(tmp_path):
    with pytest.raises(UsageError, match=r"unknown device 'gpu'; choose one of: auto, cuda, tensorrt, openvino, cpu"):
        finetune(tmp_path / "no-model.onnx", tmp_path / "no-data", device="gpu")
