"""Classification heads trained on backbone features, and their export to ONNX.

A head standardizes its input with the training features' mean and std, then applies a linear layer (``linear``)
or Linear-ReLU-Dropout-Linear (``mlp``). The ONNX head computes the same: ``Sub`` mean, ``Div`` std, ``Gemm``
nodes, then ``Softmax`` (``probabilities``) and ``ArgMax`` (``label``). The standardization is not folded into the
first layer: for a feature with a tiny spread (a nearly dead ReLU channel) ``W / sigma`` and ``b - W mu / sigma``
grow to 1e4 and cancel, and float32 then missed the trained head's probabilities by 6e-4. The head is built with
``onnx.helper`` at the backbone's opset and IR version -- no exporter in between.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import onnx
    import torch

HEAD_INPUT = "porter/head/features"
PROBABILITIES = "probabilities"
LABEL = "label"


def make_head(kind: str, in_features: int, classes: int, *, hidden: int = 256, dropout: float = 0.0,
              mean: np.ndarray | None = None, std: np.ndarray | None = None) -> "torch.nn.Module":
    """A torch head; call inside a seeded context (its weights come from torch's global generator)."""
    import torch
    from torch import nn

    class Head(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.kind = kind
            m = np.zeros(in_features, np.float32) if mean is None else np.asarray(mean, np.float32)
            s = np.ones(in_features, np.float32) if std is None else np.asarray(std, np.float32)
            self.register_buffer("mean", torch.from_numpy(m.copy()))
            self.register_buffer("std", torch.from_numpy(s.copy()))
            drop = [nn.Dropout(dropout)] if dropout > 0 else []
            if kind == "linear":
                self.net = nn.Sequential(*drop, nn.Linear(in_features, classes))
            elif kind == "mlp":
                self.net = nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), *drop, nn.Linear(hidden, classes))
            else:
                raise ValueError(f"unknown head {kind!r}")

        def forward(self, x: "torch.Tensor") -> "torch.Tensor":  # logits
            return self.net((x - self.mean) / self.std)

    return Head()


@dataclass(frozen=True, eq=False)  # arrays: compared and hashed by identity
class LinearHead:
    """The linear probe's head as arrays (float32): logits = ((x - mean) / std) @ weight.T + bias. Built, evaluated,
    checked and exported without torch, so the default finetune never imports it (~1.4 s); ``to_torch()`` gives the
    same head as a module (partial fine-tuning trains it)."""

    mean: np.ndarray
    std: np.ndarray
    weight: np.ndarray  # classes x features
    bias: np.ndarray

    def logits(self, features: np.ndarray) -> np.ndarray:
        x = (np.asarray(features, np.float32) - self.mean) / self.std
        return x @ self.weight.T + self.bias

    def to_torch(self) -> "torch.nn.Module":
        import torch

        with torch.random.fork_rng(devices=[]):  # the random init is overwritten; the caller's RNG is left alone
            head = make_head("linear", self.weight.shape[1], self.weight.shape[0], mean=self.mean, std=self.std)
        with torch.no_grad():
            head.net[-1].weight.copy_(torch.from_numpy(self.weight))
            head.net[-1].bias.copy_(torch.from_numpy(self.bias))
        return head.eval()


def softmax_parts(logits: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """(softmax, log-sum-exp) of ``logits`` along the class ``axis``, overflow-free."""
    top = logits.max(axis, keepdims=True)
    e = np.exp(logits - top)
    total = e.sum(axis, keepdims=True)
    return e / total, np.squeeze(np.log(total) + top, axis)


def as_torch(head: Any) -> "torch.nn.Module":
    """A head as a torch module (a LinearHead converted; a torch head as it is)."""
    return head.to_torch() if isinstance(head, LinearHead) else head


def standardization(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and std of the training features; constant features get std 1 (nothing to scale)."""
    f = features.astype(np.float64)
    mean = f.mean(axis=0)
    std = f.std(axis=0)
    std = np.where(std < 1e-6 * max(1.0, float(np.abs(mean).max(initial=0.0))), 1.0, std)
    return mean.astype(np.float32), std.astype(np.float32)


def head_layers(head: "LinearHead | torch.nn.Module") -> tuple[np.ndarray, np.ndarray, list[tuple[np.ndarray, np.ndarray]]]:
    """(mean, std, [(W [out x in], b), ...]): the head's standardization and its linear layers, float32."""
    if isinstance(head, LinearHead):
        return head.mean.copy(), head.std.copy(), [(head.weight.copy(), head.bias.copy())]
    from torch import nn

    linears = [m for m in head.net if isinstance(m, nn.Linear)]
    layers = [(m.weight.detach().float().numpy().copy(), m.bias.detach().float().numpy().copy()) for m in linears]
    return head.mean.float().numpy().copy(), head.std.float().numpy().copy(), layers


def predict_proba(head: "LinearHead | torch.nn.Module", features: np.ndarray, batch: int = 4096) -> np.ndarray:
    """Softmax probabilities of the (unfolded) head; a torch head in eval mode."""
    if isinstance(head, LinearHead):
        out = []
        for i in range(0, len(features), batch):
            out.append(softmax_parts(head.logits(features[i:i + batch]), axis=1)[0])
        return np.concatenate(out) if out else np.zeros((0, len(head.bias)), np.float32)
    import torch

    head.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(features), batch):
            x = torch.from_numpy(np.ascontiguousarray(features[i:i + batch], dtype=np.float32))
            out.append(torch.softmax(head(x), dim=1).numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def head_to_onnx(head: "LinearHead | torch.nn.Module", *, opset: int, ir_version: int, batch_dim: str | int | None = "batch",
                 input_name: str = HEAD_INPUT) -> "onnx.ModelProto":
    """The head as an ONNX model: ``input_name`` (batch x features) -> ``probabilities``, ``label``."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    mean, std, layers = head_layers(head)
    inits = [numpy_helper.from_array(mean, "porter/head/mean"), numpy_helper.from_array(std, "porter/head/std")]
    nodes = [helper.make_node("Sub", [input_name, "porter/head/mean"], ["porter/head/centred"], name="porter/head/sub"),
             helper.make_node("Div", ["porter/head/centred", "porter/head/std"], ["porter/head/standardized"],
                              name="porter/head/div")]
    x = "porter/head/standardized"
    for i, (w, b) in enumerate(layers):
        wn, bn, y = f"porter/head/W{i}", f"porter/head/b{i}", f"porter/head/dense{i}"
        inits += [numpy_helper.from_array(w, wn), numpy_helper.from_array(b, bn)]
        nodes.append(helper.make_node("Gemm", [x, wn, bn], [y], name=f"porter/head/gemm{i}", transB=1))
        x = y
        if i < len(layers) - 1:
            nodes.append(helper.make_node("Relu", [x], [x + "/relu"], name=f"porter/head/relu{i}"))
            x = x + "/relu"
    nodes.append(helper.make_node("Softmax", [x], [PROBABILITIES], name="porter/head/softmax", axis=1))
    nodes.append(helper.make_node("ArgMax", [x], [LABEL], name="porter/head/argmax", axis=1, keepdims=0))
    in_features = layers[0][0].shape[1]
    classes = layers[-1][0].shape[0]
    graph = helper.make_graph(
        nodes, "porter_head",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, [batch_dim, in_features])],
        [helper.make_tensor_value_info(PROBABILITIES, TensorProto.FLOAT, [batch_dim, classes]),
         helper.make_tensor_value_info(LABEL, TensorProto.INT64, [batch_dim])],
        initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir_version,
                              producer_name="porter")
    onnx.checker.check_model(model)
    return model
