"""Keras importer end to end through the Python API: parity, normalization, metadata, every bad input."""

from __future__ import annotations

import zipfile

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import porter
from porter.errors import (ModelLoadError, NetworkError, OutputError, SourceError, UnsafeModelError,
                           UnsupportedError, UsageError, ValidationError)

import keras  # noqa: E402  (a hard dependency: a broken install must fail, not skip)


def _session(model):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def _dims(value):
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


def _no_leftovers(directory):
    return [p.name for p in directory.iterdir()]


@pytest.mark.parametrize("name, batches", [("cnn_bn.keras", (1, 2, 5)), ("two_outputs.h5", (1, 4, 7)),
                                           ("savedmodel", (1, 3, 8))])
def test_fixture_parity_at_several_batch_sizes(fixtures_dir, tmp_path, name, batches):
    out = tmp_path / "m.onnx"
    result = porter.convert(str(fixtures_dir / "keras" / name), out, validation_batch_sizes=batches)
    assert result.parity.passed and result.parity.max_scaled <= 1e-4
    assert sorted({r.batch_size for r in result.parity.results}) == sorted(batches)
    model = onnx.load(out)
    onnx.checker.check_model(model, full_check=True)
    # every input and output leads with the one dynamic axis named "batch"
    for v in list(model.graph.input) + list(model.graph.output):
        assert _dims(v)[0] == "batch", v.name
    # independent check, not trusting the validator: a fresh batch size against Keras/TF itself
    rng = np.random.default_rng(42)
    inputs = [i for i in model.graph.input]
    feed = {i.name: rng.standard_normal([6, *_dims(i)[1:]]).astype(np.float32) for i in inputs}
    got = _session(model).run(None, feed)
    if name == "savedmodel":
        import tensorflow as tf

        sig = tf.saved_model.load(str(fixtures_dir / "keras" / name)).signatures["serving_default"]
        ref = [sig(**{k: tf.constant(v) for k, v in feed.items()})["output_0"].numpy()]
    else:
        km = keras.models.load_model(fixtures_dir / "keras" / name, compile=False)
        ref = km(list(feed.values())[0], training=False)
        ref = [np.asarray(r) for r in (ref if isinstance(ref, (list, tuple)) else [ref])]
    for g, r in zip(got, ref):
        assert g.shape == r.shape
        assert np.abs(g - r).max() / max(1.0, np.abs(r).max()) <= 1e-4


def test_source_names_are_kept(fixtures_dir):
    result = porter.convert(str(fixtures_dir / "keras" / "two_outputs.h5"))
    assert [i.name for i in result.model.graph.input] == ["features"]
    assert [o.name for o in result.model.graph.output] == ["class_probs", "embedding"]
    assert result.path is None


def test_metadata_is_written_and_read_back(fixtures_dir, tmp_path):
    out = tmp_path / "cnn.onnx"
    porter.convert(f"keras:{fixtures_dir / 'keras' / 'cnn_bn.keras'}", out, preprocess="unit",
                   labels=("a", "b", "c", "d"))
    card = porter.ModelCard.from_onnx(onnx.load(out))
    assert card.framework == "keras" and card.porter_version == porter.__version__
    assert card.source == f"keras:{(fixtures_dir / 'keras' / 'cnn_bn.keras').resolve()}"  # absolute: found from anywhere
    assert set(card.framework_versions) == {"tensorflow", "keras", "tf2onnx"}
    assert card.labels == ("a", "b", "c", "d")
    assert card.preprocess.mode == "unit" and card.preprocess.size == (16, 16) and card.preprocess.layout == "NHWC"
    assert card.parity.passed is True and card.parity.outputs["probs"].max_abs < 1e-5
    assert card.provenance["exporter"] == "tf2onnx"


def test_keras_application_mobilenetv2_without_weights(tmp_path):
    out = tmp_path / "mnv2.onnx"
    result = porter.convert("keras:MobileNetV2", out, weights="none", input_shapes={None: (64, 64, 3)})
    assert result.parity.passed and result.parity.max_scaled <= 1e-4
    pre = result.card.preprocess
    assert (pre.mode, pre.size, pre.channel_order, pre.scale, pre.mean) == ("tf", (64, 64), "RGB", 1 / 127.5, (1.0,) * 3)
    assert _dims(result.model.graph.input[0]) == ["batch", 64, 64, 3]
    assert out.stat().st_size > 10_000_000  # 3.5 M float32 parameters in one file


def test_application_preprocessing_families():
    from porter.importers.keras import application_preprocess

    assert application_preprocess("VGG16") == "caffe"
    assert application_preprocess("ResNet50") == "caffe"
    assert application_preprocess("MobileNetV2") == "tf"
    assert application_preprocess("DenseNet121") == "torch"
    assert application_preprocess("EfficientNetB0") == "raw"


def test_imagenet_weights_offline_names_the_cache_file(tmp_path, monkeypatch, capfd):
    import urllib.error

    from keras.src.utils import file_utils

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras_home"))
    monkeypatch.setattr(file_utils, "urlretrieve", offline)
    out = tmp_path / "m.onnx"
    with pytest.raises(NetworkError) as err:
        porter.convert("keras:MobileNetV2", out)
    msg = str(err.value)
    assert "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224.h5" in msg and "--weights none" in msg
    assert not out.exists()
    # Keras announced the download before it failed: on stderr, never on stdout (porter's results)
    captured = capfd.readouterr()
    assert "Downloading data from" not in captured.out and "Downloading data from" in captured.err


def test_unknown_application_lists_close_matches():
    with pytest.raises(SourceError) as err:
        porter.convert("keras:MobilNetV2")
    assert "did you mean MobileNetV2" in str(err.value)


def test_missing_path(tmp_path):
    with pytest.raises(SourceError, match="model not found"):
        porter.convert(str(tmp_path / "nope.keras"), tmp_path / "out.onnx")
    assert _no_leftovers(tmp_path) == []


@pytest.mark.parametrize("name", ["cnn_bn.keras", "two_outputs.h5"])
def test_truncated_files(fixtures_dir, tmp_path, name):
    data = (fixtures_dir / "keras" / name).read_bytes()
    bad = tmp_path / name
    bad.write_bytes(data[: len(data) // 2])
    out = tmp_path / "out.onnx"
    with pytest.raises((ModelLoadError, SourceError)) as err:
        porter.convert(str(bad), out)
    assert "truncated" in str(err.value)
    assert not out.exists() and sorted(_no_leftovers(tmp_path)) == [name]


def test_other_kind_renamed_keras(fixtures_dir, tmp_path):
    bad = tmp_path / "model.keras"
    bad.write_text('{"not": "a model"}')
    with pytest.raises(SourceError, match=r"model.keras is not a Keras zip archive"):
        porter.convert(str(bad), tmp_path / "out.onnx")
    z = tmp_path / "other.keras"
    with zipfile.ZipFile(z, "w") as f:
        f.writestr("readme.txt", "hello")
    with pytest.raises(SourceError, match="a zip archive of another kind"):
        porter.convert(str(z), tmp_path / "out.onnx")
    assert not (tmp_path / "out.onnx").exists()


@pytest.fixture(scope="module")
def lambda_models(tmp_path_factory):
    d = tmp_path_factory.mktemp("lambda")
    m = keras.Sequential([keras.Input((4,), name="x"), keras.layers.Dense(3),
                          keras.layers.Lambda(lambda t: t * 2.0, name="double")])
    m.save(d / "lam.keras")
    m.save(d / "lam.h5")
    return d


@pytest.mark.parametrize("name", ["lam.keras", "lam.h5"])
def test_lambda_refused_unless_unsafe(lambda_models, tmp_path, name):
    out = tmp_path / "out.onnx"
    with pytest.raises(UnsafeModelError) as err:
        porter.convert(str(lambda_models / name), out)
    assert "Lambda layer(s) double" in str(err.value) and "--unsafe" in str(err.value)
    assert not out.exists()
    result = porter.convert(str(lambda_models / name), out, unsafe=True)
    assert result.parity.passed and out.exists()


def test_output_exists_needs_force(fixtures_dir, tmp_path):
    out = tmp_path / "m.onnx"
    out.write_bytes(b"precious")
    with pytest.raises(OutputError, match="already exists; use --force"):
        porter.convert(str(fixtures_dir / "keras" / "two_outputs.h5"), out)
    assert out.read_bytes() == b"precious"
    porter.convert(str(fixtures_dir / "keras" / "two_outputs.h5"), out, force=True)
    assert onnx.load(out).graph.output[0].name == "class_probs"
    assert sorted(_no_leftovers(tmp_path)) == ["m.onnx"]  # no temp files left behind


def test_output_directory_missing(fixtures_dir, tmp_path):
    with pytest.raises(OutputError, match="does not exist; create it first"):
        porter.convert(str(fixtures_dir / "keras" / "two_outputs.h5"), tmp_path / "missing" / "m.onnx")


def test_unconvertible_ops_are_all_named(tmp_path):
    import tensorflow as tf

    class Exotic(keras.layers.Layer):
        def call(self, x):
            return tf.math.igamma(tf.abs(x) + 1.0, tf.abs(x) + 1.0) + tf.math.special.bessel_i1e(x)

    inp = keras.Input((4,), name="x")
    model = keras.Model(inp, Exotic()(inp))
    out = tmp_path / "m.onnx"
    with pytest.raises(UnsupportedError) as err:
        porter.convert(model, out)
    assert "Igamma" in str(err.value)
    assert not out.exists()


def test_unknown_dims_need_input_shape(tmp_path):
    inp = keras.Input((None, None, 3), name="img")
    model = keras.Model(inp, keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(2, 3)(inp)))
    with pytest.raises(UsageError, match=r"--input-shape 224,224,3"):
        porter.convert(model)
    result = porter.convert(model, input_shapes={None: (20, 24, 3)})
    assert _dims(result.model.graph.input[0]) == ["batch", 20, 24, 3]
    with pytest.raises(UsageError, match="does not fit input"):
        porter.convert(model, input_shapes={None: (20, 24, 4)})


def test_validation_failure_names_every_output(fixtures_dir):
    from porter.graph.validate import validate

    result = porter.convert(str(fixtures_dir / "keras" / "two_outputs.h5"), validate=False)
    assert result.parity is None

    def wrong_source(arrays):
        b = arrays[0].shape[0]
        return [np.full((b, 3), 1 / 3, np.float32), np.zeros((b, 8), np.float32)]

    with pytest.raises(ValidationError) as err:
        validate(result.model, wrong_source, atol=1e-4, rtol=1e-3, batch_sizes=(1, 2))
    msg = str(err.value)
    assert "4 check(s)" in msg and "class_probs @batch 1" in msg and "embedding @batch 2" in msg
    assert len(err.value.report.failures) == 4


def test_unknown_option_is_a_usage_error():
    with pytest.raises(UsageError, match="unknown convert option"):
        porter.convert("keras:MobileNetV2", opsett=13)


def test_external_data_only_over_the_size_limit(fixtures_dir, tmp_path, monkeypatch):
    from porter import outputs

    small = tmp_path / "small.onnx"
    porter.convert(str(fixtures_dir / "keras" / "cnn_bn.keras"), small)
    assert sorted(_no_leftovers(tmp_path)) == ["small.onnx"]
    monkeypatch.setattr(outputs, "TWO_GB", 1000)  # pretend the model is huge
    monkeypatch.setattr(outputs, "EXTERNAL_THRESHOLD", 64)
    big = tmp_path / "big.onnx"
    porter.convert(str(fixtures_dir / "keras" / "cnn_bn.keras"), big)
    assert (tmp_path / "big.onnx.data").exists()
    model = onnx.load(big)  # loads its external data from beside it
    x = np.random.default_rng(0).standard_normal((2, 16, 16, 3)).astype(np.float32)
    np.testing.assert_allclose(_session(model).run(None, {"image": x})[0],
                               _session(onnx.load(small)).run(None, {"image": x})[0], rtol=1e-6)


def test_exact_gelu_converts_through_erf():
    # tf2onnx leaves TF's Erfc (Keras 3's exact gelu) unconverted; porter rewrites it as 1 - Erf
    inp = keras.Input((6,), name="x")
    model = keras.Model(inp, keras.layers.Dense(4, activation="gelu")(inp))
    result = porter.convert(model, validation_batch_sizes=(1, 5))
    ops = {n.op_type for n in result.model.graph.node}
    assert "Erf" in ops and "Erfc" not in ops
    assert result.parity.passed and result.parity.max_scaled < 1e-5


def test_savedmodel_that_touches_files_is_refused(tmp_path):
    import tensorflow as tf

    victim = tmp_path / "written-by-model.txt"

    class Sneaky(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec((None, 4), tf.float32, name="x")])
        def serve(self, x):
            tf.io.write_file(str(victim), tf.strings.as_string(tf.reduce_sum(x)))
            return {"y": x * 2.0}

    module = Sneaky()
    sm = tmp_path / "sneaky"
    tf.saved_model.save(module, str(sm), signatures={"serving_default": module.serve})
    out = tmp_path / "m.onnx"
    with pytest.raises(UnsafeModelError) as err:
        porter.convert(str(sm), out)
    assert "WriteFile" in str(err.value) and "--unsafe" in str(err.value)
    assert not victim.exists() and not out.exists()


@pytest.mark.parametrize("name", ["model.h5", "model.bin", "model"])
def test_a_keras_zip_under_another_name_loads_by_its_content(fixtures_dir, tmp_path, name):
    import shutil

    src = tmp_path / name
    shutil.copy(fixtures_dir / "keras" / "cnn_bn.keras", src)
    r = porter.convert(str(src))
    assert r.parity.passed and r.card.source_form == "keras-file"


def test_an_hdf5_model_named_keras_loads_by_its_content(fixtures_dir, tmp_path):
    import shutil

    src = tmp_path / "model.keras"
    shutil.copy(fixtures_dir / "keras" / "two_outputs.h5", src)
    r = porter.convert(str(src))
    assert r.parity.passed and r.card.source_form == "h5-file"


def test_a_successful_conversion_prints_no_tf2onnx_chatter(tmp_path, porter_cli):
    """Keras 3's exact gelu uses Erfc, which tf2onnx logs as unsupported before porter patches it."""
    keras = pytest.importorskip("keras")
    inp = keras.Input((8,), name="x")
    keras.Model(inp, keras.layers.Dense(4, activation="gelu", name="g")(inp)).save(tmp_path / "gelu.keras")
    r = porter_cli("convert", tmp_path / "gelu.keras", "-o", tmp_path / "gelu.onnx")
    assert r.returncode == 0 and "parity passed" in r.stdout
    assert r.stderr.strip() == "", r.stderr
