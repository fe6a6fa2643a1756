"""Cut detection and transfer on backbones in the shapes people publish (fixtures/heads, pretrained on digits 0-4).

Where the automatic cut lands on each head shape, that the merged model computes backbone + the pooling porter
appends + the head, that the cut search picks the better cut when the answer is known, and that the feature cache
hits for sources converted afresh on every run (Keras files, TF.js model.json).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import porter
from porter.graph.cuts import cut_candidates, plan_cuts
from porter.transfer import finetune

ROOT = Path(__file__).resolve().parent.parent
HEADS = ROOT / "fixtures" / "heads"
sys.path.insert(0, str(ROOT / "examples" / "digits"))

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def converted():
    return {name: porter.convert(str(HEADS / f"{name}.keras")).model
            for name in ("dense2", "classmap", "dense1", "nohead")}


def run(model, x, outputs=None):
    if outputs:
        m = onnx.ModelProto()
        m.CopyFrom(model)
        for name in outputs:
            m.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
        model = m
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})


def named(pattern: str, name: str) -> bool:
    """Keras numbers layer scopes per session (digits_dense2_1/gap_1/...): match with the numbers left open."""
    return re.fullmatch(pattern.replace("#", r"(_\d+)?"), name) is not None


@pytest.mark.parametrize("name, tensor, shape, pooled, reason", [
    ("dense2", "digits_dense2#/gap#/Mean:0", (64, 1, 1), None, "old head of 3 dense layers"),
    ("classmap", "digits_classmap#/features#/Relu:0", (64, 8, 8), (2, 3), "before the class-map head"),
    ("dense1", "digits_dense1#/gap#/Mean:0", (64, 1, 1), None, "old head of 1 dense layer"),
    ("nohead", "digits_nohead#/features#/Relu:0", (64, 8, 8), (2, 3), "the backbone's last feature map"),
])
def test_automatic_cut_is_the_pooled_backbone(converted, name, tensor, shape, pooled, reason):
    cut = plan_cuts(converted[name], "backbone")[0]
    assert named(tensor, cut.name), cut.name
    assert tuple(cut.shape[1:]) == shape and cut.pool_axes == pooled and cut.features == 64
    assert reason in cut.reason and cut.kind == "backbone"


def test_candidates_list_the_old_heads_hidden_layers_and_earlier_blocks(converted):
    cands = cut_candidates(converted["dense2"])
    kinds = [(c.kind, c.features) for c in cands]
    assert kinds[0] == ("backbone", 64)
    assert kinds[1:3] == [("pre-logits", 32), ("pre-logits", 64)]  # fc2's output, then fc1's
    assert named("digits_dense2#/fc2#/Relu:0", cands[1].name) and named("digits_dense2#/fc1#/Relu:0", cands[2].name)
    blocks = [c for c in cands if c.kind == "block"]
    assert 2 <= len(blocks) <= 3 and all(c.pool_axes == (2, 3) for c in blocks)
    assert any(named("digits_dense2#/res_relu#/Relu:0", c.name) for c in blocks)  # after the residual Add
    # auto searches what fits in 2x the backbone's width; search takes them all
    assert sum(c.features for c in plan_cuts(converted["dense2"])) <= 128
    assert len(plan_cuts(converted["dense2"], "search")) == len(cands)
    assert [c.kind for c in cut_candidates(converted["classmap"])][0] == "backbone"
    assert not any(c.features == 5 for c in cut_candidates(converted["classmap"]))  # never the old class scores


def digits(classes, n_per_class=None, seed=0):
    from prepare_data import digit_images

    x, y = digit_images(classes)
    if n_per_class:
        rng = np.random.default_rng(seed)
        keep = np.concatenate([rng.permutation(np.flatnonzero(y == c))[:n_per_class] for c in classes])
        x, y = x[keep], y[keep]
    return x[..., None], y


def test_merged_model_is_backbone_plus_appended_pooling_plus_head(converted, tmp_path):
    model = converted["classmap"]
    x, y = digits((5, 6, 7, 8, 9), n_per_class=40)
    r = finetune(model, (x, y), cut="backbone", cache=False, progress=False)
    cut = r.metrics.cut
    assert cut.pooled == [2, 3] and cut.features == 64 and r.metrics.training.method == "lbfgs"
    assert r.val_accuracy > 0.85
    images = x[:24].astype(np.float32) / 255.0  # the "unit" preprocessing the Keras model was trained with
    (fmap,) = run(model, images, [cut.tensor])[-1:]
    feats = fmap.mean(axis=(2, 3))
    from porter.transfer.heads import head_layers

    mean, std, [(w, b)] = head_layers(r.head)
    logits = ((feats - mean) / std) @ w.T + b
    want = np.exp(logits - logits.max(1, keepdims=True))
    want /= want.sum(1, keepdims=True)
    prob, label = run(r.model, images)
    np.testing.assert_allclose(prob, want, atol=1e-5)
    np.testing.assert_array_equal(label, want.argmax(1))
    assert not any(n.op_type == "Softmax" and not n.name.startswith("porter/") for n in r.model.graph.node)


def known_answer_model() -> onnx.ModelProto:
    """An image model whose backbone output forgets the red channel, which an earlier block still has.

    block = image + conv3x3(image) (a residual Add, NCHW; only its red channel sees red); backbone = relu(1x1 conv reading green and blue only)
    -> GlobalAveragePool -> Gemm -> Softmax. A task decided by redness is solvable at the block, not at the backbone.
    """
    rng = np.random.default_rng(0)
    conv = rng.normal(0, 0.1, (3, 3, 3, 3)).astype(np.float32)
    conv[1:, 0] = 0  # green and blue of the block don't see red
    mix = np.zeros((4, 3, 1, 1), np.float32)
    mix[:, 1:, 0, 0] = rng.normal(0, 1, (4, 2))  # no weight on red
    inits = [numpy_helper.from_array(conv, "conv_w"), numpy_helper.from_array(mix, "mix_w"),
             numpy_helper.from_array(rng.normal(0, 1, (2, 4)).astype(np.float32), "fc_w"),
             numpy_helper.from_array(np.zeros(2, np.float32), "fc_b")]
    nodes = [helper.make_node("Conv", ["image", "conv_w"], ["conv"], pads=[1, 1, 1, 1]),
             helper.make_node("Add", ["image", "conv"], ["block"], name="residual"),
             helper.make_node("Conv", ["block", "mix_w"], ["mixed"]),
             helper.make_node("Relu", ["mixed"], ["features"]),
             helper.make_node("GlobalAveragePool", ["features"], ["pool"]),
             helper.make_node("Flatten", ["pool"], ["flat"]),
             helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logits"], transB=1),
             helper.make_node("Softmax", ["logits"], ["prob"], axis=1)]
    g = helper.make_graph(nodes, "forgets_red", [helper.make_tensor_value_info("image", TensorProto.FLOAT,
                                                                                 ["batch", 3, 8, 8])],
                          [helper.make_tensor_value_info("prob", TensorProto.FLOAT, ["batch", 2])], initializer=inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_search_picks_the_cut_that_has_the_answer():
    model = known_answer_model()
    rng = np.random.default_rng(1)
    n = 160
    y = rng.integers(0, 2, n)
    pixels = rng.integers(0, 256, (n, 8, 8, 3))
    pixels[..., 0] = np.where(y[:, None, None] == 1, rng.integers(150, 256, (n, 8, 8)), rng.integers(0, 100, (n, 8, 8)))
    pixels = pixels.astype(np.uint8)
    r = finetune(model, (pixels[:120], y[:120]), preprocess="unit", cache=False, progress=False)
    search = {row.tensor: row for row in r.metrics.cut_search}
    assert set(search) >= {"pool", "block"} and search["block"].chosen and not search["pool"].chosen
    assert search["block"].val_loss < search["pool"].val_loss - search["block"].val_loss_se_vs_first
    assert r.metrics.cut.tensor == "block" and r.metrics.cut.pooled == [2, 3]
    assert "chosen on validation among" in r.summary() and "<- chosen" in r.summary()
    from porter.imaging import to_tensor

    _, label = run(r.model, to_tensor(list(pixels[120:]), r.card.preprocess, 3))
    assert (label == y[120:]).mean() > 0.95
    backbone_only = finetune(model, (pixels[:120], y[:120]), preprocess="unit", cut="backbone", cache=False,
                             progress=False)
    _, label = run(backbone_only.model, to_tensor(list(pixels[120:]), r.card.preprocess, 3))
    assert (label == y[120:]).mean() < 0.8  # what the backbone's own output allows


def test_search_for_an_mlp_head_chooses_its_own_l2_and_leaves_the_adamw_settings_to_the_mlp():
    model = known_answer_model()
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, 80)
    pixels = rng.integers(0, 256, (80, 8, 8, 3)).astype(np.uint8)
    r = finetune(model, (pixels, y), preprocess="unit", head="mlp", hidden=8, epochs=3, weight_decay=0.3,
                 cache=False, progress=False)
    from porter.transfer.probe import L2_GRID

    assert len(r.metrics.cut_search) >= 2
    assert all(row.l2 != 0.3 and min(L2_GRID) <= row.l2 <= max(L2_GRID) for row in r.metrics.cut_search)
    assert r.metrics.training.method == "adamw" and r.metrics.training.chosen.weight_decay == 0.3


@pytest.mark.parametrize("source", [str(HEADS / "dense1.keras"),
                                    "tfjs:" + str(ROOT / "fixtures" / "tfjs" / "layers_sequential" / "model.json")])
def test_second_finetune_from_a_converted_source_reads_the_cache(source, tmp_path):
    from model_builders import make_folder

    is_keras = source.endswith(".keras")
    data = make_folder(tmp_path / "data", n=8, size=32 if is_keras else 20, modes=("L",) if is_keras else ("RGB",))
    cache = tmp_path / "cache"
    first = finetune(source, data, preprocess="unit", cache_dir=cache, progress=False)
    assert not first.features_cached and list(cache.glob("*.npz"))
    second = finetune(source, data, preprocess="unit", head="mlp", hidden=8, epochs=3, cache_dir=cache, progress=False)
    assert second.features_cached  # converted afresh, other generated tensor names, same fingerprint
    assert second.metrics.cut.tensor == first.metrics.cut.tensor
