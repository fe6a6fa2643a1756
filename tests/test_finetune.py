"""porter.finetune on small hand-built ONNX backbones: outputs, metadata, parity, determinism, cache, data kinds."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from PIL import Image

import porter
from porter.transfer import FinetuneOptions, finetune
from porter.spec import ModelCard

from model_builders import COLORS, blobs, build, make_folder, report_files, run, save, vector_model

pytestmark = pytest.mark.usefixtures("isolated_cache")

def test_image_folder_end_to_end(tmp_path):
    data = make_folder(tmp_path / "data", modes=("RGB", "RGBA"))  # RGBA is composited over white
    src = save(build("gemm"), tmp_path / "gemm.onnx")
    out = tmp_path / "tuned.onnx"
    r = finetune(src, data, out, epochs=60, batch_size=8, progress=False)
    for p in report_files(out):
        assert p.is_file() and p.stat().st_size > 0, p
    assert r.path == out
    model = onnx.load(out)
    assert [o.name for o in model.graph.output] == ["probabilities", "label"]
    assert [i.name for i in model.graph.input] == ["image"]
    assert model.opset_import[0].version == 17 and model.ir_version == 8
    card = ModelCard.from_onnx(model)
    assert card.labels == ("blue", "green", "red")
    assert card.preprocess.mode == "unit" and card.preprocess.layout == "NCHW" and card.preprocess.size == (8, 8)
    assert card.cut == "pool"  # the model's own global pooling, the old Gemm cut off
    assert card.source == "test:gemm" and card.provenance["finetuned_from"] == str(src)
    assert card.training.head == "linear" and card.training.examples == {"train": 30, "val": 6}  # round(12 * 0.2) per class
    assert card.parity.passed and card.parity.outputs["probabilities"].max_abs < 1e-4
    metrics = json.loads(report_files(out)[1].read_text())
    assert metrics["labels"] == ["blue", "green", "red"]
    assert metrics["training"]["method"] == "lbfgs" and metrics["history"] == {}
    curve = metrics["regularization"]
    assert len(curve) >= 7 and metrics["training"]["chosen"]["l2"] in [p["l2"] for p in curve]
    assert metrics["final"]["val_loss"] == min(p["val_loss"] for p in curve)
    assert set(metrics["validation"]["per_class"]) == {"blue", "green", "red"}
    assert np.array(metrics["validation"]["confusion_matrix"]).sum() == 6
    assert metrics["final"]["val_accuracy"] == r.val_accuracy >= 0.85
    assert Image.open(report_files(out)[2]).size[0] > 300
    # the merged model equals backbone + head computed separately, on every training image
    from porter.graph.surgery import extract_backbone
    from porter.transfer.heads import head_layers
    from porter.imaging import preprocess

    files = sorted(data.glob("*/*.png"))
    x = preprocess(files, card.preprocess, channels=3)
    prob, label = run(model, x)
    (feats,) = run(extract_backbone(onnx.load(src)), x)
    mean, std, [(w, b)] = head_layers(r.head)
    logits = ((feats.reshape(len(feats), -1) - mean) / std) @ w.T + b
    want = np.exp(logits - logits.max(1, keepdims=True))
    want /= want.sum(1, keepdims=True)
    np.testing.assert_allclose(prob, want, atol=1e-5)
    np.testing.assert_array_equal(label, want.argmax(1))
    truth = np.array([["blue", "green", "red"].index(f.parent.name) for f in files])
    assert (label == truth).mean() >= 0.9


@pytest.mark.parametrize("kind", ["matmul_add", "conv1x1", "reducemean"])
def test_other_classifier_endings_and_nhwc(tmp_path, kind):
    data = make_folder(tmp_path / "data", n=8)
    r = finetune(save(build(kind), tmp_path / "m.onnx"), data, None, epochs=5, progress=False)
    assert r.path is None and r.report == {}
    assert r.card.preprocess.layout == ("NHWC" if kind in ("matmul_add", "reducemean") else "NCHW")
    assert r.metrics.cut.features == 4
    assert not list(tmp_path.glob("*.json"))


def test_classmaps_head_is_cut_off_and_the_feature_map_pooled(tmp_path):
    data = make_folder(tmp_path / "data", n=6)
    r = finetune(save(build("classmaps"), tmp_path / "m.onnx"), data, epochs=3, progress=False)
    cut = r.metrics.cut
    assert cut.tensor == "relu" and cut.pooled == [2, 3] and cut.features == 4  # not the 5 old class scores
    assert "class-map head" in cut.reason and "average-pooled" in r.summary()


def test_mlp_head_balance_and_options_land_in_metrics(tmp_path):
    data = make_folder(tmp_path / "data", n=6, modes=("RGB", "L", "LA", "P"))  # grey and palette images too
    for i in range(6, 18):  # make "red" 3x bigger than the others
        Image.fromarray(np.full((8, 8, 3), COLORS["red"], np.uint8)).save(data / "red" / f"x{i}.png")
    r = finetune(save(build("gemm"), tmp_path / "m.onnx"), data, head="mlp", hidden=16, balance=True, epochs=4,
                 patience=2, progress=False)
    t = r.metrics.training
    assert t.head == "mlp" and t.hidden == 16 and t.dropout == 0.2
    w = t.class_weights
    assert w[2] < w[0] == pytest.approx(w[1])
    gemms = [n for n in r.model.graph.node if n.op_type == "Gemm" and n.name.startswith("porter/head")]
    assert len(gemms) == 2


def test_same_seed_same_model_other_seed_other_model(tmp_path):
    data = make_folder(tmp_path / "data", n=8)
    src = save(build("gemm"), tmp_path / "m.onnx")

    def head_weights(**kw):
        r = finetune(src, data, epochs=6, progress=False, **kw)
        return {t.name: numpy_helper.to_array(t) for t in r.model.graph.initializer if t.name.startswith("porter/head")}

    a, b = head_weights(seed=1), head_weights(seed=1)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    c = head_weights(seed=2)
    assert any(not np.array_equal(a[k], c[k]) for k in a)
    d = head_weights(seed=1, cache=False)  # freshly extracted features: the same model
    assert all(np.array_equal(a[k], d[k]) for k in a)


def test_global_torch_rng_is_left_alone(tmp_path):
    import torch

    data = make_folder(tmp_path / "data", n=6)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    finetune(save(build("gemm"), tmp_path / "m.onnx"), data, epochs=2, progress=False)
    assert torch.equal(torch.rand(3), expected)


def test_features_are_cached_and_the_key_follows_the_inputs(tmp_path):
    data = make_folder(tmp_path / "data", n=6)
    src = save(build("gemm"), tmp_path / "m.onnx")
    first = finetune(src, data, epochs=2, progress=False)
    assert not first.features_cached
    assert len(list((tmp_path / "cache" / "features").glob("*.npz"))) == 1
    again = finetune(src, data, epochs=3, head="mlp", progress=False)  # other head settings: cache hit
    assert again.features_cached
    assert finetune(src, data, epochs=2, preprocess="tf", progress=False).features_cached is False
    assert finetune(src, data, epochs=2, cut="relu", progress=False).features_cached is False
    f = data / "red" / "000.png"
    os.utime(f, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert finetune(src, data, epochs=2, progress=False).features_cached is False
    other = build("gemm")  # same graph, other weights: another backbone hash
    assert finetune(save(other, tmp_path / "o.onnx"), data, epochs=2, progress=False).features_cached is False
    assert len(list((tmp_path / "cache" / "features").glob("*.npz"))) == 5


def test_stale_cache_is_caught_by_the_merge_check(tmp_path):
    """A cache entry whose features don't match the backbone fails loudly instead of training on them."""
    data = make_folder(tmp_path / "data", n=6)
    src = save(build("gemm"), tmp_path / "m.onnx")
    finetune(src, data, epochs=2, progress=False)
    (entry,) = (tmp_path / "cache" / "features").glob("*.npz")
    z = dict(np.load(entry))
    z["features"] = z["features"] + 5.0
    np.savez(entry, **z)
    with pytest.raises(porter.ValidationError, match="stale feature cache"):
        finetune(src, data, tmp_path / "out.onnx", epochs=2, progress=False)
    assert not (tmp_path / "out.onnx").exists()


def test_csv_for_a_vector_model(tmp_path):
    x, y = blobs()
    csv = tmp_path / "d.csv"
    names = np.array(["no", "yes"])
    rows = ["a,b,kind,c,d"] + [f"{r[0]},{r[1]},{names[t]},{r[2]},{r[3]}" for r, t in zip(x, y)]
    csv.write_text("\n".join(rows) + "\n")
    src = tmp_path / "v.onnx"
    onnx.save(vector_model(), src)
    out = tmp_path / "v_tuned.onnx"
    r = finetune(src, csv, out, label_column="kind", epochs=30, progress=False)
    model = onnx.load(out)
    assert model.opset_import[0].version == 13 and model.ir_version == 7  # the backbone's, kept
    assert ModelCard.from_onnx(model).labels == ("no", "yes")
    assert r.metrics.cut.tensor == "t"
    prob, label = run(model, x)
    assert (label == y).mean() > 0.95
    assert r.card.preprocess is None


def test_numpy_arrays_pixels_and_vectors(tmp_path):
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1, 2], 8)
    colors = np.array(list(COLORS.values()))
    pixels = np.clip(colors[y][:, None, None, :] + rng.normal(0, 20, (24, 8, 8, 3)), 0, 255).astype(np.uint8)
    r = finetune(save(build("gemm"), tmp_path / "m.onnx"), (pixels, y), epochs=20, progress=False)
    assert r.labels == ("0", "1", "2") and r.metrics.data.kind == "pixels"
    prob, label = run(r.model, porter.imaging.to_tensor(list(pixels), r.card.preprocess, 3))
    assert (label == y).mean() > 0.9
    x, yv = blobs()
    r = finetune(vector_model(), (x, np.where(yv == 1, "pos", "neg")), epochs=20, progress=False)
    assert r.labels == ("neg", "pos") and r.metrics.data.kind == "vectors"


def test_progress_goes_to_stderr(tmp_path, capsys):
    data = make_folder(tmp_path / "data", n=6)
    finetune(save(build("gemm"), tmp_path / "m.onnx"), data, epochs=2, progress=True)
    err = capsys.readouterr().err
    assert "features [" in err and "18/18" in err
    assert "probe l2 " in err and "val_loss" in err and "val_acc" in err


def test_unknown_preprocessing_defaults_to_raw_with_a_note(tmp_path):
    data = make_folder(tmp_path / "data", n=6)
    r = finetune(save(build("gemm"), tmp_path / "m.onnx", preprocess=None), data, epochs=2, progress=False)
    assert r.card.preprocess.mode == "raw"
    assert any("records no preprocessing" in n for n in r.notes)
    r = finetune(save(build("gemm"), tmp_path / "m.onnx", preprocess=None), data, epochs=2, preprocess="torch",
                 mean=0.5, progress=False)
    assert r.card.preprocess.mode == "custom" and r.card.preprocess.mean == (0.5, 0.5, 0.5)
    assert r.card.preprocess.std == pytest.approx((0.229, 0.224, 0.225))


def test_dynamic_size_backbone_takes_image_size(tmp_path):
    model = build("gemm")
    for d in model.graph.input[0].type.tensor_type.shape.dim[2:]:
        d.Clear()
        d.dim_param = "side"
    data = make_folder(tmp_path / "data", n=6, size=12)
    src = save(model, tmp_path / "dyn.onnx", preprocess=None)
    r = finetune(src, data, epochs=2, image_size=(10, 10), preprocess="unit", progress=False)
    assert r.card.preprocess.size == (10, 10)
    with pytest.raises(porter.DataError, match="no fixed image size; give --image-size"):
        finetune(src, data, epochs=2, progress=False)


def test_options_are_checked():
    with pytest.raises(porter.UsageError, match="unknown finetune option"):
        FinetuneOptions.from_kwargs(epoch=3)
    with pytest.raises(porter.UsageError, match="--val-split"):
        FinetuneOptions.from_kwargs(val_split=1.0)
    with pytest.raises(porter.UsageError, match="unknown head 'big'"):
        FinetuneOptions.from_kwargs(head="big")
    with pytest.raises(porter.UsageError, match="bad image size"):
        FinetuneOptions.from_kwargs(image_size="a,b")
    assert FinetuneOptions.from_kwargs(image_size="32x24").image_size == (32, 24)


def test_fixed_batch_onnx_model(tmp_path):
    """ONNX files exported with batch 1 run in padded chunks; the merged model keeps the source's input."""
    model = build("gemm")
    for v in list(model.graph.input) + list(model.graph.output) + list(model.graph.value_info):
        dims = v.type.tensor_type.shape.dim
        if dims:
            dims[0].Clear()
            dims[0].dim_value = 1
    data = make_folder(tmp_path / "data", n=7)
    r = finetune(save(model, tmp_path / "b1.onnx"), data, epochs=3, feature_batch_size=4, progress=False)
    assert r.metrics.features.examples == 21
    assert r.model.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1
    prob, label = run(r.model, np.zeros((1, 3, 8, 8), np.float32))
    assert prob.shape == (1, 3) and label.shape == (1,)


def test_features_come_from_the_predict_pipeline_with_streams(tmp_path, monkeypatch):
    """Feature extraction is porter predict's pipeline: concurrent streams on the CPU, same numbers as by hand."""
    import porter.runtime.session as S
    import porter.transfer.features as F
    from porter.graph.cuts import choose_cut
    from porter.graph.surgery import extract_backbone
    from porter.imaging import preprocess
    from porter.transfer.data import load_data

    monkeypatch.setattr(S, "cpu_threads", lambda: 2)
    data = make_folder(tmp_path / "data", n=12)
    (data / "red" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    model = onnx.load(save(build("gemm"), tmp_path / "m.onnx"))
    card = ModelCard.from_onnx(model)
    cut = choose_cut(model, None)
    backbone = extract_backbone(model, cut)
    made = []
    real = F.backbone_predictor
    monkeypatch.setattr(F, "backbone_predictor", lambda *a, **kw: made.append(real(*a, **kw)) or made[-1])
    dataset = load_data(data)
    g = F.InputGeometry("image", "image", "NCHW", (8, 8), 3, dims=("batch", 3, 8, 8))
    got = F.compute_features(model, [cut], dataset, g, card.preprocess, batch_size=2, device="cpu", cache=False,
                             progress=False)[cut.key]
    assert made[0].last_stats.streams == 2 and made[0].last_stats.images == 37  # 19 batches of 2: two streams
    [(name, why)] = got.skipped
    assert name == str(Path("red") / "broken.png") and why.startswith(f"{name}: not an image Pillow can decode")
    files = [f for f in sorted(data.glob("*/*.png")) if f.name != "broken.png"]
    (want,) = run(backbone, preprocess(files, card.preprocess, channels=3))
    assert len(got.index) == 36 and [dataset.names[i] for i in got.index] == [str(f.relative_to(data)) for f in files]
    np.testing.assert_allclose(got.features, want, atol=1e-6)


@pytest.mark.parametrize("damage", ["cut_short", "nan", "duplicated_rows"])
def test_a_cache_entry_that_does_not_describe_the_data_is_recomputed(tmp_path, damage):
    """An entry covering fewer files, with NaNs, or repeating rows is not trained on: porter extracts afresh."""
    data = make_folder(tmp_path / "data", n=6)
    src = save(build("gemm"), tmp_path / "m.onnx")
    finetune(src, data, epochs=2, progress=False)  # 3 colours x 6 images
    (entry,) = (tmp_path / "cache" / "features").glob("*.npz")
    z = dict(np.load(entry))
    if damage == "cut_short":
        z["features"], z["index"] = z["features"][:-3], z["index"][:-3]
    elif damage == "nan":
        z["features"] = z["features"].copy()
        z["features"][2, 0] = np.nan
    else:
        z["index"] = np.concatenate([z["index"][:-1], z["index"][:1]])
    np.savez(entry, **z)
    again = finetune(src, data, epochs=2, progress=False)
    assert again.features_cached is False  # recomputed, and the entry rewritten whole
    rewritten = np.load(entry)
    assert sorted(rewritten["index"].tolist()) == list(range(18)) and np.isfinite(rewritten["features"]).all()
    assert finetune(src, data, epochs=2, progress=False).features_cached  # the rewritten entry is good


def test_the_default_finetune_never_imports_torch(tmp_path):
    """The linear probe runs on numpy + scipy and its head is arrays (heads.LinearHead): a default finetune, report
    included, leaves torch unloaded (importing it costs ~1.4 s, most of a run whose features are cached)."""
    import subprocess
    import sys

    data = make_folder(tmp_path / "data", modes=("RGB",))
    src = save(build("gemm"), tmp_path / "gemm.onnx")
    code = ("import sys, porter; r = porter.finetune(sys.argv[1], sys.argv[2], sys.argv[3], progress=False); "
            "print(r.val_accuracy); print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch'))")
    out = subprocess.run([sys.executable, "-c", code, str(src), str(data), str(tmp_path / "t.onnx")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    accuracy, modules = out.stdout.splitlines()[-2:]
    assert float(accuracy) >= 0.85 and (tmp_path / "t.onnx").is_file()
    assert modules == "[]"
