"""Convnet classifiers for the quantization tests, built with onnx.helper, and image folders they take.

``colour_net`` carries an image's colour through ``depth`` mostly-identity 3x3 convs to a classifier, so its answers
depend on the input (a random deep net collapses to one class and would pass any gate). ``broken_at=k`` makes one
channel of conv k a constant 5000 that conv k+1 ignores: uint8 activations calibrated on that range round every
other channel of conv k's output to zero, so int8 breaks unless conv k and k+1 stay in float.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh
from PIL import Image

from porter.spec import PreprocessSpec
from runtime_models import _finish, card_for

CLASSES = ("amber", "blue", "green", "red")


def colour_net(depth: int = 8, broken_at: int | None = None, seed: int = 0, size: int = 16, width: int = 8,
               preprocess: PreprocessSpec | None = None):
    rng = np.random.default_rng(seed)
    inits, nodes, cur, cin = [], [], "x", 3
    for i in range(depth):
        w = rng.normal(0, 0.05, (width, cin, 3, 3)).astype(np.float32)
        b = np.zeros(width, np.float32)
        for c in range(width):
            w[c, c % cin, 1, 1] += 1.0
        if broken_at is not None and i == broken_at:
            w[0], b[0] = 0.0, 5000.0
        if broken_at is not None and i == broken_at + 1:
            w[:, 0] = 0.0
        inits += [nh.from_array(w, f"w{i}"), nh.from_array(b, f"b{i}")]
        nodes += [h.make_node("Conv", [cur, f"w{i}", f"b{i}"], [f"c{i}"], pads=[1, 1, 1, 1], name=f"conv{i}"),
                  h.make_node("Relu", [f"c{i}"], [f"r{i}"], name=f"relu{i}")]
        cur, cin = f"r{i}", width
    wf = rng.normal(0, 10.0, (width, len(CLASSES))).astype(np.float32)
    inits += [nh.from_array(wf, "wf"), nh.from_array(np.zeros(len(CLASSES), np.float32), "bf")]
    nodes += [h.make_node("GlobalAveragePool", [cur], ["p"], name="pool"), h.make_node("Flatten", ["p"], ["f"], name="flatten"),
              h.make_node("Gemm", ["f", "wf", "bf"], ["logits"], name="fc"),
              h.make_node("Softmax", ["logits"], ["probabilities"], axis=1, name="softmax")]
    graph = h.make_graph(nodes, "colour_net", [h.make_tensor_value_info("x", T.FLOAT, ["N", 3, size, size])],
                         [h.make_tensor_value_info("probabilities", T.FLOAT, ["N", len(CLASSES)])], inits)
    spec = preprocess or PreprocessSpec.preset("unit", layout="NCHW", size=(size, size), channels=3)
    return _finish(graph, card_for(spec, CLASSES))


def colour_images(root: Path, n: int = 140, size: int = 16, seed: int = 0, classes=CLASSES[:2]) -> Path:
    """``n`` noisy gradient images of random tints, in class folders named after the model's labels."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        d = root / classes[i % len(classes)]
        d.mkdir(parents=True, exist_ok=True)
        ramp = np.linspace(0, 120, size)[None, :, None] * (1 if i % 2 else -1) % 256
        img = ramp + rng.normal(0, 30, (size, size, 3)) + rng.uniform(0, 130, 3)
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(d / f"{i}.png")
    return root
