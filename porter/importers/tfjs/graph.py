"""TF.js graph-model -> TensorFlow GraphDef -> ONNX.

A graph-model's topology is a TensorFlow ``GraphDef`` written as protobuf JSON, with every ``Const`` value moved
to the weight shards. Porter rebuilds the GraphDef itself (tf2onnx's TF.js reader reads only the first weight
group and fails on current TensorFlow): parse the JSON, put each decoded weight into its ``Const`` node, rewrite
the ops that exist only in TF.js's converter (``_FusedConv2D``, ``FusedDepthwiseConv2dNative``,
``_FusedMatMul`` with their ``fused_ops`` lists, ``Prelu``) into plain TensorFlow ops, then convert with
``tf2onnx.convert.from_graph_def``. The signature's input and output names are kept; its order is the ONNX order.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from ...errors import ConversionError, ModelLoadError, UnsupportedError, UsageError, first_line
from ...logging_setup import heavy_import

FUSED_BASE = {"_FusedConv2D": "Conv2D", "FusedDepthwiseConv2dNative": "DepthwiseConv2dNative",
              "_FusedMatMul": "MatMul"}
_BASE_ATTRS = {
    "Conv2D": ("T", "strides", "padding", "explicit_paddings", "data_format", "dilations", "use_cudnn_on_gpu"),
    "DepthwiseConv2dNative": ("T", "strides", "padding", "explicit_paddings", "data_format", "dilations"),
    "MatMul": ("T", "transpose_a", "transpose_b"),
}
_UNARY_ACTIVATIONS = {"relu": "Relu", "relu6": "Relu6", "elu": "Elu", "selu": "Selu", "sigmoid": "Sigmoid",
                      "tanh": "Tanh", "leakyrelu": "LeakyRelu"}
# TF.js's own op names that are not TensorFlow ops and that porter rewrites
TFJS_ONLY_OPS = ("_FusedConv2D", "FusedDepthwiseConv2dNative", "_FusedMatMul", "Prelu")
# lowered control flow: while loops porter raises to While (control_flow.py), conds tf2onnx's rewriter converts
LOWERED_CONTROL_FLOW = ("Enter", "Exit", "LoopCond", "NextIteration", "Switch", "Merge")


def _tf():
    return heavy_import("tensorflow")


# --- parsing and weights ----------------------------------------------------------------------------------------

def parse_graph_def(topology: dict, where: str):
    tf = _tf()
    from google.protobuf import json_format

    topo = {k: v for k, v in topology.items() if k in ("node", "library", "versions")}
    gd = tf.compat.v1.GraphDef()
    try:
        json_format.ParseDict(topo, gd, ignore_unknown_fields=True)
    except json_format.ParseError as e:
        raise ModelLoadError(f"{where}: modelTopology is not a valid TensorFlow GraphDef ({str(e)[:200]})") from None
    if not gd.node:
        raise ModelLoadError(f"{where}: the graph-model's topology has no nodes")
    return gd


def fill_constants(gd, weights: dict[str, np.ndarray], where: str) -> list[str]:
    """Put each weight into the Const node of the same name; return notes."""
    tf = _tf()
    notes = []
    used = set()
    for node in gd.node:
        if node.op != "Const":
            continue
        dtype = tf.dtypes.as_dtype(node.attr["dtype"].type) if "dtype" in node.attr else None
        declared = node.attr["value"].tensor if "value" in node.attr else None
        if node.name not in weights:
            if declared is not None and _has_content(declared):
                continue  # an inline constant
            raise ModelLoadError(f"{where}: Const node {node.name!r} has no value: it is not in the weights manifest; "
                                 f"the weight files belong to another model or are incomplete")
        arr = weights[node.name]
        used.add(node.name)
        if declared is not None and declared.HasField("tensor_shape") and not declared.tensor_shape.unknown_rank:
            dims = [d.size for d in declared.tensor_shape.dim]
            if list(arr.shape) != dims and arr.size == 1 and int(np.prod(dims)) == 1:
                arr = arr.reshape(dims)  # a scalar written as [1] or the other way round
            elif list(arr.shape) != dims:
                raise ModelLoadError(f"{where}: weight {node.name!r} has shape {list(arr.shape)} but its Const node "
                                     f"declares {dims}")
        if dtype is None:
            dtype = tf.dtypes.as_dtype(arr.dtype) if arr.dtype != object else tf.string
            node.attr["dtype"].type = dtype.as_datatype_enum
        elif dtype.is_floating and arr.dtype.kind in "iub":
            raise ModelLoadError(f"{where}: weight {node.name!r} is declared {arr.dtype} in weightsManifest, but its "
                                 f"Const node holds {dtype.name}; the manifest's dtype is wrong (its bytes would be "
                                 f"read as integers): fix the dtype of {node.name!r} in model.json")
        try:
            if dtype == tf.string:
                proto = tf.make_tensor_proto(arr, dtype=tf.string, shape=arr.shape)
            else:
                proto = tf.make_tensor_proto(arr.astype(dtype.as_numpy_dtype), dtype=dtype, shape=arr.shape)
        except (TypeError, ValueError) as e:
            raise ModelLoadError(f"{where}: weight {node.name!r} ({arr.dtype}) doesn't fit its Const node of dtype "
                                 f"{dtype.name}: {e}") from None
        node.attr["value"].tensor.CopyFrom(proto)
    unused = [w for w in weights if w not in used]
    if unused:
        notes.append(f"{len(unused)} weight(s) match no Const node and were ignored: {', '.join(unused[:5])}")
    return notes


def _has_content(t) -> bool:
    return bool(t.tensor_content or t.float_val or t.int_val or t.string_val or t.bool_val or t.int64_val
                or t.double_val or t.half_val)


# --- TF.js-only ops -> plain TensorFlow -------------------------------------------------------------------------

class _Rewriter:
    def __init__(self, gd):
        self.tf = _tf()
        self.gd = gd
        self.out_nodes: list[Any] = []

    def new_node(self, op: str, name: str, inputs: Sequence[str], t_attr=None, **attrs):
        node = self.tf.compat.v1.NodeDef()
        node.op, node.name = op, name
        node.input.extend(inputs)
        if t_attr is not None:
            node.attr["T"].CopyFrom(t_attr)
        for k, v in attrs.items():
            node.attr[k].CopyFrom(v)
        self.out_nodes.append(node)
        return node

    def attr(self, **kw):
        return self.tf.compat.v1.AttrValue(**kw)

    def rewrite(self) -> None:
        self.by_name = {n.name: n for n in self.gd.node}
        for node in self.gd.node:
            if node.op in FUSED_BASE:
                self._fused(node)
            elif node.op == "BiasAdd" and not self._vector_const(node.input[1]):
                # TF.js's BiasAdd is a broadcasting add (its converter also fuses AddV2(x, scalar) into one);
                # TensorFlow's wants a rank-1 bias
                node.op = "AddV2"
                node.attr.pop("data_format", None)
                self.out_nodes.append(node)
            elif node.op == "Prelu":
                data = [i for i in node.input if not i.startswith("^")]
                ctrl = [i for i in node.input if i.startswith("^")]
                self._prelu(node.name, data[0], data[1], self._t(node), ctrl)
            else:
                self.out_nodes.append(node)
        del self.gd.node[:]
        self.gd.node.extend(self.out_nodes)

    def _vector_const(self, name: str) -> bool:
        node = self.by_name.get(name.split(":")[0])
        if node is None or node.op != "Const" or "value" not in node.attr:
            return False
        shape = node.attr["value"].tensor.tensor_shape
        return not shape.unknown_rank and len(shape.dim) == 1

    def _t(self, node):
        if "T" in node.attr:
            return node.attr["T"]
        return self.attr(type=self.tf.float32.as_datatype_enum)

    def _fused(self, node) -> None:
        base = FUSED_BASE[node.op]
        data = [i for i in node.input if not i.startswith("^")]
        ctrl = [i for i in node.input if i.startswith("^")]
        fused = [s.decode() if isinstance(s, bytes) else s for s in node.attr["fused_ops"].list.s]
        num_args = node.attr["num_args"].i if "num_args" in node.attr else len(data) - 2
        args = data[2:2 + num_args]
        t = self._t(node)
        steps: list[tuple[str, Any]] = []  # (kind, payload)
        ai = 0
        for op in fused:
            key = op.lower()
            if key == "biasadd":
                steps.append(("BiasAdd", args[ai]))
                ai += 1
            elif key in ("fusedbatchnorm", "fusedbatchnormv3"):
                steps.append(("FusedBatchNorm", args[ai:ai + 4]))
                ai += 4
            elif key == "prelu":
                steps.append(("Prelu", args[ai]))
                ai += 1
            elif key in _UNARY_ACTIVATIONS:
                steps.append((_UNARY_ACTIVATIONS[key], None))
            elif key in ("", "linear", "identity"):
                continue
            else:
                raise _UnknownFused(node.op, op, node.name)
            if ai > len(args):
                raise ModelLoadError(f"node {node.name!r} ({node.op}) lists fused ops {fused} but has only "
                                     f"{len(args)} extra inputs")
        base_attrs = {k: node.attr[k] for k in _BASE_ATTRS[base] if k in node.attr and k != "T"}
        if base in ("Conv2D", "DepthwiseConv2dNative") and "padding" in base_attrs:
            pad = base_attrs["padding"].s
            if pad != b"EXPLICIT":
                base_attrs.pop("explicit_paddings", None)
        names = [f"{node.name}/porter_{base}"] + [f"{node.name}/porter_{k}_{i}" for i, (k, _) in enumerate(steps)]
        names[-1] = node.name  # the last op keeps the fused node's name, so consumers still resolve
        self.new_node(base, names[0], data[:2] + ctrl, t, **base_attrs)
        prev = names[0]
        fmt = node.attr["data_format"] if "data_format" in node.attr else None
        for (kind, payload), name in zip(steps, names[1:]):
            if kind == "BiasAdd" and not self._vector_const(payload):  # TF.js fuses any add (see rewrite)
                self.new_node("AddV2", name, [prev, payload], t)
            elif kind == "BiasAdd":
                extra = {"data_format": fmt} if fmt is not None and base != "MatMul" else {}
                self.new_node("BiasAdd", name, [prev, payload], t, **extra)
            elif kind == "FusedBatchNorm":
                eps = node.attr["epsilon"].f if "epsilon" in node.attr else 1e-3
                extra = {"data_format": fmt} if fmt is not None else {}
                self.new_node("FusedBatchNormV3", name, [prev, *payload], t, U=self.attr(type=t.type),
                              epsilon=self.attr(f=eps), is_training=self.attr(b=False), **extra)
            elif kind == "Prelu":
                self._prelu(name, prev, payload, t, [])
            elif kind == "LeakyRelu":
                alpha = node.attr["leakyrelu_alpha"].f if "leakyrelu_alpha" in node.attr else 0.2
                self.new_node("LeakyRelu", name, [prev], t, alpha=self.attr(f=alpha))
            else:
                self.new_node(kind, name, [prev], t)
            prev = name

    def _prelu(self, name: str, x: str, alpha: str, t, ctrl: list[str]) -> None:
        """TF.js prelu(x, a) = x if x > 0 else a * x  ==  relu(x) - a * relu(-x)."""
        self.new_node("Relu", f"{name}/porter_pos", [x] + ctrl, t)
        self.new_node("Neg", f"{name}/porter_negx", [x] + ctrl, t)
        self.new_node("Relu", f"{name}/porter_negrelu", [f"{name}/porter_negx"], t)
        self.new_node("Mul", f"{name}/porter_scaled", [alpha, f"{name}/porter_negrelu"], t)
        self.new_node("Sub", name, [f"{name}/porter_pos", f"{name}/porter_scaled"], t)


class _UnknownFused(Exception):
    def __init__(self, op: str, fused: str, node: str):
        super().__init__(f"{op}[{fused}]")
        self.op, self.fused, self.node = op, fused, node


def rewrite_tfjs_ops(gd) -> None:
    try:
        _Rewriter(gd).rewrite()
    except _UnknownFused as e:
        raise UnsupportedError(f"TF.js graph op {e.op!r} with fused activation {e.fused!r} (node {e.node!r}) has no "
                               f"converter; supported fused ops: BiasAdd, FusedBatchNorm, Prelu, "
                               f"{', '.join(sorted(set(_UNARY_ACTIVATIONS.values())))}") from None


def fill_default_attrs(gd) -> None:
    """Drop internal ``_`` attrs; add attrs the op's definition gives defaults for (TF.js drops some)."""
    from tensorflow.python.framework import op_def_registry

    for node in gd.node:
        for key in [k for k in node.attr if k.startswith("_")]:  # grappler annotations (_input_shapes ...)
            del node.attr[key]
        op_def = op_def_registry.get(node.op)
        if op_def is None:
            continue
        for a in op_def.attr:
            if a.name not in node.attr and a.HasField("default_value"):
                node.attr[a.name].CopyFrom(a.default_value)


def check_ops(gd, opset: int) -> None:
    """Name every op that neither TensorFlow nor tf2onnx (at ``opset``) can handle, in one error."""
    from tensorflow.python.framework import op_def_registry

    heavy_import("tf2onnx")
    import tf2onnx.onnx_opset  # noqa: F401 - importing it registers tf2onnx's op handlers
    from tf2onnx.handler import tf_op

    known: set[str] = set()
    for version, handlers in enumerate(tf_op.get_opsets().get("", [])):
        if version <= opset:
            known |= set(handlers)
    bad: dict[str, list[str]] = defaultdict(list)
    for node in gd.node:
        if node.op in LOWERED_CONTROL_FLOW:
            continue
        if op_def_registry.get(node.op) is None or node.op not in known:
            bad[node.op].append(node.name)
    for fn in gd.library.function:
        for node in fn.node_def:
            if op_def_registry.get(node.op) is None or node.op not in known:
                bad[node.op].append(f"{fn.signature.name}/{node.name}")
    if bad:
        items = [f"{op!r} ({len(nodes)} node{'s' if len(nodes) > 1 else ''}: {', '.join(nodes[:3])}"
                 f"{', ...' if len(nodes) > 3 else ''})" for op, nodes in sorted(bad.items())]
        head = "TF.js graph op " if len(items) == 1 else "TF.js graph ops "
        raise UnsupportedError(f"{head}{'; '.join(items)} {'has' if len(items) == 1 else 'have'} no converter "
                               f"(neither TensorFlow nor tf2onnx at opset {opset} knows {'it' if len(items) == 1 else 'them'})")


# --- signature --------------------------------------------------------------------------------------------------

@dataclass
class Endpoint:
    name: str  # the public name (signature key), used for ONNX
    tensor: str  # graph tensor, e.g. "image:0"
    node: str


def _tensor(name: str) -> str:
    return name if ":" in name else f"{name}:0"


def endpoints(gd, signature: dict | None) -> tuple[list[Endpoint], list[Endpoint]]:
    nodes = {n.name: n for n in gd.node}

    def from_sig(section: str) -> list[Endpoint] | None:
        items = (signature or {}).get(section)
        if not isinstance(items, dict) or not items:
            return None
        out = []
        for key, info in items.items():
            tname = (info or {}).get("name") if isinstance(info, dict) else None
            tname = _tensor(str(tname or key))
            node = tname.rsplit(":", 1)[0]
            if node not in nodes:
                raise ModelLoadError(f"the signature's {section[:-1]} {key!r} names tensor {tname!r}, but the graph "
                                     f"has no node {node!r}")
            out.append(Endpoint(str(key), tname, node))
        return out

    inputs = from_sig("inputs")
    if inputs is None:
        inputs = [Endpoint(n.name, f"{n.name}:0", n.name) for n in gd.node if n.op in ("Placeholder",)]
    outputs = from_sig("outputs")
    if outputs is None:
        consumed = {i.lstrip("^").split(":")[0] for n in gd.node for i in n.input}
        outputs = [Endpoint(n.name, f"{n.name}:0", n.name) for n in gd.node
                   if n.name not in consumed and n.op not in ("Const", "NoOp", "Placeholder", "Assert")]
    if not inputs or not outputs:
        raise ModelLoadError("the graph-model has no inputs or no outputs (no signature and no Placeholder / "
                             "unconsumed nodes)")
    return inputs, outputs


def apply_input_shapes(gd, inputs: list[Endpoint], opts) -> None:
    """Give unknown non-batch input dims the sizes from --input-shape (the converter needs concrete shapes)."""
    nodes = {n.name: n for n in gd.node}
    for ep in inputs:
        node = nodes[ep.node]
        if node.op != "Placeholder" or "shape" not in node.attr:
            continue
        shape = node.attr["shape"].shape
        if shape.unknown_rank:
            given = opts.input_shapes.shape_for(ep.name, len(inputs))
            if given is None:
                raise UsageError(f"graph-model input {ep.name!r} has unknown rank; give its dims without the batch "
                                 f"axis, e.g. --input-shape {ep.name}:224,224,3")
            shape.unknown_rank = False
            del shape.dim[:]
            shape.dim.add().size = -1
            for g in given:
                shape.dim.add().size = int(g)
            continue
        dims = [d.size for d in shape.dim]
        given = opts.input_shapes.shape_for(ep.name, len(inputs))
        if given is not None:
            if len(given) != len(dims) - 1 or any(d not in (-1, g) for d, g in zip(dims[1:], given)):
                raise UsageError(f"--input-shape {','.join(map(str, given))} does not fit graph-model input "
                                 f"{ep.name!r} of shape {dims} (give the dims without the batch axis)")
            for d, g in zip(shape.dim[1:], given):
                d.size = int(g)
        elif any(d < 0 for d in dims[1:]):
            example = ",".join("224" if d < 0 else str(d) for d in dims[1:])
            raise UsageError(f"graph-model input {ep.name!r} has unknown dims {['?' if d < 0 else d for d in dims]}; "
                             f"give concrete dims without the batch axis, e.g. --input-shape {ep.name}:{example}")


# --- running and converting -------------------------------------------------------------------------------------

def make_runner(gd, inputs: list[Endpoint], outputs: list[Endpoint]):
    tf = _tf()

    def _import():
        tf.compat.v1.import_graph_def(gd, name="")

    try:
        wrapped = tf.compat.v1.wrap_function(_import, [])
        fn = wrapped.prune([wrapped.graph.get_tensor_by_name(e.tensor) for e in inputs],
                           [wrapped.graph.get_tensor_by_name(e.tensor) for e in outputs])
    except (ValueError, KeyError, TypeError, tf.errors.OpError) as e:
        raise ConversionError(f"TensorFlow can't rebuild the graph-model: {first_line(e)}") from None
    placeholders = {n.name: n for n in gd.node if n.op == "Placeholder"}
    dtypes = [tf.dtypes.as_dtype(placeholders[e.node].attr["dtype"].type) if e.node in placeholders else tf.float32
              for e in inputs]

    def run(arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
        res = fn(*[tf.constant(np.asarray(a), dtype=d) for a, d in zip(arrays, dtypes)])
        res = res if isinstance(res, (list, tuple)) else [res]
        return [np.asarray(r.numpy()) for r in res]

    return run


def to_onnx(gd, inputs: list[Endpoint], outputs: list[Endpoint], opset: int):
    from ..keras import run_tf2onnx

    tf2onnx = heavy_import("tf2onnx")
    return run_tf2onnx(lambda: tf2onnx.convert.from_graph_def(gd, input_names=[e.tensor for e in inputs],
                                                              output_names=[e.tensor for e in outputs],
                                                              opset=opset)[0], opset, "the graph-model")


def prepare_graph(topology: dict, signature: dict | None, opts, where: str):
    """Parse, rewrite and check the graph (no weights yet): fail on unsupported ops before any download."""
    gd = parse_graph_def(topology, where)
    rewrite_tfjs_ops(gd)
    check_ops(gd, opts.opset)
    fill_default_attrs(gd)
    inputs, outputs = endpoints(gd, signature)
    apply_input_shapes(gd, inputs, opts)
    return gd, inputs, outputs
