"""Lowered while loops in a GraphDef -> functional ``While`` ops with ``cond`` / ``body`` functions.

TF.js's converter lowers TF2 control flow by default: a ``tf.while_loop`` becomes ``Enter``, ``Merge``,
``Switch``, ``NextIteration``, ``LoopCond`` and ``Exit`` nodes in frames, and a ``TensorArray`` becomes TensorList
state flowing through them. tf2onnx converts the functional form (what every TF2 SavedModel has) to ONNX ``Loop``,
TensorList state, nested loops and conditionals inside bodies included; its rewriter for the lowered form knows only
TF1's ``TensorArrayV3`` and fails on TensorLists and on nested loops ("Graph has cycles"). So porter raises each
lowered loop back to a ``While`` node, innermost frame first, and leaves the rest to tf2onnx. The source model that
validation runs is the graph as TF.js has it, so parity proves the raising too.

Per frame (the ``frame_name`` of its ``Enter`` nodes), each loop variable is the chain
``Enter -> Merge(Enter, NextIteration) -> Switch(Merge, LoopCond) -> :1 body ... -> NextIteration`` and
``Switch:0 -> Exit``; a constant ``Enter`` is a loop invariant. ``cond`` computes ``LoopCond``'s input from the
``Merge`` outputs; ``body`` computes each ``NextIteration`` input from the ``Switch:1`` outputs. Each ``Exit``
becomes an ``Identity`` of the matching ``While`` output, under its own name, so consumers and signature names
still resolve. Control edges inside a frame only pin nodes to it and are dropped (inference graphs are pure).
"""

from __future__ import annotations

from collections import defaultdict, deque
from dataclasses import dataclass, field

from ...errors import ConversionError, first_line
from ...logging_setup import heavy_import

LOWERED_LOOP_OPS = ("Enter", "Exit", "LoopCond", "NextIteration")  # Switch / Merge also make lowered conds


def _tf():
    return heavy_import("tensorflow")


def _src(inp: str) -> str:
    return inp.lstrip("^").split(":")[0]


def _tensor(inp: str) -> str:
    """Canonical tensor name: 'node' and 'node:0' are the same tensor."""
    return inp if ":" in inp else f"{inp}:0"


def _data_inputs(node) -> list[str]:
    return [i for i in node.input if not i.startswith("^")]


def _is_free_const(node) -> bool:
    return node.op == "Const" and not node.input


@dataclass
class _Var:
    enter: object
    merge: object = None
    switch: object = None
    next_iter: object = None
    exit: object = None


@dataclass
class _Frame:
    name: str
    parent: str
    loop_vars: list[_Var] = field(default_factory=list)
    invariants: list = field(default_factory=list)  # constant Enter nodes
    loop_cond: object = None


def assign_frames(nodes) -> tuple[dict[str, str], dict[str, str]]:
    """(node name -> frame name, frame -> parent frame); the root frame is ''. TF's own rule: an Enter starts its
    frame_name, an Exit's consumers are in the parent frame, anything else is in the frame of its inputs. An input-less
    Const belongs to no frame (it is copied where it is used)."""
    by_name = {n.name: n for n in nodes}
    preds: dict[str, list[str]] = {}
    consumers: dict[str, list[str]] = defaultdict(list)
    for n in nodes:
        ps = [_src(i) for i in n.input if _src(i) in by_name]
        if n.op == "Merge":  # the back edge NextIteration -> Merge closes the loop; order ignores it
            ps = [p for p in ps if by_name[p].op != "NextIteration"]
        preds[n.name] = ps
        for p in ps:
            consumers[p].append(n.name)
    indegree = {n.name: len(set(preds[n.name])) for n in nodes}
    queue = deque(n.name for n in nodes if indegree[n.name] == 0)
    frame_of: dict[str, str] = {}
    parent: dict[str, str] = {}
    seen: set[str] = set()
    while queue:
        name = queue.popleft()
        node = by_name[name]
        anchors = [p for p in preds[name] if not _is_free_const(by_name[p])]
        if node.op == "Enter":
            frame = node.attr["frame_name"].s.decode()
            outer = _frame_after(by_name, frame_of, parent, anchors[0]) if anchors else ""
            parent.setdefault(frame, outer)
        elif anchors:
            frame = _frame_after(by_name, frame_of, parent, anchors[0])
        else:
            frame = ""
        frame_of[name] = frame
        for c in set(consumers[name]):
            if c in seen:
                continue
            indegree[c] -= 1
            if indegree[c] == 0:
                seen.add(c)
                queue.append(c)
    if len(frame_of) != len(nodes):
        stuck = [n.name for n in nodes if n.name not in frame_of][:3]
        raise ConversionError(f"the graph-model's control flow has a cycle that is not a while loop (at {stuck})")
    return frame_of, parent


def _frame_after(by_name, frame_of, parent, producer: str) -> str:
    """The frame a consumer of ``producer`` is in."""
    if by_name[producer].op == "Exit":
        return parent.get(frame_of[producer], "")
    return frame_of[producer]


def _frames(nodes, frame_of, parent) -> list[_Frame]:
    by_name = {n.name: n for n in nodes}
    consumers: dict[str, list] = defaultdict(list)
    for n in nodes:
        for i in n.input:
            consumers[_src(i)].append((n, i))
    frames: dict[str, _Frame] = {}
    for n in nodes:
        if n.op != "Enter":
            continue
        f = frames.setdefault(frame_of[n.name], _Frame(frame_of[n.name], parent.get(frame_of[n.name], "")))
        if n.attr["is_constant"].b:
            f.invariants.append(n)
            continue
        var = _Var(n)
        merges = [c for c, _ in consumers[n.name] if c.op == "Merge"]
        if len(merges) != 1:
            raise ConversionError(f"loop variable Enter {n.name!r} feeds {len(merges)} Merge nodes, not one")
        var.merge = merges[0]
        nexts = [by_name[_src(i)] for i in _data_inputs(var.merge) if by_name[_src(i)].op == "NextIteration"]
        switches = [c for c, i in consumers[var.merge.name] if c.op == "Switch" and _tensor(i) == f"{var.merge.name}:0"]
        if len(nexts) != 1 or len(switches) > 1:
            raise ConversionError(f"loop variable {n.name!r}: its Merge has {len(nexts)} NextIteration input(s) and "
                                  f"{len(switches)} Switch consumer(s); porter understands one of each")
        var.next_iter = nexts[0]
        # no Switch: neither the body nor the loop's result reads the variable (only cond does); TF prunes it
        var.switch = switches[0] if switches else None
        if var.switch is not None:
            exits = [c for c, i in consumers[var.switch.name] if c.op == "Exit" and _tensor(i) == f"{var.switch.name}:0"]
            var.exit = exits[0] if exits else None
        f.loop_vars.append(var)
    for n in nodes:
        if n.op == "LoopCond" and frame_of[n.name] in frames:
            f = frames[frame_of[n.name]]
            if f.loop_cond is not None:
                raise ConversionError(f"while-loop frame {f.name!r} has two LoopCond nodes")
            f.loop_cond = n
    for f in frames.values():
        if f.loop_vars and f.loop_cond is None:
            raise ConversionError(f"while-loop frame {f.name!r} has no LoopCond")
    return [f for f in frames.values() if f.loop_vars]


def _depth(frame: str, parent: dict[str, str]) -> int:
    d = 0
    while frame:
        frame = parent.get(frame, "")
        d += 1
    return d


def raise_while_loops(gd) -> int:
    """Replace every lowered while loop in ``gd`` (in place) by a functional While; return how many."""
    if not any(n.op == "Enter" for n in gd.node):
        return 0
    raised = 0
    used_names = {n.name for n in gd.node} | {f.signature.name for f in gd.library.function}
    while True:
        nodes = list(gd.node)
        try:
            frame_of, parent = assign_frames(nodes)
            frames = _frames(nodes, frame_of, parent)
            if not frames:
                break
            frame = max(frames, key=lambda f: _depth(f.name, parent))
            _raise_one(gd, frame, frame_of, used_names)
        except (KeyError, IndexError, AttributeError) as e:  # a loop whose parts don't fit together (untrusted JSON)
            raise ConversionError(f"the graph-model's while loop is malformed: {type(e).__name__} {e}") from None
        raised += 1
    leftover = sorted({n.op for n in gd.node if n.op in LOWERED_LOOP_OPS})
    if leftover:
        raise ConversionError(f"porter could not raise every lowered while loop; left: {', '.join(leftover)}")
    return raised


def _unique(base: str, used: set[str]) -> str:
    name, k = base, 0
    while name in used:
        k += 1
        name = f"{base}_{k}"
    used.add(name)
    return name


def _raise_one(gd, frame: _Frame, frame_of: dict[str, str], used_names: set[str]) -> None:
    """Replace ``frame``'s nodes by one While. Its arguments are, as while_v2 lays them out (and tf2onnx expects):
    [loop counter, maximum iterations (-1: none), loop variables..., invariants..., captured outer tensors...]."""
    tf = _tf()
    attr = tf.compat.v1.AttrValue
    by_name = {n.name: n for n in gd.node}
    members = {name for name, f in frame_of.items() if f == frame.name}
    loop_vars = frame.loop_vars
    structural = {frame.loop_cond.name} | {e.name for e in frame.invariants} | {
        n.name for v in loop_vars for n in (v.enter, v.merge, v.switch, v.next_iter, v.exit) if n is not None}
    first = 2  # after the counter and the maximum
    n_state = first + len(loop_vars)
    outer_inputs = [_data_inputs(v.enter)[0] for v in loop_vars] + [_data_inputs(e)[0] for e in frame.invariants]
    cond_args = {f"{v.merge.name}:0": first + k for k, v in enumerate(loop_vars)}
    body_args = {f"{v.switch.name}:1": first + k for k, v in enumerate(loop_vars) if v.switch is not None}
    for k, e in enumerate(frame.invariants, start=n_state):
        cond_args[f"{e.name}:0"] = body_args[f"{e.name}:0"] = k
    captures: dict[str, int] = {}  # outer tensors read inside the frame without an Enter (tolerated by TF.js)

    def collect(outputs: list[str], args: dict[str, int]) -> list:
        keep: list[str] = []
        seen: set[str] = set()
        stack = [_src(t) for t in outputs if _tensor(t) not in args]
        while stack:
            name = stack.pop()
            if name in seen:
                continue
            seen.add(name)
            node = by_name[name]
            if name in structural:
                raise ConversionError(f"while-loop frame {frame.name!r}: node {name!r} ({node.op}) is reached "
                                      f"inside the loop in a way porter does not understand")
            keep.append(name)
            for i in _data_inputs(node):
                t = _tensor(i)
                if t in args or t in captures:
                    continue
                src = by_name[_src(i)]
                if src.name in members or _is_free_const(src):
                    stack.append(src.name)
                else:
                    captures[t] = first + len(outer_inputs) + len(captures)
        return [by_name[n] for n in keep]

    cond_out = [_data_inputs(frame.loop_cond)[0]]
    body_out = [_data_inputs(v.next_iter)[0] for v in loop_vars]
    cond_nodes = collect(cond_out, cond_args)
    body_nodes = collect(body_out, body_args)
    for t, k in captures.items():
        cond_args[t] = body_args[t] = k
    outer_inputs += list(captures)
    types, shapes = _types_and_shapes(gd, outer_inputs)
    int32 = tf.int32.as_datatype_enum
    arg_types = [int32, int32] + types
    shapes = [tf.TensorShape([]), tf.TensorShape([])] + shapes
    n_args = len(arg_types)

    base = _unique(frame.name.replace("/", "_").strip("_") or "while", used_names)
    cond_name = _unique(f"porter_{base}_cond", used_names)
    body_name = _unique(f"porter_{base}_body", used_names)
    arg = f"{body_name}_arg"  # argument names unique per function: nested loops' ONNX bodies must not shadow
    one = tf.compat.v1.NodeDef(op="Const", name="porter_one")
    one.attr["dtype"].CopyFrom(attr(type=int32))
    one.attr["value"].CopyFrom(attr(tensor=tf.make_tensor_proto(1, tf.int32)))
    count = tf.compat.v1.NodeDef(op="AddV2", name="porter_count", input=[f"{arg}0", "porter_one"])
    count.attr["T"].CopyFrom(attr(type=int32))
    body_outputs = ["porter_count:0", f"{arg}1:0"] + body_out + [f"{arg}{k}:0" for k in range(n_state, n_args)]
    # loop-variable shapes: the most specific shape both the initial value and every body output fit (what
    # while_v2 records as output_shapes); a few rounds reach the fixed point
    for _ in range(4):
        body_fn, out_shapes = _function(gd, body_name, body_nodes + [one, count], body_args, arg_types, shapes,
                                        body_outputs, arg)
        relaxed = [a.most_specific_compatible_shape(b) for a, b in zip(shapes, out_shapes)]
        if all(r.as_proto() == a.as_proto() for r, a in zip(relaxed, shapes)):
            break
        shapes = relaxed
    cond_fn, _ = _function(gd, cond_name, cond_nodes, cond_args, arg_types, shapes, cond_out, f"{cond_name}_arg")
    gd.library.function.extend([cond_fn, body_fn])

    starts = []
    for value in (0, -1):
        c = tf.compat.v1.NodeDef(op="Const", name=_unique(f"{frame.name}/porter_{'counter' if value == 0 else 'max'}",
                                                          used_names))
        c.attr["dtype"].CopyFrom(attr(type=int32))
        c.attr["value"].CopyFrom(attr(tensor=tf.make_tensor_proto(value, tf.int32)))
        starts.append(c)
    while_node = tf.compat.v1.NodeDef(op="While", name=_unique(f"{frame.name}/porter_while", used_names))
    while_node.input.extend([starts[0].name, starts[1].name] + outer_inputs)
    while_node.attr["T"].CopyFrom(attr(list=attr.ListValue(type=arg_types)))
    while_node.attr["cond"].CopyFrom(attr(func=tf.compat.v1.NameAttrList(name=cond_name)))
    while_node.attr["body"].CopyFrom(attr(func=tf.compat.v1.NameAttrList(name=body_name)))
    while_node.attr["parallel_iterations"].CopyFrom(attr(i=10))
    while_node.attr["output_shapes"].CopyFrom(attr(list=attr.ListValue(shape=[sh.as_proto() for sh in shapes])))
    exits = {v.exit.name: first + k for k, v in enumerate(loop_vars) if v.exit is not None}
    new_nodes = starts + [while_node]
    for node in gd.node:
        if node.name in exits:  # the loop's result keeps the Exit's name
            ident = tf.compat.v1.NodeDef(op="Identity", name=node.name, input=[f"{while_node.name}:{exits[node.name]}"])
            ident.attr["T"].CopyFrom(attr(type=arg_types[exits[node.name]]))
            new_nodes.append(ident)
        elif node.name not in members:
            new_nodes.append(node)
    del gd.node[:]
    gd.node.extend(new_nodes)  # a GraphDef needs no order: TensorFlow sorts it on import


def _types_and_shapes(gd, tensors: list[str]):
    """Dtypes (enum) and static shapes TensorFlow infers for ``tensors`` of ``gd``."""
    tf = _tf()
    g = tf.Graph()
    try:
        with g.as_default():
            tf.compat.v1.import_graph_def(gd, name="")
        found = [g.get_tensor_by_name(_tensor(t)) for t in tensors]
    except (ValueError, KeyError, TypeError, tf.errors.OpError) as e:
        raise ConversionError(f"TensorFlow can't rebuild the graph-model around a while loop: "
                              f"{first_line(e, 200)}") from None
    return [t.dtype.as_datatype_enum for t in found], [t.shape for t in found]


def _function(gd, name: str, nodes, args: dict[str, int], arg_types: list[int], arg_shapes, outputs: list[str],
              arg: str):
    """A FunctionDef of ``nodes`` whose inputs ``args`` (tensor -> position) become arguments <arg><k>,
    and the static shapes of its outputs given ``arg_shapes``."""
    tf = _tf()
    from tensorflow.python.framework.graph_to_function_def import graph_to_function_def

    attr = tf.compat.v1.AttrValue
    sub = tf.compat.v1.GraphDef()
    sub.versions.CopyFrom(gd.versions)
    sub.library.CopyFrom(gd.library)
    for k, dtype in enumerate(arg_types):
        ph = sub.node.add(op="Placeholder", name=f"{arg}{k}")
        ph.attr["dtype"].CopyFrom(attr(type=dtype))
        ph.attr["shape"].CopyFrom(attr(shape=arg_shapes[k].as_proto()))
    rename = {t: f"{arg}{k}:0" for t, k in args.items()}
    for node in nodes:
        copy = sub.node.add()
        copy.CopyFrom(node)
        del copy.input[:]
        copy.input.extend(rename.get(_tensor(i), i) for i in _data_inputs(node))
    g = tf.Graph()
    try:
        with g.as_default():
            tf.compat.v1.import_graph_def(sub, name="")
        ins = [g.get_tensor_by_name(f"{arg}{k}:0") for k in range(len(arg_types))]
        outs = [g.get_tensor_by_name(rename.get(_tensor(t), _tensor(t))) for t in outputs]
        ops = [op for op in g.get_operations() if op.type != "Placeholder" or not op.name.startswith(arg)]
        fdef = graph_to_function_def(g, ops, ins, outs, out_names=[f"out{k}" for k in range(len(outs))])
    except (ValueError, KeyError, TypeError, tf.errors.OpError) as e:
        raise ConversionError(f"porter could not rebuild while loop {name!r} as a function: "
                              f"{first_line(e, 200)}") from None
    fdef.signature.name = name
    for k, shape in enumerate(arg_shapes):  # what function_def_to_graph (and so tf2onnx) reads as the arg shapes
        fdef.arg_attr[k].attr["_output_shapes"].CopyFrom(attr(list=attr.ListValue(shape=[shape.as_proto()])))
    return fdef, [t.shape for t in outs]
