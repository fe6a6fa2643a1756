"""Small hand-built ONNX models and image folders that the surgery and finetune tests share (not a test module)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from porter.spec import ModelCard

RNG = np.random.default_rng(0)


def _w(name, *shape):
    return numpy_helper.from_array(RNG.standard_normal(shape).astype(np.float32) * 0.3, name)


def build(kind: str, opset: int = 17, seed: int | None = None) -> onnx.ModelProto:
    """Tiny image classifiers, one per way a classifier ends. NCHW input [batch, 3, 8, 8] unless said. Weights
    come from the module's RNG (so they depend on what was built before) unless ``seed`` pins them."""
    global RNG
    if seed is not None:
        shared, RNG = RNG, np.random.default_rng(seed)
        try:
            return build(kind, opset)
        finally:
            RNG = shared
    nhwc = kind in ("matmul_add", "reducemean")
    x = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 8, 8, 3] if nhwc else ["batch", 3, 8, 8])
    inits = [_w("conv_w", 4, 3, 3, 3), _w("conv_b", 4)]
    nodes = []
    src = "image"
    if nhwc:
        nodes.append(helper.make_node("Transpose", ["image"], ["nchw"], perm=[0, 3, 1, 2]))
        src = "nchw"
    nodes += [helper.make_node("Conv", [src, "conv_w", "conv_b"], ["conv"], pads=[1, 1, 1, 1], name="conv1"),
              helper.make_node("Relu", ["conv"], ["relu"])]
    if kind == "gemm":
        inits += [_w("fc_w", 5, 4), _w("fc_b", 5)]
        nodes += [helper.make_node("GlobalAveragePool", ["relu"], ["pool"], name="gap"),
                  helper.make_node("Flatten", ["pool"], ["flat"], axis=1),
                  helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logits"], transB=1, name="fc"),
                  helper.make_node("Softmax", ["logits"], ["prob"], axis=1)]
    elif kind == "matmul_add":
        inits += [_w("fc_w", 4, 5), _w("fc_b", 5)]
        nodes += [helper.make_node("ReduceMean", ["relu"], ["pool"], axes=[2, 3], keepdims=0, name="mean"),
                  helper.make_node("MatMul", ["pool", "fc_w"], ["mm"], name="dense/MatMul"),
                  helper.make_node("Add", ["mm", "fc_b"], ["logits"]),
                  helper.make_node("Softmax", ["logits"], ["prob"], axis=-1)]
    elif kind == "conv1x1":
        inits += [_w("cls_w", 5, 4, 1, 1), _w("cls_b", 5)]
        nodes += [helper.make_node("GlobalAveragePool", ["relu"], ["pool"], name="gap"),
                  helper.make_node("Conv", ["pool", "cls_w", "cls_b"], ["cls"], name="classifier"),
                  helper.make_node("Flatten", ["cls"], ["logits"], axis=1),
                  helper.make_node("Softmax", ["logits"], ["prob"], axis=1)]
    elif kind in ("classmaps", "classmaps3x3"):  # class maps, then pooling, no classifier after it: SqueezeNet's
        k = 3 if kind == "classmaps3x3" else 1       # 1x1 conv; oarriaga's mini-Xception (TF.js emotion) a 3x3 one
        inits += [_w("cls_w", 5, 4, k, k), _w("cls_b", 5)]
        nodes += [helper.make_node("Conv", ["relu", "cls_w", "cls_b"], ["maps"], name="classmaps",
                                   pads=[k // 2] * 4),
                  helper.make_node("GlobalAveragePool", ["maps"], ["pool"], name="gap"),
                  helper.make_node("Flatten", ["pool"], ["logits"], axis=1),
                  helper.make_node("Softmax", ["logits"], ["prob"], axis=1)]
    elif kind == "reducemean":  # opset 18 ReduceMean (axes as an input), NHWC, then a Gemm
        opset = max(opset, 18)
        inits += [numpy_helper.from_array(np.array([1, 2], np.int64), "axes"), _w("fc_w", 5, 4), _w("fc_b", 5)]
        nodes += [helper.make_node("Transpose", ["relu"], ["back"], perm=[0, 2, 3, 1]),
                  helper.make_node("ReduceMean", ["back", "axes"], ["pool"], keepdims=1, name="mean"),
                  helper.make_node("Reshape", ["pool", "shape"], ["flat"]),
                  helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logits"], transB=1),
                  helper.make_node("Softmax", ["logits"], ["prob"], axis=1)]
        inits.append(numpy_helper.from_array(np.array([-1, 4], np.int64), "shape"))
    elif kind == "noclassifier":  # include_top=False: the feature map itself, flattened
        nodes += [helper.make_node("Flatten", ["relu"], ["prob"], axis=1)]
    elif kind == "sequence":  # positions as a sequence: [batch, 4, 64] -> mean over positions -> Gemm
        inits += [numpy_helper.from_array(np.array([-1, 4, 64], np.int64), "seq_shape"), _w("fc_w", 5, 4), _w("fc_b", 5)]
        nodes += [helper.make_node("Reshape", ["relu", "seq_shape"], ["tokens"]),
                  helper.make_node("ReduceMean", ["tokens"], ["pool"], axes=[2], keepdims=0),
                  helper.make_node("Gemm", ["pool", "fc_w", "fc_b"], ["logits"], transB=1),
                  helper.make_node("Softmax", ["logits"], ["prob"], axis=1)]
    else:
        raise ValueError(kind)
    out = helper.make_tensor_value_info("prob", TensorProto.FLOAT, ["batch", None])
    model = helper.make_model(helper.make_graph(nodes, kind, [x], [out], initializer=inits),
                              opset_imports=[helper.make_opsetid("", opset)], ir_version=8)
    onnx.checker.check_model(model)
    return onnx.shape_inference.infer_shapes(model)


COLORS = {"blue": (40, 60, 200), "green": (40, 190, 60), "red": (210, 50, 40)}


def make_folder(root: Path, n: int = 12, size: int = 8, classes=COLORS, modes=("RGB",), seed: int = 0) -> Path:
    """One subfolder per colour; noisy images of that colour, saved in the given PIL modes (cycled)."""
    rng = np.random.default_rng(seed)
    for c, rgb in classes.items():
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            arr = np.clip(np.array(rgb) + rng.normal(0, 25, (size, size, 3)), 0, 255).astype(np.uint8)
            img = Image.fromarray(arr).convert(modes[i % len(modes)])
            img.save(root / c / f"{i:03d}.png")
    return root


def save(model: onnx.ModelProto, path: Path, preprocess: str | None = "unit") -> Path:
    if preprocess:
        from porter.spec import PreprocessSpec

        dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
        nhwc = dims[-1] in (1, 3)
        spec = PreprocessSpec.preset(preprocess, layout="NHWC" if nhwc else "NCHW",
                                     size=dims[1:3] if nhwc else dims[2:4], channels=dims[-1] if nhwc else dims[1])
        ModelCard(source="test:" + model.graph.name, framework="onnx", porter_version="0", preprocess=spec).apply_to(model)
    onnx.save(model, path)
    return path


def run(model, x):
    sess = ort.InferenceSession(model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model),
                                providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})


def report_files(out: Path) -> list[Path]:
    stem = out.with_suffix("")
    return [out, Path(f"{stem}.metrics.json"), Path(f"{stem}.training.png"), Path(f"{stem}.confusion.png")]


def vector_model(features: int = 4, classes: int = 3) -> onnx.ModelProto:
    rng = np.random.default_rng(1)
    w1 = numpy_helper.from_array(rng.standard_normal((16, features)).astype(np.float32), "w1")
    b1 = numpy_helper.from_array(np.zeros(16, np.float32), "b1")
    w2 = numpy_helper.from_array(rng.standard_normal((classes, 16)).astype(np.float32), "w2")
    b2 = numpy_helper.from_array(np.zeros(classes, np.float32), "b2")
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], transB=1),
             helper.make_node("Tanh", ["h"], ["t"]),
             helper.make_node("Gemm", ["t", "w2", "b2"], ["logits"], transB=1),
             helper.make_node("Softmax", ["logits"], ["p"], axis=1)]
    g = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", features])],
                          [helper.make_tensor_value_info("p", TensorProto.FLOAT, ["batch", classes])],
                          initializer=[w1, b1, w2, b2])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)], ir_version=7)


def blobs(n=60, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    x = rng.normal(0, 0.3, (n, 4)) + np.where(y[:, None] == 1, 1.0, -1.0)
    return x.astype(np.float32), y
