"""Graph surgery for fine-tuning: find where to cut, extract the backbone, merge a new head onto it.

Framework-free: imports only onnx and numpy. The cut is the tensor a new head is attached to -- the input of
the final classifier (``Gemm``; ``MatMul`` [+ ``Add``]; a 1x1 ``Conv`` after global pooling), found by walking
back from the model's output through trailing ``Softmax``/``Flatten``/``Reshape``/``Identity``-like nodes.
Without such a classifier the last global pooling (``GlobalAveragePool``/``GlobalMaxPool``, or ``ReduceMean``
over the spatial axes) is the fallback.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..errors import UsageError

FEATURES = "porter/features"  # the backbone's output: batch x features
# Nodes that sit between a classifier and the model output without changing what it computes per example.
PASS_THROUGH = {"Softmax", "LogSoftmax", "Sigmoid", "Flatten", "Reshape", "Identity", "Squeeze", "Unsqueeze",
                "Dropout", "Cast", "Transpose"}
GLOBAL_POOLS = {"GlobalAveragePool", "GlobalMaxPool"}


class CutCandidate(NamedTuple):
    """A tensor a head can be attached to: its name, its (inferred) shape, and why it is a candidate."""

    name: str
    shape: tuple[int | str | None, ...] | None
    reason: str

    def describe(self) -> str:
        return f"{self.name} {format_shape(self.shape)} ({self.reason})"


def format_shape(shape: Sequence[int | str | None] | None) -> str:
    if shape is None:
        return "[unknown shape]"
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


# --- reading the graph ------------------------------------------------------------------------------------------

class _Graph:
    """Producer/consumer maps, constants and inferred shapes of a model's main graph."""

    def __init__(self, model: onnx.ModelProto):
        try:
            inferred = onnx.shape_inference.infer_shapes(model)
        except Exception:  # noqa: BLE001 - shapes are a help, not a requirement
            inferred = model
        g = inferred.graph
        self.graph = model.graph
        self.nodes = list(model.graph.node)
        self.producer: dict[str, onnx.NodeProto] = {}
        self.order: dict[str, int] = {}
        for i, node in enumerate(self.nodes):
            for out in node.output:
                if out:
                    self.producer[out] = node
                    self.order[out] = i
        self.consts: dict[str, onnx.TensorProto] = {t.name: t for t in model.graph.initializer}
        for node in self.nodes:
            if node.op_type == "Constant" and node.output:
                for a in node.attribute:
                    if a.name == "value" and a.type == onnx.AttributeProto.TENSOR:
                        self.consts[node.output[0]] = a.t
        self.inputs = [v.name for v in model.graph.input if v.name not in self.consts]
        self.shapes: dict[str, tuple[int | str | None, ...]] = {}
        self.types: dict[str, int] = {}
        for v in list(g.input) + list(g.value_info) + list(g.output):
            t = v.type.tensor_type
            if t.elem_type:
                self.types[v.name] = t.elem_type
            if t.HasField("shape"):
                self.shapes[v.name] = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                                            for d in t.shape.dim)

    def tensors(self) -> set[str]:
        return set(self.producer) | set(self.inputs)

    def const_array(self, name: str) -> np.ndarray | None:
        t = self.consts.get(name)
        return numpy_helper.to_array(t) if t is not None else None

    def through(self, name: str) -> str:
        """Walk back from ``name`` through pass-through nodes; the first tensor that isn't their output."""
        seen = set()
        while name in self.producer and name not in seen:
            seen.add(name)
            node = self.producer[name]
            if node.op_type not in PASS_THROUGH or not node.input:
                break
            name = node.input[0]
        return name


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _is_global_pool(g: _Graph, node: onnx.NodeProto) -> bool:
    if node.op_type in GLOBAL_POOLS:
        return True
    if node.op_type != "ReduceMean" or not node.input:
        return False
    axes = _attr(node, "axes")
    if axes is None and len(node.input) > 1 and node.input[1]:
        arr = g.const_array(node.input[1])
        axes = arr.reshape(-1).tolist() if arr is not None else None
    shape = g.shapes.get(node.input[0])
    if axes is None or shape is None or len(shape) != 4:
        return False
    spatial = {((a + 4) % 4) for a in axes}
    return spatial in ({2, 3}, {1, 2})  # NCHW or NHWC


def _classifier_input(g: _Graph, name: str) -> tuple[str, str] | None:
    """If ``name`` is produced by a classifier layer, return (its feature input, description)."""
    node = g.producer.get(name)
    if node is None:
        return None
    if node.op_type == "Gemm" and len(node.input) >= 2 and node.input[1] in g.consts:
        return node.input[0], f"input of the final classifier (Gemm '{node.name or node.output[0]}')"
    if node.op_type == "Add" and len(node.input) == 2:
        for mm, bias in ((node.input[0], node.input[1]), (node.input[1], node.input[0])):
            prod = g.producer.get(mm)
            if prod is not None and prod.op_type == "MatMul" and prod.input[1] in g.consts and bias in g.consts:
                return prod.input[0], f"input of the final classifier (MatMul + Add '{prod.name or prod.output[0]}')"
    if node.op_type == "MatMul" and len(node.input) == 2 and node.input[1] in g.consts:
        return node.input[0], f"input of the final classifier (MatMul '{node.name or node.output[0]}')"
    if node.op_type == "Conv" and len(node.input) >= 2 and node.input[1] in g.consts:
        w = g.consts[node.input[1]]
        if len(w.dims) == 4 and tuple(w.dims[2:]) == (1, 1):
            pooled = g.through(node.input[0])
            pool = g.producer.get(pooled)
            if pool is not None and _is_global_pool(g, pool):
                return node.input[0], f"input of the final classifier (1x1 Conv '{node.name or node.output[0]}' after global pooling)"
    return None


def cut_candidates(model: onnx.ModelProto) -> list[CutCandidate]:
    """Tensors a new head can be attached to, best first, as (name, shape, reason).

    First the input of each output's final classifier, then the outputs of global pooling nodes (latest first).
    """
    return _candidates(_Graph(model))


def _candidates(g: _Graph) -> list[CutCandidate]:
    found: list[CutCandidate] = []
    names: set[str] = set()

    def add(name: str, reason: str) -> None:
        if name not in names:
            names.add(name)
            found.append(CutCandidate(name, g.shapes.get(name), reason))

    for out in g.graph.output:
        hit = _classifier_input(g, g.through(out.name))
        if hit:
            add(*hit)
    pools = [n for n in g.nodes if _is_global_pool(g, n)]
    for node in reversed(pools):
        kind = node.op_type if node.op_type in GLOBAL_POOLS else "ReduceMean over the spatial axes"
        add(node.output[0], f"output of global pooling ({kind} '{node.name or node.output[0]}')")
    return found


@dataclass(frozen=True)
class Cut:
    """The chosen cut: the tensor, its shape, why, and a note when porter fell back or the user chose."""

    name: str
    shape: tuple[int | str | None, ...] | None
    reason: str
    note: str | None = None


def choose_cut(model: onnx.ModelProto, cut: str | None = None) -> Cut:
    """The tensor to attach a head to: ``cut`` if given (checked), else the best detected candidate."""
    g = _Graph(model)
    candidates = _candidates(g)
    listing = "; ".join(c.describe() for c in candidates[:6]) or "none detected"
    if cut is not None:
        if cut in g.consts:
            raise UsageError(f"--cut {cut!r} is a weight (initializer), not an activation; candidates: {listing}")
        if cut not in g.tensors():
            raise UsageError(f"--cut {cut!r} is not a tensor of this model; candidates: {listing} "
                             f"(porter inspect MODEL --cuts lists them)")
        reason = next((c.reason for c in candidates if c.name == cut), "chosen with --cut")
        chosen = Cut(cut, g.shapes.get(cut), reason, note=f"cut at {cut!r} (--cut)")
    else:
        if not candidates:
            raise UsageError("no cut found: this model has no final classifier (Gemm, MatMul [+ Add], 1x1 Conv after "
                             "global pooling) and no global pooling; choose the feature tensor with --cut TENSOR")
        best = candidates[0]
        note = None
        if best.reason.startswith("output of global pooling"):
            note = (f"no final classifier found (Gemm, MatMul + Add, 1x1 Conv after global pooling); cutting at the "
                    f"last global pooling {best.name!r} {format_shape(best.shape)}")
        chosen = Cut(best.name, best.shape, best.reason, note)
    feature_dim(chosen, listing)  # fails early on a spatial tensor
    return chosen


def feature_dim(cut: Cut, listing: str = "") -> int | None:
    """The feature count of a batch x features tensor (trailing unit dims allowed); None when not known yet."""
    shape = cut.shape
    if shape is None:
        return None
    rest = shape[1:]
    unknown = [d for d in rest if not isinstance(d, int) or d <= 0]
    big = [d for d in rest if isinstance(d, int) and d > 1]
    if len(shape) < 2 or len(unknown) + len(big) > 1:
        hint = f"; candidates: {listing}" if listing else ""
        raise UsageError(f"cut tensor {cut.name!r} has shape {format_shape(shape)}, not batch x features after "
                         f"pooling; cut after global pooling or flattening{hint}")
    if unknown:
        return None  # checked when the features are computed
    return int(big[0]) if big else 1


# --- extraction -------------------------------------------------------------------------------------------------

def _subgraph_inputs(node: onnx.NodeProto) -> set[str]:
    """Outer-scope names a control-flow node's subgraphs read."""
    names: set[str] = set()
    for a in node.attribute:
        graphs = [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs) if a.type == onnx.AttributeProto.GRAPHS else []
        for sg in graphs:
            local = {i.name for i in sg.input} | {i.name for i in sg.initializer}
            for n in sg.node:
                local.update(n.output)
            for n in sg.node:
                names.update(i for i in n.input if i and i not in local)
                names.update(_subgraph_inputs(n) - local)
    return names


def extract_backbone(model: onnx.ModelProto, cut: Cut | str | None = None) -> onnx.ModelProto:
    """The sub-graph from the model's inputs to the cut, with one output ``porter/features`` (batch x features).

    Keeps the source's input(s), opset, IR version and functions; drops ``porter.*`` metadata. A cut tensor
    with trailing unit dims (``N x C x 1 x 1``) is flattened.
    """
    if not isinstance(cut, Cut):
        cut = choose_cut(model, cut)
    src = model.graph
    g = _Graph(model)
    needed = {cut.name}
    keep = [False] * len(g.nodes)
    for i in range(len(g.nodes) - 1, -1, -1):
        node = g.nodes[i]
        if any(o in needed for o in node.output if o):
            keep[i] = True
            needed.update(n for n in node.input if n)
            needed.update(_subgraph_inputs(node))
    nodes = [n for n, k in zip(g.nodes, keep) if k]
    inputs = [v for v in src.input if v.name in needed and v.name not in g.consts]
    if not inputs:
        raise UsageError(f"cut tensor {cut.name!r} does not depend on any model input; choose another --cut")
    inits = [t for t in src.initializer if t.name in needed]
    sparse = [t for t in src.sparse_initializer if t.values.name in needed]
    value_info = [v for v in src.value_info if v.name in needed and v.name != cut.name]

    rank = len(cut.shape) if cut.shape is not None else None
    tail_op = "Identity" if rank == 2 else "Flatten"
    tail = helper.make_node(tail_op, [cut.name], [FEATURES], name="porter/features",
                            **({"axis": 1} if tail_op == "Flatten" else {}))
    batch = _batch_dim(inputs[0])
    dim = feature_dim(cut)
    out = helper.make_tensor_value_info(FEATURES, g.types.get(cut.name, onnx.TensorProto.FLOAT), [batch, dim])
    graph = helper.make_graph(nodes + [tail], (src.name or "model") + "_backbone", inputs, [out],
                              initializer=inits, value_info=value_info, sparse_initializer=sparse)
    backbone = helper.make_model(graph, opset_imports=list(model.opset_import), ir_version=model.ir_version,
                                 functions=list(model.functions), producer_name=model.producer_name,
                                 producer_version=model.producer_version)
    backbone.domain, backbone.model_version = model.domain, model.model_version
    return backbone


def _batch_dim(value: onnx.ValueInfoProto) -> str | int | None:
    dims = value.type.tensor_type.shape.dim
    if not dims:
        return "batch"
    d = dims[0]
    return d.dim_param if d.HasField("dim_param") else (d.dim_value if d.HasField("dim_value") else "batch")


def model_hash(model: onnx.ModelProto) -> str:
    """A content hash of a model's computation: graph and weights, not metadata, names of nodes or doc strings."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    del m.metadata_props[:]
    m.doc_string = m.producer_name = m.producer_version = ""
    for node in m.graph.node:
        node.name = ""
        node.doc_string = ""
    return hashlib.sha256(m.SerializeToString(deterministic=True)).hexdigest()


# --- merging ----------------------------------------------------------------------------------------------------

def merge_head(backbone: onnx.ModelProto, head: onnx.ModelProto) -> onnx.ModelProto:
    """Connect ``head`` (one input, its outputs ``probabilities`` and ``label``) to the backbone's features.

    Uses ``onnx.compose.merge_models``; the head must be built at the backbone's opset and IR version. A backbone
    tensor that happens to share a name with a head tensor is renamed first.
    """
    from onnx import compose

    from .normalize import rename_tensor

    if len(head.graph.input) != 1:
        raise ValueError("a head has exactly one input")
    head_names = {n for node in head.graph.node for n in list(node.input) + list(node.output)}
    head_names |= {t.name for t in head.graph.initializer} | {o.name for o in head.graph.output}
    backbone = _copy(backbone)
    back_names = {n for node in backbone.graph.node for n in list(node.input) + list(node.output)}
    back_names |= {t.name for t in backbone.graph.initializer} | {v.name for v in backbone.graph.input}
    for name in sorted((back_names & head_names) - {FEATURES}):
        rename_tensor(backbone, name, f"backbone/{name}")
    if FEATURES in head_names - {head.graph.input[0].name}:
        raise ValueError(f"head must not use the name {FEATURES} internally")
    merged = compose.merge_models(backbone, head, io_map=[(FEATURES, head.graph.input[0].name)],
                                  name=backbone.graph.name.removesuffix("_backbone") + "_finetuned")
    del merged.metadata_props[:]
    merged.ir_version = backbone.ir_version
    onnx.checker.check_model(merged)
    return merged


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    return m
