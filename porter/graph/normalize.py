"""Make every exported graph look the same: source I/O names, one symbolic ``batch`` axis, checked and inferred.

An input the exporter gave a fixed leading dim keeps it: whether that batch can be freed is ``batch.py``'s question,
answered by proof, not by renaming the axis.
"""

from __future__ import annotations

from typing import Sequence

import onnx

from ..errors import ConversionError, UnsupportedError
from .batch import BATCH


def rename_tensor(model: onnx.ModelProto, old: str, new: str) -> None:
    """Rename a tensor everywhere it appears (graph I/O, nodes, initializers, value_info), loop and branch bodies
    included: they read outer tensors by name (a detector's Loop reads the image input)."""
    if old == new:
        return
    _rename_in(model.graph, old, new)


def _rename_in(g: onnx.GraphProto, old: str, new: str) -> None:
    for node in g.node:
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = new
        for i, name in enumerate(node.output):
            if name == old:
                node.output[i] = new
        for a in node.attribute:
            for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                local = {v.name for v in sub.input} | {t.name for t in sub.initializer} | {
                    o for n in sub.node for o in n.output}
                if old not in local:  # a body that defines the name itself shadows the outer tensor
                    _rename_in(sub, old, new)
    for coll in (g.input, g.output, g.value_info):
        for v in coll:
            if v.name == old:
                v.name = new
    for init in g.initializer:
        if init.name == old:
            init.name = new


def _unique_names(names: Sequence[str], taken: set[str]) -> list[str]:
    out = []
    for n in names:
        clean = n.split(":")[0] if n.endswith(":0") else n
        cand, k = clean, 1
        while cand in taken or cand in out:
            cand, k = f"{clean}_{k}", k + 1
        out.append(cand)
    return out


def normalize(model: onnx.ModelProto, input_names: Sequence[str] | None = None,
              output_names: Sequence[str] | None = None) -> onnx.ModelProto:
    """Rename I/O, call every dynamic leading axis of the inputs and outputs ``batch``, check the graph.

    Outputs whose leading axis is really something else (an NMS selection) are renamed from validation's
    evidence afterwards (``batch.name_output_axes``)."""
    g = model.graph
    inits = {i.name for i in g.initializer}
    inputs = [v for v in g.input if v.name not in inits]
    internal = {n for node in g.node for n in list(node.input) + list(node.output)}
    for values, wanted in ((inputs, input_names), (list(g.output), output_names)):
        if wanted is None:
            continue
        if len(wanted) != len(values):
            raise ConversionError(f"exporter produced {len(values)} tensors but the source has {len(wanted)} "
                                  f"({', '.join(wanted)}); please report this model")
        taken = internal - {v.name for v in values}
        for v, new in zip(values, _unique_names(list(wanted), taken)):
            rename_tensor(model, v.name, new)

    # One symbolic batch axis: whatever the exporter called it (unk__123, s0, batch_size ...).
    batch_symbols: set[str] = set()
    for v in list(inputs) + list(g.output):
        shape = v.type.tensor_type.shape
        if v.type.tensor_type.HasField("shape") and len(shape.dim) >= 1:
            d0 = shape.dim[0]
            if d0.HasField("dim_param"):
                batch_symbols.add(d0.dim_param)
            if not d0.HasField("dim_value"):
                d0.Clear()
                d0.dim_param = BATCH
    for v in g.value_info:
        for d in v.type.tensor_type.shape.dim:
            if d.HasField("dim_param") and d.dim_param in batch_symbols:
                d.dim_param = BATCH

    leftovers = foreign_ops(model)
    if leftovers:
        raise UnsupportedError(
            f"{len(leftovers)} op(s) have no ONNX conversion: "
            + ", ".join(f"{op} (node {', '.join(repr(n) for n in nodes[:3])}{' ...' if len(nodes) > 3 else ''})"
                        for op, nodes in sorted(leftovers.items()))
            + "; replace them in the source model or try another --opset")
    try:
        onnx.checker.check_model(model)
        inferred = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise ConversionError(f"the exported ONNX graph is invalid: {str(e).splitlines()[0]}") from e
    return inferred


def foreign_ops(model: onnx.ModelProto) -> dict[str, list[str]]:
    """Ops an exporter left behind unconverted (it logs them and carries on): op type -> node names.

    A node counts as foreign when its domain is the ONNX default one but ONNX has no schema of that name, or its
    domain is one ONNX Runtime does not know. Subgraphs (If/Loop bodies) are searched too.
    """
    known_domains = {"", "ai.onnx", "ai.onnx.ml", "com.microsoft", "com.microsoft.nchwc", "ai.onnx.preview.training"}
    known_domains |= {f.domain for f in model.functions}  # model-local functions (torch's exporter emits some)
    found: dict[str, list[str]] = {}

    def walk(graph: onnx.GraphProto) -> None:
        for node in graph.node:
            domain = node.domain or ""
            if domain not in known_domains or (domain in ("", "ai.onnx") and not onnx.defs.has(node.op_type)):
                found.setdefault(node.op_type, []).append(node.name or node.output[0])
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    walk(attr.g)
                for sub in attr.graphs:
                    walk(sub)

    walk(model.graph)
    return found
