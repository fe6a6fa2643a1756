"""TF.js layers-model -> Keras 3 model: rebuild the Keras-2 JSON topology layer by layer, then load the weights.

The topology comes in two shapes: ``{"class_name": ..., "config": ...}`` (written by TF.js itself) and
``{"keras_version", "backend", "model_config": {...}}`` (written by the Python converter). Porter never hands
the JSON to a generic deserializer: every class goes through an allowlist (``LAYERS``) whose entries translate
the old config keys (``batch_input_shape``, ``alpha`` of LeakyReLU, TF.js activation names ...) into the Keras 3
constructor's arguments. Initializers, regularizers and constraints don't affect inference and are dropped; a
config key porter doesn't know is an error rather than something silently ignored. Weights are assigned by name
(``<layer>/<variable>``) with shape checks.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from ...errors import ModelLoadError, UnsupportedError, first_line
from ...logging_setup import heavy_import

MODEL_CLASSES = ("Sequential", "Model", "Functional")

# keys that only matter for training or for TF.js bookkeeping; dropped from every layer config
_DROP_ALWAYS = {"batch_input_shape", "batch_shape", "batch_size", "input_shape", "input_dtype",
                "input_length", "activity_regularizer", "module", "registered_name", "build_config",
                "sparse", "ragged", "optional"}
_DROP_SUFFIXES = ("_initializer", "_regularizer", "_constraint")
# options that only change training behaviour (or give the input size again): dropped when Keras 3 lacks them
_TRAINING_ONLY = {"input_dim", "renorm", "renorm_clipping", "renorm_momentum", "fused", "virtual_batch_size", "adjustment",
                  "synchronized", "seed", "noise_shape", "momentum"}

# options Keras 3 lacks on some class but that do nothing at these values (tf_keras writes groups=1 everywhere)
_NO = object()
_NEUTRAL: dict[str, Any] = {"groups": 1, "data_format": "channels_last", "dilation_rate": (1, 1)}


def _as_tuple(v: Any) -> Any:
    return tuple(v) if isinstance(v, list) else v


@dataclass
class LayerSpec:
    keras_name: str  # class in keras.layers
    renames: dict[str, str] = field(default_factory=dict)
    fix: Callable[[dict[str, Any]], None] | None = None  # in-place config edits
    weight_aliases: dict[str, tuple[str, ...]] = field(default_factory=dict)  # keras var -> TF.js names


def _hard_sigmoid_keras2(x):
    """TF.js/Keras 2 hard sigmoid: clip(0.2 x + 0.5, 0, 1) (Keras 3's is relu6(x + 3) / 6)."""
    ops = heavy_import("keras").ops
    return ops.clip(0.2 * x + 0.5, 0.0, 1.0)


def _gelu_tanh(x):
    return heavy_import("keras").activations.gelu(x, approximate=True)


def _gelu_erf(x):
    """TF.js gelu is the exact one: x * 0.5 * (1 + erf(x / sqrt 2)) (tf2onnx's Erfc is rewritten in keras.py)."""
    return heavy_import("keras").activations.gelu(x, approximate=False)


_ACTIVATIONS: dict[str, Any] = {
    "linear": "linear", "relu": "relu", "relu6": "relu6", "elu": "elu", "selu": "selu", "sigmoid": "sigmoid",
    "softmax": "softmax", "softplus": "softplus", "softsign": "softsign", "tanh": "tanh", "swish": "silu",
    "silu": "silu", "mish": "mish", "exponential": "exponential", "logsoftmax": "log_softmax",
    "log_softmax": "log_softmax", "hardsigmoid": _hard_sigmoid_keras2, "hard_sigmoid": _hard_sigmoid_keras2,
    "gelu": _gelu_erf, "gelu_new": _gelu_tanh,
}


def activation(value: Any, where: str) -> Any:
    if value is None:
        return "linear"
    if isinstance(value, dict):  # {"class_name": "relu", "config": {...}} (newer serializations)
        value = value.get("config", {}).get("name") or value.get("class_name")
    key = str(value)
    found = _ACTIVATIONS.get(key) or _ACTIVATIONS.get(key.lower())
    if found is None:
        raise UnsupportedError(f"{where} uses activation {value!r}, which porter can't convert; supported: "
                               f"{', '.join(sorted(k for k in _ACTIVATIONS if k.islower()))}")
    return found


def _fix_leaky(cfg: dict) -> None:
    if "alpha" in cfg:
        cfg["negative_slope"] = cfg.pop("alpha")


def _fix_bn(cfg: dict) -> None:
    axis = cfg.get("axis", -1)
    if isinstance(axis, list):
        if len(axis) != 1:
            raise UnsupportedError(f"BatchNormalization over several axes {axis} is not supported")
        cfg["axis"] = axis[0]


def _fix_reshape(cfg: dict) -> None:
    cfg["target_shape"] = tuple(cfg["target_shape"])


def _fix_permute(cfg: dict) -> None:
    cfg["dims"] = tuple(cfg["dims"])


def _fix_relu(cfg: dict) -> None:
    if cfg.get("max_value") is not None:
        cfg["max_value"] = float(cfg["max_value"])


def _fix_thresholded(cfg: dict) -> None:
    """ThresholdedReLU (gone from Keras 3): x if x > theta else 0 == ReLU(threshold=theta) up to x == theta."""
    cfg["threshold"] = float(cfg.pop("theta", 1.0))


def _fix_upsampling(cfg: dict) -> None:
    if cfg.get("interpolation", "nearest") != "nearest":
        raise UnsupportedError(f"UpSampling2D with interpolation {cfg['interpolation']!r}: porter converts only "
                               f"'nearest' (TF.js and Keras 3 disagree on bilinear sampling)")


def _conv(name: str, **kw) -> LayerSpec:
    return LayerSpec(name, **kw)


LAYERS: dict[str, LayerSpec] = {
    "InputLayer": LayerSpec("InputLayer"),
    "Dense": LayerSpec("Dense"),
    "Conv1D": _conv("Conv1D"), "Conv2D": _conv("Conv2D"), "Conv3D": _conv("Conv3D"),
    "Conv2DTranspose": _conv("Conv2DTranspose"),
    "DepthwiseConv2D": LayerSpec("DepthwiseConv2D", weight_aliases={"kernel": ("depthwise_kernel", "kernel")}),
    "SeparableConv1D": LayerSpec("SeparableConv1D"), "SeparableConv2D": LayerSpec("SeparableConv2D"),
    "BatchNormalization": LayerSpec("BatchNormalization", fix=_fix_bn),
    "LayerNormalization": LayerSpec("LayerNormalization"),
    "Activation": LayerSpec("Activation"),
    "ReLU": LayerSpec("ReLU", fix=_fix_relu), "LeakyReLU": LayerSpec("LeakyReLU", fix=_fix_leaky),
    "PReLU": LayerSpec("PReLU"), "ELU": LayerSpec("ELU"), "Softmax": LayerSpec("Softmax"),
    "ThresholdedReLU": LayerSpec("ReLU", fix=_fix_thresholded),
    "MaxPooling1D": LayerSpec("MaxPooling1D"), "MaxPooling2D": LayerSpec("MaxPooling2D"),
    "MaxPooling3D": LayerSpec("MaxPooling3D"),
    "AveragePooling1D": LayerSpec("AveragePooling1D"), "AveragePooling2D": LayerSpec("AveragePooling2D"),
    "AveragePooling3D": LayerSpec("AveragePooling3D"),
    "GlobalAveragePooling1D": LayerSpec("GlobalAveragePooling1D"),
    "GlobalAveragePooling2D": LayerSpec("GlobalAveragePooling2D"),
    "GlobalMaxPooling1D": LayerSpec("GlobalMaxPooling1D"), "GlobalMaxPooling2D": LayerSpec("GlobalMaxPooling2D"),
    "ZeroPadding1D": LayerSpec("ZeroPadding1D"), "ZeroPadding2D": LayerSpec("ZeroPadding2D"),
    "Cropping1D": LayerSpec("Cropping1D"), "Cropping2D": LayerSpec("Cropping2D"),
    "UpSampling1D": LayerSpec("UpSampling1D"), "UpSampling2D": LayerSpec("UpSampling2D", fix=_fix_upsampling),
    "Add": LayerSpec("Add"), "Subtract": LayerSpec("Subtract"), "Multiply": LayerSpec("Multiply"),
    "Average": LayerSpec("Average"), "Maximum": LayerSpec("Maximum"), "Minimum": LayerSpec("Minimum"),
    "Concatenate": LayerSpec("Concatenate"), "Dot": LayerSpec("Dot"),
    "Dropout": LayerSpec("Dropout"), "SpatialDropout1D": LayerSpec("SpatialDropout1D"),
    "SpatialDropout2D": LayerSpec("SpatialDropout2D"), "GaussianNoise": LayerSpec("GaussianNoise"),
    "GaussianDropout": LayerSpec("GaussianDropout"), "AlphaDropout": LayerSpec("AlphaDropout"),
    "Flatten": LayerSpec("Flatten"), "Reshape": LayerSpec("Reshape", fix=_fix_reshape),
    "Permute": LayerSpec("Permute", fix=_fix_permute), "RepeatVector": LayerSpec("RepeatVector"),
    "Embedding": LayerSpec("Embedding"), "Rescaling": LayerSpec("Rescaling"),
}


def supported_layers() -> list[str]:
    return sorted(set(LAYERS) - {"InputLayer"}) + ["Sequential/Model (nested)"]


# --- topology shapes --------------------------------------------------------------------------------------------

def model_config(topology: dict) -> dict:
    """The ``{class_name, config}`` of the model, whichever of the two shapes the file uses."""
    mc = topology.get("model_config", topology)
    if isinstance(mc, str):  # some converters stored the Keras JSON as a string
        import json

        mc = json.loads(mc)
    if not isinstance(mc, dict) or "class_name" not in mc or "config" not in mc:
        raise ModelLoadError("modelTopology is not a Keras model config (expected class_name and config, or "
                             "model_config holding them)")
    if mc["class_name"] not in MODEL_CLASSES:
        raise UnsupportedError(f"the top-level TF.js model class is {mc['class_name']!r}; porter reads Sequential "
                               f"and functional (Model) layers-models")
    return mc


def _layer_list(mc: dict) -> list[dict]:
    cfg = mc["config"]
    layers = cfg if isinstance(cfg, list) else cfg.get("layers")
    if not isinstance(layers, list) or not layers:
        raise ModelLoadError(f"the {mc['class_name']} config has no layers")
    for i, lc in enumerate(layers, 1):
        if not isinstance(lc, dict) or "class_name" not in lc or not isinstance(lc.get("config"), dict):
            raise ModelLoadError(f"layer {i} of {len(layers)} in the topology has no class_name/config")
    return layers


def _layer_name(lc: dict) -> str:
    return str(lc.get("name") or lc["config"].get("name"))


def check_supported(mc: dict) -> None:
    """Name every layer class without a converter, with its position, in one error."""
    missing: list[str] = []

    def walk(m: dict, where: str) -> None:
        layers = _layer_list(m)
        for i, lc in enumerate(layers, 1):
            cls = lc["class_name"]
            pos = f"layer {i} of {len(layers)}{where}"
            if cls in MODEL_CLASSES:
                walk(lc, f" in {_layer_name(lc)!r}")
            elif cls not in LAYERS:
                missing.append(f"{cls!r} ({pos}, named {_layer_name(lc)!r})")

    walk(mc, "")
    if missing:
        head = (f"TF.js layer {missing[0]} has no converter" if len(missing) == 1
                else f"TF.js layers {', '.join(missing)} have no converter")
        raise UnsupportedError(f"{head}. Supported: {', '.join(supported_layers())}")


# --- building ---------------------------------------------------------------------------------------------------

@dataclass
class Built:
    layer: Any  # a keras layer
    class_name: str
    position: str


class Builder:
    def __init__(self) -> None:
        self.keras = heavy_import("keras")
        self.leaves: list[tuple[str, Built]] = []  # (config name, built) for weight assignment

    # one layer object from its config
    def make_layer(self, lc: dict, position: str):
        cls = lc["class_name"]
        if cls in MODEL_CLASSES:
            sub = self.build_model(lc, nested=True)
            return sub
        spec = LAYERS[cls]
        name = _layer_name(lc)
        where = f"layer {name!r} ({cls}, {position})"
        cfg = dict(lc["config"])
        cfg.pop("name", None)
        for k in list(cfg):
            if k in _DROP_ALWAYS or k.endswith(_DROP_SUFFIXES):
                cfg.pop(k)
        for old, new in spec.renames.items():
            if old in cfg:
                cfg[new] = cfg.pop(old)
        if spec.fix:
            try:
                spec.fix(cfg)
            except UnsupportedError as e:
                raise UnsupportedError(f"{where}: {e}") from None
        if "activation" in cfg:
            cfg["activation"] = activation(cfg["activation"], where)
        cfg.pop("dtype", None)
        klass = getattr(self.keras.layers, spec.keras_name)
        accepted = set(inspect.signature(klass.__init__).parameters) - {"self", "kwargs"}
        cfg.pop("trainable", None)  # inference only; some Keras 3 classes don't take it
        for k in list(cfg):
            if k not in accepted:
                if k in _TRAINING_ONLY or _NEUTRAL.get(k, _NO) == _as_tuple(cfg[k]):
                    cfg.pop(k)
                    continue
                raise UnsupportedError(f"{where}: config option {k}={cfg[k]!r} has no Keras 3 equivalent porter "
                                       f"knows; please report this model")
        try:  # porter computes in float32 whatever policy the file names (mixed_float16 ...)
            layer = klass(name=name, dtype="float32", **cfg)
        except (TypeError, ValueError) as e:
            raise ModelLoadError(f"{where}: Keras 3 can't build it from its config ({first_line(e)})") from None
        self.leaves.append((name, Built(layer, cls, position)))
        return layer

    def input_tensor(self, name: str, batch_shape: Any, dtype: Any, where: str):
        if not isinstance(batch_shape, (list, tuple)) or not batch_shape:
            raise ModelLoadError(f"{where}: the input has no usable batch_input_shape ({batch_shape!r})")
        if isinstance(dtype, dict):
            dtype = dtype.get("config", {}).get("name")
        dtype = dtype or "float32"
        if dtype not in ("float32", "int32", "bool"):
            raise UnsupportedError(f"{where}: input dtype {dtype!r} is not supported (float32, int32, bool)")
        return self.keras.Input(batch_shape=tuple(None if d is None or d < 0 else int(d) for d in batch_shape),
                                name=name, dtype=dtype)

    def build_model(self, mc: dict, nested: bool = False):
        if mc["class_name"] == "Sequential":
            return self._sequential(mc, nested)
        return self._functional(mc)

    def _sequential(self, mc: dict, nested: bool):
        layers = _layer_list(mc)
        cfg = mc["config"] if isinstance(mc["config"], dict) else {}
        n = len(layers)
        first = layers[0]
        body = layers
        if first["class_name"] == "InputLayer":
            fc = first["config"]
            x = self.input_tensor(_layer_name(first), fc.get("batch_input_shape") or fc.get("batch_shape"),
                                  fc.get("dtype"), f"layer 1 of {n}")
            body = layers[1:]
        else:
            fc = first["config"]
            shape = fc.get("batch_input_shape") or fc.get("batch_shape")
            if shape is None and fc.get("input_shape") is not None:
                shape = [None, *fc["input_shape"]]
            if shape is None:
                if nested:
                    raise UnsupportedError("a nested Sequential model without an input shape is not supported")
                raise ModelLoadError(f"the first layer {_layer_name(first)!r} has no batch_input_shape; porter "
                                     f"can't tell the model's input shape")
            x = self.input_tensor(f"{_layer_name(first)}_input", shape, fc.get("dtype"), f"layer 1 of {n}")
        inp = x
        offset = n - len(body)
        for i, lc in enumerate(body, offset + 1):
            layer = self.make_layer(lc, f"layer {i} of {n}")
            try:
                x = layer(x)
            except Exception as e:  # noqa: BLE001 - Keras raises ValueError/TypeError/... on shape mismatches
                raise ModelLoadError(f"layer {_layer_name(lc)!r} ({lc['class_name']}, layer {i} of {n}) can't be "
                                     f"applied to its input: {first_line(e)}") from None
        return self.keras.Model(inp, x, name=cfg.get("name") or "sequential")

    def _functional(self, mc: dict):
        cfg = mc["config"]
        layers = _layer_list(mc)
        n = len(layers)
        outs: dict[tuple[str, int], Any] = {}
        objects: dict[str, Any] = {}
        pending: list[tuple[dict, int, Any, str]] = []
        for i, lc in enumerate(layers, 1):
            name = _layer_name(lc)
            pos = f"layer {i} of {n}"
            if lc["class_name"] == "InputLayer":
                c = lc["config"]
                outs[(name, 0)] = self.input_tensor(name, c.get("batch_input_shape") or c.get("batch_shape"),
                                                    c.get("dtype"), pos)
                continue
            objects[name] = self.make_layer(lc, pos)
            for ni, node in enumerate(lc.get("inbound_nodes") or []):
                pending.append((lc, ni, node, pos))
        while pending:
            progress, rest = False, []
            for lc, ni, node, pos in pending:
                refs, kwargs = _node_refs(node, f"layer {_layer_name(lc)!r} ({pos})")
                if not all((r[0], r[1]) in outs for r in refs):
                    rest.append((lc, ni, node, pos))
                    continue
                args = [_pick(outs[(r[0], r[1])], r[2]) for r in refs]
                name = _layer_name(lc)
                try:
                    y = objects[name](args[0] if len(args) == 1 else args, **kwargs)
                except Exception as e:  # noqa: BLE001
                    raise ModelLoadError(f"layer {name!r} ({lc['class_name']}, {pos}) can't be applied to its "
                                         f"inputs: {first_line(e)}") from None
                outs[(name, ni)] = y
                progress = True
            if not progress:
                missing = sorted({r[0] for lc, ni, node, pos in rest for r in _node_refs(node, "")[0]
                                  if (r[0], r[1]) not in outs})
                raise ModelLoadError(f"the topology's connections can't be resolved: layer(s) "
                                     f"{', '.join(map(repr, missing[:6]))} are referenced but never produce that output")
            pending = rest

        def endpoints(key: str) -> list:
            spec = cfg.get(key) or []
            if spec and isinstance(spec[0], str):
                spec = [spec]
            result = []
            for e in spec:
                name, node_index, tensor_index = e[0], int(e[1]), int(e[2]) if len(e) > 2 else 0
                if (name, node_index) not in outs:
                    raise ModelLoadError(f"the model's {key} names layer {name!r}, which the topology never builds")
                result.append(_pick(outs[(name, node_index)], tensor_index))
            return result

        inputs, outputs = endpoints("input_layers"), endpoints("output_layers")
        if not inputs or not outputs:
            raise ModelLoadError("the functional model config has no input_layers/output_layers")
        return self.keras.Model(inputs if len(inputs) > 1 else inputs[0], outputs if len(outputs) > 1 else outputs[0],
                                name=cfg.get("name") or "model")


def _pick(value: Any, index: int):
    if isinstance(value, (list, tuple)):
        return value[index]
    if index != 0:
        raise ModelLoadError(f"the topology asks for output {index} of a layer with a single output")
    return value


def _node_refs(node: Any, where: str) -> tuple[list[tuple[str, int, int]], dict]:
    """Inbound tensors of one call: Keras-2 ``[[name, node, tensor, kwargs], ...]`` or Keras-3 ``{args, kwargs}``."""
    refs: list[tuple[str, int, int]] = []
    kwargs: dict = {}
    if isinstance(node, dict) and "args" in node:  # Keras 3 layout
        def walk(v: Any) -> None:
            if isinstance(v, dict) and v.get("class_name") == "__keras_tensor__":
                h = v["config"]["keras_history"]
                refs.append((h[0], int(h[1]), int(h[2])))
            elif isinstance(v, (list, tuple)):
                for x in v:
                    walk(x)
        walk(node["args"])
        kwargs = {k: v for k, v in (node.get("kwargs") or {}).items() if not isinstance(v, (dict, list))}
    elif isinstance(node, list):
        for e in node:
            if not isinstance(e, list) or len(e) < 3:
                raise ModelLoadError(f"{where}: malformed inbound node entry {e!r}")
            refs.append((str(e[0]), int(e[1]), int(e[2])))
            if len(e) > 3 and isinstance(e[3], dict):
                kwargs.update({k: v for k, v in e[3].items() if not isinstance(v, (dict, list))})
    else:
        raise ModelLoadError(f"{where}: malformed inbound node {node!r}")
    kwargs.pop("training", None)
    kwargs.pop("mask", None)
    return refs, kwargs


# --- weights ----------------------------------------------------------------------------------------------------

def assign_weights(builder: Builder, weights: dict[str, np.ndarray]) -> list[str]:
    """Give every layer variable its manifest weight (by name, shape-checked); return notes."""
    used: set[str] = set()
    by_suffix: dict[str, list[str]] = {}
    for wname in weights:
        parts = wname.split("/")
        for k in range(1, len(parts)):
            by_suffix.setdefault("/".join(parts[k:]), []).append(wname)
    for lname, built in builder.leaves:
        layer = built.layer
        spec = LAYERS[built.class_name]
        for var in layer.weights:
            vname = var.name.split("/")[-1].split(":")[0]
            candidates = (f"{lname}/{alias}" for alias in spec.weight_aliases.get(vname, (vname,)))
            found = None
            tried = []
            for cand in candidates:
                tried.append(cand)
                if cand in weights:
                    found = cand
                    break
                nested = [w for w in by_suffix.get(cand, []) if w not in used]
                if len(nested) == 1:
                    found = nested[0]
                    break
            where = f"layer {lname!r} ({built.class_name}, {built.position})"
            if found is None:
                raise ModelLoadError(f"{where} needs weight {tried[0]!r}, which model.json's weightsManifest does not "
                                     f"list; the weights don't belong to this topology")
            arr = weights[found]
            want = tuple(int(d) for d in var.shape)
            if tuple(arr.shape) != want:
                raise ModelLoadError(f"weight {found!r} has shape {list(arr.shape)} but {where} expects "
                                     f"{list(want)}; the weights don't match the topology")
            target = np.dtype(var.dtype if isinstance(var.dtype, str) else np.float32)
            if target.kind == "f" and arr.dtype.kind in "iub":
                raise ModelLoadError(f"weight {found!r} is declared {arr.dtype} in weightsManifest, but {where} holds "
                                     f"float values there; the manifest's dtype is wrong (its bytes would be read as "
                                     f"integers): fix the dtype of {found!r} in model.json")
            var.assign(arr.astype(target))
            used.add(found)
    notes = []
    unused = [w for w in weights if w not in used]
    if unused:
        notes.append(f"{len(unused)} weight(s) in the manifest belong to no layer and were ignored: "
                     f"{', '.join(unused[:5])}{', ...' if len(unused) > 5 else ''}")
    return notes


def build_keras_model(topology: dict, weights: dict[str, np.ndarray]):
    """Return (keras.Model with the file's weights, notes)."""
    mc = model_config(topology)
    check_supported(mc)
    builder = Builder()
    model = builder.build_model(mc)
    notes = assign_weights(builder, weights)
    return model, notes




__all__ = ["LAYERS", "build_keras_model", "check_supported", "supported_layers", "model_config"]
