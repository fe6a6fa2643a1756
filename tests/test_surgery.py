"""Cut detection, backbone extraction and head merging on small hand-built ONNX classifiers."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from porter.errors import UsageError
from porter.graph.cuts import choose_cut, cut_candidates
from porter.graph.surgery import FEATURES, Fingerprint, extract_backbone, merge_head

from model_builders import build

RNG = np.random.default_rng(0)


def run(model, x):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})


def image_for(model, n=3):
    shape = [n] + [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim[1:]]
    return RNG.standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("kind, name, shape, reason", [
    ("gemm", "pool", ("batch", 4, 1, 1), "GlobalAveragePool 'gap'"),
    ("matmul_add", "pool", ("batch", 4), "ReduceMean over the spatial axes"),
    ("conv1x1", "pool", ("batch", 4, 1, 1), "1x1 Conv 'classifier' on pooled features"),
    ("reducemean", "pool", (None, 1, 1, 4), "Gemm"),
])
def test_cut_lands_on_the_pooled_backbone_past_the_old_head(kind, name, shape, reason):
    model = build(kind)
    cands = cut_candidates(model)
    assert cands[0].name == name and cands[0].kind == "backbone" and cands[0].pool_axes is None
    assert tuple(cands[0].shape)[1:] == shape[1:]
    assert reason in cands[0].reason and "is cut off" in cands[0].reason
    cut = choose_cut(model)
    assert cut.name == name and cut.features == 4 and cut.note is None


@pytest.mark.parametrize("kind, kernel", [("classmaps", "1x1"), ("classmaps3x3", "3x3")])
def test_classmap_head_is_cut_off_and_the_feature_map_pooled(kind, kernel):
    cut = choose_cut(build(kind))
    assert cut.name == "relu" and cut.pool_axes == (2, 3) and cut.feature_shape == ("batch", 4)
    assert "class-map head" in cut.reason and f"{kernel} Conv class maps 'classmaps'" in cut.reason
    assert [c.name for c in cut_candidates(build(kind))] == ["relu"]  # the pooled class scores are no candidate


def test_a_model_without_head_is_cut_at_its_output_and_pooled():
    cut = choose_cut(build("noclassifier"))
    assert cut.name == "relu" and cut.pool_axes == (2, 3) and cut.features == 4  # after the ReLU, before the Flatten


def test_nhwc_feature_map_is_pooled_over_its_own_spatial_axes():
    g = helper.make_graph([helper.make_node("Relu", ["image"], ["act"]), helper.make_node("Identity", ["act"], ["out"])],
                          "nhwc", [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 8, 8, 3])],
                          [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", 8, 8, 3])])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    cut = choose_cut(model)
    assert cut.name == "act" and cut.pool_axes == (1, 2)
    x = RNG.standard_normal((2, 8, 8, 3)).astype(np.float32)
    (got,) = run(extract_backbone(model, cut), x)
    np.testing.assert_allclose(got, np.maximum(x, 0).mean(axis=(1, 2)), rtol=1e-6)


def test_no_candidate_is_an_error():
    g = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "id",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])])
    with pytest.raises(UsageError, match="no cut found.*--cut"):
        choose_cut(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8))


def test_unknown_cut_lists_candidates():
    with pytest.raises(UsageError) as e:
        choose_cut(build("gemm"), "nope")
    msg = str(e.value)
    assert "'nope' is not a tensor" in msg and "pool [batch, 4, 1, 1]" in msg
    assert "\n" not in msg


def test_weight_as_cut_is_refused():
    with pytest.raises(UsageError, match="weight"):
        choose_cut(build("gemm"), "fc_w")


def test_user_cut_at_a_feature_map_is_pooled_and_a_sequence_is_refused():
    cut = choose_cut(build("gemm"), "relu")
    assert cut.kind == "user" and cut.pool_axes == (2, 3) and cut.features == 4
    with pytest.raises(UsageError, match=r"'tokens' has shape \[\?, 4, 64\], not batch x features"):
        choose_cut(build("sequence"), "tokens")


@pytest.mark.parametrize("kind", ["gemm", "matmul_add", "conv1x1", "classmaps", "classmaps3x3", "reducemean"])
def test_extracted_backbone_computes_the_cut_tensor(kind):
    model = build(kind)
    cut = choose_cut(model)
    backbone = extract_backbone(model, cut)
    assert [o.name for o in backbone.graph.output] == [FEATURES]
    assert [i.name for i in backbone.graph.input] == [model.graph.input[0].name]
    assert backbone.opset_import == model.opset_import and backbone.ir_version == model.ir_version
    assert not any(n.op_type in ("Softmax", "Gemm", "MatMul") for n in backbone.graph.node)
    assert not any(n.name == "classmaps" for n in backbone.graph.node)
    # reference: the full model with the cut tensor exposed as an extra output, pooled by hand when porter pools it
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.append(helper.make_tensor_value_info(cut.name, TensorProto.FLOAT, None))
    x = image_for(model)
    want = run(probe, x)[-1]
    want = want.mean(axis=cut.pool_axes) if cut.pool_axes else want.reshape(3, -1)
    (got,) = run(backbone, x)
    assert got.shape == (3, 4)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def test_several_cuts_come_out_of_one_backbone():
    from porter.graph.cuts import plan_cuts

    model = build("gemm")
    cuts = plan_cuts(model, "search") + [choose_cut(model, "relu")]
    backbone = extract_backbone(model, cuts)
    assert [o.name for o in backbone.graph.output] == [f"{FEATURES}/{i}" for i in range(len(cuts))]
    x = image_for(model, 2)
    outs = run(backbone, x)
    for cut, got in zip(cuts, outs):
        (alone,) = run(extract_backbone(model, cut), x)
        np.testing.assert_array_equal(got, alone)


def test_user_cut_at_pooling_is_flattened():
    model = build("gemm")
    backbone = extract_backbone(model, "pool")
    (got,) = run(backbone, image_for(model, 2))
    assert got.shape == (2, 4)


def test_merge_head_outputs_probabilities_and_label():
    import torch

    from porter.transfer.heads import head_to_onnx, make_head, predict_proba

    model = build("gemm")
    backbone = extract_backbone(model)
    mean, std = np.array([0.5, 1, 2, 3], np.float32), np.array([0.1, 2, 3, 0.5], np.float32)
    torch.manual_seed(0)
    for kind in ("linear", "mlp"):
        head = make_head(kind, 4, 3, hidden=8, mean=mean, std=std)
        onnx_head = head_to_onnx(head, opset=17, ir_version=backbone.ir_version)
        merged = merge_head(backbone, onnx_head)
        assert [o.name for o in merged.graph.output] == ["probabilities", "label"]
        assert [i.name for i in merged.graph.input] == ["image"]
        x = image_for(model, 5)
        prob, label = run(merged, x)
        (feats,) = run(backbone, x)
        want = predict_proba(head, feats)
        np.testing.assert_allclose(prob, want, atol=1e-5, rtol=1e-4)
        assert label.dtype == np.int64 and label.shape == (5,)
        np.testing.assert_array_equal(label, want.argmax(1))


def test_merge_renames_clashing_backbone_tensors():
    from porter.transfer.heads import head_to_onnx, make_head

    model = build("gemm")
    from porter.graph.normalize import rename_tensor

    rename_tensor(model, "relu", "probabilities")  # a backbone tensor with a head output's name
    backbone = extract_backbone(model)
    merged = merge_head(backbone, head_to_onnx(make_head("linear", 4, 2), opset=17, ir_version=8))
    prob, label = run(merged, image_for(model, 2))
    assert prob.shape == (2, 2)


def test_fingerprint_ignores_generated_tensor_names():
    from porter.graph.normalize import rename_tensor

    a = build("gemm")
    b = onnx.ModelProto()
    b.CopyFrom(a)
    rename_tensor(b, "relu", "const_fold_opt__57")  # what a second conversion calls the same tensor
    fa, fb = Fingerprint(a), Fingerprint(b)
    assert fa.digest == fb.digest and fa.tensor_id("relu") == fb.tensor_id("const_fold_opt__57")
    b.graph.initializer[0].raw_data = np.zeros(4 * 3 * 3 * 3, np.float32).tobytes()
    assert Fingerprint(b).digest != fa.digest


def test_fingerprint_ignores_node_names_and_metadata_but_not_weights():
    a, b = build("gemm"), build("gemm")
    assert Fingerprint(a).digest != Fingerprint(b).digest  # different random weights
    c = onnx.ModelProto()
    c.CopyFrom(a)
    c.graph.node[0].name = "renamed"
    c.producer_name = "x"
    onnx.helper.set_model_props(c, {"porter.labels": "[\"a\"]"})
    assert Fingerprint(a).digest == Fingerprint(c).digest
