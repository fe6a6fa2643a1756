"""What a fine-tuning run measured, typed: ``FinetuneResult.metrics`` and the report's ``NAME.metrics.json``.

One head on classes gives a :class:`FinetuneMetrics`, several targets (``--task``) a :class:`TasksMetrics`. The
sections code reads by field are records; open-ended tables (curves, per-epoch histories, per-class figures and
confusion matrices, per-output checks) stay lists and dicts. ``to_dict`` is the JSON porter has always written, key
for key and in the same order. Metrics are produced in-process and nothing reads ``metrics.json`` back, so there is
no ``from_dict``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..spec import PreprocessSpec


def _present(**values: Any) -> dict[str, Any]:
    """The values that are not None, in the order given."""
    return {k: v for k, v in values.items() if v is not None}


# --- sections both shapes share ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Split:
    """Examples (rows, for several targets) in the training and validation splits."""

    train: int
    val: int

    def to_dict(self) -> dict[str, Any]:
        return {"train": self.train, "val": self.val}


@dataclass(frozen=True)
class SkippedFile:
    """An unreadable file left out, and why."""

    file: str
    error: str

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.file, "error": self.error}


@dataclass(frozen=True)
class CutRecord:
    """Where the head attaches: the tensor, its shape, why it was chosen, its pooling and width."""

    tensor: str
    shape: str
    reason: str
    pooled: list[int] | None  # the axes average-pooled to make features, or None
    features: int
    kind: str | None = None  # one head: the cut's kind (backbone, block, user ...); None (not written) for tasks
    choice: str | None = None  # one head: how the cut was chosen; None (not written) for tasks

    def to_dict(self) -> dict[str, Any]:
        return {"tensor": self.tensor, "shape": self.shape, **_present(kind=self.kind), "reason": self.reason,
                "pooled": self.pooled, "features": self.features, **_present(choice=self.choice)}


@dataclass(frozen=True)
class Chosen:
    """The settings chosen on validation: ``l2`` (the linear probe), ``lr`` and ``weight_decay`` (AdamW),
    ``alpha`` (a task's ridge), ``hidden`` and ``weight`` (a task on a shared trunk). Unset ones are not written."""

    l2: float | None = None
    lr: float | None = None
    weight_decay: float | None = None
    alpha: float | None = None
    hidden: int | None = None
    weight: float | None = None

    @classmethod
    def of(cls, chosen: dict[str, Any]) -> "Chosen":
        return cls(**chosen)

    def to_dict(self) -> dict[str, Any]:
        return _present(l2=self.l2, lr=self.lr, weight_decay=self.weight_decay, alpha=self.alpha,
                        hidden=self.hidden, weight=self.weight)


# --- one head on classes -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DataRecord:
    source: str
    kind: str  # images | pixels | vectors
    examples: int
    class_counts: dict[str, int]
    skipped: tuple[SkippedFile, ...]
    ignored_files: list[str]  # the first 100 files that are not images
    ignored_count: int

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "kind": self.kind, "examples": self.examples,
                "class_counts": self.class_counts, "skipped": [s.to_dict() for s in self.skipped],
                "ignored_files": self.ignored_files, "ignored_count": self.ignored_count}


@dataclass(frozen=True)
class CutCandidate:
    """One row of the cut search: the linear probe on this cut's features, scored on validation."""

    tensor: str
    kind: str
    features: int
    pooled: bool
    val_loss: float
    val_loss_se_vs_first: float  # the standard error of its loss difference to the first candidate (the backbone)
    val_accuracy: float
    l2: float | None
    chosen: bool

    def to_dict(self) -> dict[str, Any]:
        return {"tensor": self.tensor, "kind": self.kind, "features": self.features, "pooled": self.pooled,
                "val_loss": self.val_loss, "val_loss_se_vs_first": self.val_loss_se_vs_first,
                "val_accuracy": self.val_accuracy, "l2": self.l2, "chosen": self.chosen}


@dataclass(frozen=True)
class Scores:
    """Loss and accuracy on validation, and on training where known; ``epoch``: the kept epoch of an AdamW head."""

    val_loss: float
    val_accuracy: float
    loss: float | None = None
    accuracy: float | None = None
    epoch: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {**_present(loss=self.loss, accuracy=self.accuracy), "val_loss": self.val_loss,
                "val_accuracy": self.val_accuracy, **_present(epoch=self.epoch)}


@dataclass(frozen=True)
class TailLayer:
    """A weight-carrying layer of the trained tail."""

    node: str
    op: str
    weights: list[str]
    parameters: int

    def to_dict(self) -> dict[str, Any]:
        return {"node": self.node, "op": self.op, "weights": self.weights, "parameters": self.parameters}


@dataclass(frozen=True)
class PartialRecord:
    """Partial fine-tuning (``--unfreeze`` / ``--train-from``): the tail, its training and both phases' scores."""

    start: str  # the tensor the trained tail starts at
    start_shape: list[int]
    end: str
    requested: int | None  # --unfreeze N
    layers: tuple[TailLayer, ...]
    trainable_parameters: int
    frozen_parameters: int
    frozen_constants: int
    notes: list[str]
    lr: float
    precision: str
    epochs_run: int
    best_epoch: int  # 0: the head alone
    stopped_early: bool
    improved: bool
    kept: str  # "partial" or "head-only"
    head_refit: bool  # the probe refit on train + validation on the kept tail's features
    gain_within_noise: bool
    head_only: Scores  # epoch 0, rounded
    partial: Scores  # the kept epoch, rounded
    translation_max_scaled_diff: float
    augmented_views: int
    history: dict[str, list[float]]  # per epoch, epoch 0 first
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {"start": self.start, "start_shape": self.start_shape, "end": self.end, "requested": self.requested,
                "layers": [layer.to_dict() for layer in self.layers],
                "trainable_parameters": self.trainable_parameters, "frozen_parameters": self.frozen_parameters,
                "frozen_constants": self.frozen_constants, "notes": self.notes, "lr": self.lr,
                "precision": self.precision, "epochs_run": self.epochs_run, "best_epoch": self.best_epoch,
                "stopped_early": self.stopped_early, "improved": self.improved, "kept": self.kept,
                "head_refit": self.head_refit, "gain_within_noise": self.gain_within_noise,
                "head_only": self.head_only.to_dict(), "partial": self.partial.to_dict(),
                "translation_max_scaled_diff": self.translation_max_scaled_diff,
                "augmented_views": self.augmented_views, "history": self.history, "seconds": self.seconds}


@dataclass(frozen=True)
class AugmentRecord:
    ops: list[str]
    views: int  # per training image
    examples: int  # views featurized
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {"ops": self.ops, "views": self.views, "examples": self.examples, "seconds": self.seconds}


@dataclass(frozen=True)
class FeaturesRecord:
    """The backbone pass: cached or computed, how fast, where."""

    cached: bool
    cache: str | None
    examples: int
    seconds: float
    per_second: float | None  # None when cached
    device: str | None  # None when cached
    providers: list[str] | None
    cuts_extracted: int

    def to_dict(self) -> dict[str, Any]:
        return {"cached": self.cached, "cache": self.cache, "examples": self.examples, "seconds": self.seconds,
                "per_second": self.per_second, "device": self.device, "providers": self.providers,
                "cuts_extracted": self.cuts_extracted}


@dataclass(frozen=True)
class HeadTraining:
    """The head's training: the options it ran with and what it chose."""

    head: str
    method: str  # lbfgs | adamw
    chosen: Chosen
    refit_on_train_and_val: bool
    hidden: int | None  # --head mlp
    dropout: float | None
    epochs: int
    epochs_run: int | None  # adamw
    best_epoch: int | None
    stopped_early: bool | None
    patience: int
    batch_size: int
    lr: float | None
    weight_decay: float | None
    balance: bool
    class_weights: list[float] | None
    val_split: float
    seed: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {"head": self.head, "method": self.method, "chosen": self.chosen.to_dict(),
                "refit_on_train_and_val": self.refit_on_train_and_val, "hidden": self.hidden,
                "dropout": self.dropout, "epochs": self.epochs, "epochs_run": self.epochs_run,
                "best_epoch": self.best_epoch, "stopped_early": self.stopped_early, "patience": self.patience,
                "batch_size": self.batch_size, "lr": self.lr, "weight_decay": self.weight_decay,
                "balance": self.balance, "class_weights": self.class_weights, "val_split": self.val_split,
                "seed": self.seed, "seconds": self.seconds}


@dataclass(frozen=True)
class MergeCheck:
    """The merged model against its parts: backbone + head (or, with partial fine-tuning, torch tail + head)."""

    what: str
    examples: int
    max_abs_diff: float
    max_rel_diff: float
    scaled: float
    tolerance_ratio: float  # max |diff| / (atol + rtol |reference|): within tolerance when <= 1
    label_agreement: float
    atol: float
    rtol: float
    cached_feature_max_abs_diff: float
    passed: bool
    translation_max_scaled_diff: float | None = None  # partial: the torch tail vs ONNX Runtime

    def to_dict(self) -> dict[str, Any]:
        return {"what": self.what, "examples": self.examples, "max_abs_diff": self.max_abs_diff,
                "max_rel_diff": self.max_rel_diff, "scaled": self.scaled, "tolerance_ratio": self.tolerance_ratio,
                "label_agreement": self.label_agreement, "atol": self.atol, "rtol": self.rtol,
                "cached_feature_max_abs_diff": self.cached_feature_max_abs_diff, "passed": self.passed,
                **_present(translation_max_scaled_diff=self.translation_max_scaled_diff)}


@dataclass(frozen=True)
class Int8Record:
    """``--int8``: the quantized copy written, or why the gate refused it (``refused``; nothing else is set)."""

    written: bool
    refused: str | None = None
    path: str | None = None
    method: str | None = None
    samples: int | None = None
    excluded: list[str] | None = None  # nodes kept in float
    rounds: int | None = None
    gate: dict[str, Any] | None = None  # the gate's figures as quantization writes them (Agreement.to_dict)
    val_accuracy_fp32: float | None = None
    val_accuracy_int8: float | None = None

    def to_dict(self) -> dict[str, Any]:
        if self.refused is not None:
            return {"written": self.written, "refused": self.refused}
        return {"written": self.written, "path": self.path, "method": self.method, "samples": self.samples,
                "excluded": self.excluded, "rounds": self.rounds, "gate": self.gate,
                "val_accuracy_fp32": self.val_accuracy_fp32, "val_accuracy_int8": self.val_accuracy_int8}


@dataclass(frozen=True)
class FinetuneMetrics:
    """One head on classes."""

    porter_version: str
    source: str | None
    data: DataRecord
    labels: list[str]
    examples: Split
    cut: CutRecord
    cut_search: tuple[CutCandidate, ...]  # empty with one candidate
    partial: PartialRecord | None
    augment: AugmentRecord | None
    preprocess: PreprocessSpec | None
    features: FeaturesRecord
    training: HeadTraining
    regularization: list[dict[str, Any]]  # the probe: its curve over L2 strengths
    grid: list[dict[str, Any]]  # AdamW: a row per (lr, weight decay) tried
    history: dict[str, list[float]]  # AdamW: per epoch of the chosen run
    final: Scores
    validation: dict[str, Any]  # accuracy, per-class figures, confusion matrix (report.classification_metrics)
    check: MergeCheck
    timings: dict[str, float]
    notes: list[str]
    int8: Int8Record | None = None  # --int8 only (not written otherwise)
    seconds: float | None = None  # the whole run, set when it ends

    def to_dict(self) -> dict[str, Any]:
        d = {"porter_version": self.porter_version, "source": self.source, "data": self.data.to_dict(),
             "labels": self.labels, "examples": self.examples.to_dict(), "cut": self.cut.to_dict(),
             "cut_search": [c.to_dict() for c in self.cut_search],
             "partial": self.partial.to_dict() if self.partial else None,
             "augment": self.augment.to_dict() if self.augment else None,
             "preprocess": self.preprocess.to_dict() if self.preprocess else None,
             "features": self.features.to_dict(), "training": self.training.to_dict(),
             "regularization": self.regularization, "grid": self.grid, "history": self.history,
             "final": self.final.to_dict(), "validation": self.validation, "check": self.check.to_dict(),
             "timings": self.timings, "notes": self.notes}
        if self.int8 is not None:
            d["int8"] = self.int8.to_dict()
        d["seconds"] = self.seconds
        return d


# --- several targets ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TableData:
    source: str
    kind: str  # images | vectors
    examples: int
    skipped: tuple[SkippedFile, ...]
    unlabelled_rows: list[str]  # the first 100 rows with no label for any task
    unlabelled_count: int

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "kind": self.kind, "examples": self.examples,
                "skipped": [s.to_dict() for s in self.skipped], "unlabelled_rows": self.unlabelled_rows,
                "unlabelled_count": self.unlabelled_count}


@dataclass(frozen=True)
class TableFeatures:
    cached: bool
    cache: str | None
    examples: int
    seconds: float
    device: str | None  # None when cached

    def to_dict(self) -> dict[str, Any]:
        return {"cached": self.cached, "cache": self.cache, "examples": self.examples, "seconds": self.seconds,
                "device": self.device}


@dataclass(frozen=True)
class TaskMetrics:
    """One task: what it is, its rows, what was chosen, its curve and validation figures, its outputs."""

    name: str
    type: str  # classification | regression
    inferred: bool  # its type inferred from the column
    classes: list[str] | None
    train_rows: int
    val_rows: int
    labelled: int
    chosen: Chosen
    curve: list[dict[str, Any]]  # the probe's L2 or the ridge's alpha curve; empty on a shared trunk
    validation: dict[str, Any]  # classification: accuracy, per-class, confusion matrix, loss; regression: mae...
    outputs: list[str]
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "type": self.type, "inferred": self.inferred, "classes": self.classes,
                "train_rows": self.train_rows, "val_rows": self.val_rows, "labelled": self.labelled,
                "chosen": self.chosen.to_dict(), "curve": self.curve, "validation": self.validation,
                "outputs": self.outputs, "seconds": self.seconds}


@dataclass(frozen=True)
class JointTraining:
    """``--shared-hidden``: the joint training of the trunk and every task's layer."""

    hidden: int
    lr: float
    weights: dict[str, float]  # each task's weight in the joint loss
    initial_losses: list[float]
    best_epoch: int
    epochs_run: int
    history: dict[str, Any]  # loss, val_loss per epoch; tasks: each task's validation figures per epoch
    task_best: dict[str, dict[str, Any]]  # each task's own best epoch and its figures there and at the kept one
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {"hidden": self.hidden, "lr": self.lr, "weights": self.weights, "initial_losses": self.initial_losses,
                "best_epoch": self.best_epoch, "epochs_run": self.epochs_run, "history": self.history,
                "task_best": self.task_best, "seconds": self.seconds}


@dataclass(frozen=True)
class TasksCheck:
    """The merged model against the heads computed separately, output by output."""

    examples: int
    atol: float
    rtol: float
    outputs: dict[str, dict[str, Any]]  # output -> {"max_abs": ...} (scores, values) or {"equal": ...} (labels)
    passed: bool

    def to_dict(self) -> dict[str, Any]:
        return {"examples": self.examples, "atol": self.atol, "rtol": self.rtol, "outputs": self.outputs,
                "passed": self.passed}


@dataclass(frozen=True)
class TasksMetrics:
    """Several targets (``--task``) on one backbone."""

    porter_version: str
    source: str | None
    data: TableData
    examples: Split
    cut: CutRecord
    preprocess: PreprocessSpec | None
    features: TableFeatures
    tasks: tuple[TaskMetrics, ...]
    shared_trunk: JointTraining | None
    check: TasksCheck
    timings: dict[str, float]
    notes: list[str]
    seed: int
    val_split: float
    seconds: float | None = None  # the whole run, set when it ends

    def to_dict(self) -> dict[str, Any]:
        return {"porter_version": self.porter_version, "source": self.source, "data": self.data.to_dict(),
                "examples": self.examples.to_dict(), "cut": self.cut.to_dict(),
                "preprocess": self.preprocess.to_dict() if self.preprocess else None,
                "features": self.features.to_dict(), "tasks": [t.to_dict() for t in self.tasks],
                "shared_trunk": self.shared_trunk.to_dict() if self.shared_trunk else None,
                "check": self.check.to_dict(), "timings": self.timings, "notes": self.notes, "seed": self.seed,
                "val_split": self.val_split, "seconds": self.seconds}
