"""porter.finetune straight from every importer's fixtures: convert (with parity), cut, train, merge, check."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from porter.transfer import finetune
from porter.spec import ModelCard

from conftest import FIXTURES
from model_builders import make_folder

SOURCES = {
    "keras-file": (f"{FIXTURES}/backbone/backbone.keras", {}),
    "keras-bn": (f"{FIXTURES}/keras/cnn_bn.keras", {}),
    "torchhub-local": (f"torchhub:{FIXTURES}/torchhub:small_cnn", {}),
    "torchscript": (f"{FIXTURES}/torchhub/torchscript/small_cnn_scripted.pt", {"input_shapes": {None: (3, 32, 32)}}),
    "tfjs-layers": (f"tfjs:{FIXTURES}/tfjs/layers_sequential/model.json", {}),
    "tfjs-graph": (f"tfjs:{FIXTURES}/tfjs/graph_convnet/model.json", {}),
}


pytestmark = pytest.mark.usefixtures("isolated_cache")


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SOURCES))
def test_finetune_from_every_importer(name, tmp_path):
    source, convert_options = SOURCES[name]
    data = make_folder(tmp_path / "data", n=6, size=20, modes=("RGB", "L"))
    out = tmp_path / f"{name}.onnx"
    r = finetune(source, data, out, epochs=3, preprocess="unit", convert_options=convert_options, progress=False)
    model = onnx.load(out)
    assert [o.name for o in model.graph.output] == ["probabilities", "label"]
    card = ModelCard.from_onnx(model)
    assert card.labels == ("blue", "green", "red") and card.preprocess.mode == "unit"
    assert card.framework != "onnx" and card.training.source_parity.passed  # converted with parity first
    assert card.parity.passed and card.parity.outputs["probabilities"].max_abs < 1e-4
    assert any(n.startswith("converted ") for n in r.notes)
    # the merged model runs on the preprocessed images and agrees with its own label output
    from porter.imaging import preprocess

    files = sorted(data.glob("*/*.png"))
    x = preprocess(files, card.preprocess)
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    prob, label = sess.run(None, {sess.get_inputs()[0].name: x})
    assert prob.shape == (18, 3) and np.allclose(prob.sum(1), 1, atol=1e-5)
    np.testing.assert_array_equal(label, prob.argmax(1))
