"""The tail's ONNX nodes as a trainable torch module: porter's own op translations, one small function per op.

Why not onnx2torch: it is unmaintained since 2024, and it rebuilds a graph into its own module tree, so trained
weights would have to be mapped back to initializer names through its naming. Here each node runs as the ONNX
operator says (torch.nn.functional), the tail's trainable constants are ``nn.Parameter`` keyed by their initializer
names, and writing them back is a lookup. Normalization layers run in inference mode with frozen statistics and
scale (the recipe: BatchNorm stays in inference mode while the layers around it train). An op outside ``OPS`` is
refused by name before any training.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import numpy_helper

from ..errors import UsageError
from ..graph.tail import Tail

Op = Callable[[onnx.NodeProto, list[Any], dict[str, Any]], Any]


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _ints(t: Any) -> list[int]:
    return [int(v) for v in (t.tolist() if isinstance(t, torch.Tensor) else t)]


# --- op translations --------------------------------------------------------------------------------------------

def _explicit_pads(a: dict, x: torch.Tensor, kernel: list[int], strides: list[int], dilations: list[int]) -> list[int]:
    """ONNX pads [b1, b2, ..., e1, e2, ...] for ``x``'s spatial dims, auto_pad resolved."""
    n = len(kernel)
    auto = a.get("auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        begin, end = [], []
        for d in range(n):
            size = x.shape[2 + d]
            out = math.ceil(size / strides[d])
            total = max(0, (out - 1) * strides[d] + (kernel[d] - 1) * dilations[d] + 1 - size)
            small, big = total // 2, total - total // 2
            begin.append(small if auto == "SAME_UPPER" else big)
            end.append(big if auto == "SAME_UPPER" else small)
        return begin + end
    if auto == "VALID":
        return [0] * (2 * n)
    return list(a.get("pads", [0] * (2 * n)))


def _pad_input(x: torch.Tensor, pads: list[int], value: float) -> tuple[torch.Tensor, list[int]]:
    """(x padded explicitly when begin != end, the symmetric padding torch can take itself)."""
    n = len(pads) // 2
    begin, end = pads[:n], pads[n:]
    if begin == end:
        return x, begin
    flat: list[int] = []
    for d in reversed(range(n)):  # F.pad: last dim first
        flat += [begin[d], end[d]]
    return F.pad(x, flat, value=value), [0] * n


def _conv(node, x, a):
    w = x[1]
    n = w.dim() - 2
    strides = list(a.get("strides", [1] * n))
    dilations = list(a.get("dilations", [1] * n))
    kernel = list(a.get("kernel_shape", w.shape[2:]))
    pads = _explicit_pads(a, x[0], kernel, strides, dilations)
    inp, sym = _pad_input(x[0], pads, 0.0)
    conv = (F.conv1d, F.conv2d, F.conv3d)[n - 1]
    return conv(inp, w, x[2] if len(x) > 2 else None, strides, sym, dilations, a.get("group", 1))


def _pool(kind: str):
    def run(node, x, a):
        kernel = list(a["kernel_shape"])
        n = len(kernel)
        strides = list(a.get("strides", [1] * n))
        dilations = list(a.get("dilations", [1] * n))
        pads = _explicit_pads(a, x[0], kernel, strides, dilations)
        ceil = bool(a.get("ceil_mode", 0))
        if kind == "max":
            inp, sym = _pad_input(x[0], pads, -math.inf)
            pool = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[n - 1]
            return pool(inp, kernel, strides, sym, dilations, ceil_mode=ceil)
        pool = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[n - 1]
        if any(d != 1 for d in dilations):
            raise UsageError("AveragePool with dilations is not supported in a trainable tail")
        include = bool(a.get("count_include_pad", 0))
        if pads[:n] == pads[n:]:
            return pool(x[0], kernel, strides, pads[:n], ceil_mode=ceil, count_include_pad=include)
        inp, _ = _pad_input(x[0], pads, 0.0)
        total = pool(inp, kernel, strides, 0, ceil_mode=ceil, count_include_pad=True)
        if include:
            return total
        ones, _ = _pad_input(torch.ones_like(x[0][:1, :1]), pads, 0.0)
        return total / pool(ones, kernel, strides, 0, ceil_mode=ceil, count_include_pad=True)
    return run


def _gemm(node, x, a):
    A = x[0].t() if a.get("transA", 0) else x[0]
    B = x[1].t() if a.get("transB", 0) else x[1]
    y = a.get("alpha", 1.0) * (A @ B)
    if len(x) > 2 and x[2] is not None:
        y = y + a.get("beta", 1.0) * x[2]
    return y


def _batch_norm(node, x, a):
    return F.batch_norm(x[0], x[3], x[4], x[1], x[2], training=False, eps=a.get("epsilon", 1e-5))


def _layer_norm(node, x, a):
    axis = a.get("axis", -1) % x[0].dim()
    shape = x[0].shape[axis:]
    return F.layer_norm(x[0], shape, x[1] if len(x) > 1 else None, x[2] if len(x) > 2 else None,
                        a.get("epsilon", 1e-5))


def _instance_norm(node, x, a):
    return F.instance_norm(x[0], weight=x[1], bias=x[2], eps=a.get("epsilon", 1e-5))


def _clip(node, x, a):
    lo = x[1] if len(x) > 1 and x[1] is not None else a.get("min")
    hi = x[2] if len(x) > 2 and x[2] is not None else a.get("max")
    lo = float(lo) if lo is not None else None
    hi = float(hi) if hi is not None else None
    return torch.clamp(x[0], lo, hi)


def _axes(x: list, a: dict, index: int = 1) -> list[int] | None:
    if len(x) > index and x[index] is not None:
        return _ints(x[index])
    return list(a["axes"]) if "axes" in a else None


def _reduce(fn: str):
    def run(node, x, a):
        axes = _axes(x, a)
        keep = bool(a.get("keepdims", 1))
        if not axes:
            if a.get("noop_with_empty_axes", 0):
                return x[0]
            axes = list(range(x[0].dim()))
        axes = [d % x[0].dim() for d in axes]
        if fn == "mean":
            return x[0].mean(dim=axes, keepdim=keep)
        if fn == "sum":
            return x[0].sum(dim=axes, keepdim=keep)
        y = x[0]
        for d in sorted(axes, reverse=True):
            y = (y.amax if fn == "max" else y.amin)(dim=d, keepdim=keep)
        return y
    return run


def _reshape(node, x, a):
    shape = _ints(x[1])
    if not a.get("allowzero", 0):
        shape = [x[0].shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return x[0].reshape(shape)


def _flatten(node, x, a):
    axis = a.get("axis", 1) % max(1, x[0].dim())
    return x[0].reshape(int(np.prod(x[0].shape[:axis], dtype=np.int64)), -1)


def _squeeze(node, x, a):
    axes = _axes(x, a)
    if axes is None:
        return x[0].squeeze()
    y = x[0]
    for d in sorted((d % y.dim() for d in axes), reverse=True):
        y = y.squeeze(d)
    return y


def _unsqueeze(node, x, a):
    axes = _axes(x, a)
    y = x[0]
    rank = y.dim() + len(axes)
    for d in sorted(d % rank for d in axes):
        y = y.unsqueeze(d)
    return y


def _slice(node, x, a):
    if len(x) > 1:
        starts, ends = _ints(x[1]), _ints(x[2])
        axes = _ints(x[3]) if len(x) > 3 and x[3] is not None else list(range(len(starts)))
        steps = _ints(x[4]) if len(x) > 4 and x[4] is not None else [1] * len(starts)
    else:
        starts, ends = list(a["starts"]), list(a["ends"])
        axes, steps = list(a.get("axes", range(len(starts)))), [1] * len(starts)
    y = x[0]
    index: list[Any] = [slice(None)] * y.dim()
    for s, e, ax, st in zip(starts, ends, axes, steps):
        if st <= 0:
            raise UsageError("Slice with a negative step is not supported in a trainable tail")
        size = y.shape[ax]
        s = max(0, min(size, s + size if s < 0 else s))
        e = max(0, min(size, e + size if e < 0 else e))
        index[ax % y.dim()] = slice(s, e, st)
    return y[tuple(index)]


def _pad(node, x, a):
    pads = _ints(x[1]) if len(x) > 1 else list(a["pads"])
    mode = a.get("mode", b"constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    if mode != "constant":
        raise UsageError(f"Pad mode {mode!r} is not supported in a trainable tail")
    value = float(x[2]) if len(x) > 2 and x[2] is not None and x[2].numel() else float(a.get("value", 0.0))
    n = x[0].dim()
    flat: list[int] = []
    for d in reversed(range(n)):
        flat += [pads[d], pads[n + d]]
    return F.pad(x[0], flat, value=value)


def _softmax(log: bool):
    def run(node, x, a):
        axis = a.get("axis", -1)
        return F.log_softmax(x[0], axis) if log else F.softmax(x[0], axis)
    return run


def _cast(node, x, a):
    np_type = onnx.helper.tensor_dtype_to_np_dtype(a["to"])
    return x[0].to(torch.from_numpy(np.zeros(0, np_type)).dtype)


def _gather(node, x, a):
    axis = a.get("axis", 0) % x[0].dim()
    idx = x[1].long()
    idx = torch.where(idx < 0, idx + x[0].shape[axis], idx)
    if idx.dim() == 0:
        return x[0].select(axis, int(idx))
    return torch.index_select(x[0], axis, idx.reshape(-1)).reshape(
        *x[0].shape[:axis], *idx.shape, *x[0].shape[axis + 1:])


def _split(node, x, a):
    axis = a.get("axis", 0)
    sizes = _ints(x[1]) if len(x) > 1 and x[1] is not None else list(a.get("split", []))
    if not sizes:
        n = len(node.output)
        sizes = [x[0].shape[axis] // n] * n
    return list(torch.split(x[0], sizes, dim=axis))


def _hard_sigmoid(node, x, a):
    return torch.clamp(a.get("alpha", 0.2) * x[0] + a.get("beta", 0.5), 0.0, 1.0)


def _unary(fn):
    return lambda node, x, a: fn(x[0])


def _binary(fn):
    return lambda node, x, a: fn(x[0], x[1])


def _variadic(fn):
    def run(node, x, a):
        y = x[0]
        for v in x[1:]:
            y = fn(y, v)
        return y
    return run


OPS: dict[str, Op] = {
    "Conv": _conv, "Gemm": _gemm, "MatMul": _binary(torch.matmul),
    "BatchNormalization": _batch_norm, "LayerNormalization": _layer_norm, "InstanceNormalization": _instance_norm,
    "Relu": _unary(F.relu), "Sigmoid": _unary(torch.sigmoid), "Tanh": _unary(torch.tanh),
    "LeakyRelu": lambda node, x, a: F.leaky_relu(x[0], a.get("alpha", 0.01)),
    "Elu": lambda node, x, a: F.elu(x[0], a.get("alpha", 1.0)),
    "HardSigmoid": _hard_sigmoid, "HardSwish": _unary(F.hardswish), "Softplus": _unary(F.softplus),
    "Gelu": lambda node, x, a: F.gelu(x[0], approximate=(a.get("approximate", b"none").decode()
                                                         if isinstance(a.get("approximate"), bytes) else
                                                         a.get("approximate", "none"))),
    "Erf": _unary(torch.erf), "Exp": _unary(torch.exp), "Log": _unary(torch.log), "Sqrt": _unary(torch.sqrt),
    "Neg": _unary(torch.neg), "Abs": _unary(torch.abs), "Reciprocal": _unary(torch.reciprocal),
    "Clip": _clip, "PRelu": _binary(lambda v, s: torch.where(v >= 0, v, v * s)),
    "Add": _binary(torch.add), "Sub": _binary(torch.sub), "Mul": _binary(torch.mul), "Div": _binary(torch.div),
    "Pow": _binary(torch.pow), "Max": _variadic(torch.maximum), "Min": _variadic(torch.minimum),
    "Sum": _variadic(torch.add),
    "GlobalAveragePool": lambda node, x, a: x[0].mean(dim=tuple(range(2, x[0].dim())), keepdim=True),
    "GlobalMaxPool": lambda node, x, a: x[0].amax(dim=tuple(range(2, x[0].dim())), keepdim=True),
    "MaxPool": _pool("max"), "AveragePool": _pool("avg"),
    "ReduceMean": _reduce("mean"), "ReduceSum": _reduce("sum"), "ReduceMax": _reduce("max"),
    "ReduceMin": _reduce("min"),
    "Reshape": _reshape, "Flatten": _flatten, "Squeeze": _squeeze, "Unsqueeze": _unsqueeze,
    "Transpose": lambda node, x, a: x[0].permute(*(a.get("perm") or reversed(range(x[0].dim())))),
    "Concat": lambda node, x, a: torch.cat(list(x), dim=a["axis"]),
    "Identity": _unary(lambda v: v), "Dropout": _unary(lambda v: v),  # inference: dropout is the identity
    "Softmax": _softmax(False), "LogSoftmax": _softmax(True),
    "Shape": lambda node, x, a: torch.tensor(x[0].shape[a.get("start", 0):a.get("end", x[0].dim())],
                                             dtype=torch.int64),
    "Gather": _gather, "Cast": _cast, "Slice": _slice, "Pad": _pad, "Split": _split,
    "Constant": lambda node, x, a: torch.from_numpy(numpy_helper.to_array(a["value"]).copy()),
}


class TailModule(torch.nn.Module):
    """``tail.start`` (one tensor, batch-major) -> ``tail.end``, computed node by node as ONNX does.

    ``parameters()`` are the tail's trainable constants (float32); the frozen ones are buffers. ``fixed_batch``:
    the model was exported at this batch (its Reshape constants say so): larger batches run in chunks of it.
    """

    def __init__(self, model: onnx.ModelProto, tail: Tail, fixed_batch: int | None = None):
        super().__init__()
        nodes = [model.graph.node[i] for i in tail.nodes]
        unknown = sorted({n.op_type for n in nodes if n.op_type not in OPS or n.domain not in ("", "ai.onnx")})
        if unknown:
            raise UsageError(f"the tail from {tail.start!r} contains {', '.join(unknown)}, which porter can't train "
                             f"(supported: {', '.join(sorted(OPS))}); give a smaller --unfreeze or a later "
                             f"--train-from")
        consts = {t.name: t for t in model.graph.initializer}
        for n in model.graph.node:  # Constant nodes are constants too (the tail reads them, never runs them)
            if n.op_type == "Constant" and n.output:
                value = next((a.t for a in n.attribute if a.name == "value" and a.type == onnx.AttributeProto.TENSOR),
                             None)
                if value is not None:
                    consts.setdefault(n.output[0], value)
        self.nodes = nodes
        self.attrs = [_attrs(n) for n in nodes]
        self.start, self.end, self.fixed_batch = tail.start, tail.end, fixed_batch
        self.weights = torch.nn.ParameterDict()
        self.keys: dict[str, str] = {}  # constant name -> parameter/buffer key (names may hold '.', '/', ':')
        for k, name in enumerate(tail.trainable + tail.frozen):
            if name not in consts:
                raise UsageError(f"the tail reads {name!r}, a constant porter can't read (a sparse initializer or "
                                 f"a Constant without a tensor value); give a smaller --unfreeze")
            arr = numpy_helper.to_array(consts[name]).copy()
            key = f"c{k}"
            self.keys[name] = key
            if name in tail.trainable:
                self.weights[key] = torch.nn.Parameter(torch.from_numpy(arr.astype(np.float32)))
            else:
                self.register_buffer(key, torch.from_numpy(arr.astype(np.float32) if arr.dtype.kind == "f" else arr))

    def const(self, name: str) -> torch.Tensor:
        key = self.keys[name]
        return self.weights[key] if key in self.weights else getattr(self, key)

    def trained_weights(self) -> dict[str, np.ndarray]:
        """Constant name -> its trained value (float32), for ``porter.graph.tail.write_back``."""
        return {name: self.weights[key].detach().cpu().numpy().copy()
                for name, key in self.keys.items() if key in self.weights}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fixed_batch and x.shape[0] != self.fixed_batch:
            return torch.cat([self._run(c) for c in torch.split(x, self.fixed_batch)])
        return self._run(x)

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        values: dict[str, Any] = {self.start: x}
        for node, a in zip(self.nodes, self.attrs):
            args = [None if not i else values[i] if i in values else self.const(i) for i in node.input]
            out = OPS[node.op_type](node, args, a)
            if isinstance(out, (list, tuple)):
                for name, v in zip(node.output, out):
                    values[name] = v
            else:
                values[node.output[0]] = out
        return values[self.end]
