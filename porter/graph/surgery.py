"""Graph surgery for fine-tuning: extract the backbone up to one or more cuts, merge a new head onto it.

Framework-free: imports only onnx and numpy. Where to cut is ``cuts.py``'s job; here a cut becomes a graph output
of batch x features: pooled by a ``ReduceMean`` porter appends when the cut is a spatial feature map, flattened when
it has trailing unit dims.
"""

from __future__ import annotations

import hashlib
from typing import Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..errors import UsageError
from .cuts import Cut, ModelGraph, choose_cut

FEATURES = "porter/features"  # the backbone's output: batch x features (with several cuts: porter/features/0, ...)


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


def extract_backbone(model: onnx.ModelProto, cuts: Cut | str | Sequence[Cut] | None = None) -> onnx.ModelProto:
    """The sub-graph from the model's inputs to the cut(s), each as an output of batch x features.

    One cut: one output ``porter/features``; several: ``porter/features/0``, ``/1``, ... in their order, computed in
    one pass. A spatial cut gets the global average pooling it asks for (``Cut.pool_axes``); trailing unit dims
    (``N x C x 1 x 1``) are flattened. Keeps the source's input(s), opset, IR version and functions; drops
    ``porter.*`` metadata.
    """
    if cuts is None or isinstance(cuts, str):
        cuts = [choose_cut(model, cuts)]
    elif isinstance(cuts, Cut):
        cuts = [cuts]
    cuts = list(cuts)
    src = model.graph
    g = ModelGraph(model)
    needed = {c.name for c in cuts}
    keep = [False] * len(g.nodes)
    for i in range(len(g.nodes) - 1, -1, -1):
        node = g.nodes[i]
        if any(o in needed for o in node.output if o):
            keep[i] = True
            needed.update(n for n in node.input if n)
            needed.update(_subgraph_inputs(node))
    nodes = [n for n, k in zip(g.nodes, keep) if k]
    inputs = [v for v in src.input if v.name in needed and v.name not in g.consts]
    for c in cuts:
        if c.name not in g.inputs and not _depends_on_input(g, c.name):
            raise UsageError(f"cut tensor {c.name!r} does not depend on any model input; choose another --cut")
    inits = [t for t in src.initializer if t.name in needed]
    sparse = [t for t in src.sparse_initializer if t.values.name in needed]
    cut_names = {c.name for c in cuts}
    value_info = [v for v in src.value_info if v.name in needed and v.name not in cut_names]
    batch = _batch_dim(inputs[0])
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    outputs = []
    for i, cut in enumerate(cuts):
        out_name = FEATURES if len(cuts) == 1 else f"{FEATURES}/{i}"
        tail, extra = _feature_tail(cut, out_name, opset)
        nodes += tail
        inits += extra
        outputs.append(helper.make_tensor_value_info(out_name, g.types.get(cut.name, onnx.TensorProto.FLOAT),
                                                     [batch, cut.features]))
    graph = helper.make_graph(nodes, (src.name or "model") + "_backbone", inputs, outputs,
                              initializer=inits, value_info=value_info, sparse_initializer=sparse)
    backbone = helper.make_model(graph, opset_imports=list(model.opset_import), ir_version=model.ir_version,
                                 functions=list(model.functions), producer_name=model.producer_name,
                                 producer_version=model.producer_version)
    backbone.domain, backbone.model_version = model.domain, model.model_version
    return backbone


def _depends_on_input(g: ModelGraph, name: str) -> bool:
    stack, seen = [name], set()
    while stack:
        n = stack.pop()
        if n in g.inputs:
            return True
        node = g.producer.get(n)
        if node is None or n in seen:
            continue
        seen.add(n)
        stack.extend(i for i in list(node.input) + sorted(_subgraph_inputs(node)) if i)
    return False


def _feature_tail(cut: Cut, out_name: str, opset: int) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """Nodes turning the cut tensor into ``out_name`` (batch x features): pool if asked, then flatten."""
    nodes, inits = [], []
    x = cut.name
    if cut.pool_axes:
        pooled = f"{out_name}/pooled"
        if opset >= 18:
            axes = f"{out_name}/pool_axes"
            inits.append(numpy_helper.from_array(np.array(cut.pool_axes, np.int64), axes))
            nodes.append(helper.make_node("ReduceMean", [x, axes], [pooled], name=f"{out_name}/pool", keepdims=0))
        else:
            nodes.append(helper.make_node("ReduceMean", [x], [pooled], name=f"{out_name}/pool",
                                          axes=list(cut.pool_axes), keepdims=0))
        x = pooled
        rank = 2
    else:
        rank = len(cut.shape) if cut.shape is not None else None
    if rank == 2:
        nodes.append(helper.make_node("Identity", [x], [out_name], name=out_name))
    else:
        nodes.append(helper.make_node("Flatten", [x], [out_name], name=out_name, axis=1))
    return nodes, inits


def _batch_dim(value: onnx.ValueInfoProto) -> str | int | None:
    dims = value.type.tensor_type.shape.dim
    if not dims:
        return "batch"
    d = dims[0]
    return d.dim_param if d.HasField("dim_param") else (d.dim_value if d.HasField("dim_value") else "batch")


class Fingerprint:
    """A content hash of a model's computation, blind to how its tensors and nodes are named.

    Converters name generated tensors with process-wide counters (tf2onnx's ``const_fold_opt__123``), and Keras
    numbers its layers per session, so the same source converted twice gives different names and bytes. Tensors
    are renamed by first use (inputs, then nodes in order), so ``digest`` changes only with the graph's structure,
    attributes and weights, and ``tensor_id`` names a tensor the same way in every conversion.
    """

    def __init__(self, model: onnx.ModelProto):
        ids: dict[str, str] = {}

        def cid(name: str) -> str:
            if not name:
                return ""
            if name not in ids:
                ids[name] = f"t{len(ids)}"
            return ids[name]

        graph = model.graph
        h = hashlib.sha256()
        init_names = {t.name for t in graph.initializer}
        for v in graph.input:
            if v.name not in init_names:
                h.update(f"in {cid(v.name)} ".encode() + _value_type(v))
        for node in graph.node:
            h.update(f"{node.domain}:{node.op_type}({','.join(cid(i) for i in node.input)})->"
                     f"{','.join(cid(o) for o in node.output)}".encode())
            for a in sorted(node.attribute, key=lambda a: a.name):
                c = onnx.AttributeProto()
                c.CopyFrom(a)
                c.doc_string = ""
                if c.type == onnx.AttributeProto.TENSOR:
                    c.t.name = ""
                h.update(c.SerializeToString(deterministic=True))
        for t in sorted(graph.initializer, key=lambda t: int(cid(t.name)[1:])):
            arr = numpy_helper.to_array(t)
            h.update(f"init {cid(t.name)} {arr.dtype} {arr.shape}".encode() + np.ascontiguousarray(arr).tobytes())
        for v in graph.output:
            h.update(f"out {cid(v.name)}".encode())
        for o in sorted(model.opset_import, key=lambda o: o.domain):
            h.update(f"opset {o.domain} {o.version}".encode())
        self.digest = h.hexdigest()
        self._ids = ids

    def tensor_id(self, name: str) -> str:
        return self._ids.get(name, name)


def _value_type(v: onnx.ValueInfoProto) -> bytes:
    t = onnx.TypeProto()
    t.CopyFrom(v.type)
    return t.SerializeToString(deterministic=True)


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
    # merge_models lists a domain twice when the backbone imports several (e.g. "" and ai.onnx.ml); ORT's
    # quantizer, among others, refuses such a model: one entry per domain, its highest version
    versions: dict[str, int] = {}
    for o in merged.opset_import:
        versions[o.domain] = max(o.version, versions.get(o.domain, 0))
    del merged.opset_import[:]
    merged.opset_import.extend(onnx.helper.make_opsetid(d, v) for d, v in versions.items())
    onnx.checker.check_model(merged)
    return merged


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    return m
