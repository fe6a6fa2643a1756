"""Keras importer: keras.applications by name, .keras / .h5 files, SavedModel directories, in-memory models.

Keras files load in safe mode: a Lambda layer (or anything else that would run code from the file) is refused
unless the user passes --unsafe. Conversion goes through ``tf.function`` + ``tf2onnx.convert.from_function``
(tf2onnx's ``from_keras`` does not understand Keras 3 models).
"""

from __future__ import annotations

import contextlib
import difflib
import json
import os
import re
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..logging_setup import heavy_import
from ..errors import (ConversionError, ModelLoadError, NetworkError, SourceError, UnsafeModelError, UnsupportedError,
                      UsageError, first_line)
from ..options import DEFAULT_OPSET, ConvertOptions
from ..sources import SourceRef
from ..spec import PreprocessSpec
from . import ImportedModel, register_importer

# keras.applications module -> preprocessing family (what the family's preprocess_input does)
APPLICATION_PREPROCESS = {
    "mobilenet": "tf", "mobilenet_v2": "tf", "inception_v3": "tf", "inception_resnet_v2": "tf", "xception": "tf",
    "nasnet": "tf", "resnet_v2": "tf",
    "vgg16": "caffe", "vgg19": "caffe", "resnet": "caffe", "resnet50": "caffe",
    "densenet": "torch",
    # these include their own rescaling layers: they take raw 0..255 pixels
    "efficientnet": "raw", "efficientnet_v2": "raw", "convnext": "raw", "mobilenet_v3": "raw", "regnet": "raw",
    "resnet_rs": "raw",
}
UNSAFE_CLASSES = ("Lambda", "TFOpLambda")
# TensorFlow ops that touch the file system or run Python: a SavedModel is untrusted input, and porter runs its
# signature (parity validation), so such ops are refused unless --unsafe.
UNSAFE_TF_OPS = frozenset({
    "ReadFile", "WriteFile", "MatchingFiles", "DeleteFile", "PyFunc", "PyFuncStateless", "EagerPyFunc",
    "SaveV2", "Save", "SaveSlices", "MergeV2Checkpoints", "WriteSummary", "WriteScalarSummary",
    "WriteImageSummary", "WriteAudioSummary", "WriteHistogramSummary", "WriteRawProtoSummary",
    "CreateSummaryFileWriter", "ImportEvent", "DebugIdentity", "DebugIdentityV2", "DebugIdentityV3",
})


def _tf():
    return heavy_import("tensorflow")


def _keras():
    _tf()
    return heavy_import("keras")


def framework_versions() -> dict[str, str]:
    tf, keras, tf2onnx = _tf(), _keras(), heavy_import("tf2onnx")

    return {"tensorflow": tf.__version__, "keras": keras.__version__, "tf2onnx": tf2onnx.__version__}


# --- loading ----------------------------------------------------------------------------------------------------

def application_names() -> list[str]:
    apps = _keras().applications
    return sorted(n for n in dir(apps) if n[:1].isupper() and callable(getattr(apps, n)))


def application_preprocess(name: str) -> str | None:
    """The preprocessing family of a keras.applications constructor (None when porter doesn't know it)."""
    ctor = getattr(_keras().applications, name)
    return APPLICATION_PREPROCESS.get(ctor.__module__.rsplit(".", 1)[-1])


def load_application(name: str, opts: ConvertOptions):
    keras = _keras()
    names = application_names()
    if name not in names:
        lower = {n.lower(): n for n in names}
        close = difflib.get_close_matches(name, names, n=4, cutoff=0.5) or (
            [lower[name.lower()]] if name.lower() in lower else [])
        hint = f"did you mean {', '.join(close)}?" if close else f"available: {', '.join(names)}"
        raise SourceError(f"unknown keras.applications model {name!r}; {hint}")
    ctor = getattr(keras.applications, name)
    weights: Any = opts.weights or "imagenet"
    kwargs: dict[str, Any] = {}
    shape = opts.input_shapes.only_shape()  # its one input's name is Keras' choice (input_layer, input_1 ...)
    if shape:
        kwargs["input_shape"] = tuple(shape)
    if weights.lower() == "none":
        weights = None
    elif weights != "imagenet":
        if not Path(weights).is_file():
            raise SourceError(f"weights file not found: {weights}; use --weights imagenet, none, or a path to an .h5 file")
    try:
        # keras.utils.get_file prints "Downloading data from URL" and a progress bar on stdout, which is porter's
        # for results (a CSV or JSON on stdout must stay parseable): they go to stderr with porter's other lines
        with contextlib.redirect_stdout(sys.stderr):
            model = ctor(weights=weights, **kwargs)
    except ValueError as e:
        raise UsageError(f"keras.applications.{name} rejected the options: {first_line(e, 1000)}") from None
    except Exception as e:  # noqa: BLE001 - keras.utils.get_file raises plain Exception on fetch failures
        msg = str(e)
        if weights == "imagenet" and ("fetch failure" in msg or "URL" in msg or isinstance(e, OSError)):
            url = re.search(r"https?://\S+", msg)
            fname = url.group(0).rstrip(".:,;").rsplit("/", 1)[-1] if url else f"the {name} weights file"
            cache = Path(os.environ.get("KERAS_HOME", Path.home() / ".keras")) / "models"
            raise NetworkError(f"can't download ImageNet weights for {name} (offline?); place {fname} in {cache} "
                               f"or use --weights none|PATH") from None
        raise ModelLoadError(f"can't build keras.applications.{name}: {first_line(e, 1000)}") from None
    return model, weights


def _scan_config_for_unsafe(config: Any) -> list[str]:
    """Names of layers whose deserialization runs code (Lambda etc.), found anywhere in a Keras config."""
    found: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if node.get("class_name") in UNSAFE_CLASSES:
                found.append(str(node.get("config", {}).get("name", node.get("class_name"))))
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(config)
    return found


def _read_config(ref: SourceRef) -> Any:
    path = Path(ref.location)
    try:
        if ref.form == "keras-file":
            with zipfile.ZipFile(path) as z:
                return json.loads(z.read("config.json"))
        import h5py

        with h5py.File(path, "r") as f:
            raw = f.attrs.get("model_config")
            if raw is None:
                raise ModelLoadError(f"{path} holds only weights, no model architecture; load them into the model in "
                                     f"Python and pass the model to porter.convert, or save it with model.save()")
            return json.loads(raw.decode() if isinstance(raw, bytes) else raw)
    except ModelLoadError:
        raise
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as e:
        raise ModelLoadError(f"can't read {path}: {first_line(e, 1000)} — the file looks truncated or corrupt; "
                             f"save the model again") from None


@contextlib.contextmanager
def _named_for_keras(ref: SourceRef):
    """The file under a name whose extension says what porter found inside: Keras picks its loader by extension,
    porter detects by content (an HDF5 file called model.keras, a .keras zip called model.h5 or model.bin)."""
    wanted = ".keras" if ref.form == "keras-file" else ".h5"
    path = Path(ref.location)
    if path.suffix.lower() == wanted or (wanted == ".h5" and path.suffix.lower() == ".hdf5"):
        yield str(path)
        return
    with tempfile.TemporaryDirectory(prefix="porter-keras-") as tmp:
        link = Path(tmp) / f"model{wanted}"
        link.symlink_to(path.resolve())
        yield str(link)


def load_file(ref: SourceRef, opts: ConvertOptions):
    unsafe = _scan_config_for_unsafe(_read_config(ref))
    if unsafe and not opts.unsafe:
        raise UnsafeModelError(f"{ref.location} contains Lambda layer(s) {', '.join(unsafe)} whose code would run on "
                               f"load; porter refuses it in safe mode. If you trust the file, pass --unsafe")
    keras = _keras()
    try:
        with _named_for_keras(ref) as path:
            return keras.models.load_model(path, compile=False, safe_mode=not opts.unsafe)
    except ValueError as e:
        if "safe_mode" in str(e) or "arbitrary code" in str(e):
            raise UnsafeModelError(f"{ref.location} needs unsafe deserialization ({first_line(e, 1000)[:120]}); if you "
                                   f"trust the file, pass --unsafe") from None
        raise ModelLoadError(f"can't load {ref.location}: {first_line(e, 1000)}") from None
    except TypeError as e:
        m = re.search(r"class[^']*'([^']+)'", str(e))
        what = f"custom class {m.group(1)!r}" if m else "a custom object"
        raise ModelLoadError(f"{ref.location} uses {what} that Keras can't rebuild without its Python code; load the "
                             f"model in Python and pass it to porter.convert") from None
    except Exception as e:  # noqa: BLE001 - h5py/zip errors of every kind mean "corrupt"
        raise ModelLoadError(f"can't load {ref.location}: {first_line(e, 1000)} — the file looks truncated or corrupt") from None


# --- conversion -------------------------------------------------------------------------------------------------

def _clean(name: str) -> str:
    return name.split(":")[0]


def _tensor_name(t) -> str:
    """The name of the layer that produced a KerasTensor (the Input layer for inputs), else the tensor's own."""
    history = getattr(t, "_keras_history", None)
    op = getattr(history, "operation", None) if history is not None else None
    return op.name if op is not None else _clean(t.name)


def _input_specs(model, opts: ConvertOptions):
    tf = _tf()
    specs = []
    n = len(model.inputs)
    for t in model.inputs:
        name = _tensor_name(t)
        dims = list(t.shape[1:])
        if any(d is None for d in dims):
            given = opts.input_shapes.shape_for(name, n)
            if given is None:
                example = ",".join("224" if d is None else str(d) for d in dims)
                raise UsageError(f"input {name!r} has unknown dims {['?' if d is None else d for d in t.shape]}; give "
                                 f"concrete dims without the batch axis, e.g. --input-shape {example}")
            if len(given) != len(dims) or any(d is not None and d != g for d, g in zip(dims, given)):
                raise UsageError(f"--input-shape {','.join(map(str, given))} does not fit input {name!r} of shape "
                                 f"{['?' if d is None else d for d in t.shape]} (give the dims without the batch axis)")
            dims = list(given)
        specs.append(tf.TensorSpec((None, *dims), tf.as_dtype(t.dtype), name=name))
    return specs


def _output_names(model) -> list[str]:
    return [_tensor_name(t) for t in model.outputs]


def convert_tf_function(fn, specs: Sequence[Any], opts: ConvertOptions):
    """Run tf2onnx on a tf.function."""
    tf2onnx = heavy_import("tf2onnx")
    model = run_tf2onnx(lambda: tf2onnx.convert.from_function(fn, input_signature=list(specs), opset=opts.opset)[0],
                        opts.opset)
    _captures_to_initializers(model, fn.get_concrete_function(*specs), len(specs))
    return model


def _captures_to_initializers(model, concrete, n_args: int) -> None:
    """tf2onnx turns a function's captured constants (a loaded SavedModel's tf.constant members) into graph
    inputs beside the real ones; they are values, so they become initializers holding the captured tensors."""
    from onnx import numpy_helper

    tf = _tf()
    captured = {t.name: v for t, v in zip(concrete.inputs[n_args:], concrete.captured_inputs)
                if t.dtype != tf.dtypes.resource}
    if not captured:
        return
    g = model.graph
    keep = []
    for v in g.input:
        if v.name in captured:
            g.initializer.append(numpy_helper.from_array(np.asarray(captured[v.name].numpy()), v.name))
        else:
            keep.append(v)
    del g.input[:]
    g.input.extend(keep)


@contextlib.contextmanager
def _tf2onnx_logs_muted():
    """tf2onnx logs "Unsupported ops: Erfc" and the like at ERROR level, then carries on; porter patches what it
    can (Erfc) and names every op left unconverted itself (normalize.foreign_ops), so at the terminal (quiet mode)
    those lines are noise on a successful conversion. --debug and API callers keep them."""
    import logging

    from ..logging_setup import is_quiet

    if not is_quiet():
        yield
        return
    logger = logging.getLogger("tf2onnx")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def check_tf2onnx_opset(opset: int) -> None:
    """Refuse, before any model is loaded or downloaded, an opset tf2onnx has no table for (porter's own range is
    wider: the torch exporters reach further)."""
    _tf()  # imported the quiet way (tf2onnx imports TensorFlow)
    newest = max(heavy_import("tf2onnx.constants").OPSET_TO_IR_VERSION)
    if opset > newest:
        raise UsageError(f"--opset {opset}: tf2onnx, which converts Keras and TF.js sources, targets opsets up to "
                         f"{newest}; give --opset {newest} or lower (default {DEFAULT_OPSET})")


def run_tf2onnx(convert: Callable[[], Any], opset: int, what: str = ""):
    """Call one tf2onnx entry point; map its failures to porter errors and patch what it leaves unconverted."""
    where = f" on {what}" if what else ""
    try:
        with _tf2onnx_logs_muted():
            onnx_model = convert()
    except ValueError as e:
        if "opset" in str(e).lower():
            raise UsageError(f"tf2onnx can't target opset {opset}: {first_line(e, 1000)}; try --opset 17") from None
        raise ConversionError(f"tf2onnx failed{where}: {first_line(e, 1000)}") from None
    except Exception as e:  # noqa: BLE001 - tf2onnx raises many kinds
        raise ConversionError(f"tf2onnx failed{where}: {type(e).__name__}: {first_line(e, 1000)}") from None
    _rewrite_erfc(onnx_model)
    return onnx_model


def _rewrite_erfc(model) -> None:
    """tf2onnx passes TF's Erfc through unconverted (Keras 3's exact gelu uses it); ONNX has only Erf: 1 - erf(x)."""
    from onnx import helper

    graph = model.graph
    nodes = list(graph.node)
    if not any(n.op_type == "Erfc" and n.domain in ("", "ai.onnx") for n in nodes):
        return
    del graph.node[:]
    for node in nodes:
        if node.op_type != "Erfc" or node.domain not in ("", "ai.onnx"):
            graph.node.append(node)
            continue
        erf, one = f"{node.name}__erf", f"{node.name}__one"
        graph.node.extend([
            helper.make_node("Erf", [node.input[0]], [erf], name=erf),
            helper.make_node("CastLike", [_float_scalar(graph, one), node.input[0]], [one + "_cast"], name=one + "_cast"),
            helper.make_node("Sub", [one + "_cast", erf], list(node.output), name=node.name or erf + "_sub"),
        ])


def _float_scalar(graph, name: str) -> str:
    from onnx import TensorProto, helper

    graph.initializer.append(helper.make_tensor(name, TensorProto.FLOAT, [], [1.0]))
    return name


def keras_model_to_imported(model, opts: ConvertOptions, source_label: str) -> ImportedModel:
    """Convert an in-memory keras.Model; shared by the Keras and TF.js (layers-model) importers."""
    tf = _tf()
    keras = _keras()
    specs = _input_specs(model, opts)
    single = len(specs) == 1

    def call(*xs):
        out = model(xs[0] if single else list(xs), training=False)
        return tf.nest.flatten(out)

    fn = tf.function(call, input_signature=specs, autograph=False)
    onnx_model = convert_tf_function(fn, specs, opts)

    def run_source(arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
        out = model(arrays[0] if single else list(arrays), training=False)
        return [np.asarray(keras.ops.convert_to_numpy(o)) for o in tf.nest.flatten(out)]

    return ImportedModel(
        onnx_model=onnx_model, run_source=run_source, framework="keras", framework_versions=framework_versions(),
        input_names=[s.name for s in specs], output_names=_output_names(model),
        provenance={"exporter": "tf2onnx", "source_model": source_label})


def import_savedmodel(ref: SourceRef, opts: ConvertOptions) -> ImportedModel:
    tf = _tf()
    try:
        loaded = tf.saved_model.load(ref.location)
    except Exception as e:  # noqa: BLE001
        raise ModelLoadError(f"can't load SavedModel {ref.location}: {first_line(e, 1000)}") from None
    sigs = dict(getattr(loaded, "signatures", {}) or {})
    if not sigs:
        raise ModelLoadError(f"SavedModel {ref.location} has no serving signatures; export it with a signature "
                             f"(model.export() or tf.saved_model.save(..., signatures=...))")
    sig = sigs.get("serving_default") or sigs[sorted(sigs)[0]]
    graph_def = sig.graph.as_graph_def()
    refuse_soft_nms(graph_def, f"SavedModel {ref.location}")
    risky = _unsafe_tf_ops(graph_def)
    if risky and not opts.unsafe:
        raise UnsafeModelError(f"SavedModel {ref.location} uses ops that touch files or run Python "
                               f"({', '.join(sorted(risky))}); porter runs the model to check parity and refuses "
                               f"it. If you trust the model, pass --unsafe")
    _, kw_specs = sig.structured_input_signature
    names = sorted(kw_specs)
    specs = []
    for name in names:
        s = kw_specs[name]
        dims = list(s.shape[1:])
        if any(d is None for d in dims):
            given = opts.input_shapes.shape_for(name, len(names))
            if given is None:
                raise UsageError(f"SavedModel input {name!r} has unknown dims {s.shape}; give --input-shape "
                                 f"{name}:" + ",".join("N" if d is None else str(d) for d in dims))
            dims = list(given)
        # a declared batch stays: whether it can be freed is proven after conversion (graph.batch)
        specs.append(tf.TensorSpec((s.shape[0], *dims), s.dtype, name=name))
    out_names = sorted(sig.structured_outputs)

    def call(*xs):
        out = sig(**dict(zip(names, xs)))
        return [out[k] for k in out_names]

    fn = tf.function(call, input_signature=specs, autograph=False)
    onnx_model = convert_tf_function(fn, specs, opts)

    def run_source(arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
        out = sig(**{n: tf.constant(a) for n, a in zip(names, arrays)})
        return [out[k].numpy() for k in out_names]

    return ImportedModel(onnx_model=onnx_model, run_source=run_source, framework="tensorflow",
                         framework_versions=framework_versions(), input_names=names, output_names=out_names,
                         provenance={"exporter": "tf2onnx", "signature": "serving_default" if "serving_default" in sigs else sorted(sigs)[0]})


def refuse_soft_nms(graph_def, where: str) -> None:
    """ONNX's NonMaxSuppression is hard NMS; a NonMaxSuppressionV5 with soft_nms_sigma > 0 (soft-NMS, which
    rescores instead of dropping) has no ONNX equivalent. tf2onnx truncates the sigma to int before checking it is 0,
    so sigma 0.5 would pass and convert to plain NMS: refuse it here, naming the node."""
    from tensorflow.python.framework import tensor_util

    scopes = [list(graph_def.node)] + [list(f.node_def) for f in graph_def.library.function]
    for nodes in scopes:
        consts = {n.name: n for n in nodes if n.op == "Const"}
        for n in nodes:
            if n.op != "NonMaxSuppressionV5" or len(n.input) < 6:
                continue
            src = consts.get(n.input[5].lstrip("^").split(":")[0])
            sigma = float(tensor_util.MakeNdarray(src.attr["value"].tensor)) if src is not None else None
            if sigma is None or sigma != 0.0:
                shown = "computed at run time" if sigma is None else f"{sigma:g}"
                raise UnsupportedError(f"{where}: node {n.name!r} is soft-NMS (NonMaxSuppressionV5 with "
                                       f"soft_nms_sigma {shown}); ONNX's NonMaxSuppression is hard NMS only. "
                                       f"Export the model with soft_nms_sigma=0 (tf.image.non_max_suppression)")


def _unsafe_tf_ops(graph_def) -> set[str]:
    ops = {n.op for n in graph_def.node}
    for fn in graph_def.library.function:
        ops |= {n.op for n in fn.node_def}
    return ops & UNSAFE_TF_OPS


def _imagenet_labels() -> tuple[str, ...] | None:
    """ImageNet class names from Keras's cache (no download: labels are a nicety, not worth a network call)."""
    path = Path(os.environ.get("KERAS_HOME", Path.home() / ".keras")) / "models" / "imagenet_class_index.json"
    try:
        index = json.loads(path.read_text())
        return tuple(index[str(i)][1] for i in range(len(index)))
    except (OSError, ValueError, KeyError):
        return None


@register_importer("keras")
def import_keras(ref: SourceRef, opts: ConvertOptions) -> ImportedModel:
    check_tf2onnx_opset(opts.opset)
    if ref.form == "savedmodel":
        return import_savedmodel(ref, opts)
    preprocess = None
    labels = None
    notes: list[str] = []
    if ref.form == "application":
        model, weights = load_application(ref.location, opts)
        mode = application_preprocess(ref.location)
        shape = tuple(model.inputs[0].shape[1:])
        if mode:
            size = tuple(shape[:2]) if all(isinstance(d, int) for d in shape[:2]) else None
            preprocess = PreprocessSpec.preset(mode, layout="NHWC", size=size, channels=shape[-1])
        if weights == "imagenet" and model.outputs[0].shape[-1] == 1000:
            labels = _imagenet_labels()
            if labels is None:
                notes.append("ImageNet labels not in Keras's cache (imagenet_class_index.json); none recorded")
        label = f"keras.applications.{ref.location} (weights={weights or 'none'})"
    elif ref.form == "object":
        model, label = ref.obj, f"keras.Model {ref.obj.name}"
    elif ref.form in ("keras-file", "h5-file"):
        model, label = load_file(ref, opts), Path(ref.location).name
    else:
        raise SourceError(f"the Keras importer can't read {ref} ({ref.form})")
    imported = keras_model_to_imported(model, opts, label)
    imported.preprocess = preprocess
    imported.labels = labels
    imported.notes.extend(notes)
    if ref.form == "application":
        imported.weights = weights or "none"
    return imported
