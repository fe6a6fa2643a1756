"""The batch axis, told truthfully: which inputs and outputs carry it, and whether a fixed-batch export can be freed.

Zoos publish many models exported at batch 1: the signature says ``[1, 48, 48, 1]`` and shape constants spell the
1 out (``Reshape(x, [1, 2304])``; tf2onnx adds its own layout Reshapes such as ``[1, 1, 48, 48]``). Marking such an
input dynamic is a lie the first batch of 3 exposes. Porter instead

1. reads the exported batch off the inputs (``fixed_batch``),
2. rewrites the Reshape shape constants whose leading entry is that batch to ``-1`` (or ``0``, "copy the input's
   dim", when the shape already has a ``-1``) and marks the inputs' leading axis ``batch`` (``free_batch``),
3. proves the rewrite: the freed model at batch B and 3B must equal the source run B examples at a time
   (``run_in_chunks``), every output whose leading axis was the batch must still follow it. Only a proven rewrite is
   kept; otherwise the model keeps its fixed batch and says so (``BatchPlan``).

Outputs are named from evidence, not assumed: ``name_output_axes`` gives ``batch`` to outputs whose leading axis
followed the batch during validation and a named dynamic axis (``<output>_len``) to those whose length depended on
the data (NMS selections), so an NMS output is never declared batch-major.

Framework-free: imports only onnx and numpy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import onnx
from onnx import numpy_helper

from .cuts import ModelGraph
from .inspect import graph_inputs

BATCH = "batch"


@dataclass(frozen=True)
class BatchPlan:
    """How a converted model takes batches: ``dynamic`` (as exported), ``freed`` (a fixed export made dynamic by
    rewriting shape constants, proven by parity) or ``fixed`` (runs only at ``size``)."""

    mode: str  # dynamic | freed | fixed
    size: int | None = None  # the exported batch for freed / fixed
    rewrites: int = 0  # shape constants rewritten (freed)
    reason: str = ""  # why a fixed batch stayed fixed

    def to_dict(self) -> dict:
        d: dict = {"mode": self.mode}
        if self.size is not None:
            d["size"] = self.size
        if self.rewrites:
            d["rewrites"] = self.rewrites
        if self.reason:
            d["reason"] = self.reason
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "BatchPlan":
        return cls(str(d.get("mode", "dynamic")), d.get("size"), int(d.get("rewrites", 0)), str(d.get("reason", "")))

    def describe(self) -> str:
        if self.mode == "dynamic":
            return "batch: dynamic"
        if self.mode == "freed":
            return (f"batch: dynamic (exported at batch {self.size}; {self.rewrites} batch-carrying shape "
                    f"constant{'s' if self.rewrites != 1 else ''} rewritten, proven by parity)")
        return f"batch: fixed at {self.size} ({self.reason}); predict, bench and finetune feed it {self.size} at a time"


def fixed_batch(model: onnx.ModelProto) -> int | None:
    """The leading dim every input was exported with, if all share one fixed value; None when any is dynamic."""
    dims = [i.shape[0] if i.shape else None for i in graph_inputs(model)]
    if not dims or any(not isinstance(d, int) or d <= 0 for d in dims):
        return None
    return dims[0] if len(set(dims)) == 1 else None


def free_batch(model: onnx.ModelProto, batch: int) -> tuple[onnx.ModelProto, int]:
    """A copy whose inputs have a dynamic ``batch`` axis and whose batch-carrying Reshape constants say -1 / 0.

    Only the top-level graph is rewritten (a loop body's shapes are per-iteration). The rewrite is a hypothesis:
    callers prove it by parity (``run_in_chunks``) before keeping it.
    """
    view = ModelGraph(model)  # constants and the shapes inferred at the exported batch
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    taken = {i.name for i in g.initializer} | {o for n in g.node for o in n.output}
    rewrites = 0
    for node in g.node:
        target = view.const_array(node.input[1]) if node.op_type == "Reshape" and len(node.input) >= 2 else None
        if target is None:
            continue
        shape = target.astype(np.int64).reshape(-1)
        if shape.size < 1 or shape[0] != batch:
            continue
        data_shape = view.shapes.get(node.input[0])
        if data_shape and isinstance(data_shape[0], int) and data_shape[0] not in (0, batch):
            continue  # the data has lost its batch axis (x[0] of a batch of 1): this leading 1 is an expand_dims
        new = shape.copy()
        new[0] = 0 if -1 in shape[1:] else -1
        name, k = f"{node.input[1]}/porter_batch", 0
        while name in taken:
            k += 1
            name = f"{node.input[1]}/porter_batch_{k}"
        taken.add(name)
        g.initializer.append(numpy_helper.from_array(new, name))
        node.input[1] = name
        rewrites += 1
    if rewrites:  # the replaced shape constants, unless something else (a loop body too) still reads them
        used = _all_inputs(g)
        keep = [i for i in g.initializer if i.name in used]
        del g.initializer[:]
        g.initializer.extend(keep)
    inits = {i.name for i in g.initializer}
    for v in g.input:
        if v.name in inits or not v.type.tensor_type.shape.dim:
            continue
        d0 = v.type.tensor_type.shape.dim[0]
        d0.Clear()
        d0.dim_param = BATCH
    for v in g.output:  # re-declared from evidence after validation (name_output_axes)
        dims = v.type.tensor_type.shape.dim
        if dims and dims[0].HasField("dim_value") and dims[0].dim_value == batch:
            dims[0].Clear()
            dims[0].dim_param = BATCH
    del g.value_info[:]  # shapes inferred at the fixed batch are stale
    return out, rewrites


def _all_inputs(graph: onnx.GraphProto) -> set[str]:
    names: set[str] = {o.name for o in graph.output}
    for node in graph.node:
        names.update(node.input)
        for a in node.attribute:
            for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                names |= _all_inputs(sub)
    return names


def run_in_chunks(run_source: Callable[[Sequence[np.ndarray]], Sequence[np.ndarray]],
                  batch: int) -> Callable[[Sequence[np.ndarray]], list[np.ndarray]]:
    """The source run ``batch`` examples at a time, outputs joined on the leading axis: the reference a freed
    batch must reproduce. Fails (ValueError) when an output has no leading axis to join on."""

    def run(arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
        n = int(np.shape(arrays[0])[0])
        if n % batch:
            raise ValueError(f"batch {n} is not a multiple of the exported batch {batch}")
        parts = [list(run_source([a[i:i + batch] for a in arrays])) for i in range(0, n, batch)]
        if len(parts) == 1:
            return parts[0]
        joined = []
        for outs in zip(*parts):
            if any(np.ndim(o) == 0 for o in outs):
                raise ValueError("an output is a scalar, with no batch axis to join")
            joined.append(np.concatenate(outs, axis=0))
        return joined

    return run


def name_output_axes(model: onnx.ModelProto, follows_batch: dict[str, bool], varies: dict[str, bool],
                     fixed: int | None = None) -> None:
    """Declare the outputs' axes from what validation saw. Leading axis: ``batch`` where it followed the batch
    size (the fixed size itself for a fixed-batch model), ``<output>_len`` where its length changed with the data
    or is unknown. Other dims the exporter left symbolic (tf2onnx's ``unk__12``) are data-dependent lengths:
    ``<output>_len`` (``<output>_len<i>`` when there are several)."""
    for v in model.graph.output:
        dims = v.type.tensor_type.shape.dim
        if not dims:
            continue
        d0 = dims[0]
        if v.name in follows_batch:
            if follows_batch[v.name] and fixed is None:
                d0.Clear()
                d0.dim_param = BATCH
            elif follows_batch[v.name]:
                d0.Clear()
                d0.dim_value = fixed
            elif varies.get(v.name) or not d0.HasField("dim_value"):
                d0.Clear()
                d0.dim_param = "?"  # named below
        free = [d for d in dims if d.HasField("dim_param") and d.dim_param != BATCH]
        for i, d in enumerate(free):
            d.Clear()
            d.dim_param = f"{v.name}_len" if len(free) == 1 else f"{v.name}_len{i}"
