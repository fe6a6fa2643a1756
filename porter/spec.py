"""Typed metadata that travels inside the ONNX file: preprocessing and the model card.

Everything porter knows about a model is stored under ``porter.*`` keys in ``metadata_props`` so that a
deployed model carries its own labels and normalization. ``ModelCard.from_onnx`` reads it back; nothing else
in porter parses those keys.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Sequence

from .errors import UsageError

METADATA_PREFIX = "porter."

# name -> (channel_order, scale, mean, std): x = (pixels[0..255] in channel_order * scale - mean) / std
PRESETS: dict[str, tuple[str, float, tuple[float, ...], tuple[float, ...]]] = {
    "raw": ("RGB", 1.0, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
    "unit": ("RGB", 1.0 / 255.0, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
    "tf": ("RGB", 1.0 / 127.5, (1.0, 1.0, 1.0), (1.0, 1.0, 1.0)),
    "torch": ("RGB", 1.0 / 255.0, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "caffe": ("BGR", 1.0, (103.939, 116.779, 123.68), (1.0, 1.0, 1.0)),
}


@dataclass(frozen=True)
class PreprocessSpec:
    """How raw 0..255 pixels become the model's input tensor.

    ``x = (pixels_in_channel_order * scale - mean) / std``, resized to ``size`` (H, W) and laid out as
    ``layout`` (NHWC or NCHW). ``mode`` names the preset the values came from ("custom" when overridden).
    """

    mode: str = "raw"
    layout: str = "NHWC"
    size: tuple[int, int] | None = None
    channels: int | None = 3
    channel_order: str = "RGB"
    scale: float = 1.0
    mean: tuple[float, ...] = (0.0, 0.0, 0.0)
    std: tuple[float, ...] = (1.0, 1.0, 1.0)

    def __post_init__(self) -> None:
        # sequences given as lists become tuples: the spec is a value (hashable, comparable, safe to share)
        for name, kind in (("mean", float), ("std", float), ("size", int)):
            value = getattr(self, name)
            if value is None and name == "size":
                continue
            try:
                object.__setattr__(self, name, tuple(kind(v) for v in value))
            except (TypeError, ValueError):
                raise UsageError(f"preprocessing {name} must be a sequence of numbers, got {value!r}") from None
        if self.layout not in ("NHWC", "NCHW"):
            raise UsageError(f"preprocessing layout must be NHWC or NCHW, got {self.layout!r}")
        if self.channel_order not in ("RGB", "BGR"):
            raise UsageError(f"channel order must be RGB or BGR, got {self.channel_order!r}")
        if any(s == 0 for s in self.std):
            raise UsageError(f"preprocessing std must not contain 0, got {list(self.std)}")

    @classmethod
    def preset(cls, mode: str, *, layout: str = "NHWC", size: Sequence[int] | None = None,
               channels: int | None = 3, mean: Sequence[float] | None = None,
               std: Sequence[float] | None = None) -> "PreprocessSpec":
        if mode not in PRESETS:
            raise UsageError(f"unknown preprocessing {mode!r}; choose one of: {', '.join(PRESETS)}")
        order, scale, pmean, pstd = PRESETS[mode]
        custom = mean is not None or std is not None
        n = channels or 3
        return cls(
            mode="custom" if custom else mode,
            layout=layout,
            size=tuple(int(s) for s in size) if size else None,
            channels=channels,
            channel_order=order,
            scale=scale,
            mean=_per_channel(mean if mean is not None else pmean, n, "mean"),
            std=_per_channel(std if std is not None else pstd, n, "std"),
        )

    def with_(self, **changes: Any) -> "PreprocessSpec":
        return replace(self, **changes)

    @classmethod
    def resolve(cls, known: "PreprocessSpec | None", *, mode: str | None = None, mean: Sequence[float] | None = None,
                std: Sequence[float] | None = None, layout: str = "NHWC", size: Sequence[int] | None = None,
                channels: int | None = 3) -> "PreprocessSpec | None":
        """The one rule for the preprocessing convert, finetune and predict use: what the model records
        (``known``) unless ``--preprocess`` / ``--mean`` / ``--std`` override it, on the given input geometry.

        No override: ``known`` (None when the model records none). A mode: that preset, ``mean``/``std``
        replacing its own. Only ``mean``/``std``: they replace ``known``'s (a custom spec stays custom; no known
        spec starts from ``raw``)."""
        geo = dict(layout=layout, size=tuple(size) if size else None, channels=channels)
        if mode is None and mean is None and std is None:
            return known.with_(**geo) if known is not None else None
        if mode is None and known is not None and known.mode not in PRESETS:
            base = cls.preset("raw", channels=channels or 3, mean=mean or known.mean, std=std or known.std)
            return known.with_(mode="custom", mean=base.mean, std=base.std, **geo)
        mode = mode or (known.mode if known is not None and known.mode in PRESETS else "raw")
        return cls.preset(mode, mean=mean, std=std, **geo)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["size"] = list(self.size) if self.size else None
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PreprocessSpec":
        return cls(
            mode=d.get("mode", "custom"),
            layout=d.get("layout", "NHWC"),
            size=tuple(d["size"]) if d.get("size") else None,
            channels=d.get("channels"),
            channel_order=d.get("channel_order", "RGB"),
            scale=float(d.get("scale", 1.0)),
            mean=tuple(float(v) for v in d.get("mean", (0.0,))),
            std=tuple(float(v) for v in d.get("std", (1.0,))),
        )

    def describe(self) -> str:
        size = "x".join(map(str, self.size)) if self.size else "any size"
        return (f"{self.mode} ({self.layout}, {size}, {self.channels or '?'}ch {self.channel_order}, "
                f"x*{self.scale:.6g} - {_fmt(self.mean)} / {_fmt(self.std)})")


def _per_channel(values: Sequence[float], n: int, what: str) -> tuple[float, ...]:
    vals = tuple(float(v) for v in values)
    if len(vals) == 1:
        return vals * n
    if len(vals) == 3 and n == 1:  # a grey model fed the RGB preset: average the channel stats
        return (sum(vals) / 3.0,)
    if len(vals) != n:
        raise UsageError(f"--{what} needs 1 or {n} values (one per channel), got {len(vals)}")
    return vals


def _fmt(values: Sequence[float]) -> str:
    return "[" + ", ".join(f"{v:.6g}" for v in values) + "]"


@dataclass(frozen=True)
class OutputFigures:
    """One output's figures in a parity record: the worst over the batch sizes checked."""

    max_abs: float = 0.0
    max_rel: float = 0.0
    scaled: float = 0.0  # max_abs / max(1, max |reference|): the headline figure
    top1_agreement: float | None = None  # (batch, classes) outputs
    equal: bool | None = None  # integer outputs (labels) compared exactly

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"max_abs": self.max_abs, "max_rel": self.max_rel, "scaled": self.scaled}
        if self.top1_agreement is not None:
            d["top1_agreement"] = self.top1_agreement
        if self.equal is not None:
            d["equal"] = self.equal
        return d


@dataclass(frozen=True)
class ParityRecord:
    """A parity check as a model card records it (``porter.parity``): source vs ONNX after ``porter convert``
    (graph.validate.ParityReport.to_record), or the merged model vs its parts after ``porter finetune`` (``check``
    says what was compared). Read from metadata defensively: metadata is untrusted input."""

    passed: bool
    outputs: dict[str, OutputFigures] = field(default_factory=dict)
    atol: float | None = None
    rtol: float | None = None
    batch_sizes: tuple[int, ...] = ()
    seed: int | None = None
    check: str | None = None

    @property
    def max_scaled(self) -> float:
        return max((o.scaled for o in self.outputs.values()), default=0.0)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"passed": self.passed, "atol": self.atol, "rtol": self.rtol,
                             "batch_sizes": list(self.batch_sizes), "seed": self.seed,
                             "outputs": {k: v.to_dict() for k, v in self.outputs.items()}}
        if self.check is not None:
            d["check"] = self.check
        return d

    @classmethod
    def from_dict(cls, d: Any) -> "ParityRecord | None":
        """The record in ``d`` (``to_dict``'s shape), or None when it isn't one."""
        if not isinstance(d, dict) or not isinstance(d.get("passed"), bool):
            return None

        number = _finite_float
        outputs = {}
        for name, o in (d.get("outputs") or {}).items() if isinstance(d.get("outputs"), dict) else ():
            if isinstance(o, dict):
                outputs[str(name)] = OutputFigures(number(o.get("max_abs")) or 0.0, number(o.get("max_rel")) or 0.0,
                                                   number(o.get("scaled")) or 0.0, number(o.get("top1_agreement")),
                                                   o["equal"] if isinstance(o.get("equal"), bool) else None)
        sizes = d.get("batch_sizes")
        sizes = tuple(int(b) for b in sizes if isinstance(b, int)) if isinstance(sizes, list) else ()
        seed = d.get("seed")
        return cls(d["passed"], outputs, number(d.get("atol")), number(d.get("rtol")), sizes,
                   seed if isinstance(seed, int) and not isinstance(seed, bool) else None,
                   str(d["check"]) if d.get("check") is not None else None)


@dataclass(frozen=True)
class ModelCard:
    """What porter records about a model, serialized under ``porter.*`` in ONNX ``metadata_props``.

    ``provenance`` holds importer-specific facts (exporter used, TF.js format, generatedBy ...) as
    string pairs; ``training`` holds fine-tuning figures; ``cut`` the tensor a fine-tuned head is attached to.
    """

    source: str
    framework: str
    porter_version: str
    framework_versions: dict[str, str] = field(default_factory=dict)
    preprocess: PreprocessSpec | None = None
    labels: tuple[str, ...] | None = None
    parity: ParityRecord | None = None
    provenance: dict[str, str] = field(default_factory=dict)
    cut: str | None = None
    training: dict[str, Any] | None = None
    batch: dict[str, Any] | None = None  # graph.batch.BatchPlan.to_dict(): dynamic / freed / fixed at a size
    source_form: str | None = None  # sources.SourceRef.form: "object" / "module" = an in-memory model
    weights: str | None = None  # the named pretrained weights the source was built with (keras.applications)
    source_sha256: str | None = None  # sources.source_digest at conversion: a rebuild can tell the file was replaced
    # multi-task heads: [{"name", "type": classification|regression, "labels": [...] | "mean"/"std" (the target's
    # units), "outputs": [...]}]; None for single-task models (``labels`` then names the classes)
    tasks: tuple[dict[str, Any], ...] | None = None
    # porter quantize: how the int8 model was made (method, samples, nodes kept in float) and its measured gate
    quantization: dict[str, Any] | None = None

    @property
    def in_memory(self) -> bool:
        """Converted from a Python object (keras.Model, nn.Module): nothing on disk or a hub rebuilds it."""
        return self.source_form in ("object", "module")

    def with_(self, **changes: Any) -> "ModelCard":
        return replace(self, **changes)

    def to_metadata(self) -> dict[str, str]:
        m = {
            "porter.version": self.porter_version,
            "porter.source": self.source,
            "porter.framework": self.framework,
            "porter.framework_versions": json.dumps(self.framework_versions, sort_keys=True),
            "porter.preprocess": json.dumps(self.preprocess.to_dict()) if self.preprocess else "unknown",
        }
        if self.labels is not None:
            m["porter.labels"] = json.dumps(list(self.labels))
        if self.parity is not None:
            m["porter.parity"] = json.dumps(self.parity.to_dict(), sort_keys=True)
        if self.provenance:
            m["porter.provenance"] = json.dumps(self.provenance, sort_keys=True)
        if self.cut is not None:
            m["porter.cut"] = self.cut
        if self.training is not None:
            m["porter.training"] = json.dumps(self.training, sort_keys=True)
        if self.batch is not None:
            m["porter.batch"] = json.dumps(self.batch, sort_keys=True)
        if self.source_form is not None:
            m["porter.source_form"] = self.source_form
        if self.weights is not None:
            m["porter.weights"] = self.weights
        if self.source_sha256 is not None:
            m["porter.source_sha256"] = self.source_sha256
        if self.tasks is not None:
            m["porter.tasks"] = json.dumps(list(self.tasks), sort_keys=True)
        if self.quantization is not None:
            m["porter.quantization"] = json.dumps(self.quantization, sort_keys=True)
        return m

    @classmethod
    def from_metadata(cls, props: dict[str, str]) -> "ModelCard | None":
        if "porter.source" not in props:
            return None
        # every field is untrusted input (a model file someone sent): malformed JSON or a wrong type reads as absent
        return cls(
            source=str(props["porter.source"]),
            framework=props.get("porter.framework", "unknown"),
            porter_version=props.get("porter.version", "unknown"),
            framework_versions=_str_dict(_json_value(props.get("porter.framework_versions"))),
            preprocess=_preprocess(props.get("porter.preprocess")),
            labels=_labels(_json_value(props.get("porter.labels"))),
            parity=ParityRecord.from_dict(_json_dict(props.get("porter.parity"))),
            provenance=_str_dict(_json_value(props.get("porter.provenance"))),
            cut=props.get("porter.cut"),
            training=_json_dict(props.get("porter.training")),
            batch=_batch(_json_dict(props.get("porter.batch"))),
            source_form=props.get("porter.source_form"),
            weights=props.get("porter.weights"),
            source_sha256=props.get("porter.source_sha256"),
            tasks=_tasks(props["porter.tasks"]) if "porter.tasks" in props else None,
            quantization=_json_dict(props.get("porter.quantization")),
        )

    @classmethod
    def from_onnx(cls, model) -> "ModelCard | None":
        return cls.from_metadata({p.key: p.value for p in model.metadata_props})

    def apply_to(self, model) -> None:
        """Replace every porter.* entry of ``model.metadata_props`` with this card; keep the others."""
        keep = [(p.key, p.value) for p in model.metadata_props if not p.key.startswith(METADATA_PREFIX)]
        del model.metadata_props[:]
        for key, value in keep + sorted(self.to_metadata().items()):
            entry = model.metadata_props.add()
            entry.key, entry.value = key, value


def _json_value(text: str | None) -> Any:
    """JSON from metadata (untrusted): None when absent or malformed (too deep included), not a crash."""
    if text is None:
        return None
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return None


def _json_dict(text: str | None) -> dict[str, Any] | None:
    """A JSON object from metadata (untrusted): anything else is None, not a crash."""
    value = _json_value(text)
    return value if isinstance(value, dict) else None


def _str_dict(value: Any) -> dict[str, str]:
    return {str(k): str(v) for k, v in value.items()} if isinstance(value, dict) else {}


def _labels(value: Any) -> tuple[str, ...] | None:
    return tuple(str(v) for v in value) if isinstance(value, list) else None


def _finite_float(v: Any) -> float | None:
    """A JSON number as a finite float, or None (not a number, inf/nan, or an integer too large for a float)."""
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        return None
    try:
        f = float(v)
    except OverflowError:
        return None
    return f if math.isfinite(f) else None


def _finite(v: Any) -> bool:
    return _finite_float(v) is not None


def _preprocess(text: str | None) -> "PreprocessSpec | None":
    """The recorded preprocessing, or None (unknown) unless every field is what porter writes: sizes, channels and
    statistics a model file made up would otherwise reach the image pipeline."""
    d = _json_dict(text) if text not in (None, "unknown") else None
    if d is None:
        return None
    size, channels = d.get("size"), d.get("channels")
    stats = [d.get("mean", [0.0]), d.get("std", [1.0])]
    if not (isinstance(d.get("mode", "custom"), str) and d.get("layout", "NHWC") in ("NHWC", "NCHW")
            and d.get("channel_order", "RGB") in ("RGB", "BGR") and _finite(d.get("scale", 1.0))
            and (size is None or (isinstance(size, list) and len(size) == 2
                                  and all(isinstance(v, int) and not isinstance(v, bool) and 0 < v <= 65535
                                          for v in size)))
            and (channels is None or channels in (1, 3, 4))
            and all(isinstance(v, list) and len(v) in (1, 3) and all(_finite(x) for x in v) for v in stats)
            and all(float(x) != 0 for x in stats[1])):
        return None
    return PreprocessSpec.from_dict(d)


def _batch(d: dict[str, Any] | None) -> dict[str, Any] | None:
    """graph.batch.BatchPlan's record, or None when it isn't one."""
    if d is None or d.get("mode") not in ("dynamic", "freed", "fixed"):
        return None
    if not (d.get("size") is None or (isinstance(d.get("size"), int) and not isinstance(d.get("size"), bool))):
        return None
    return d if isinstance(d.get("rewrites", 0), int) and isinstance(d.get("reason", ""), str) else None


def _tasks(text: str) -> tuple[dict[str, Any], ...] | None:
    """``porter.tasks`` read defensively (metadata is untrusted): malformed entries make it None, not a crash."""
    raw = _json_value(text)
    if not isinstance(raw, list):
        return None
    tasks = []
    for t in raw:
        if not isinstance(t, dict) or not isinstance(t.get("name"), str) or t.get("type") not in (
                "classification", "regression"):
            return None
        if t["type"] == "classification" and not (isinstance(t.get("labels"), list)
                                                  and all(isinstance(l, str) for l in t["labels"])):
            return None
        tasks.append(t)
    return tuple(tasks)
