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
class PartialTraining:
    """Partial fine-tuning's figures in a training record (its ``partial_*`` keys)."""

    start: str | None = None  # the tensor the trained tail starts at
    layers: int | None = None  # the weight-carrying layers it trained
    lr: float | None = None
    best_epoch: int | None = None
    kept: str | None = None  # "partial" (the tail beat the head alone on validation) or "head-only"
    head_only_val_accuracy: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"partial_start": self.start, "partial_layers": self.layers, "partial_lr": self.lr,
                "partial_best_epoch": self.best_epoch, "partial_kept": self.kept,
                "head_only_val_accuracy": self.head_only_val_accuracy}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PartialTraining | None":
        """The ``partial_*`` keys of a training record's JSON, or None when it has none."""
        if not any(key in d for key in cls().to_dict()):
            return None
        kept = d.get("partial_kept")
        return cls(_text(d.get("partial_start")), _count(d.get("partial_layers"), least=1),
                   _within(d.get("partial_lr")), _count(d.get("partial_best_epoch")),  # 0: the head alone was kept
                   kept if kept in ("partial", "head-only") else None,
                   _within(d.get("head_only_val_accuracy"), 0.0, 1.0))


@dataclass(frozen=True)
class TaskTraining:
    """One task's figures in a multi-task training record: the strength chosen on validation and its scores."""

    name: str
    type: str  # classification | regression
    # chosen: a head of its own -> l2 (the linear probe) or alpha (the ridge); a shared trunk -> hidden and weight
    l2: float | None = None
    alpha: float | None = None
    hidden: int | None = None  # the shared layer's units
    weight: float | None = None  # this task's weight in the joint loss
    accuracy: float | None = None  # classification
    mae: float | None = None  # regression, in the target's units
    rmse: float | None = None
    r2: float | None = None

    def to_dict(self) -> dict[str, Any]:
        figures = {"l2": self.l2, "alpha": self.alpha, "hidden": self.hidden, "weight": self.weight,
                   "accuracy": self.accuracy, "mae": self.mae, "rmse": self.rmse, "r2": self.r2}
        return {"name": self.name, "type": self.type, **{k: v for k, v in figures.items() if v is not None}}

    @classmethod
    def from_dict(cls, d: Any) -> "TaskTraining | None":
        if not isinstance(d, dict) or not isinstance(d.get("name"), str) or d.get("type") not in (
                "classification", "regression"):
            return None
        return cls(d["name"], d["type"], l2=_within(d.get("l2")), alpha=_within(d.get("alpha")),
                   hidden=_count(d.get("hidden"), least=1), weight=_within(d.get("weight")),
                   accuracy=_within(d.get("accuracy"), 0.0, 1.0), mae=_within(d.get("mae")),
                   rmse=_within(d.get("rmse")), r2=_within(d.get("r2"), -math.inf, 1.0))


@dataclass(frozen=True)
class TrainingRecord:
    """What ``porter finetune`` records about the training (``porter.training``): one head trained on classes, or
    (``tasks``) the heads of a multi-task model. ``to_dict`` is the JSON porter has always written there, so files
    from older versions read the same; read from metadata defensively (untrusted input): a missing, wrongly typed or
    impossible value reads as absent."""

    examples: dict[str, int] = field(default_factory=dict)  # {"train": n, "val": n}
    seed: int | None = None  # never negative: numpy refuses negative seeds
    data: str | None = None  # where the data came from
    # one head on classes
    head: str | None = None  # transfer.options.HEADS
    method: str | None = None  # lbfgs | adamw
    l2: float | None = None  # lbfgs: the L2 strength chosen on validation
    lr: float | None = None  # adamw: the learning rate and weight decay chosen on validation
    weight_decay: float | None = None
    best_epoch: int | None = None  # adamw, 1-based
    epochs_run: int | None = None
    val_accuracy: float | None = None
    val_loss: float | None = None
    train_accuracy: float | None = None
    class_counts: dict[str, int] = field(default_factory=dict)
    features: int | None = None  # the width of the features at the cut
    skipped: int | None = None  # unreadable files left out
    source_parity: ParityRecord | None = None  # the conversion's check, when the source was converted first
    partial: PartialTraining | None = None  # partial fine-tuning (--unfreeze / --train-from)
    augment: tuple[str, ...] = ()  # the augmentations whose views trained the head
    views: int | None = None  # augmented views per training image
    # several targets (--task): each task's figures; the fields above for one head stay None
    tasks: tuple[TaskTraining, ...] | None = None

    def to_dict(self) -> dict[str, Any]:
        if self.tasks is not None:
            return {"tasks": [t.to_dict() for t in self.tasks], "examples": dict(self.examples), "seed": self.seed,
                    "data": self.data}
        chosen = {"l2": self.l2, "lr": self.lr, "weight_decay": self.weight_decay}
        d: dict[str, Any] = {
            "head": self.head, "method": self.method, **{k: v for k, v in chosen.items() if v is not None},
            "best_epoch": self.best_epoch, "epochs_run": self.epochs_run, "val_accuracy": self.val_accuracy,
            "val_loss": self.val_loss, "train_accuracy": self.train_accuracy, "examples": dict(self.examples),
            "class_counts": dict(self.class_counts), "features": self.features, "seed": self.seed, "data": self.data,
            "skipped": self.skipped, "source_parity": self.source_parity.to_dict() if self.source_parity else None}
        if self.partial is not None:
            d.update(self.partial.to_dict())
        if self.augment:
            d.update(augment=",".join(self.augment), views=self.views)
        return d

    @classmethod
    def from_dict(cls, d: Any) -> "TrainingRecord | None":
        """The record in ``d`` (``to_dict``'s shape), or None when ``d`` is not a JSON object."""
        if not isinstance(d, dict):
            return None
        tasks, augment = d.get("tasks"), d.get("augment")
        return cls(
            examples=_counts(d.get("examples")), seed=_count(d.get("seed")), data=_text(d.get("data")),
            head=_text(d.get("head")), method=d["method"] if d.get("method") in ("lbfgs", "adamw") else None,
            l2=_within(d.get("l2")), lr=_within(d.get("lr")), weight_decay=_within(d.get("weight_decay")),
            best_epoch=_count(d.get("best_epoch"), least=1), epochs_run=_count(d.get("epochs_run"), least=1),
            val_accuracy=_within(d.get("val_accuracy"), 0.0, 1.0), val_loss=_within(d.get("val_loss")),
            train_accuracy=_within(d.get("train_accuracy"), 0.0, 1.0),
            class_counts=_counts(d.get("class_counts")), features=_count(d.get("features"), least=1),
            skipped=_count(d.get("skipped")), source_parity=ParityRecord.from_dict(d.get("source_parity")),
            partial=PartialTraining.from_dict(d),
            augment=tuple(augment.split(",")) if isinstance(augment, str) and augment else (),
            views=_count(d.get("views"), least=1),
            tasks=tuple(t for t in map(TaskTraining.from_dict, tasks) if t is not None) if isinstance(tasks, list)
            else None)


@dataclass(frozen=True)
class ModelCard:
    """What porter records about a model, serialized under ``porter.*`` in ONNX ``metadata_props``.

    ``provenance`` holds importer-specific facts (exporter used, TF.js format, generatedBy ...) as
    string pairs; ``training`` holds fine-tuning figures (a TrainingRecord); ``cut`` the tensor a fine-tuned head is
    attached to.
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
    training: TrainingRecord | None = None
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
            m["porter.training"] = json.dumps(self.training.to_dict(), sort_keys=True)
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
            training=TrainingRecord.from_dict(_json_dict(props.get("porter.training"))),
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


def _within(v: Any, low: float = 0.0, high: float = math.inf) -> float | None:
    """A finite JSON number in [low, high] as a float, or None (a figure no training produces reads as absent)."""
    f = _finite_float(v)
    return f if f is not None and low <= f <= high else None


def _count(v: Any, least: int = 0) -> int | None:
    """A JSON integer of at least ``least`` (not a bool), or None."""
    return v if isinstance(v, int) and not isinstance(v, bool) and v >= least else None


def _counts(v: Any) -> dict[str, int]:
    """A JSON object of counts (examples per split, per class); entries that aren't a count are left out."""
    return {str(k): n for k, n in v.items() if _count(n) is not None} if isinstance(v, dict) else {}


def _text(v: Any) -> str | None:
    return v if isinstance(v, str) else None


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
