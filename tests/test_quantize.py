"""porter quantize: int8 calibrated through the model's preprocessing, an accuracy gate, diverging nodes kept float."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

import porter
from porter.errors import DataError, UsageError, ValidationError
from porter.quantization import data as D
from porter.spec import ModelCard, PreprocessSpec
from quantize_models import colour_images, colour_net
from runtime_models import save

pytestmark = pytest.mark.usefixtures("isolated_cache")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return colour_images(tmp_path_factory.mktemp("colours"))


def ops(model) -> dict[str, int]:
    counts: dict[str, int] = {}
    for n in model.graph.node:
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return counts


def float_nodes(model) -> set[str]:
    """Conv/Gemm nodes of a QDQ model whose weight is still a float initializer (kept in float)."""
    inits = {i.name for i in model.graph.initializer}
    return {n.name for n in model.graph.node if n.op_type in ("Conv", "Gemm") and n.input[1] in inits}


def test_quantize_passes_the_gate_and_records_it(tmp_path, images):
    src = save(colour_net(), tmp_path / "net.onnx")
    result = porter.quantize(src, images, tmp_path / "net.int8.onnx", samples=60)
    q = onnx.load(str(tmp_path / "net.int8.onnx"))
    assert ops(q)["QuantizeLinear"] >= 8 and ops(q)["DequantizeLinear"] >= 16  # activations and weights in int8
    assert not float_nodes(q)
    # the output softmax stays float by default; nothing else needed to
    assert result.excluded == ["softmax"] and result.agreement.inputs == 80  # 140 images: 60 calibrate, 80 gate
    assert result.agreement.drop <= 1.0
    card = ModelCard.from_onnx(q)
    assert card.labels == ("amber", "blue", "green", "red") and card.preprocess is not None  # the card is kept
    rec = card.quantization
    assert rec["method"] == "minmax" and rec["samples"] == 60 and rec["excluded"] == ["softmax"]
    assert rec["gate"]["inputs"] == 80 and rec["gate"]["top1_agreement"] == pytest.approx(result.agreement.top1_agreement)
    assert 0 <= rec["gate"]["accuracy_fp32"] <= 1 and "accuracy_int8" in rec["gate"]  # class folders = labels
    probs = porter.load(q, device="cpu").run(porter.load(q).example_inputs(8, seed=1))["probabilities"]
    # probabilities a uint8 softmax would round to 0 (steps of 1/255) survive: the softmax ran in float
    assert ((probs > 0) & (probs < 1 / 510)).any()
    # the int8 file predicts what fp32 predicts on new images
    fp32, int8 = porter.load(src, device="cpu"), porter.load(tmp_path / "net.int8.onnx", device="cpu")
    paths = sorted(str(p) for p in images.rglob("*.png"))[:40]
    same = np.mean([a.label == b.label for a, b in zip(fp32.predict(paths), int8.predict(paths))])
    assert same >= 0.95


def test_the_node_that_breaks_under_int8_is_kept_in_float(tmp_path, images):
    src = save(colour_net(broken_at=3), tmp_path / "broken.onnx")
    lines = []
    result = porter.quantize(src, images, tmp_path / "broken.int8.onnx", samples=60, log=lines.append)
    first = result.rounds[0]
    assert first["drop_points"] > 20  # naive int8 breaks it
    assert {"conv3", "conv4", "softmax"} <= set(result.excluded)  # the outlier's producer and its consumer
    assert len([n for n in result.excluded if n.startswith("conv")]) <= 2  # and nothing else of weight
    assert result.agreement.drop <= 1.0 and len(result.rounds) == 2
    q = onnx.load(str(tmp_path / "broken.int8.onnx"))
    assert float_nodes(q) == {"conv3", "conv4"}
    assert ModelCard.from_onnx(q).quantization["excluded"] == result.excluded
    assert any("keeping in float: " in line and "conv4" in line for line in lines)


def test_a_model_int8_cannot_hold_is_refused_with_figures(tmp_path, images):
    # 3 convs: the two that would have to stay float are more than porter keeps float (a quarter)
    src = save(colour_net(depth=3, broken_at=1), tmp_path / "small.onnx")
    out = tmp_path / "small.int8.onnx"
    with pytest.raises(ValidationError) as e:
        porter.quantize(src, images, out, samples=60)
    msg = str(e.value)
    assert "top-1 agreement with fp32" in msg and "points" in msg and "--max-drop" in msg and "\n" not in msg
    assert not out.exists()
    # allowing the drop it has is an explicit choice, and then it is written
    result = porter.quantize(src, images, out, samples=60, max_drop=100)
    assert out.exists() and result.agreement.drop > 20


def test_calibration_goes_through_the_models_preprocessing(tmp_path, images):
    spec = PreprocessSpec.preset("torch", layout="NCHW", size=(16, 16), channels=3)
    model = colour_net(preprocess=spec)
    fp32 = porter.load(model, device="cpu")
    listed = D.list_data(images)
    assert listed.classes == ("amber", "blue") and len(listed.paths) == 140
    samples = D.load_samples(D.draw(listed, 10, 0), fp32)
    from porter.imaging import preprocess

    expected = preprocess([str(p) for p in samples.names], spec, channels=3)
    np.testing.assert_allclose(samples.tensors["x"], expected, rtol=0, atol=1e-6)  # ImageNet mean/std applied
    assert samples.tensors["x"].min() < -0.5  # not 0..1 pixels
    # calibrating on wrongly normalized data (0..255 pixels) breaks the gate on real inputs: the right data passes
    good = porter.quantize(model, images, samples=60)
    assert good.agreement.drop <= 1.0
    raw = D.load_samples(D.draw(listed, 60, 1), porter.load(model, device="cpu", preprocess="raw")).tensors["x"]
    bad = porter.quantize(model, raw, samples=60, eval=images, max_drop=100)
    assert bad.agreement.drop > good.agreement.drop + 10


def test_cli_quantize_and_inspect(tmp_path, images, porter_cli):
    src = save(colour_net(broken_at=3), tmp_path / "net.onnx")
    out = tmp_path / "net.int8.onnx"
    r = porter_cli("quantize", src, "--calibrate", images, "-o", out, "--samples", "60")
    assert r.returncode == 0, r.stderr
    assert "quantized to int8" in r.stdout and "kept in float (5): softmax, conv4, relu4, conv3, relu3" in r.stdout
    assert "porter: round 1:" in r.stderr and "porter: keeping in float:" in r.stderr
    r = porter_cli("inspect", out)
    assert r.returncode == 0 and "quantization: int8 QDQ" in r.stdout and "5 node(s) kept in float" in r.stdout
    assert "top-1 agreement" in r.stdout and "accuracy fp32" in r.stdout
    info = json.loads(porter_cli("inspect", out, "--json").stdout)
    assert json.loads(info["porter"]["porter.quantization"])["method"] == "minmax"
    # the output exists: not replaced without --force; quantizing a quantized model is refused
    r = porter_cli("quantize", src, "--calibrate", images, "-o", out)
    assert r.returncode != 0 and "--force" in r.stderr and r.stderr.count("\n") == 1
    r = porter_cli("quantize", out, "--calibrate", images, "-o", tmp_path / "again.onnx")
    assert r.returncode != 0 and "already quantized" in r.stderr and r.stderr.count("\n") == 1


@pytest.mark.parametrize("args, words", [
    (["--calibrate", "missing-dir"], "not found"),
    (["--calibrate", "IMAGES", "--samples", "130"], "lower --samples"),
    (["--calibrate", "IMAGES", "--method", "kl"], "invalid choice"),
    (["--calibrate", "IMAGES", "--max-drop", "-1"], "--max-drop"),
    (["--calibrate", "IMAGES", "--exclude", "nope"], "names no node"),
    ([], "--calibrate"),
])
def test_cli_quantize_mistakes_are_one_line(tmp_path, images, porter_cli, args, words):
    src = save(colour_net(depth=2), tmp_path / "net.onnx")
    args = [str(images) if a == "IMAGES" else a for a in args]
    r = porter_cli("quantize", src, "-o", tmp_path / "q.onnx", *args)
    assert r.returncode != 0 and words in r.stderr and r.stderr.strip().count("\n") == 0, r.stderr
    assert not (tmp_path / "q.onnx").exists()


def test_api_mistakes(tmp_path, images):
    model = colour_net(depth=2)
    with pytest.raises(UsageError, match="calibration method"):
        porter.quantize(model, images, method="kl")
    with pytest.raises(DataError, match="not a folder"):
        porter.quantize(model, tmp_path / "x.onnx" if save(model, tmp_path / "x.onnx") else None)
    with pytest.raises(DataError, match="calibration tensors"):
        porter.quantize(model, {"y": np.zeros((40, 3, 16, 16), np.float32)})


def test_malformed_quantization_metadata_is_not_a_crash(tmp_path, porter_cli):
    model = colour_net(depth=2)
    for key, value in (("porter.quantization", "[1, 2"), ):
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    assert ModelCard.from_onnx(model).quantization is None
    model2 = colour_net(depth=2)
    ModelCard.from_onnx(model2).with_(quantization={"gate": "odd", "excluded": 3}).apply_to(model2)
    r = porter_cli("inspect", save(model2, tmp_path / "odd.onnx"))
    assert r.returncode == 0 and "quantization: int8" in r.stdout


def test_finetune_int8_writes_a_gated_int8_model_beside_it(tmp_path, images):
    src = save(colour_net(), tmp_path / "backbone.onnx")
    result = porter.finetune(src, images, tmp_path / "ft.onnx", progress=False, int8=True)
    q = result.metrics.int8
    assert result.int8 is not None and result.int8_refusal is None
    assert (tmp_path / "ft.int8.onnx").is_file() and q.path == str(tmp_path / "ft.int8.onnx")
    assert q.gate["inputs"] == result.metrics.examples.val and q.gate["drop_points"] <= 1.0
    assert q.val_accuracy_fp32 is not None and q.val_accuracy_int8 is not None
    card = ModelCard.from_onnx(onnx.load(str(tmp_path / "ft.int8.onnx")))
    assert card.labels == result.card.labels and card.quantization["calibration"].startswith("the fine-tuning")
    assert "int8:" in result.summary() and "val_acc fp32" in result.summary()
    int8 = porter.load(tmp_path / "ft.int8.onnx", device="cpu")
    paths = sorted(str(p) for p in images.rglob("*.png"))[:20]
    same = np.mean([a.label == b.label for a, b in zip(int8.predict(paths), porter.load(result.path).predict(paths))])
    assert same >= 0.9


def test_finetune_int8_refused_keeps_the_fp32_model(tmp_path, images, porter_cli):
    src = save(colour_net(depth=3, broken_at=1), tmp_path / "backbone.onnx")
    r = porter_cli("finetune", src, images, "-o", tmp_path / "ft.onnx", "--int8", "--quiet")
    assert r.returncode == 1
    assert (tmp_path / "ft.onnx").is_file() and not (tmp_path / "ft.int8.onnx").exists()
    assert "int8: not written:" in r.stdout
    assert r.stderr.strip().splitlines()[-1].startswith("porter: error: int8 model not written")
    metrics = json.loads((tmp_path / "ft.metrics.json").read_text())
    assert metrics["int8"]["written"] is False and "top-1 agreement" in metrics["int8"]["refused"]
