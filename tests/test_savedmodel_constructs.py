"""The constructs of real TF.js graph-models, in SavedModels and in-memory Keras models: a fixed batch of 1 with
batch-carrying reshapes, tf.while_loop over a TensorArray, NMS (padded and not) with top-k, soft-NMS refused."""

from __future__ import annotations

import numpy as np
import pytest

import porter
from porter.errors import UnsupportedError

tf = pytest.importorskip("tensorflow")
RNG = np.random.default_rng(3)


def save(module, path):
    tf.saved_model.save(module, str(path), signatures=module.__call__)
    return str(path)


class Batch1(tf.Module):
    def __init__(self):
        self.k = tf.constant(RNG.normal(0, 0.3, (3, 3, 1, 4)).astype("float32"))
        self.w = tf.constant(RNG.normal(0, 0.1, (8 * 8 * 4, 5)).astype("float32"))

    @tf.function(input_signature=[tf.TensorSpec([1, 16, 16, 1], tf.float32, name="image")])
    def __call__(self, x):
        y = tf.reshape(tf.nn.relu(tf.nn.conv2d(x, self.k, 2, "SAME")), [1, 8 * 8 * 4])
        return {"probs": tf.nn.softmax(y @ self.w)}


class Loop(tf.Module):
    def __init__(self):
        self.w = tf.constant(RNG.normal(0, 0.3, (6, 6)).astype("float32"))

    @tf.function(input_signature=[tf.TensorSpec([None, 6], tf.float32, name="x")])
    def __call__(self, x):
        ta = tf.TensorArray(tf.float32, size=3)
        h = x
        for i in tf.range(3):
            h = tf.tanh(h @ self.w) + tf.cast(i, tf.float32)
            ta = ta.write(i, h)
        return {"last": h, "steps": tf.transpose(ta.stack(), [1, 0, 2])}


class Nms(tf.Module):
    def __init__(self, sigma: float = 0.0):
        self.sigma = sigma

    @tf.function(input_signature=[tf.TensorSpec([1, 24, 4], tf.float32, name="boxes"),
                                  tf.TensorSpec([1, 24], tf.float32, name="scores")])
    def __call__(self, boxes, scores):
        b, s = boxes[0], scores[0]
        b = tf.concat([tf.minimum(b[:, :2], b[:, 2:]), tf.maximum(b[:, :2], b[:, 2:])], 1)
        keep, kept_scores = tf.image.non_max_suppression_with_scores(b, s, 6, 0.5, 0.2, self.sigma)
        padded, valid = tf.image.non_max_suppression_padded(b, s, 6, 0.5, 0.2, pad_to_max_output_size=True)
        top, top_idx = tf.math.top_k(s, 4)
        return {"keep": keep, "kept_scores": kept_scores, "padded": padded, "valid": valid, "top": top,
                "top_idx": top_idx}


def test_savedmodel_at_batch_1_is_freed_with_proof(tmp_path):
    r = porter.convert(save(Batch1(), tmp_path / "sm"), tmp_path / "m.onnx")
    assert r.batch.mode == "freed" and r.batch.rewrites >= 1
    assert r.parity.passed and r.parity.batch_sizes == (1, 3)
    assert "batch: dynamic (exported at batch 1" in r.summary()


def test_savedmodel_while_loop_over_a_tensor_array(tmp_path):
    import onnxruntime as ort

    path = save(Loop(), tmp_path / "sm")
    r = porter.convert(path, tmp_path / "m.onnx")
    assert r.batch.mode == "dynamic" and r.parity.passed
    assert "Loop" in {n.op_type for n in r.model.graph.node}
    x = RNG.standard_normal((5, 6)).astype(np.float32)
    want = tf.saved_model.load(path).signatures["serving_default"](x=tf.constant(x))
    got = dict(zip(["last", "steps"], ort.InferenceSession(str(tmp_path / "m.onnx")).run(["last", "steps"], {"x": x})))
    np.testing.assert_allclose(got["steps"], want["steps"].numpy(), atol=1e-5)
    np.testing.assert_allclose(got["last"], want["last"].numpy(), atol=1e-5)


def test_savedmodel_nms_and_top_k_keep_a_fixed_batch_and_data_dependent_axes(tmp_path):
    r = porter.convert(save(Nms(), tmp_path / "sm"), tmp_path / "m.onnx")
    assert r.parity.passed
    # the outputs have no batch axis at all (NMS over one image): a dynamic batch can't be proven
    assert r.batch.mode == "fixed" and r.batch.size == 1
    shapes = {o.name: [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim] for o in r.model.graph.output}
    assert shapes["keep"] == ["keep_len"] and shapes["kept_scores"] == ["kept_scores_len"]
    assert shapes["padded"] == [6] and shapes["top"] == [4] and shapes["valid"] == []
    ops = {n.op_type for n in r.model.graph.node}
    assert {"NonMaxSuppression", "TopK", "Loop"} <= ops
    assert [o.name for o in r.model.graph.output] == sorted(shapes)  # signature keys, in the signature's order


def test_soft_nms_is_refused_not_converted_to_hard_nms(tmp_path):
    with pytest.raises(UnsupportedError, match=r"soft-NMS \(NonMaxSuppressionV5 with soft_nms_sigma 0.5\)"):
        porter.convert(save(Nms(sigma=0.5), tmp_path / "sm"))


def test_keras_model_with_a_while_loop(tmp_path):
    keras = pytest.importorskip("keras")

    class Unrolled(keras.layers.Layer):
        def call(self, x):
            def body(i, h):
                return i + 1, tf.nn.relu(h) * 0.5 + x

            return tf.while_loop(lambda i, h: i < 4, body, [tf.constant(0), x])[1]

    inp = keras.Input((5,), name="features")
    out = keras.layers.Dense(3, name="head")(Unrolled()(keras.layers.Dense(5)(inp)))
    model = keras.Model(inp, out)
    r = porter.convert(model, tmp_path / "m.onnx")
    assert r.parity.passed and r.batch.mode == "dynamic"
    assert "Loop" in {n.op_type for n in r.model.graph.node}


class JoinsAConstant(tf.Module):
    """Batch-major, but it concatenates a [1, 4] constant to its pooled features: it runs only at batch 1."""

    def __init__(self):
        self.k = tf.constant(RNG.normal(0, 0.3, (3, 3, 3, 16)).astype("float32"))
        self.extra = tf.constant(RNG.normal(0, 0.3, (1, 4)).astype("float32"))
        self.w = tf.constant(RNG.normal(0, 0.3, (20, 5)).astype("float32"))

    @tf.function(input_signature=[tf.TensorSpec([1, 8, 8, 3], tf.float32, name="image")])
    def __call__(self, x):
        y = tf.reduce_mean(tf.nn.relu(tf.nn.conv2d(x, self.k, 1, "SAME")), [1, 2])
        return {"probs": tf.nn.softmax(tf.concat([y, self.extra], 1) @ self.w)}


class SqueezesTheBatch(tf.Module):
    def __init__(self):
        self.k = tf.constant(RNG.normal(0, 0.3, (3, 3, 3, 16)).astype("float32"))
        self.w = tf.constant(RNG.normal(0, 0.3, (16, 5)).astype("float32"))

    @tf.function(input_signature=[tf.TensorSpec([1, 8, 8, 3], tf.float32, name="image")])
    def __call__(self, x):
        y = tf.squeeze(tf.nn.relu(tf.nn.conv2d(x, self.k, 1, "SAME")), 0)  # H x W x C from here on
        y = tf.reduce_mean(y, [0, 1], keepdims=True)[0]
        return {"probs": tf.nn.softmax(y @ self.w)}


def test_finetune_and_predict_a_model_fixed_at_batch_1(tmp_path):
    from model_builders import make_folder

    r = porter.convert(save(JoinsAConstant(), tmp_path / "sm"), tmp_path / "m.onnx", preprocess="unit")
    assert r.batch.mode == "fixed" and "Concat" in r.batch.reason
    data = make_folder(tmp_path / "data", n=10)
    ft = porter.finetune(tmp_path / "m.onnx", data, tmp_path / "ft.onnx", progress=False)
    assert ft.model.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1  # still fixed
    predictor = porter.load(tmp_path / "ft.onnx", device="cpu")
    assert predictor.batch_size == 1
    images = sorted((data / "red").glob("*.png")) + sorted((data / "blue").glob("*.png"))
    labels = [p.label for p in predictor.predict([str(p) for p in images])]
    assert np.mean([lab == p.parent.name for lab, p in zip(labels, images)]) > 0.9


def test_finetune_refuses_a_model_without_a_batch_axis_inside(tmp_path):
    from model_builders import make_folder

    r = porter.convert(save(SqueezesTheBatch(), tmp_path / "sm"), tmp_path / "m.onnx", preprocess="unit")
    assert r.batch.mode == "fixed" and "Squeeze" in r.batch.reason
    with pytest.raises(porter.UsageError, match="fixed batch of 1 and its tensors before the old head have no batch"):
        porter.finetune(tmp_path / "m.onnx", make_folder(tmp_path / "data", n=4), progress=False)
