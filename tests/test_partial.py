"""Partial fine-tuning: the tail found, translated to torch (== ONNX Runtime), trained, written back; augmented views;
the memory-mapped feature path."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from porter.errors import UsageError
from porter.graph.cuts import choose_cut
from porter.graph.surgery import extract_backbone
from porter.graph.tail import find_tail, write_back
from porter.transfer import finetune
from porter.transfer.tail_module import TailModule

from model_builders import make_folder, run, save

pytestmark = pytest.mark.usefixtures("isolated_cache")


def _w(rng, name, *shape, scale=0.3):
    return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)


def deep_model(spatial=("h", "w"), extra_op: str | None = None, share: bool = False) -> onnx.ModelProto:
    """A small CNN with the constructs tails hold: BatchNorm, asymmetric and SAME padding, depthwise conv, Clip,
    a residual Add, HardSwish, AveragePool without pad counting, Transpose there and back, Concat, then GAP ->
    Flatten -> Gemm classifier. ``extra_op``: an op inserted before the last conv; ``share``: the last conv reuses
    the first's weights."""
    rng = np.random.default_rng(3)
    inits = [_w(rng, "c1_w", 8, 3, 3, 3), _w(rng, "c1_b", 8),
             numpy_helper.from_array(rng.uniform(0.5, 1.5, 8).astype(np.float32), "bn_scale"),
             _w(rng, "bn_bias", 8), _w(rng, "bn_mean", 8),
             numpy_helper.from_array(rng.uniform(0.5, 2.0, 8).astype(np.float32), "bn_var"),
             _w(rng, "dw_w", 8, 1, 3, 3), _w(rng, "dw_b", 8), _w(rng, "pw_w", 8, 8, 1, 1), _w(rng, "pw_b", 8),
             _w(rng, "last_w", 8, 16, 1, 1), _w(rng, "last_b", 8), _w(rng, "fc_w", 5, 8), _w(rng, "fc_b", 5),
             numpy_helper.from_array(np.array(0.0, np.float32), "lo"),
             numpy_helper.from_array(np.array(6.0, np.float32), "hi")]
    nodes = [
        helper.make_node("Conv", ["image", "c1_w", "c1_b"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("BatchNormalization", ["c1", "bn_scale", "bn_bias", "bn_mean", "bn_var"], ["bn"],
                         epsilon=1e-3),
        helper.make_node("Relu", ["bn"], ["r1"]),
        helper.make_node("MaxPool", ["r1"], ["mp"], kernel_shape=[2, 2], strides=[2, 2], pads=[0, 0, 1, 1]),
        helper.make_node("Conv", ["mp", "dw_w", "dw_b"], ["dw"], group=8, auto_pad="SAME_UPPER",
                         kernel_shape=[3, 3], name="depthwise"),
        helper.make_node("Clip", ["dw", "lo", "hi"], ["relu6"]),
        helper.make_node("Conv", ["relu6", "pw_w", "pw_b"], ["pw"], name="pointwise"),
        helper.make_node("Add", ["pw", "mp"], ["res"]),
        helper.make_node("HardSwish", ["res"], ["hs"]),
        helper.make_node("AveragePool", ["hs"], ["avg"], kernel_shape=[3, 3], pads=[1, 1, 1, 1],
                         count_include_pad=0),
        helper.make_node("Transpose", ["avg"], ["nhwc"], perm=[0, 2, 3, 1]),
        helper.make_node("Transpose", ["nhwc"], ["nchw"], perm=[0, 3, 1, 2]),
        helper.make_node("Concat", ["nchw", "hs"], ["cat"], axis=1),
    ]
    last_in = "cat"
    if extra_op:
        nodes.append(helper.make_node(extra_op, ["cat"], ["extra"], size=3))
        last_in = "extra"
    if share:  # a 16 -> 8 conv can't reuse conv1's 3-channel weight: share the pointwise bias instead
        nodes.append(helper.make_node("Conv", [last_in, "last_w", "pw_b"], ["last"], name="last"))
    else:
        nodes.append(helper.make_node("Conv", [last_in, "last_w", "last_b"], ["last"], name="last"))
    nodes += [helper.make_node("Relu", ["last"], ["feat"]),
              helper.make_node("GlobalAveragePool", ["feat"], ["gap"], name="gap"),
              helper.make_node("Flatten", ["gap"], ["flat"], axis=1),
              helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logits"], transB=1, name="fc"),
              helper.make_node("Softmax", ["logits"], ["prob"], axis=1)]
    x = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, *spatial])
    out = helper.make_tensor_value_info("prob", TensorProto.FLOAT, ["batch", 5])
    model = helper.make_model(helper.make_graph(nodes, "deep", [x], [out], initializer=inits),
                              opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    return model


def ort_pair(model, start: str, end: str, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(start tensor, end tensor) as ONNX Runtime computes them on ``x``, unflattened."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    del m.graph.output[:]
    m.graph.output.extend([helper.make_tensor_value_info(start, TensorProto.FLOAT, None),
                           helper.make_tensor_value_info(end, TensorProto.FLOAT, None)])
    return tuple(run(m, x))


def torch_tail(module, start: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return module(torch.from_numpy(start)).numpy()


# --- the tail and its torch translation -------------------------------------------------------------------------

def test_tail_layers_counted_back_from_the_cut_and_residual_blocks_kept_whole():
    model = deep_model()
    cut = choose_cut(model)
    assert cut.name == "gap"
    one = find_tail(model, cut.name, unfreeze=1)
    assert one.start == "cat" and [l.node for l in one.layers] == ["last"] and one.trainable == ("last_w", "last_b")
    assert one.trainable_parameters == 8 * 16 + 8 and not one.notes
    two = find_tail(model, cut.name, unfreeze=2)  # the residual Add reads mp: the block can't be split
    assert two.start == "mp" and [l.node for l in two.layers] == ["depthwise", "pointwise", "last"]
    assert "can't be split" in two.notes[0]
    assert set(two.frozen) >= {"lo", "hi"} and "bn_scale" not in two.trainable
    four = find_tail(model, cut.name, unfreeze=4)  # every layer: from the model input itself
    assert four.start == "image" and len(four.layers) == 4
    assert "bn_scale" in four.frozen and "bn_mean" in four.frozen  # normalization stays frozen
    with pytest.raises(UsageError, match="only 4 weight-carrying layers"):
        find_tail(model, cut.name, unfreeze=5)
    with pytest.raises(UsageError, match="skip connection"):
        find_tail(model, cut.name, train_from="relu6")  # pw + mp: mp goes around relu6
    with pytest.raises(UsageError, match="is a weight"):
        find_tail(model, cut.name, train_from="last_w")
    with pytest.raises(UsageError, match="not a tensor"):
        find_tail(model, cut.name, train_from="nope")


@pytest.mark.parametrize("size,batch", [((8, 8), 1), ((8, 8), 3), ((11, 9), 2), ((16, 16), 4)])
@pytest.mark.parametrize("start", ["image", "r1", "mp", "cat"])
def test_tail_module_equals_onnx_runtime(size, batch, start):
    model = deep_model()
    tail = find_tail(model, "gap", train_from=start)
    module = TailModule(model, tail)
    x = np.random.default_rng(batch).standard_normal((batch, 3, *size)).astype(np.float32)
    a, b = ort_pair(model, start, "gap", x)
    got = torch_tail(module, a)
    assert got.shape == b.shape
    np.testing.assert_allclose(got, b, rtol=1e-5, atol=1e-5)


def test_unsupported_op_in_the_tail_is_refused_by_name():
    model = deep_model(extra_op="LRN")
    tail = find_tail(model, "gap", unfreeze=2)  # the last conv and the block before it: LRN sits between
    with pytest.raises(UsageError, match=r"contains LRN, which porter can't train") as e:
        TailModule(model, tail)
    assert "--unfreeze" in str(e.value)


def test_write_back_changes_exactly_the_tail_weights_and_keeps_the_graph():
    model = deep_model()
    tail = find_tail(model, "gap", unfreeze=2)
    module = TailModule(model, tail)
    with torch.no_grad():
        for p in module.parameters():
            p.mul_(1.5).add_(0.01)
    written = write_back(model, module.trained_weights())
    before = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    after = {t.name: numpy_helper.to_array(t) for t in written.graph.initializer}
    changed = {n for n in before if not np.array_equal(before[n], after[n])}
    assert changed == set(tail.trainable) == {"dw_w", "dw_b", "pw_w", "pw_b", "last_w", "last_b"}
    assert [(n.op_type, list(n.input), list(n.output)) for n in written.graph.node] == \
        [(n.op_type, list(n.input), list(n.output)) for n in model.graph.node]
    x = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)
    start, _ = ort_pair(model, "mp", "gap", x)
    _, end = ort_pair(written, "mp", "gap", x)  # ONNX Runtime on the written model == the trained torch tail
    np.testing.assert_allclose(torch_tail(module, start), end, rtol=1e-5, atol=1e-5)


def test_a_weight_shared_with_the_frozen_part_stays_frozen():
    model = deep_model(share=True)
    tail = find_tail(model, "gap", unfreeze=1)
    assert tail.trainable == ("last_w",) and "pw_b" in tail.frozen
    assert any("pw_b" in n and "frozen" in n for n in tail.notes)


# --- finetune with --unfreeze -----------------------------------------------------------------------------------

def _src(tmp_path):
    return save(deep_model(spatial=(8, 8)), tmp_path / "deep.onnx")


def test_partial_finetune_writes_the_tail_back_and_equals_tail_plus_head(tmp_path):
    src = _src(tmp_path)
    data = make_folder(tmp_path / "data", n=16)
    out = tmp_path / "tuned.onnx"
    r = finetune(src, data, out, unfreeze=2, finetune_lr=3e-3, finetune_epochs=8, progress=False)
    p = r.metrics.partial
    assert p.start == "mp" and [l.node for l in p.layers] == ["depthwise", "pointwise", "last"]
    assert p.trainable_parameters == 8 * 9 + 8 + 64 + 8 + 128 + 8
    assert len(p.history["val_loss"]) == p.epochs_run + 1  # epoch 0: the head alone
    assert p.head_only.val_loss == p.history["val_loss"][0]
    assert p.partial.val_loss == min(p.history["val_loss"]) <= p.head_only.val_loss
    assert p.improved and p.best_epoch >= 1
    assert r.metrics.check.passed and r.metrics.check.translation_max_scaled_diff < 1e-5
    assert out.with_name("tuned.finetune.png").stat().st_size > 0
    assert r.card.training.partial.layers == 3 and r.card.training.partial.kept == "partial"
    assert "tail: 3 layers from mp" in r.summary() and "head only val_loss" in r.summary()
    assert "check: merged model == torch tail + head on the tail's cached input" in r.summary()

    # the shipped model is the original graph with the tail's weights written in, plus the head
    original = onnx.load(src)
    shipped = onnx.load(out)
    before = {t.name: numpy_helper.to_array(t) for t in original.graph.initializer}
    after = {t.name: numpy_helper.to_array(t) for t in shipped.graph.initializer if t.name in before}
    changed = {n for n in after if not np.array_equal(before[n], after[n])}
    assert changed == {"dw_w", "dw_b", "pw_w", "pw_b", "last_w", "last_b"}
    backbone_ops = [n.op_type for n in extract_backbone(original, choose_cut(original)).graph.node]
    assert [n.op_type for n in shipped.graph.node][:len(backbone_ops)] == backbone_ops

    # ... and it computes the tail (in torch, from the written weights) + the trained head, computed separately
    from porter.imaging import preprocess
    from porter.spec import ModelCard

    files = sorted(data.glob("*/*.png"))
    x = preprocess(files, ModelCard.from_onnx(shipped).preprocess, channels=3)
    start, _ = ort_pair(original, "mp", "gap", x)
    module = TailModule(shipped, find_tail(shipped, "gap", train_from="mp"))
    with torch.no_grad():
        want = torch.softmax(r.head(torch.from_numpy(torch_tail(module, start).reshape(len(x), -1))), 1).numpy()
    prob, label = run(shipped, x)
    np.testing.assert_allclose(prob, want, atol=1e-5)
    assert (label == want.argmax(1)).all()


def test_unfreeze_zero_is_the_head_only_model(tmp_path):
    src = _src(tmp_path)
    data = make_folder(tmp_path / "data")
    a = finetune(src, data, cut="backbone", progress=False)
    b = finetune(src, data, cut="backbone", unfreeze=0, progress=False)
    assert b.metrics.partial is None
    assert a.model.SerializeToString() == b.model.SerializeToString()


def test_a_tail_that_does_not_help_leaves_the_weights_unchanged(tmp_path):
    src = _src(tmp_path)
    data = make_folder(tmp_path / "data")
    # a learning rate this large only makes validation worse: epoch 0 (the head alone) is kept
    r = finetune(src, data, unfreeze=1, finetune_lr=50.0, finetune_epochs=2, patience=2, progress=False)
    p = r.metrics.partial
    assert not p.improved and p.kept == "head-only" and p.best_epoch == 0
    original = {t.name: numpy_helper.to_array(t) for t in onnx.load(src).graph.initializer}
    for t in r.model.graph.initializer:
        if t.name in original:
            assert np.array_equal(numpy_helper.to_array(t), original[t.name]), t.name
    assert "kept the head-only model" in r.summary()
    # ... and the head is head-only's (refit on train + validation), so the model is head-only's, weight for weight
    head_only = finetune(src, data, cut="backbone", progress=False).model
    assert p.head_refit
    assert ({t.name: t.SerializeToString() for t in r.model.graph.initializer}
            == {t.name: t.SerializeToString() for t in head_only.graph.initializer})
    assert [n.SerializeToString() for n in r.model.graph.node] == [n.SerializeToString() for n in head_only.graph.node]


def test_a_tail_that_helps_ships_the_probe_refit_on_its_features(tmp_path):
    src = _src(tmp_path)
    data = make_folder(tmp_path / "data", n=16)
    r = finetune(src, data, unfreeze=2, finetune_lr=3e-3, finetune_epochs=8, progress=False)
    p = r.metrics.partial
    assert p.improved and p.head_refit
    # the shipped head is the linear probe at the chosen L2 on the trained tail's features of train + validation:
    # its standardization is theirs (all 16 x 3 images), not the training split's
    shipped = r.model  # the written-back graph: its backbone cut (gap) is the source's
    feats, = run(extract_backbone(shipped, choose_cut(onnx.load(src))), _pixels(shipped, data))
    mean = numpy_helper.to_array(next(t for t in shipped.graph.initializer if t.name == "porter/head/mean"))
    np.testing.assert_allclose(mean, feats.reshape(len(feats), -1).mean(0), rtol=1e-4, atol=1e-5)


def _pixels(model, data):
    from porter.imaging import preprocess
    from porter.spec import ModelCard

    return preprocess(sorted(data.glob("*/*.png")), ModelCard.from_onnx(model).preprocess, channels=3)


def test_partial_options_are_checked_before_any_work(tmp_path):
    src = _src(tmp_path)
    data = make_folder(tmp_path / "data")
    for kwargs, msg in [({"unfreeze": -1}, "--unfreeze must be"), ({"unfreeze": 1, "train_from": "mp"}, "not both"),
                        ({"finetune_lr": 0.0}, "--finetune-lr"), ({"views": 2}, "--views needs --augment"),
                        ({"augment": "flip,blur"}, "unknown augmentation 'blur'"),
                        ({"memory_budget": "lots"}, "not a size"), ({"unfreeze": 9}, "only 4 weight-carrying")]:
        with pytest.raises(UsageError, match=msg):
            finetune(src, data, progress=False, **kwargs)


# --- augmented views --------------------------------------------------------------------------------------------

def test_augmented_views_are_deterministic_per_seed(tmp_path):
    from porter.transfer.augment import AugmentedView

    data = make_folder(tmp_path / "data", n=2, size=24)
    path = sorted(data.glob("*/*.png"))[0]
    ops = ("flip", "crop", "rotate", "color")
    a = AugmentedView(path, ops, (0, 5, 1)).rgb("a")
    assert np.array_equal(a, AugmentedView(path, ops, (0, 5, 1)).rgb("a"))
    assert not np.array_equal(a, AugmentedView(path, ops, (0, 5, 2)).rgb("a"))  # another view
    assert not np.array_equal(a, AugmentedView(path, ops, (1, 5, 1)).rgb("a"))  # another seed
    flip = AugmentedView(path, ("flip",), (0, 0, 0))
    img = np.asarray(__import__("PIL.Image", fromlist=["Image"]).open(path).convert("RGB"))
    assert any(np.array_equal(AugmentedView(path, ("flip",), (0, 0, k)).rgb("f"), img[:, ::-1]) for k in range(8))
    assert flip.rgb("f").shape == img.shape


def test_finetune_with_views_trains_on_them_and_repeats_exactly(tmp_path):
    src = _src(tmp_path)
    data = make_folder(tmp_path / "data")
    a = finetune(src, data, augment="crop,color", views=3, cache=False, progress=False)
    b = finetune(src, data, augment=["crop", "color"], views=3, cache=False, progress=False)
    n_train = a.metrics.examples.train
    assert a.metrics.augment.views == 3 and a.metrics.augment.examples == 3 * n_train
    assert a.model.SerializeToString() == b.model.SerializeToString()
    c = finetune(src, data, augment="crop,color", views=3, seed=1, cache=False, progress=False)
    assert c.model.SerializeToString() != a.model.SerializeToString()
    assert "augment: 3 views (crop, color)" in a.summary()


def test_augment_refuses_vector_data(tmp_path):
    from model_builders import blobs, vector_model

    x, y = blobs()
    with pytest.raises(UsageError, match="--augment is for image data"):
        finetune(vector_model(), (x, y), augment="flip", progress=False)


# --- memory: features past the budget stream from a memory-mapped file -----------------------------------------

def test_memory_budget_maps_features_from_disk_with_the_same_result(tmp_path, isolated_cache):
    src = _src(tmp_path)
    data = make_folder(tmp_path / "data")
    in_memory = finetune(src, data, unfreeze=1, finetune_epochs=3, cache=False, progress=False)
    mapped = finetune(src, data, unfreeze=1, finetune_epochs=3, memory_budget=1024, progress=False)
    assert mapped.model.SerializeToString() == in_memory.model.SerializeToString()
    entries = list(isolated_cache.rglob("*.features.npy"))
    assert entries and not list(isolated_cache.rglob(".rows-*"))
    again = finetune(src, data, unfreeze=1, finetune_epochs=3, memory_budget=1024, progress=False)
    assert again.features_cached and again.model.SerializeToString() == in_memory.model.SerializeToString()


def test_features_that_fit_neither_memory_nor_disk_are_refused(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    src = _src(tmp_path)
    data = make_folder(tmp_path / "data")
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**6, 10**6 - 100, 100))
    with pytest.raises(UsageError, match=r"need 36.0 KiB: more than the memory budget left \(2.8 KiB\).*smaller --unfreeze or a later --train-from"):
        finetune(src, data, unfreeze=1, memory_budget=4000, progress=False)  # the cut's features fit, not the tail's


def test_cli_unfreeze_and_its_errors(tmp_path, porter_cli):
    src = _src(tmp_path)
    data = make_folder(tmp_path / "data")
    out = tmp_path / "cli.onnx"
    r = porter_cli("finetune", str(src), str(data), "-o", str(out), "--unfreeze", "1", "--finetune-epochs", "3",
                   "--quiet")
    assert r.returncode == 0, r.stderr
    assert "tail: 1 layer from cat" in r.stdout
    metrics = json.loads(out.with_name("cli.metrics.json").read_text())
    assert metrics["partial"]["requested"] == 1
    for args, msg in [(["--unfreeze", "x"], "invalid int value"), (["--augment", "zoom"], "unknown augmentation"),
                      (["--unfreeze", "7"], "only 4 weight-carrying")]:
        r = porter_cli("finetune", str(src), str(data), "-o", str(tmp_path / "bad.onnx"), *args, "--quiet")
        assert r.returncode != 0 and msg in r.stderr and "Traceback" not in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_the_tail_runs_channels_last_and_keeps_constants_of_other_ranks():
    """TailNet turns the tail's 4-D weights channels-last (a 1-channel input would otherwise leave every later layer
    NCHW); a 5-D constant, which has no channels-last, is left as it is, and the numbers don't change."""
    from porter.transfer.partial import TailNet

    class Tail(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(1, 4, 3, padding=1)
            self.register_buffer("scale5d", torch.full((1, 1, 1, 1, 1), 2.0))

        def forward(self, x):
            return torch.max_pool2d(self.conv(x), 2) * self.scale5d[0]

    torch.manual_seed(0)
    module, x = Tail(), torch.randn(3, 1 * 8 * 8)
    want = module(x.reshape(3, 1, 8, 8)).reshape(3, -1)
    net = TailNet(module, torch.nn.Identity(), (1, 8, 8), None)
    assert module.conv.weight.is_contiguous(memory_format=torch.channels_last) and module.scale5d.dim() == 5
    got = net.features(x)
    torch.testing.assert_close(got, want)
