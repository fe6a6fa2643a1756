"""Tiny ONNX models built with onnx.helper for the runtime tests (no framework needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import onnx
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

from porter.spec import ModelCard, PreprocessSpec

IR_VERSION = 9  # onnx 1.23 writes IR 14 by default, newer than onnxruntime reads


def _finish(graph, card: ModelCard | None) -> onnx.ModelProto:
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)], producer_name="porter-tests")
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    if card is not None:
        card.apply_to(model)
    return model


def card_for(preprocess: PreprocessSpec | None, labels: Sequence[str] | None = None, source: str = "test:model",
             framework: str = "test", **extra) -> ModelCard:
    return ModelCard(source=source, framework=framework, porter_version="0.1.0", preprocess=preprocess,
                     labels=tuple(labels) if labels else None, **extra)


def classifier(layout: str = "NCHW", size: tuple[int, int] | None = (8, 8), channels: int = 3, classes: int = 5,
               head: str = "softmax", batch: int | str = "batch", preprocess: str | PreprocessSpec | None = "torch",
               labels: Sequence[str] | None = None, seed: int = 0, card: ModelCard | None = None,
               extra_label_output: bool = False) -> onnx.ModelProto:
    """conv 3x3 -> relu -> global average pool -> Gemm -> Softmax|LogSoftmax|nothing (logits)."""
    rng = np.random.default_rng(seed)
    hw = list(size) if size else ["height", "width"]
    shape = [batch, channels, *hw] if layout == "NCHW" else [batch, *hw, channels]
    inits = [nh.from_array(rng.normal(0, 0.5, size=(6, channels, 3, 3)).astype(np.float32), "conv_w"),
             nh.from_array(rng.normal(0, 0.1, size=(6,)).astype(np.float32), "conv_b"),
             nh.from_array(rng.normal(0, 1.0, size=(6, classes)).astype(np.float32), "fc_w"),
             nh.from_array(rng.normal(0, 0.1, size=(classes,)).astype(np.float32), "fc_b")]
    nodes = []
    x = "image"
    if layout == "NHWC":
        nodes.append(h.make_node("Transpose", ["image"], ["nchw"], perm=[0, 3, 1, 2]))
        x = "nchw"
    nodes += [h.make_node("Conv", [x, "conv_w", "conv_b"], ["conv"], pads=[1, 1, 1, 1]),
              h.make_node("Relu", ["conv"], ["relu"]),
              h.make_node("GlobalAveragePool", ["relu"], ["pool"]),
              h.make_node("Flatten", ["pool"], ["flat"]),
              h.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logits"])]
    out = "logits"
    if head == "softmax":
        nodes.append(h.make_node("Softmax", ["logits"], ["probabilities"], axis=1))
        out = "probabilities"
    elif head == "logsoftmax":
        nodes.append(h.make_node("LogSoftmax", ["logits"], ["log_probs"], axis=1))
        out = "log_probs"
    outputs = [h.make_tensor_value_info(out, T.FLOAT, [batch, classes])]
    if extra_label_output:
        nodes.append(h.make_node("ArgMax", [out], ["label"], axis=1, keepdims=0))
        outputs.append(h.make_tensor_value_info("label", T.INT64, [batch]))
    graph = h.make_graph(nodes, "classifier", [h.make_tensor_value_info("image", T.FLOAT, shape)], outputs, inits)
    if card is None and preprocess is not None:
        spec = (preprocess if isinstance(preprocess, PreprocessSpec)
                else PreprocessSpec.preset(preprocess, layout=layout, size=size, channels=channels))
        card = card_for(spec, labels)
    elif card is None and labels:
        card = card_for(None, labels)
    return _finish(graph, card)


ANIMALS = ("ant", "bee", "cow", "doe", "elk")


def labelled_classifier() -> onnx.ModelProto:
    """What the predict suites run: an NHWC classifier with TF preprocessing and five labels (``ANIMALS``)."""
    return classifier(layout="NHWC", preprocess="tf", labels=ANIMALS)


def feature_model(size=(8, 8), preprocess: str | None = "unit") -> onnx.ModelProto:
    """Not a classifier: a feature map (N x 4 x H x W) and its per-image mean (N x 1 x 1 x 1)."""
    rng = np.random.default_rng(1)
    w = nh.from_array(rng.normal(size=(4, 3, 1, 1)).astype(np.float32), "w")
    nodes = [h.make_node("Conv", ["image", "w"], ["features"]),
             h.make_node("ReduceMean", ["features"], ["mean"], keepdims=1)]
    graph = h.make_graph(nodes, "features", [h.make_tensor_value_info("image", T.FLOAT, ["batch", 3, *size])],
                         [h.make_tensor_value_info("features", T.FLOAT, ["batch", 4, *size]),
                          h.make_tensor_value_info("mean", T.FLOAT, ["batch", 1, 1, 1])], [w])
    card = card_for(PreprocessSpec.preset(preprocess, layout="NCHW", size=size)) if preprocess else None
    return _finish(graph, card)


def tabular_model() -> onnx.ModelProto:
    """A non-image model: float[batch, 10] -> float[batch, 3] logits."""
    rng = np.random.default_rng(2)
    w = nh.from_array(rng.normal(size=(10, 3)).astype(np.float32), "w")
    graph = h.make_graph([h.make_node("MatMul", ["features", "w"], ["scores"])], "tabular",
                         [h.make_tensor_value_info("features", T.FLOAT, ["batch", 10])],
                         [h.make_tensor_value_info("scores", T.FLOAT, ["batch", 3])], [w])
    return _finish(graph, card_for(None))


def save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save(model, str(path))
    return path


def random_images(n: int, size=(12, 10), seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size=(*size, 3), dtype=np.uint8) for _ in range(n)]


def write_images(folder: Path, n: int, size=(12, 10), seed: int = 0, ext: str = ".png") -> list[Path]:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, img in enumerate(random_images(n, size, seed)):
        p = folder / f"img{i:03d}{ext}"
        Image.fromarray(img).save(p)
        paths.append(p)
    return paths
