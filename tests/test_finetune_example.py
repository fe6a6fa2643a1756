"""The bundled example's claim, checked: the backbone pretrained on digits 0-4 transfers to digits 5-9 better than
the same architecture with random weights (what scripts/example.sh prints)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pytest

import porter
from porter.imaging import preprocess

from conftest import FIXTURES, ROOT


@pytest.mark.slow
def test_pretrained_backbone_transfers_better_than_random(tmp_path, monkeypatch):
    monkeypatch.setenv("PORTER_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "digits"
    subprocess.run([sys.executable, str(ROOT / "examples" / "digits" / "prepare_data.py"), str(data)], check=True,
                   capture_output=True)
    files = sorted((data / "test").glob("*/*.png"))
    accuracy = {}
    for name in ("backbone", "random"):
        onnx_model = porter.convert(FIXTURES / "backbone" / f"{name}.keras", None, preprocess="unit").model
        r = porter.finetune(onnx_model, data / "train", tmp_path / f"{name}.onnx", progress=False)
        assert r.labels == ("5", "6", "7", "8", "9")
        sess = ort.InferenceSession(str(tmp_path / f"{name}.onnx"), providers=["CPUExecutionProvider"])
        _, label = sess.run(None, {"image": preprocess(files, r.card.preprocess, channels=1)})
        truth = np.array([r.labels.index(f.parent.name) for f in files])
        accuracy[name] = float((label == truth).mean())
    assert accuracy["backbone"] >= 0.96
    assert accuracy["backbone"] - accuracy["random"] >= 0.01, accuracy
