"""Bad values are refused up front, in one line, before any conversion or training work starts."""

from __future__ import annotations


import pytest

import porter
from porter.errors import ModelLoadError, UsageError
from porter.options import ConvertOptions


@pytest.mark.parametrize("kwargs, message", [
    ({"atol": -1}, r"--atol must be a finite number >= 0, got -1"),
    ({"rtol": float("nan")}, r"--rtol must be a finite number >= 0, got nan"),
    ({"mean": (float("nan"), 1, 1)}, r"--mean must be finite numbers, got nan,1,1"),
    ({"std": (float("inf"),)}, r"--std must be finite numbers other than 0, got inf"),
    ({"std": (0.5, 0, 0.5)}, r"--std must be finite numbers other than 0, got 0.5,0,0.5"),
])
def test_convert_options_refuse_bad_numbers(kwargs, message):
    with pytest.raises(UsageError, match=message):
        ConvertOptions.from_kwargs(**kwargs)


def test_finetune_options_refuse_a_zero_std(tmp_path):
    with pytest.raises(UsageError, match="--std must be finite numbers other than 0"):
        porter.finetune(tmp_path / "none.onnx", tmp_path / "none", std=0)


def test_a_deeply_nested_model_json_is_one_error(tmp_path):
    deep = "[" * 100000 + "]" * 100000
    path = tmp_path / "model.json"
    path.write_text('{"modelTopology": ' + deep + ', "weightsManifest": []}')
    with pytest.raises(ModelLoadError, match="nests its JSON too deeply"):
        porter.convert(f"tfjs:{path}")


def test_a_binary_labels_file_is_one_line(tmp_path, porter_cli, fixtures_dir):
    labels = tmp_path / "labels.txt"
    labels.write_bytes(b"\xff\xfe\x00\x81binary")
    r = porter_cli("convert", fixtures_dir / "tfjs" / "graph_int32" / "model.json", "-o", tmp_path / "m.onnx",
                   "--labels", labels)
    assert r.returncode != 0 and r.stderr.strip() == (f"porter: error: labels file {labels} is not UTF-8 text; give a "
                                                      f"text file with one class name per line")
    assert not (tmp_path / "m.onnx").exists()


def test_an_input_shape_for_an_input_the_model_lacks_is_an_error(fixtures_dir):
    with pytest.raises(UsageError, match=r"--input-shape names 'nosuch', but the model's inputs are pixels"):
        porter.convert(str(fixtures_dir / "tfjs" / "graph_int32" / "model.json"), input_shapes={"nosuch": (16, 16, 3)})


def test_an_input_shape_the_source_keeps_fixed_is_an_error(fixtures_dir, tmp_path):
    keras_file = str(fixtures_dir / "heads" / "dense1.keras")  # input fixed at 32 x 32 x 1
    with pytest.raises(UsageError, match=r"--input-shape 64,64,1: the model's input 'image' is \[batch, 32, 32, 1\] "
                                         r"and its source keeps those dims fixed"):
        porter.convert(keras_file, tmp_path / "m.onnx", input_shapes={None: (64, 64, 1)})
    assert not (tmp_path / "m.onnx").exists()
    assert porter.convert(keras_file, input_shapes={None: (32, 32, 1)}, validate=False).model is not None
    with pytest.raises(UsageError, match=r"--input-shape 64,64: the model's input 'image' is \[batch, 32, 32, 1\], "
                                         r"3 dims after the batch; give that many"):
        porter.convert(keras_file, input_shapes={None: (64, 64)})


def test_a_keras_application_takes_its_shape_under_its_input_name(tmp_path):
    r = porter.convert("keras:MobileNetV2", weights="none", input_shapes={"input_layer": (96, 96, 3)}, validate=False)
    assert [list(i.type.tensor_type.shape.dim)[1].dim_value for i in r.model.graph.input] == [96]


@pytest.mark.parametrize("source", ["keras", "tfjs-url"])
def test_an_opset_tf2onnx_lacks_is_refused_before_loading(fixtures_dir, source):
    # a URL nothing listens on: refusing before the download is what makes this a UsageError, not a NetworkError
    ref = str(fixtures_dir / "heads" / "dense1.keras") if source == "keras" else "tfjs:http://127.0.0.1:9/model.json"
    with pytest.raises(UsageError, match=r"--opset 19: tf2onnx, which converts Keras and TF.js sources, targets "
                                         r"opsets up to 18; give --opset 18 or lower"):
        porter.convert(ref, opset=19)


def test_options_a_source_does_not_use_are_named(fixtures_dir):
    r = porter.convert(str(fixtures_dir / "heads" / "dense1.keras"), weights="none", trust_repo=True,
                       hub_args={"pretrained": False}, validate=False)
    assert r.notes[:3] == ["--weights is ignored: only keras:NAME applications use it",
                           "--hub-arg is ignored: only torchhub: entry points use it",
                           "--trust-repo is ignored: only torchhub:OWNER/REPO GitHub repos (a local folder you name "
                           "is trusted by naming it) use it"]
    used = porter.convert(str(fixtures_dir / "heads" / "dense1.keras"), unsafe=True, validate=False)
    assert not any("ignored" in n for n in used.notes)  # --unsafe is a Keras file's option


@pytest.mark.parametrize("workers", [0, -1])
def test_finetune_workers_must_be_positive(tmp_path, workers):
    with pytest.raises(UsageError, match=f"--workers must be a positive integer, got {workers}"):
        porter.finetune(tmp_path / "none.onnx", tmp_path / "none", workers=workers)


def test_a_batch_that_cannot_fit_in_memory_is_refused_before_allocating():
    from porter.runtime import load
    from porter.runtime.bench import bench
    from runtime_models import classifier

    with pytest.raises(UsageError, match=r"batch size 10000000000 \(its inputs alone\) needs .* GiB, more than half"):
        bench(load(classifier(), device="cpu"), [10_000_000_000], min_seconds=0.0, warmup=0)


def test_an_mlp_head_that_cannot_fit_in_memory_is_refused(tmp_path):
    from model_builders import build, make_folder, save

    src = save(build("gemm"), tmp_path / "m.onnx")
    data = make_folder(tmp_path / "data", n=4)
    with pytest.raises(UsageError, match=r"an MLP head of [\d,]+ parameters \(--hidden 1000000000\) needs .* GiB"):
        porter.finetune(src, data, head="mlp", hidden=1_000_000_000, progress=False, cache_dir=tmp_path / "c")
