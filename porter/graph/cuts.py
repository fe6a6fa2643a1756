"""Where a new head can be attached to a model: the old classifier head, the backbone's features, and candidates.

Framework-free: imports only onnx and numpy. Walking back from the model's output, porter steps over the *whole*
old classifier head -- every trailing dense-like layer (``Gemm``; ``MatMul`` [+ ``Add``]; a 1x1 ``Conv`` on pooled
features; a conv of any kernel writing class maps that a global pool averages into the softmax's scores) with the
activations, dropout, flatten/reshape, softmax and global pooling between them -- and lands on the backbone's last feature map (Keras's ``include_top=False``). A spatial feature map
(NCHW or NHWC) is globally average-pooled: by the model's own pooling when it has one, else by a ``ReduceMean``
porter appends, so the merged model computes exactly what the head was trained on.

Candidates, best first: the pooled backbone output; the output of each hidden layer of the old head (pre-logits);
the pooled outputs of the last few blocks before the backbone output.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..errors import UsageError
from .inspect import format_shape, walk_back

# Nodes that sit between layers of a classifier head without mixing examples or spatial positions.
PASS_THROUGH = {"Softmax", "LogSoftmax", "Sigmoid", "Flatten", "Reshape", "Identity", "Squeeze", "Unsqueeze",
                "Dropout", "Cast", "Transpose"}
ACTIVATIONS = {"Relu", "Clip", "LeakyRelu", "Elu", "Selu", "Celu", "Tanh", "HardSigmoid", "HardSwish", "Softplus",
               "Softsign", "Gelu", "Mish", "ThresholdedRelu", "PRelu", "Sigmoid"}
SOFTMAXES = {"Softmax", "LogSoftmax", "Sigmoid"}
GLOBAL_POOLS = {"GlobalAveragePool", "GlobalMaxPool"}
# ONNX ops whose rank-4 output is NCHW by definition
NCHW_OPS = {"Conv", "ConvTranspose", "MaxPool", "AveragePool", "LpPool", "BatchNormalization", "GlobalAveragePool",
            "GlobalMaxPool", "InstanceNormalization", "LRN", "DepthToSpace", "SpaceToDepth", "QLinearConv"}
# ops that keep their first rank-4 input's layout
LAYOUT_KEEPING = ACTIVATIONS | {"Add", "Sub", "Mul", "Div", "Max", "Min", "Sum", "Mean", "Concat", "Pad", "Identity",
                                "Dropout", "Cast", "Neg", "Abs", "Sqrt", "Exp", "Erf", "Pow", "Resize",
                                "Upsample", "Where", "Softmax"}
SPATIAL_AXES = {"NCHW": (2, 3), "NHWC": (1, 2)}
BLOCK_CANDIDATES = 3  # pooled outputs of this many blocks before the backbone output are offered

Shape = tuple[int | str | None, ...]


@dataclass(frozen=True)
class Cut:
    """A tensor a head is attached to, and how it becomes batch x features.

    ``pool_axes``: the spatial axes porter averages over (a feature map without pooling of its own), else None.
    ``kind``: ``backbone`` (the pooled backbone output), ``pre-logits`` (a hidden layer of the old head),
    ``block`` (an earlier block, pooled), ``pool`` (a global pooling inside the model) or ``user`` (``--cut``).
    """

    name: str
    shape: Shape | None
    reason: str
    kind: str = "backbone"
    pool_axes: tuple[int, ...] | None = None
    note: str | None = None

    @property
    def features(self) -> int | None:
        """Width of the feature vector; None when the shape doesn't say."""
        shape = self.feature_shape
        if shape is None or len(shape) != 2 or not isinstance(shape[1], int) or shape[1] <= 0:
            return None
        return shape[1]

    @property
    def feature_shape(self) -> Shape | None:
        """The shape after pooling and flattening (batch x features); None when not known."""
        if self.shape is None:
            return None
        if self.pool_axes:
            return (self.shape[0],) + tuple(d for i, d in enumerate(self.shape) if i and i not in self.pool_axes)
        rest = self.shape[1:]
        big = [d for d in rest if not (isinstance(d, int) and d == 1)]
        if len(big) > 1:
            return None
        return (self.shape[0], big[0] if big else 1)

    @property
    def pooling(self) -> str:
        """How the tensor becomes features, as a key suffix: ``|mean[2, 3]`` or nothing."""
        return f"|mean{list(self.pool_axes)}" if self.pool_axes else ""

    @property
    def key(self) -> str:
        """What identifies the features this cut yields (with the model): tensor and pooling."""
        return self.name + self.pooling

    def describe(self) -> str:
        pooled = f" -> pooled {format_shape(self.feature_shape)}" if self.pool_axes else ""
        return f"{self.name} {format_shape(self.shape)}{pooled} ({self.reason})"


# --- reading the graph ------------------------------------------------------------------------------------------

class ModelGraph:
    """Producer/consumer maps, constants and inferred shapes of a model's main graph."""

    def __init__(self, model: onnx.ModelProto):
        try:
            inferred = onnx.shape_inference.infer_shapes(model)
        except Exception:  # noqa: BLE001 - shapes are a help, not a requirement
            inferred = model
        g = inferred.graph
        self.model = model
        self.graph = model.graph
        self.nodes = list(model.graph.node)
        self.producer: dict[str, onnx.NodeProto] = {}
        self.order: dict[str, int] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for i, node in enumerate(self.nodes):
            for out in node.output:
                if out:
                    self.producer[out] = node
                    self.order[out] = i
            for name in node.input:
                if name:
                    self.consumers.setdefault(name, []).append(node)
        self.consts: dict[str, onnx.TensorProto] = {t.name: t for t in model.graph.initializer}
        for node in self.nodes:
            if node.op_type == "Constant" and node.output:
                for a in node.attribute:
                    if a.name == "value" and a.type == onnx.AttributeProto.TENSOR:
                        self.consts[node.output[0]] = a.t
        self.inputs = [v.name for v in model.graph.input if v.name not in self.consts]
        self.shapes: dict[str, Shape] = {}
        self.types: dict[str, int] = {}
        for v in list(g.input) + list(g.value_info) + list(g.output):
            t = v.type.tensor_type
            if t.elem_type:
                self.types[v.name] = t.elem_type
            if t.HasField("shape"):
                self.shapes[v.name] = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                                            for d in t.shape.dim)
        self._layouts: dict[str, str | None] = {}
        first = self.shapes.get(self.inputs[0]) if self.inputs else None
        self.batch_dim = first[0] if first else None  # 'batch', or the fixed batch the model runs at

    def batch_major(self, name: str) -> bool:
        """Whether ``name``'s leading axis can be the batch: a model that squeezes its fixed batch of 1 away has
        tensors whose leading axis is a height or a channel count, and a head there would mix examples."""
        shape = self.shapes.get(name)
        if not shape or not isinstance(shape[0], int) or shape[0] <= 0:
            return True  # symbolic or unknown: nothing says otherwise
        return isinstance(self.batch_dim, int) and shape[0] == self.batch_dim

    def tensors(self) -> set[str]:
        return set(self.producer) | set(self.inputs)

    def const_array(self, name: str) -> np.ndarray | None:
        t = self.consts.get(name)
        return numpy_helper.to_array(t) if t is not None else None

    def rank(self, name: str) -> int | None:
        shape = self.shapes.get(name)
        return len(shape) if shape is not None else None

    def layout(self, name: str) -> str | None:
        """``NCHW`` or ``NHWC`` for a rank-4 tensor, read off the ops that produce it; None when they don't say."""
        if name in self._layouts:
            return self._layouts[name]
        self._layouts[name] = None  # cycles and deep recursion end here
        self._layouts[name] = found = self._find_layout(name)
        return found

    def _find_layout(self, name: str) -> str | None:
        node = self.producer.get(name)
        if node is None:
            if name in self.inputs:
                from .inspect import image_geometry

                geo = image_geometry(self.shapes.get(name, ()))
                return geo[0] if geo else None
            return None
        if node.op_type in NCHW_OPS:
            return "NCHW"
        if node.op_type == "Transpose":
            perm = list(attr(node, "perm", []) or [])
            inner = self.layout(node.input[0])
            if perm == [0, 2, 3, 1] and inner == "NCHW":
                return "NHWC"
            if perm == [0, 3, 1, 2] and inner == "NHWC":
                return "NCHW"
            if perm == [0, 1, 2, 3]:
                return inner
            return None
        if node.op_type in LAYOUT_KEEPING:
            for i in node.input:
                if i and i not in self.consts and self.rank(i) == 4:
                    found = self.layout(i)
                    if found:
                        return found
        return None


def attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _reduce_axes(g: ModelGraph, node: onnx.NodeProto) -> list[int] | None:
    axes = attr(node, "axes")
    if axes is None and len(node.input) > 1 and node.input[1]:
        arr = g.const_array(node.input[1])
        axes = arr.reshape(-1).tolist() if arr is not None else None
    return list(axes) if axes is not None else None


def is_global_pool(g: ModelGraph, node: onnx.NodeProto) -> bool:
    """GlobalAverage/MaxPool, ReduceMean/ReduceMax over both spatial axes, or an AveragePool over the whole map."""
    if node.op_type in GLOBAL_POOLS:
        return True
    shape = g.shapes.get(node.input[0]) if node.input else None
    if node.op_type in ("ReduceMean", "ReduceMax"):
        axes = _reduce_axes(g, node)
        if axes is None or shape is None or len(shape) != 4:
            return False
        spatial = {((a + 4) % 4) for a in axes}
        return spatial in ({2, 3}, {1, 2})
    if node.op_type in ("AveragePool", "MaxPool") and shape is not None and len(shape) == 4:
        kernel = list(attr(node, "kernel_shape", []) or [])
        pads = list(attr(node, "pads", []) or [])
        return kernel == list(shape[2:]) and all(isinstance(d, int) for d in kernel) and not any(pads)
    return False


def _pool_name(g: ModelGraph, node: onnx.NodeProto) -> str:
    kind = node.op_type if node.op_type in GLOBAL_POOLS else (
        f"{node.op_type} over the whole map" if "Pool" in node.op_type else f"{node.op_type} over the spatial axes")
    return f"{kind} '{node.name or node.output[0]}'"


def _dense_input(g: ModelGraph, name: str) -> tuple[str, str] | None:
    """If ``name`` is the output of a dense-like layer, (its input, a description)."""
    node = g.producer.get(name)
    if node is None:
        return None
    label = node.name or node.output[0]
    if node.op_type == "Gemm" and len(node.input) >= 2 and node.input[1] in g.consts:
        return node.input[0], f"Gemm '{label}'"
    if node.op_type == "Add" and len(node.input) == 2:
        for mm, bias in ((node.input[0], node.input[1]), (node.input[1], node.input[0])):
            prod = g.producer.get(mm)
            if prod is not None and prod.op_type == "MatMul" and prod.input[1] in g.consts and bias in g.consts:
                return prod.input[0], f"MatMul + Add '{prod.name or prod.output[0]}'"
    if node.op_type == "MatMul" and len(node.input) == 2 and node.input[1] in g.consts and g.rank(name) != 4:
        return node.input[0], f"MatMul '{label}'"
    if node.op_type == "Conv" and _is_1x1(g, node):
        src = g.shapes.get(node.input[0])
        pooled = g.producer.get(_through(g, node.input[0], PASS_THROUGH))
        if (src is not None and len(src) == 4 and tuple(src[2:]) == (1, 1)) or (
                pooled is not None and is_global_pool(g, pooled)):
            return node.input[0], f"1x1 Conv '{label}' on pooled features"
    return None


def _class_map_kernel(g: ModelGraph, node: onnx.NodeProto) -> str | None:
    """``KxK`` when ``node`` is a dense (not grouped) convolution with constant weights: one that can write class
    maps; None otherwise."""
    if len(node.input) < 2 or node.input[1] not in g.consts or (attr(node, "group", 1) or 1) != 1:
        return None
    w = g.consts[node.input[1]]
    return "x".join(map(str, w.dims[2:])) if len(w.dims) == 4 else None


def _is_1x1(g: ModelGraph, node: onnx.NodeProto) -> bool:
    if len(node.input) < 2 or node.input[1] not in g.consts:
        return False
    w = g.consts[node.input[1]]
    return len(w.dims) == 4 and tuple(w.dims[2:]) == (1, 1) and (attr(node, "group", 1) or 1) == 1


def _affine(g: ModelGraph, node: onnx.NodeProto) -> bool:
    """An elementwise op with a constant on a batch x features tensor (a BatchNorm folded into Mul/Add)."""
    if node.op_type not in ("Add", "Sub", "Mul", "Div") or len(node.input) != 2:
        return False
    return node.input[1] in g.consts and g.rank(node.input[0]) == 2


def _leads_to_head(g: ModelGraph, name: str) -> bool:
    """Whether walking back from ``name`` through activations and reshapes reaches a dense layer or a pooling:
    an activation before the backbone's output is part of the backbone (cut after it, not before)."""
    seen = set()
    while name in g.producer and name not in seen:
        seen.add(name)
        node = g.producer[name]
        if _dense_input(g, name) is not None or is_global_pool(g, node):
            return True
        if not node.input or not (node.op_type in PASS_THROUGH or node.op_type in ACTIVATIONS or _affine(g, node)):
            return False
        name = node.input[0]
    return False


def _through(g: ModelGraph, name: str, ops: set[str]) -> str:
    return walk_back(g.producer, name, ops)


# --- the old head -----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class OldHead:
    """The old classifier head: the backbone feature tensor it starts from and its dense layers (input first)."""

    features: Cut
    layers: tuple[tuple[str, str, str], ...]  # (input tensor, output tensor, description), in forward order
    spatial: str | None  # the backbone's last feature map (before pooling), when it has one


def find_old_head(g: ModelGraph, output: str) -> OldHead | None:
    """Walk back from ``output`` through the whole old head; None when the walk finds nothing to cut at."""
    layers: list[tuple[str, str, str]] = []
    softmax = False
    name = output
    seen: set[str] = set()
    while name in g.producer and name not in seen:
        seen.add(name)
        node = g.producer[name]
        dense = _dense_input(g, name)
        if dense is not None:
            layers.append((dense[0], name, dense[1]))
            name = dense[0]
            continue
        if node.op_type in SOFTMAXES:
            softmax = True
        if is_global_pool(g, node):
            return _at_pool(g, node, name, layers, softmax)
        if node.op_type in PASS_THROUGH and node.op_type not in ACTIVATIONS and node.input:
            name = node.input[0]
            continue
        if (node.op_type in ACTIVATIONS or _affine(g, node)) and node.input and _leads_to_head(g, node.input[0]):
            name = node.input[0]  # an activation between head layers (or the output's softmax)
            continue
        break
    layers.reverse()
    if name in g.inputs or name not in g.producer:
        # a model of dense layers only (features in, classes out): the backbone is all but the last layer
        if len(layers) < 2:
            return None
        last = layers[-1]
        cut = Cut(last[0], g.shapes.get(last[0]), f"input of the final classifier ({last[2]}); the model is dense "
                  "layers only, so its hidden layers are the backbone", "backbone")
        return OldHead(cut, (last,), None)
    desc = _head_desc(layers)
    if g.rank(name) == 4:
        layout = g.layout(name)
        cut = _pooled(g, name, layout, f"the backbone's last feature map{desc}", "backbone")
        return OldHead(cut, tuple(layers), name)
    return OldHead(Cut(name, g.shapes.get(name), f"the backbone's output{desc}", "backbone"), tuple(layers), None)


def _at_pool(g: ModelGraph, pool: onnx.NodeProto, pooled: str, layers, softmax: bool) -> OldHead:
    spatial = pool.input[0]
    layers = list(reversed(layers))
    if not layers and softmax:
        # SqueezeNet / mini-Xception style: a conv writes one map per class (1x1 in SqueezeNet, 3x3 in oarriaga's
        # mini-Xception), pooling averages them into the class scores the softmax reads
        maps = _through(g, spatial, ACTIVATIONS | {"Dropout", "Identity", "Transpose"})
        node = g.producer.get(maps)
        kernel = _class_map_kernel(g, node) if node is not None and node.op_type == "Conv" else None
        if kernel is not None:
            source = node.input[0]
            layer = (source, maps, f"{kernel} Conv class maps '{node.name or maps}' + {_pool_name(g, pool)}")
            cut = _pooled(g, source, "NCHW", f"the backbone's last feature map (before the class-map head: "
                          f"{layer[2]})", "backbone")
            return OldHead(cut, (layer,), source)
    desc = _head_desc(layers)
    cut = Cut(pooled, g.shapes.get(pooled), f"the backbone's pooled output ({_pool_name(g, pool)}){desc}", "backbone")
    return OldHead(cut, tuple(layers), spatial)


def _head_desc(layers) -> str:
    if not layers:
        return ""
    n = len(layers)
    return f"; the old head of {n} dense layer{'s' if n > 1 else ''} ({', '.join(l[2] for l in layers)}) is cut off"


def _pooled(g: ModelGraph, name: str, layout: str | None, reason: str, kind: str) -> Cut:
    shape = g.shapes.get(name)
    note = None
    if layout is None:
        # nothing in the graph says; late feature maps have more channels than positions
        if shape is not None and len(shape) == 4 and all(isinstance(d, int) for d in shape[1:]):
            layout = "NHWC" if shape[3] > shape[1] else "NCHW"
        else:
            layout = "NCHW"
        note = f"the layout of {name!r} is not recorded in the graph; taking it as {layout}"
    return Cut(name, shape, f"{reason}, average-pooled over H and W ({layout})",
               kind, SPATIAL_AXES[layout], note)


# --- candidates -------------------------------------------------------------------------------------------------

def cut_candidates(model: onnx.ModelProto) -> list[Cut]:
    """Tensors a new head can be attached to, best first (see the module docstring)."""
    return _candidates(ModelGraph(model))


def _candidates(g: ModelGraph) -> list[Cut]:
    found: list[Cut] = []
    keys: set[str] = set()

    def add(cut: Cut) -> None:
        if cut.name not in keys and cut.name not in g.consts and g.batch_major(cut.name):
            keys.add(cut.name)
            found.append(cut)

    heads = [h for h in (find_old_head(g, out.name) for out in g.graph.output) if h is not None]
    for head in heads:
        add(head.features)
    for head in heads:
        hidden = head.layers[1:]  # the input of every dense layer after the first is a hidden layer's output
        for i, (tensor, _, desc) in reversed(list(enumerate(hidden))):
            add(Cut(tensor, g.shapes.get(tensor), f"pre-logits: output of hidden layer {i + 1} of the old head "
                    f"(input of {desc})", "pre-logits"))
    for head in heads:
        if head.spatial is not None:
            for name in _blocks_before(g, head.spatial):
                add(_pooled(g, name, g.layout(name), f"output of an earlier block "
                            f"({g.producer[name].op_type} '{g.producer[name].name or name}')", "block"))
    # global poolings inside the backbone (those after its output pool the old head's class maps)
    end = max((g.order.get(h.features.name, -1) for h in heads), default=len(g.nodes))
    pools = [n for n in g.nodes if is_global_pool(g, n) and g.order[n.output[0]] <= end]
    for node in reversed(pools):
        add(Cut(node.output[0], g.shapes.get(node.output[0]), f"output of global pooling ({_pool_name(g, node)})",
                "pool"))
    return found


def _blocks_before(g: ModelGraph, feature_map: str) -> list[str]:
    """The last BLOCK_CANDIDATES block outputs the feature map depends on: residual/concat merges and stage ends
    (pooling outputs, inputs of strided convolutions), rank-4 and of a known layout, latest first."""
    ancestors: set[str] = set()
    stack = [feature_map]
    while stack:
        name = stack.pop()
        node = g.producer.get(name)
        if node is None:
            continue
        for i in node.input:
            if i and i not in ancestors and i not in g.consts:
                ancestors.add(i)
                stack.append(i)
    blocks = []
    for name in ancestors:
        node = g.producer.get(name)
        if node is None or g.rank(name) != 4 or name == feature_map:
            continue
        merge = node.op_type in ("Add", "Sum", "Concat") and sum(
            1 for i in node.input if i and i not in g.consts) >= 2
        stage = node.op_type in ("MaxPool", "AveragePool") or any(
            c.op_type in ("Conv", "MaxPool", "AveragePool") and any(s > 1 for s in (attr(c, "strides", []) or []))
            for c in g.consumers.get(name, []))
        if stage and node.op_type == "Pad" and node.input[0] in g.producer:
            name = node.input[0]  # the map before a strided conv's explicit padding: pooling zeros would skew it
        if (merge or stage) and g.layout(name) is not None and name not in blocks:
            blocks.append(name)
    blocks.sort(key=lambda n: g.order[n], reverse=True)
    # a stage end is often both a pooling output and a strided conv's input: keep distinct tensors only
    return blocks[:BLOCK_CANDIDATES]


# --- choosing ---------------------------------------------------------------------------------------------------

CUT_MODES = ("auto", "backbone", "search")
SEARCH_WIDTH_BUDGET = 2.0  # auto searches the candidates whose features fit in 2x the backbone's width


def plan_cuts(model: onnx.ModelProto, cut: str | None = None) -> list[Cut]:
    """The cuts to extract features at, the default first.

    ``cut``: None or ``auto`` (search the candidates while their features cost at most 2x the backbone's alone),
    ``backbone`` (the pooled backbone only), ``search`` (every candidate) or a tensor name (pooled if spatial).
    """
    g = ModelGraph(model)
    candidates = _candidates(g)
    listing = "; ".join(f"{c.name} {format_shape(c.shape)} ({c.kind})" for c in candidates[:6]) or "none detected"
    if cut not in (None, *CUT_MODES):
        return [_user_cut(g, cut, candidates, listing)]
    if not candidates and isinstance(g.batch_dim, int):
        raise UsageError(f"no cut found: this model runs at a fixed batch of {g.batch_dim} and its tensors before the "
                         f"old head have no batch axis (the graph squeezes it away), so a new head would mix "
                         f"examples; re-export the model with a batch axis, or give --cut TENSOR with a tensor "
                         f"whose leading dim is {g.batch_dim} (porter inspect MODEL --cuts)")
    if not candidates:
        raise UsageError("no cut found: this model has no classifier head (Gemm, MatMul [+ Add], 1x1 Conv), no "
                         "global pooling and no spatial feature map to pool; choose the feature tensor with --cut "
                         "TENSOR (porter inspect MODEL --cuts)")
    for c in candidates:
        _check_features(c, listing)
    best = candidates[0]
    if cut == "backbone" or len(candidates) == 1:
        return [best]
    if cut == "search":
        return candidates
    chosen, width = [best], best.features or 0
    for c in candidates[1:]:
        if best.features and c.features and width + c.features <= SEARCH_WIDTH_BUDGET * best.features:
            chosen.append(c)
            width += c.features
    return chosen


def choose_cut(model: onnx.ModelProto, cut: str | None = None) -> Cut:
    """The single best cut (``cut`` if it names a tensor): what ``--cut backbone`` uses."""
    return plan_cuts(model, "backbone" if cut in (None, "auto", "search") else cut)[0]


def _user_cut(g: ModelGraph, cut: str, candidates: list[Cut], listing: str) -> Cut:
    if cut in g.consts:
        raise UsageError(f"--cut {cut!r} is a weight (initializer), not an activation; candidates: {listing}")
    if cut not in g.tensors():
        raise UsageError(f"--cut {cut!r} is not a tensor of this model; candidates: {listing} "
                         f"(porter inspect MODEL --cuts lists them)")
    if not g.batch_major(cut):
        raise UsageError(f"--cut {cut!r} has shape {format_shape(g.shapes.get(cut))}: its leading axis is not the "
                         f"batch ({format_shape((g.batch_dim,))} for this model), so a head there would mix examples")
    known = next((c for c in candidates if c.name == cut), None)
    if known is not None:
        chosen = replace(known, kind="user", note=f"cut at {cut!r} (--cut)")
    elif g.rank(cut) == 4:
        chosen = replace(_pooled(g, cut, g.layout(cut), "chosen with --cut", "user"), note=f"cut at {cut!r} (--cut)")
    else:
        chosen = Cut(cut, g.shapes.get(cut), "chosen with --cut", "user", note=f"cut at {cut!r} (--cut)")
    _check_features(chosen, listing)
    return chosen


def _check_features(cut: Cut, listing: str = "") -> None:
    """Fail early on a tensor that can't be read as batch x features."""
    if cut.shape is None or cut.pool_axes:
        return
    rest = cut.shape[1:]
    unknown = [d for d in rest if not isinstance(d, int) or d <= 0]
    big = [d for d in rest if isinstance(d, int) and d > 1]
    if len(cut.shape) < 2 or len(unknown) + len(big) > 1:
        hint = f"; candidates: {listing}" if listing else ""
        raise UsageError(f"cut tensor {cut.name!r} has shape {format_shape(cut.shape)}, not batch x features and not "
                         f"a rank-4 feature map porter can pool; cut after pooling or flattening{hint}")
