"""From a torch module to raw ONNX: input signature and shapes, output structure, and the two exporters.

The modern exporter (``torch.onnx.export(dynamo=True)``: torch.export + onnxscript) goes first; when it fails
the TorchScript-based exporter (``dynamo=False``) gets a try, and the reason is recorded. Both trace with a
batch of 2 so the batch axis can't be specialised to 1, and both mark axis 0 of every input and output as
``batch``.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import os
import re
import sys
import tempfile
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

from ...errors import ConversionError, UnsupportedError, UsageError
from ...graph.batch import BATCH

TRACE_BATCH = 2  # >= 2, so neither exporter can bake a batch of 1 into the graph
DYNAMO_MIN_OPSET = 18  # the dynamo exporter writes opset 18 or later; porter converts down from there


@dataclass(frozen=True)
class InputSpec:
    name: str
    shape: tuple[int, ...]  # without the batch axis (NCHW for images)
    dtype: Any  # torch.dtype

    def describe(self) -> str:
        return f"{self.name}: [{', '.join(map(str, (BATCH, *self.shape)))}]"


def is_scripted(module) -> bool:
    import torch

    return isinstance(module, (torch.jit.ScriptModule, torch.jit.ScriptFunction))


# --- inputs -------------------------------------------------------------------------------------------------------

def forward_input_names(module) -> list[str] | None:
    """Required positional inputs of ``forward`` (its own names), or None when it takes ``*args``."""
    if is_scripted(module):
        return [a.name for a in module.forward.schema.arguments[1:] if not a.has_default_value() and not a.kwarg_only]
    try:
        params = inspect.signature(module.forward).parameters.values()
    except (TypeError, ValueError):
        return None
    names = []
    for p in params:
        if p.kind is inspect.Parameter.VAR_POSITIONAL:
            return None
        if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD) and p.default is p.empty:
            names.append(p.name)
    return names


def declared_shapes(module, n_inputs: int) -> list[tuple[tuple[int, ...], Any]] | None:
    """Input shapes (without batch) and dtypes a module declares about itself, if it does.

    Looked for, in order: ``example_inputs``/``example_input`` (tensors, batch axis included), ``input_shape``
    (dims without the batch axis, or one such tuple per input), and timm's ``pretrained_cfg``/``default_cfg``
    ``input_size``.
    """
    import torch

    for attr in ("example_inputs", "example_input"):
        ex = _attr(module, attr)
        if isinstance(ex, torch.Tensor):
            ex = (ex,)
        if isinstance(ex, (tuple, list)) and len(ex) == n_inputs and all(isinstance(t, torch.Tensor) and t.dim() >= 1 for t in ex):
            return [(tuple(int(d) for d in t.shape[1:]), t.dtype) for t in ex]
    shape = _attr(module, "input_shape")
    if shape is None:
        for cfg_name in ("pretrained_cfg", "default_cfg"):
            cfg = _attr(module, cfg_name)
            if isinstance(cfg, dict) and cfg.get("input_size"):
                shape = cfg["input_size"]
                break
    if shape is None:
        return None
    shapes = list(shape) if n_inputs > 1 or (shape and isinstance(list(shape)[0], (tuple, list))) else [shape]
    try:
        dims = [tuple(int(d) for d in s) for s in shapes]
    except (TypeError, ValueError):
        return None
    if len(dims) != n_inputs or any(not d or any(x <= 0 for x in d) for d in dims):
        return None
    return [(d, torch.float32) for d in dims]


def _attr(module, name: str):
    try:
        return getattr(module, name, None)
    except Exception:  # noqa: BLE001 - a property that raises means "not declared"
        return None


def resolve_inputs(module, opts, what: str) -> list[InputSpec]:
    """Names, shapes and dtypes of the inputs to trace with: --input-shape first, then what the module declares."""
    import torch

    names = forward_input_names(module)
    given = set(opts.input_shapes.named)
    if names is None:  # forward(*args): the user's --input-shape names are the inputs
        if given:
            names = sorted(given)
        elif opts.input_shapes.unnamed is not None:
            names = ["input"]
        else:
            raise UsageError(f"{what} takes forward(*args), so porter can't tell its inputs; give each input's dims "
                             f"without the batch axis (NCHW), e.g. --input-shape 3,224,224 or --input-shape name:3,224,224")
    if not names:
        raise UsageError(f"{what} has a forward() without required inputs; porter converts models that take tensors")
    unknown = sorted(given - set(names))
    if unknown:
        raise UsageError(f"--input-shape names {', '.join(unknown)}, but {what} takes forward({', '.join(names)}); "
                         f"use those names, or no name for a single input")
    declared = declared_shapes(module, len(names)) or []
    specs, missing = [], []
    for i, name in enumerate(names):
        shape = opts.input_shapes.shape_for(name, len(names))
        if shape is not None:
            dtype = declared[i][1] if declared else torch.float32
            specs.append(InputSpec(name, tuple(int(d) for d in shape), dtype))
        elif declared:
            specs.append(InputSpec(name, declared[i][0], declared[i][1]))
        else:
            missing.append(name)
    if missing:
        if len(names) == 1:
            example = "--input-shape 3,224,224"
        else:
            example = " ".join(f"--input-shape {n}:3,224,224" for n in missing[:2])
        raise UsageError(
            f"can't tell the input shape of {what} (forward({', '.join(names)})): it declares none (no input_shape or "
            f"example_inputs attribute); --input-shape is required: give dims without the batch axis, NCHW for "
            f"images, e.g. {example}")
    return specs


def make_examples(specs: Sequence[InputSpec], device) -> list:
    """Seeded example inputs at batch TRACE_BATCH (images: values like ImageNet-normalised pixels)."""
    import torch

    gen = torch.Generator().manual_seed(0)
    out = []
    for s in specs:
        shape = (TRACE_BATCH, *s.shape)
        if s.dtype.is_floating_point:
            t = torch.randn(shape, generator=gen, dtype=torch.float32).to(s.dtype)
        elif s.dtype == torch.bool:
            t = torch.rand(shape, generator=gen) > 0.5
        else:
            t = torch.randint(0, 10, shape, generator=gen).to(s.dtype)
        out.append(t.to(device))
    return out


def module_device(module):
    import torch

    for t in list(module.parameters()) + list(module.buffers()):
        return t.device
    return torch.device("cpu")


# --- outputs ------------------------------------------------------------------------------------------------------

def flatten_outputs(out: Any, what: str, prefix: str = "") -> list[tuple[str, Any]]:
    """Tensors of a forward() result in the exporters' (pytree) order, with stable names.

    A tensor is ``output``; a tuple or list gives ``output_0, output_1, ...``; a named tuple or a dict gives its
    field names or keys; nesting joins names with ``_``. ``None`` entries are dropped, as the exporters do.
    """
    import torch

    if isinstance(out, torch.Tensor):
        return [(prefix or "output", out)]
    if out is None:
        return []
    if isinstance(out, tuple) and hasattr(out, "_fields"):
        items = [(str(k), v) for k, v in zip(out._fields, out)]
    elif isinstance(out, dict):
        items = [(_clean(str(k)), v) for k, v in out.items()]
    elif isinstance(out, (tuple, list)):
        items = [(str(i), v) for i, v in enumerate(out)]
        if not prefix:
            items = [(f"output_{k}", v) for k, v in items]
    else:
        raise UnsupportedError(f"{what} returns a {type(out).__qualname__}; porter converts models whose forward() "
                               f"returns tensors, or tuples, lists or dicts of tensors")
    flat = []
    for k, v in items:
        flat += flatten_outputs(v, what, f"{prefix}_{k}" if prefix else k)
    return flat


def _clean(name: str) -> str:
    return re.sub(r"[^0-9A-Za-z_.]", "_", name) or "output"


# --- export -------------------------------------------------------------------------------------------------------

@dataclass
class Exported:
    model: Any  # onnx.ModelProto
    exporter: str  # dynamo | torchscript
    fallback_reason: str | None = None
    notes: list[str] = field(default_factory=list)


def export(module, examples: Sequence, input_names: Sequence[str], output_names: Sequence[str],
           output_ranks: Sequence[int], opset: int, what: str) -> Exported:
    """Export with the dynamo exporter, falling back to the TorchScript-based one; raise naming what failed."""
    if is_scripted(module):
        reason = "the model is TorchScript, which the dynamo exporter (torch.export) does not take"
        dynamo_error = None
    else:
        try:
            return _export_dynamo(module, examples, input_names, output_names, opset)
        except Exception as e:  # noqa: BLE001 - any failure of the modern exporter: try the other one
            dynamo_error = e
            reason = f"the dynamo exporter failed: {summarize(e)}"
    try:
        model = _export_torchscript(module, examples, input_names, output_names, output_ranks, opset)
    except Exception as e:  # noqa: BLE001
        texts = [_plain(str(e))] + ([_plain(str(dynamo_error))] if dynamo_error is not None else [])
        ops = failing_ops(*texts)
        named = f"unsupported op(s) {', '.join(ops)}; " if ops else ""
        dyn = f"dynamo exporter: {summarize(dynamo_error)}; " if dynamo_error is not None else f"dynamo exporter: not tried ({reason}); "
        raise UnsupportedError(
            f"neither ONNX exporter can convert {what}: {named}{dyn}TorchScript-based exporter: {summarize(e)}; "
            f"rewrite or replace that part of the model (a custom op needs an ONNX translation)") from e
    note = f"exported with the TorchScript-based exporter (torch.onnx.export dynamo=False) because {reason}"
    return Exported(model, "torchscript", reason, [note])


def _export_dynamo(module, examples, input_names, output_names, opset: int) -> Exported:
    import torch

    target = max(opset, DYNAMO_MIN_OPSET)
    batch = torch.export.Dim(BATCH)
    with quiet_exporter():
        program = torch.onnx.export(
            module, tuple(examples), dynamo=True, opset_version=target, input_names=list(input_names),
            output_names=list(output_names), dynamic_shapes=tuple({0: batch} for _ in examples),
            verbose=False, report=False, optimize=True)
    model = program.model_proto
    strip_node_metadata(model)
    notes = [f"exported with the dynamo exporter (torch.onnx.export dynamo=True) at opset {target}"]
    if target != opset:
        model = convert_opset(model, opset, target)
        notes = [f"exported with the dynamo exporter (torch.onnx.export dynamo=True) at opset {target} (its minimum), "
                 f"then converted to opset {opset} with onnx's version converter"]
    return Exported(model, "dynamo", None, notes)


# Reduce ops that gained ``noop_with_empty_axes`` (and an axes input) in opset 18; ReduceSum did in 13.
_REDUCE_18 = {"ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean", "ReduceMin",
              "ReduceProd", "ReduceSumSquare"}


def convert_opset(model, opset: int, source_opset: int):
    """Down-convert the dynamo exporter's graph with onnx's version converter, then check the result."""
    import onnx
    from onnx import version_converter

    try:
        converted = version_converter.convert_version(model, opset)
        if opset < 18:
            _drop_reduce_noop_attr(converted.graph)
        onnx.checker.check_model(converted)
    except Exception as e:  # noqa: BLE001 - becomes the fallback reason
        raise ConversionError(f"its opset-{source_opset} graph could not be converted to opset {opset} "
                              f"({_plain(str(e)).strip().splitlines()[0][:200]})") from e
    return converted


def _drop_reduce_noop_attr(graph) -> None:
    """onnx's converter moves Reduce* axes back to an attribute but keeps the opset-18 ``noop_with_empty_axes``;
    at its default (0) it means what opset 17 does anyway, so drop it; 1 has no opset-17 spelling."""
    for node in graph.node:
        if node.op_type in _REDUCE_18 and node.domain in ("", "ai.onnx"):
            for i, attr in enumerate(node.attribute):
                if attr.name == "noop_with_empty_axes":
                    if attr.i != 0:
                        raise ConversionError(f"{node.op_type} with noop_with_empty_axes=1 has no opset-17 form")
                    del node.attribute[i]
                    break
        for attr in node.attribute:
            if attr.HasField("g"):
                _drop_reduce_noop_attr(attr.g)
            for sub in attr.graphs:
                _drop_reduce_noop_attr(sub)


def _export_torchscript(module, examples, input_names, output_names, output_ranks, opset: int):
    import onnx
    import torch

    axes = {n: {0: BATCH} for n in input_names}
    axes.update({n: {0: BATCH} for n, r in zip(output_names, output_ranks) if r >= 1})
    buf = io.BytesIO()
    with _stdout_to_void(), quiet_exporter():  # deprecation of dynamo=False, tracer warnings, IR dumps
        torch.onnx.export(module, tuple(examples), buf, dynamo=False, opset_version=opset,
                          input_names=list(input_names), output_names=list(output_names), dynamic_axes=axes,
                          do_constant_folding=True, verbose=False)
    return onnx.load_model_from_string(buf.getvalue())


@contextlib.contextmanager
def quiet_exporter() -> Iterator[None]:
    """Keep the exporters' warnings, log chatter and printed graph dumps ("torchvision is not installed", partial
    FX graphs) off the terminal while they run; porter reports what matters (which exporter, why) in one line and
    the exception chain keeps the details (--debug). Logger levels and streams are restored after."""
    loggers = [logging.getLogger("torch")] + [
        logging.getLogger(name) for name in list(logging.Logger.manager.loggerDict)
        if name.startswith("torch.") and logging.getLogger(name).level not in (logging.NOTSET,)]
    saved = [(lg, lg.level) for lg in loggers]
    for lg in loggers:
        lg.setLevel(max(lg.level, logging.ERROR))
    try:
        # torch.export prints partial graphs of failed exports to sys.stderr itself
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()), \
                contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in saved:
            lg.setLevel(level)


@contextlib.contextmanager
def _stdout_to_void() -> Iterator[None]:
    """The TorchScript-based exporter's C++ side prints its IR to stdout when it fails (torch enables its ONNX log
    unconditionally); send file descriptor 1 to a scratch file for the duration."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # no real stdout (captured, notebook): nothing to protect
        yield
        return
    sys.stdout.flush()
    saved = os.dup(fd)
    with tempfile.TemporaryFile() as scratch:
        os.dup2(scratch.fileno(), fd)
        try:
            yield
        finally:
            os.dup2(saved, fd)
            os.close(saved)


def strip_node_metadata(model) -> None:
    """Drop the per-node metadata the dynamo exporter writes (stack traces with local file paths, FX node text)."""

    def walk(graph) -> None:
        for node in graph.node:
            del node.metadata_props[:]
            for attr in node.attribute:
                if attr.HasField("g"):
                    walk(attr.g)
                for sub in attr.graphs:
                    walk(sub)

    walk(model.graph)
    for fn in model.functions:
        for node in fn.node:
            del node.metadata_props[:]


# --- describing failures ------------------------------------------------------------------------------------------

_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _plain(text: str) -> str:
    return _ANSI.sub("", text)


def summarize(e: BaseException | None) -> str:
    """One line from an exporter exception: the 'Exception summary' the dynamo exporter writes, else line 1."""
    if e is None:
        return ""
    text = _plain(str(e))
    block = re.search(r"## Exception summary\s*\n(.*?)(?:\n\s*\(Refer to|\Z)", text, re.S)
    if block:
        lines = [ln.strip() for ln in block.group(1).splitlines() if ln.strip().startswith("<class")]
        if lines:
            parts = [re.sub(r"^<class '([\w.]+)'>:\s*", lambda m: m.group(1).rsplit(".", 1)[-1] + ": ", ln)
                     for ln in lines[:2]]
            return " <- ".join(parts)[:400]
    first = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    return f"{type(e).__name__}: {first}"[:400]


_OP_PATTERNS = (
    r"OpOverload\(op='([\w.]+)'",  # dynamo: No ONNX function found for <OpOverload(op='ns.name', ...)>
    r"unrecognized namespace ([\w:]+)",  # TorchScript exporter: custom op namespaces
    r"Exporting the operator '?([\w:.]+?)'? to ONNX",  # TorchScript exporter: aten ops without a symbolic
    r"Unsupported FX nodes: \{'call_function': \[([^\]]*)\]",
)


def failing_ops(*texts: str) -> list[str]:
    found: list[str] = []
    for text in texts:
        for pattern in _OP_PATTERNS:
            for m in re.finditer(pattern, text):
                for op in re.split(r"[,\s']+", m.group(1)):
                    op = op.strip("'\" ")
                    if not op:
                        continue
                    if "::" not in op and "." in op:  # ns.name[.overload] -> ns::name
                        ns, name = op.split(".", 2)[:2]
                        op = f"{ns}::{name}"
                    if op not in found:
                        found.append(op)
    return found
