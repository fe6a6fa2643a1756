"""The tail: the sub-graph between an earlier tensor and the cut whose weights partial fine-tuning trains.

Framework-free: imports only onnx and numpy. ``find_tail`` picks the start tensor (``--unfreeze N``: the latest
tensor whose sub-graph up to the cut holds the last N weight-carrying layers -- Conv, Gemm, MatMul with a constant
weight -- and reads nothing else of the model; ``--train-from TENSOR``: that tensor). A residual block can't be cut
in half (its skip connection would read a tensor before the start), so N can grow to the smallest closed tail that
holds N layers, and the tail says so. ``write_back`` puts trained weights into the model's own initializers: the
graph keeps its structure, op for op.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from ..errors import UsageError
from .cuts import ModelGraph
from .inspect import format_shape

WEIGHT_OPS = ("Conv", "Gemm", "MatMul")
NORMALIZATIONS = {"BatchNormalization", "InstanceNormalization", "LayerNormalization", "GroupNormalization"}
FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16}


@dataclass(frozen=True)
class TailLayer:
    """One weight-carrying layer of the tail and the constants it trains."""

    node: str  # the node's name (its first output when unnamed)
    op: str
    weights: tuple[str, ...]  # the constants trained (weight, bias)
    parameters: int

    def describe(self) -> str:
        return f"{self.op} {self.node} ({self.parameters:,} parameters)"


@dataclass(frozen=True)
class Tail:
    start: str  # the tensor features are cached at (the tail's input)
    start_shape: tuple | None
    end: str  # the cut tensor (the tail's output)
    nodes: tuple[int, ...]  # positions in model.graph.node, in graph order
    layers: tuple[TailLayer, ...]  # the weight-carrying layers, in graph order
    trainable: tuple[str, ...]  # constant names trained
    frozen: tuple[str, ...]  # constants the tail reads and keeps (normalization, shared, shapes)
    trainable_parameters: int
    frozen_parameters: int  # the tail's frozen constants (float) + everything before the start
    requested: int | None = None  # --unfreeze N, or None for --train-from
    notes: tuple[str, ...] = field(default=())

    def describe(self) -> str:
        return (f"{len(self.layers)} layer{'s' if len(self.layers) != 1 else ''} from {self.start} "
                f"{format_shape(self.start_shape)} to {self.end}")


def _closure(g: ModelGraph, start: str, end: str) -> set[int] | None:
    """Positions of the nodes computing ``end`` from ``start`` and constants; None when they read more (a model
    input, or a tensor reached around ``start``)."""
    nodes: set[int] = set()
    stack, seen = [end], {start}
    while stack:
        name = stack.pop()
        if name in seen or not name:
            continue
        seen.add(name)
        if name in g.consts:
            continue
        node = g.producer.get(name)
        if node is None:  # another model input (or a dangling name): the tail isn't closed under ``start``
            return None
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            return None  # control flow reads outer-scope names; never part of a trainable tail
        nodes.add(g.order[name])
        stack.extend(i for i in node.input if i)
    return nodes


def _ancestors(g: ModelGraph, end: str) -> set[int]:
    nodes: set[int] = set()
    stack, seen = [end], set()
    while stack:
        name = stack.pop()
        if name in seen or not name or name in g.consts:
            continue
        seen.add(name)
        node = g.producer.get(name)
        if node is not None:
            nodes.add(g.order[name])
            stack.extend(i for i in node.input if i)
    return nodes


def _float_const(g: ModelGraph, name: str) -> bool:
    t = g.consts.get(name)
    return t is not None and t.data_type in FLOAT_TYPES


def _weights(g: ModelGraph, node: onnx.NodeProto) -> list[str]:
    """The constants a weight-carrying node trains: Conv/Gemm weight and bias, MatMul's constant operand and the
    bias an ``Add`` right after it holds; [] when the weight isn't a constant."""
    if node.op_type in ("Conv", "Gemm"):
        if len(node.input) < 2 or not _float_const(g, node.input[1]):
            return []
        found = [node.input[1]] + ([node.input[2]] if len(node.input) > 2 and _float_const(g, node.input[2]) else [])
    elif node.op_type == "MatMul":
        found = [i for i in node.input if _float_const(g, i)][:1]
        if not found:
            return []
    else:
        return []
    if node.op_type != "Gemm" and len(found) == 1:  # a bias added by the next node (tf2onnx: MatMul + Add)
        users = g.consumers.get(node.output[0], [])
        if len(users) == 1 and users[0].op_type == "Add":
            bias = [i for i in users[0].input if i != node.output[0] and _float_const(g, i)]
            if bias:
                found.append(bias[0])
    return found


def _size(g: ModelGraph, name: str) -> int:
    return int(np.prod(g.consts[name].dims, dtype=np.int64)) if name in g.consts else 0


def find_tail(model: onnx.ModelProto, end: str, *, unfreeze: int | None = None,
              train_from: str | None = None) -> Tail:
    """The tail ending at the cut tensor ``end``: ``unfreeze`` layers counted back from it, or from ``train_from``."""
    g = ModelGraph(model)
    if (unfreeze is None) == (train_from is None):
        raise ValueError("give exactly one of unfreeze and train_from")
    layer_of = {i: _weights(g, n) for i, n in enumerate(g.nodes)}
    backbone = _ancestors(g, end)
    notes: list[str] = []
    if train_from is not None:
        if train_from in g.consts:
            raise UsageError(f"--train-from {train_from!r} is a weight (initializer), not an activation")
        if train_from not in g.tensors():
            raise UsageError(f"--train-from {train_from!r} is not a tensor of this model (porter inspect MODEL "
                             f"--cuts lists the cut; --unfreeze N picks the start for you)")
        if train_from == end:
            raise UsageError(f"--train-from {train_from!r} is the cut itself: the tail would be empty; give an "
                             f"earlier tensor")
        nodes = _closure(g, train_from, end)
        if nodes is None:
            raise UsageError(f"the cut {end!r} does not depend on {train_from!r} alone (it is not before the cut, or "
                             f"a skip connection goes around it); give a tensor every path to the cut goes through, "
                             f"or --unfreeze N")
        start = train_from
    else:
        if not isinstance(unfreeze, int) or unfreeze < 1:
            raise UsageError(f"--unfreeze must be a positive number of layers, got {unfreeze}")
        total = sum(1 for i in backbone if layer_of[i])
        if unfreeze > total:
            raise UsageError(f"--unfreeze {unfreeze}: the backbone has only {total} weight-carrying layer"
                             f"{'s' if total != 1 else ''} (Conv, Gemm, MatMul) before the cut; give at most {total}")
        # candidate starts: the inputs of the backbone's nodes, latest producer first; the model input last (the
        # whole backbone trains: its cached "features" are the preprocessed images)
        candidates = sorted({i for p in backbone for i in g.nodes[p].input
                             if i and i not in g.consts and (i in g.producer or i in g.inputs)},
                            key=lambda t: g.order.get(t, -1), reverse=True)
        start, nodes = None, None
        for t in candidates:
            if not g.batch_major(t) or g.types.get(t, onnx.TensorProto.FLOAT) not in FLOAT_TYPES:
                continue
            closed = _closure(g, t, end)
            if closed is not None and sum(1 for i in closed if layer_of[i]) >= unfreeze:
                start, nodes = t, closed
                break
        if start is None:
            raise UsageError(f"--unfreeze {unfreeze}: no tensor of this model starts a tail holding the last "
                             f"{unfreeze} layers (every candidate is read around by a skip connection, or is not "
                             f"a float tensor of batch-major shape); give a smaller --unfreeze")
    order = sorted(nodes)
    layers, trainable = [], []
    outside = {name for p in backbone - set(order) for name in g.nodes[p].input}
    for i in order:
        names = [w for w in layer_of[i] if w not in outside]
        shared = [w for w in layer_of[i] if w in outside]
        if shared:
            notes.append(f"{', '.join(shared)} also feeds layers before the tail; kept frozen")
        if layer_of[i]:
            node = g.nodes[i]
            layers.append(TailLayer(node.name or node.output[0], node.op_type, tuple(names),
                                    sum(_size(g, w) for w in names)))
            trainable += [w for w in names if w not in trainable]
    if unfreeze is not None and len(layers) > unfreeze:
        notes.append(f"--unfreeze {unfreeze}: the smallest tail holding the last {unfreeze} layers has {len(layers)} "
                     f"(a residual or branching block can't be split)")
    if not trainable:
        raise UsageError(f"the tail from {start!r} to the cut has no weight-carrying layer (Conv, Gemm, MatMul with "
                         f"constant weights) to train; give an earlier --train-from or --unfreeze N")
    read = {name for i in order for name in g.nodes[i].input if name in g.consts}
    frozen = sorted(read - set(trainable))
    trainable_count = sum(_size(g, w) for w in trainable)
    frozen_count = sum(_size(g, n) for n in g.consts if n not in trainable and _float_const(g, n)
                       and any(n in g.nodes[p].input for p in backbone))
    return Tail(start, g.shapes.get(start), end, tuple(order), tuple(layers), tuple(trainable), tuple(frozen),
                trainable_count, frozen_count, unfreeze, tuple(notes))


def write_back(model: onnx.ModelProto, weights: dict[str, np.ndarray]) -> onnx.ModelProto:
    """A copy of ``model`` with the constants named in ``weights`` replaced (same dtype and shape); nothing else
    changes. Initializers and ``Constant`` nodes both."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    left = dict(weights)

    def replaced(t: onnx.TensorProto, name: str) -> onnx.TensorProto:
        old = numpy_helper.to_array(t)
        new = np.asarray(left.pop(name))
        if new.shape != old.shape:
            raise ValueError(f"{name}: trained shape {new.shape} != the model's {old.shape}")
        return numpy_helper.from_array(new.astype(old.dtype), t.name)

    for t in out.graph.initializer:
        if t.name in left:
            t.CopyFrom(replaced(t, t.name))
    for node in out.graph.node:
        if node.op_type == "Constant" and node.output and node.output[0] in left:
            for a in node.attribute:
                if a.name == "value" and a.type == onnx.AttributeProto.TENSOR:
                    a.t.CopyFrom(replaced(a.t, node.output[0]))
    if left:
        raise ValueError(f"no constant named {', '.join(sorted(left))} in the model")
    return out
