"""PyTorch Hub importer through the CLI, as a user runs it: parity at several batch sizes checked independently
against torch, the summary lines, and the bad inputs that the CLI parses itself."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import torch  # noqa: E402

HUB = Path(__file__).resolve().parent.parent / "fixtures" / "torchhub"


def _hubconf():
    spec = importlib.util.spec_from_file_location("porter_cli_test_hubconf", HUB / "hubconf.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _check_against_torch(path, module, shape, batches=(1, 4, 9)):
    model = onnx.load(path)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    rng = np.random.default_rng(3)
    module.eval()
    for b in batches:
        x = rng.standard_normal((b, *shape)).astype(np.float32)
        got = session.run(None, {name: x})
        with torch.no_grad():
            ref = module(torch.from_numpy(x))
        ref = [t.numpy() for t in (ref if isinstance(ref, tuple) else (ref,))]
        assert len(got) == len(ref)
        for g, r in zip(got, ref):
            assert g.shape == r.shape and g.shape[0] == b
            assert np.abs(g - r).max() / max(1.0, np.abs(r).max()) <= 1e-4


def test_cli_local_entry(porter_cli, tmp_path):
    out = tmp_path / "cnn.onnx"
    res = porter_cli("convert", f"torchhub:{HUB}:small_cnn", "-o", out)
    assert res.returncode == 0, res.stderr
    assert "parity passed at batch sizes 1, 3" in res.stdout
    assert "input  x: float32[batch, 3, 32, 32]" in res.stdout and "labels: 10 (airplane" in res.stdout
    assert "note: exported with the dynamo exporter" in res.stdout
    assert "torchvision is not installed" not in res.stderr and "Traceback" not in res.stderr
    _check_against_torch(out, _hubconf().small_cnn(), (3, 32, 32))


def test_cli_multiple_outputs_with_input_shape_and_hub_arg(porter_cli, tmp_path):
    out = tmp_path / "heads.onnx"
    res = porter_cli("convert", f"torchhub:{HUB}:multi_head", "-o", out, "--input-shape", "3,24,32",
                     "--hub-arg", "pretrained=True")
    assert res.returncode == 0, res.stderr
    for line in ("output output_0: float32[batch, 5]", "output output_1: float32[batch, 4]",
                 "output output_2: float32[batch, 1, 12, 16]"):
        assert line in res.stdout
    _check_against_torch(out, _hubconf().multi_head(), (3, 24, 32))


def test_cli_torchscript_file_detected_by_content(porter_cli, tmp_path):
    renamed = tmp_path / "model.bin"  # the name says nothing; the content does
    renamed.write_bytes((HUB / "torchscript" / "small_cnn_scripted.pt").read_bytes())
    out = tmp_path / "ts.onnx"
    res = porter_cli("convert", renamed, "-o", out)
    assert res.returncode == 0, res.stderr
    assert "TorchScript-based exporter" in res.stdout
    _check_against_torch(out, torch.jit.load(str(renamed)), (3, 32, 32), batches=(2, 5))


def test_cli_hub_arg_that_is_not_a_literal(porter_cli, tmp_path):
    out = tmp_path / "m.onnx"
    res = porter_cli("convert", f"torchhub:{HUB}:small_cnn", "-o", out, "--hub-arg", "pretrained=yes please")
    assert res.returncode == 2
    assert "bad --hub-arg 'pretrained=yes please': 'yes please' is not a Python literal" in res.stderr
    assert "Traceback" not in res.stderr and not out.exists()


@pytest.mark.parametrize("args, code, message", [
    (["fixtures/torchhub/weights/small_cnn.pt"], 1, "holds a plain state dict"),
    ([f"torchhub:{HUB}:unexportable"], 1, "unsupported op(s) porter_fixture::scramble"),
    ([f"torchhub:{HUB}:multi_head"], 2, "--input-shape is required"),
    ([f"torchhub:{HUB}:small_cnn", "--hub-arg", "num_classes=5"], 1, "raised ValueError: the pretrained small_cnn"),
    ([f"torchhub:{HUB.parent}:small_cnn"], 1, "has no hubconf.py"),
])
def test_cli_bad_inputs(porter_cli, tmp_path, args, code, message):
    out = tmp_path / "m.onnx"
    res = porter_cli("convert", *args, "-o", out, cwd=HUB.parent.parent)
    assert res.returncode == code, (res.stdout, res.stderr)
    assert message in res.stderr and res.stderr.startswith("porter: error: ")
    assert len(res.stderr.strip().splitlines()) == 1 and res.stdout == ""  # one line, no dumps
    assert list(tmp_path.iterdir()) == []
