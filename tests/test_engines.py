"""Precisions and engines: --precision checks, the OpenVINO device (runs where its plugin offers a device, else
one clear error), and bench --device all side by side."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

import porter
from porter.errors import RuntimeSetupError, UsageError
from porter.runtime import session as S
from porter.runtime.compare import compare
from porter.runtime.openvino import openvino_devices
from quantize_models import colour_images, colour_net
from runtime_models import save

pytestmark = pytest.mark.usefixtures("isolated_cache")
OPENVINO_PROBLEM = openvino_devices()[1]
needs_openvino = pytest.mark.skipif(OPENVINO_PROBLEM is not None, reason=f"no OpenVINO device: {OPENVINO_PROBLEM}")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("engines")
    images = colour_images(d / "images")
    fp32 = save(colour_net(), d / "net.onnx")
    porter.quantize(fp32, images, d / "net.int8.onnx", samples=60)
    return fp32, d / "net.int8.onnx", images


@pytest.mark.parametrize("kwargs, words", [
    ({"precision": "bf16", "device": "cpu"}, "bf16 runs on --device openvino"),
    ({"precision": "int8", "device": "cpu"}, "is not quantized; make an int8 model with porter quantize"),
    ({"precision": "fp64", "device": "cpu"}, "unknown precision"),
    ({"precision": "bf16", "fp16": True, "device": "cpu"}, "disagree"),
])
def test_precision_mistakes_are_usage_errors(models, kwargs, words):
    with pytest.raises(UsageError, match=words):
        porter.load(models[0], **kwargs)


def test_an_int8_model_runs_in_int8_only(models):
    p = porter.load(models[1], device="cpu")
    assert p.quantized and p.precision == "int8" and "int8" in p.describe()
    with pytest.raises(UsageError, match="runs in int8, not fp16"):
        porter.load(models[1], device="cpu", precision="fp16")
    assert porter.load(models[1], device="cpu", precision="int8").precision == "int8"
    assert porter.load(models[0], device="cpu").precision == "fp32"


@pytest.mark.skipif(OPENVINO_PROBLEM is None, reason="OpenVINO has a device here")
def test_openvino_without_a_device_is_one_clear_error(models, porter_cli):
    with pytest.raises(RuntimeSetupError, match="device 'openvino' is not available: .*; use --device cpu"):
        porter.load(models[0], device="openvino")
    r = porter_cli("predict", models[0], str(next(models[2].rglob("*.png"))), "--device", "openvino")
    assert r.returncode != 0 and "device 'openvino' is not available" in r.stderr
    assert r.stderr.strip().count("\n") == 0


def test_openvino_plugin_missing_names_the_extra(monkeypatch):
    openvino_devices.cache_clear()
    monkeypatch.setitem(sys.modules, "onnxruntime_ep_openvino", None)  # import fails as if not installed
    try:
        devices, problem = openvino_devices()
        assert devices == () and "porter[openvino]" in problem
        with pytest.raises(RuntimeSetupError, match=r"porter\[openvino\]"):
            S.resolve_device("openvino")
    finally:
        openvino_devices.cache_clear()


@needs_openvino
@pytest.mark.parametrize("precision", [None, "fp32", "bf16"])
def test_openvino_answers_as_onnxruntime_fp32(models, precision):
    ref = porter.load(models[0], device="cpu")
    ov = porter.load(models[0], device="openvino", precision=precision)
    assert "OpenVINOExecutionProvider" in ov.providers
    x = ref.example_inputs(16, seed=3)
    a, b = ref.run(x)["probabilities"], ov.run(x)["probabilities"]
    assert np.array_equal(a.argmax(1), b.argmax(1))
    if precision != "fp32":
        assert ov.precision_report is not None and ov.precision_report.passed
    else:
        np.testing.assert_allclose(a, b, atol=1e-4)


@needs_openvino
def test_openvino_runs_the_int8_model(models):
    ov = porter.load(models[1], device="openvino")
    assert ov.precision == "int8" and ov.precision_report.passed


def test_bench_all_compares_engines_on_the_same_inputs(models):
    fp32, int8, images = models
    paths = sorted(str(p) for p in images.rglob("*.png"))[:40]
    c = compare([fp32, int8], (1, 8), min_seconds=0.05, warmup=1, images=paths)
    base, q = c.engines[0], next(e for e in c.engines if e.precision == "int8")
    assert base.engine == "onnxruntime cpu" and base.precision == "fp32" and base.top1_agreement == 1.0
    assert base.max_abs_diff == 0.0 and [r.batch_size for r in base.rows] == [1, 8]
    assert q.top1_agreement >= 0.95 and 0 < q.max_abs_diff < 0.2 and c.speedup(q, 8) > 0
    assert any("porter quantize gate" in n for n in q.notes)
    assert c.inputs == "40 images"
    if OPENVINO_PROBLEM:
        assert "OpenVINO" in c.unavailable and all("openvino" not in e.engine for e in c.engines)
    table = c.to_table()
    assert "speed-up" in table and "int8" in table and "1.00x" in table


def test_cli_bench_all(models, porter_cli):
    fp32, int8, images = models
    r = porter_cli("bench", fp32, "--device", "all", "--with", int8, "--images", images, "--batch-sizes", "1",
                   "--seconds", "0.05", "--json")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert [e["precision"] for e in data["engines"]][:2] == ["fp32", "int8"]
    assert data["agreement_inputs"].endswith("images")
    r = porter_cli("bench", fp32, "--with", int8)
    assert r.returncode != 0 and "--device all" in r.stderr and r.stderr.strip().count("\n") == 0
    r = porter_cli("bench", fp32, "--device", "all", "--fp16")
    assert r.returncode != 0 and "drop" in r.stderr
