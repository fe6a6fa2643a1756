"""Read facts off an ONNX graph: I/O, shapes, image geometry, parameter count. Imports only onnx."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import onnx
from onnx import TensorProto


def format_shape(shape: Sequence[int | str | None] | None) -> str:
    """``[batch, 224, 224, 3]``: the one way porter writes a shape (unknown dims as ``?``)."""
    if shape is None:
        return "[unknown shape]"
    # converters name unknown dims unk__0, unk__1, ...: to a reader they are just unknown
    return "[" + ", ".join("?" if d is None or str(d).startswith("unk__") else str(d) for d in shape) + "]"


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # numpy dtype name
    shape: tuple[int | str | None, ...]  # int, symbolic name, or None (unknown)

    def describe(self) -> str:
        return f"{self.name}: {self.dtype}{format_shape(self.shape)}"


def _info(value: onnx.ValueInfoProto) -> TensorInfo:
    t = value.type.tensor_type
    dims: list[int | str | None] = []
    if t.HasField("shape"):
        for d in t.shape.dim:
            dims.append(d.dim_value if d.HasField("dim_value") else (d.dim_param or None))
    dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.elem_type)).name if t.elem_type else "unknown"
    return TensorInfo(value.name, dtype, tuple(dims))


def graph_inputs(model: onnx.ModelProto) -> list[TensorInfo]:
    inits = {i.name for i in model.graph.initializer}
    return [_info(v) for v in model.graph.input if v.name not in inits]


def graph_outputs(model: onnx.ModelProto) -> list[TensorInfo]:
    return [_info(v) for v in model.graph.output]


def opset_of(model: onnx.ModelProto) -> int:
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx"):
            return o.version
    return 0


def parameter_count(model: onnx.ModelProto) -> int:
    total = 0
    for init in model.graph.initializer:
        total += int(np.prod(init.dims)) if init.dims else 1
    for node in model.graph.node:  # constants folded into Constant nodes count too
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.type == onnx.AttributeProto.TENSOR:
                    total += int(np.prod(a.t.dims)) if a.t.dims else 1
    return total


def image_geometry(shape: tuple[int | str | None, ...]) -> tuple[str, tuple[int, int] | None, int] | None:
    """(layout, (H, W) or None, channels) for a rank-4 image tensor shape, or None if it isn't one."""
    if len(shape) != 4:
        return None

    def known(d):
        return d if isinstance(d, int) and d > 0 else None

    last, second = known(shape[3]), known(shape[1])
    if last in (1, 3, 4) and second not in (1, 3, 4):
        hw = (known(shape[1]), known(shape[2]))
        return "NHWC", hw if all(hw) else None, last
    if second in (1, 3, 4):
        hw = (known(shape[2]), known(shape[3]))
        return "NCHW", hw if all(hw) else None, second
    return None


def elem_type_name(elem_type: int) -> str:
    return TensorProto.DataType.Name(elem_type)


def walk_back(producer: "Mapping[str, onnx.NodeProto]", name: str, through: "set[str] | frozenset[str]") -> str:
    """From tensor ``name``, step back through the first input of nodes whose op is in ``through`` (reshapes,
    casts, activations ...); return the first tensor reached that such a node does not produce."""
    seen = set()
    while name in producer and name not in seen:
        seen.add(name)
        node = producer[name]
        if node.op_type not in through or not node.input:
            break
        name = node.input[0]
    return name
