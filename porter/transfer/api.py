"""``porter.finetune``: cut a model's classifier off, train a new head on your data, ship one ONNX file.

source -> ONNX (converted with parity, or read) -> cut -> backbone -> features (cached) -> head (torch) ->
head ONNX at the backbone's opset -> merged model -> check (merged == backbone + head) -> model + report.
"""

from __future__ import annotations

import copy
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .. import __version__
from ..errors import UsageError, ValidationError
from ..spec import ModelCard, OutputFigures, ParityRecord, PartialTraining, PreprocessSpec, TrainingRecord
from .data import Dataset, load_data
from .features import Features, InputGeometry
from .inputs import batch_dim as batch_dim_of
from .inputs import input_geometry, resolve_preprocess, sample_inputs
from .metrics import (AugmentRecord, Chosen, CutCandidate, CutRecord, DataRecord, FeaturesRecord, FinetuneMetrics,
                      HeadTraining, MergeCheck, Scores, SkippedFile, Split, TasksMetrics)
from .options import FinetuneOptions
from .steps import featurize, load_source, logger, prefetch_imports, ray_connection

VALIDATION_ATOL = 1e-4
VALIDATION_RTOL = 1e-3


@dataclass
class FinetuneResult:
    model: Any  # onnx.ModelProto: backbone + head
    path: Path | None
    card: ModelCard
    metrics: FinetuneMetrics | TasksMetrics  # TasksMetrics: several targets (--task)
    report: dict[str, Path]  # metrics / curves / confusion -> path (empty when no output was given)
    seconds: float
    timings: dict[str, float]
    notes: list[str] = field(default_factory=list)
    features_cached: bool = False
    head: Any = field(default=None, repr=False)  # the trained head, unfolded: heads.LinearHead (the probe), else torch
    int8: Any = None  # --int8: the quantization.api.QuantizeResult (its model written as NAME.int8.onnx)
    int8_refusal: str | None = None  # --int8 asked for, but the gate refused it (the fp32 model is still written)

    @property
    def labels(self) -> tuple[str, ...]:
        return self.card.labels or ()

    @property
    def val_accuracy(self) -> float:
        return self.metrics.final.val_accuracy

    def summary(self) -> str:
        from .report import summary_text

        return summary_text(self.metrics, self.card.source, self.path, self.seconds, self.report, self.notes)


# --- the pipeline -----------------------------------------------------------------------------------------------

def finetune(source: Any, data: Any, output: str | os.PathLike | None = None, **options: Any) -> FinetuneResult:
    """Train a new classification head on ``data`` on top of ``source`` and return (and write) one ONNX model.

    ``source``: any source porter converts (reference string, path, nn.Module, keras.Model; converted with a
    parity check first), an ONNX file, or an ``onnx.ModelProto``. ``data``: a folder with one subfolder of
    images per class, a CSV file (feature columns + ``label_column``), or an ``(x, y)`` pair of arrays.
    ``output``: the ONNX file to write; the report goes beside it. Options: the fields of
    :class:`FinetuneOptions`. Raises a PorterError on any user mistake; nothing is written unless all succeeded.
    """
    start = time.perf_counter()
    opts = FinetuneOptions.from_kwargs(**options)
    with ray_connection(opts) as ray:
        return _finetune(source, data, output, opts, start, ray)


def _finetune(source: Any, data: Any, output: str | os.PathLike | None, opts: FinetuneOptions, start: float,
              ray: Any) -> FinetuneResult:
    from ..graph.inspect import opset_of
    from ..graph.cuts import Cut, plan_cuts
    from ..graph.inspect import format_shape
    from ..graph.surgery import extract_backbone, merge_head
    from ..outputs import check_output
    from .heads import head_to_onnx
    from .partial import partial_metrics
    from .int8 import int8_metrics, int8_path, quantize_finetuned
    from .report import classification_metrics, report_paths
    from .train import TrainConfig, stratified_split, train_head

    timings: dict[str, float] = {}
    log = logger(opts.progress)
    if isinstance(data, (str, os.PathLike)):
        from .tables import is_table, parse_tasks

        if is_table(Path(data).expanduser(), parse_tasks(opts.tasks), opts.path_column):
            from .multitask_run import finetune_tasks

            return finetune_tasks(source, Path(data).expanduser(), output, opts, start, ray)
    if opts.tasks:
        raise UsageError(f"--task needs a table (a CSV or JSON Lines file with one column per task), not "
                         f"{data if isinstance(data, (str, os.PathLike)) else type(data).__name__}")
    paths = report_paths(output, opts.partial) if output is not None else {}
    int8_out = int8_path(output) if output is not None and opts.int8 else None
    if output is not None:
        for p in [Path(output), *paths.values(), *([int8_out] if int8_out else [])]:
            check_output(p, opts.force)  # before any work

    prefetch_imports(report=output is not None, optimizer=opts.partial or opts.train_config.method == "adamw")
    t = time.perf_counter()
    dataset = load_data(data, label_column=opts.label_column, preprocessed=opts.preprocessed)
    timings["data"] = time.perf_counter() - t

    t = time.perf_counter()
    model, card, notes = load_source(source, opts)
    timings["load"] = time.perf_counter() - t
    geometry = input_geometry(model, opts, card)
    spec, note = resolve_preprocess(card, opts, geometry)
    if note:
        notes.append(note)
    if opts.ray is not None and dataset.kind == "vectors":
        notes.append("--ray: the data are vectors, not images; the backbone ran on them here")

    cut_mode = opts.cut
    if opts.partial and cut_mode in (None, "auto", "search"):
        cut_mode = "backbone"  # the tail is the layers before the backbone's cut; no cut search
        notes.append("partial fine-tuning: the head sits on the pooled backbone (no cut search); the tail before "
                     "it trains with the head")
    cuts = plan_cuts(model, cut_mode)
    notes += [c.note for c in cuts if c.note and c.kind != "user"]
    tail = None
    if opts.partial:
        from .partial import plan_tail

        tail = plan_tail(model, cuts[0], geometry, unfreeze=opts.unfreeze, train_from=opts.train_from)
        notes += list(tail.tail.notes)
    extract = cuts + ([tail.cut] if tail else [])

    t = time.perf_counter()
    if opts.progress:
        where = (f"cut at {cuts[0].describe()}" if len(cuts) == 1 else
                 f"choosing the cut on validation among {len(cuts)} candidates: " + ", ".join(c.name for c in cuts))
        log(f"porter: {len(dataset)} examples in {len(dataset.classes)} classes from {dataset.source}; {where}")
    by_cut = featurize(model, extract, dataset, geometry, spec, opts, ray)
    timings["features"] = time.perf_counter() - t
    first = by_cut[cuts[0].key]
    if all(f.cached for f in by_cut.values()):
        log(f"porter: features from cache ({first.cache_path})")
    if first.skipped:
        notes.append(f"skipped {len(first.skipped)} unreadable file(s): "
                     f"{', '.join(s[0] for s in first.skipped[:3])}{' ...' if len(first.skipped) > 3 else ''}")
    for c in cuts:
        width = by_cut[c.key].features.shape[1]
        if c.features is not None and width != c.features:
            raise UsageError(f"the cut tensor {c.name!r} gave {width} features but its shape says {c.features}")

    t = time.perf_counter()
    train_idx, val_idx = stratified_split(first.labels, dataset.classes, opts.val_split, opts.seed)
    by_view: dict[str, Features] = {}
    if opts.view_count:
        from .augment import augmented_views

        views = augmented_views(dataset, first.index[train_idx], opts.augment, opts.view_count, opts.seed)
        log(f"porter: {len(views)} augmented views ({', '.join(opts.augment)}) of {len(train_idx)} training images")
        t_views = time.perf_counter()
        by_view = featurize(model, extract, views, geometry, spec, opts, ray)
        timings["views"] = time.perf_counter() - t_views
    config = opts.train_config

    def fit(c: Cut, cfg: TrainConfig, verbose: bool):
        f = by_cut[c.key]
        x, y = f.features[train_idx], f.labels[train_idx]
        if c.key in by_view:  # the training split's augmented views train the head too
            x, y = np.concatenate([x, by_view[c.key].features]), np.concatenate([y, by_view[c.key].labels])
        return train_head(x, y, f.features[val_idx], f.labels[val_idx],
                          len(dataset.classes), cfg, log=log if opts.progress and verbose else None)

    cut, trained, search = _search_cuts(cuts, fit, config, first.labels[val_idx], log if opts.progress else None)
    if trained is None:
        trained = fit(cut, config, True)
    feats = by_cut[cut.key]
    timings["train"] = time.perf_counter() - t

    partial = None
    if tail is not None:
        t = time.perf_counter()
        from .heads import as_torch
        from .partial import run_partial

        # phase 2 starts from the probe fitted on train only, so its validation stays honest; the shipped head is
        # refit on train + validation afterwards, as head-only's is (refit_head)
        start_head = copy.deepcopy(as_torch(trained.train_only_head if trained.refit else trained.head))
        partial = run_partial(tail, start_head, cut, by_cut, by_view, train_idx, val_idx, lr=opts.tail_lr,
                              epochs=opts.finetune_epochs, patience=min(opts.patience, opts.finetune_epochs),
                              batch_size=opts.batch_size, seed=opts.seed, balance=opts.balance,
                              n_classes=len(dataset.classes), precision=opts.train_precision,
                              log=log if opts.progress else None)
        if partial.improved:
            from ..graph.tail import write_back

            model = write_back(model, partial.module.trained_weights())  # the graph as it was, new weights
        if trained.refit:
            from .partial import refit_head

            at_l2 = replace(config, weight_decay=trained.chosen["l2"])
            refit_head(partial, trained.head,
                       lambda xt, yt, xv, yv: train_head(xt, yt, xv, yv, len(dataset.classes), at_l2).head,
                       by_cut, by_view, tail, train_idx, val_idx)
        trained.head = partial.head  # refit, or (an AdamW head) as trained with the tail
        timings["finetune"] = time.perf_counter() - t

    t = time.perf_counter()
    backbone = extract_backbone(model, cut)
    batch_dim = batch_dim_of(backbone)
    head_model = head_to_onnx(trained.head, opset=opset_of(backbone), ir_version=backbone.ir_version,
                              batch_dim=batch_dim)
    merged = merge_head(backbone, head_model)
    if partial is None:
        from .heads import predict_proba

        check = _check_merged(merged, backbone, lambda f: predict_proba(trained.head, f), dataset, feats, geometry,
                              spec)
    else:  # merged == the torch tail + head on the tail's cached input, on held-out examples
        from .partial import Rows

        check = _check_merged(merged, extract_backbone(model, tail.cut),
                              lambda f: partial.net.probabilities(Rows([(f, np.arange(len(f)))])), dataset,
                              by_cut[tail.cut.key], geometry, spec, positions=val_idx)
        check = replace(check, what="merged model vs the tail's cached input -> torch tail + head (on validation "
                                    "examples)", translation_max_scaled_diff=partial.translation_diff)
    timings["merge"] = time.perf_counter() - t

    y_val = feats.labels[val_idx]
    val_prob = partial.val_probabilities if partial is not None else trained.val_probabilities
    val_metrics = classification_metrics(y_val, val_prob.argmax(1), dataset.classes)
    if partial is None:
        final = Scores(loss=trained.loss, accuracy=trained.accuracy, val_loss=trained.val_loss,
                       val_accuracy=val_metrics["accuracy"], epoch=trained.best_epoch)
    else:
        final = Scores(loss=partial.final["loss"], accuracy=partial.final["accuracy"],
                       val_loss=partial.final["val_loss"], val_accuracy=val_metrics["accuracy"],
                       epoch=trained.best_epoch)
    if len(cuts) > 1:
        choice = f"chosen on validation among {len(cuts)} candidates" + (" (--cut search)" if opts.cut == "search" else "")
    elif opts.cut not in (None, "auto"):
        choice = f"--cut {opts.cut}"
    else:
        choice = "the pooled backbone (the only candidate within the search budget)"
    metrics = FinetuneMetrics(
        porter_version=__version__, source=card.source,
        data=DataRecord(dataset.source, dataset.kind, len(dataset), dataset.counts(),
                        tuple(SkippedFile(n, e) for n, e in feats.skipped), dataset.ignored[:100],
                        len(dataset.ignored)),
        labels=list(dataset.classes),
        examples=Split(int(len(train_idx)), int(len(val_idx))),
        cut=CutRecord(cut.name, format_shape(cut.shape), cut.reason, list(cut.pool_axes) if cut.pool_axes else None,
                      int(feats.features.shape[1]), kind=cut.kind, choice=choice),
        cut_search=search,
        partial=partial_metrics(tail, partial, opts.view_count) if tail is not None else None,
        augment=AugmentRecord(list(opts.augment), opts.view_count, int(len(next(iter(by_view.values())).index)),
                              round(timings["views"], 4)) if by_view else None,
        preprocess=spec,
        features=FeaturesRecord(feats.cached, feats.cache_path, int(len(feats.index)), round(feats.seconds, 4),
                                round(feats.per_second, 1) if not feats.cached else None,
                                feats.device if not feats.cached else None, feats.providers,
                                sum(1 for f in by_cut.values() if not f.cached)),
        training=HeadTraining(
            head=opts.head, method=trained.method, chosen=Chosen.of(trained.chosen),
            refit_on_train_and_val=trained.refit, hidden=opts.hidden if opts.head == "mlp" else None,
            dropout=opts.head_dropout, epochs=opts.epochs, epochs_run=trained.epochs_run,
            best_epoch=trained.best_epoch, stopped_early=trained.stopped_early, patience=opts.patience,
            batch_size=opts.batch_size, lr=opts.lr, weight_decay=opts.weight_decay, balance=opts.balance,
            class_weights=trained.class_weights, val_split=opts.val_split, seed=opts.seed,
            seconds=round(trained.seconds, 4)),
        regularization=trained.curve if trained.method == "lbfgs" else [],
        grid=trained.curve if trained.method == "adamw" else [],
        history={k: [round(float(v), 6) for v in vals] for k, vals in trained.history.items()},
        final=final,
        validation=val_metrics,
        check=check,
        timings={k: round(v, 4) for k, v in timings.items()},
        notes=notes,
    )

    new_card = _card(card, dataset, spec, cut.name, metrics, source)
    new_card.apply_to(merged)
    merged.producer_name, merged.producer_version = "porter", __version__
    int8 = refusal = None
    if opts.int8:
        t = time.perf_counter()
        int8, refusal = quantize_finetuned(merged, dataset, first.index[train_idx], first.index[val_idx],
                                           opts.max_drop, opts.seed, log)
        timings["int8"] = time.perf_counter() - t
        metrics = replace(metrics, int8=int8_metrics(int8, refusal, int8_out if int8 is not None else None))
    metrics = replace(metrics, seconds=round(time.perf_counter() - start, 4))

    path = None
    if output is not None:
        extra = {int8_out: int8.model} if int8 is not None and int8_out is not None else {}
        path = _write(merged, Path(output), paths, metrics, dataset.classes, trained, opts.force, extra)
    result = FinetuneResult(merged, path, new_card, metrics, paths, time.perf_counter() - start, timings, notes,
                            feats.cached, trained.head, int8, refusal)
    if int8 is not None:
        int8.output = int8_out
    return result


# --- steps ------------------------------------------------------------------------------------------------------

def _search_cuts(cuts, fit, config, y_val, log) -> tuple[Any, Any, tuple[CutCandidate, ...]]:
    """(chosen cut, its trained head when the probe is the final head too, the search table).

    Every candidate gets the linear probe (deterministic, its L2 chosen on validation); the backbone (the first)
    is kept unless another cut is better by more than one standard error (``pick_by_validation``).
    """
    if len(cuts) == 1:
        return cuts[0], None, ()
    from .train import pick_by_validation

    # an AdamW config's lr and weight decay mean nothing to the probe: it chooses its own L2
    probe = config if config.method == "lbfgs" else replace(config, head="linear", lr=None, weight_decay=None)
    fits = [fit(c, probe, False) for c in cuts]
    best, errors = pick_by_validation(fits, y_val)
    table = []
    for i, (c, r) in enumerate(zip(cuts, fits)):
        width = int(r.head.mean.shape[0])
        table.append(CutCandidate(c.name, c.kind, width, bool(c.pool_axes), round(r.val_loss, 6),
                                  round(errors[i], 6), round(r.val_accuracy, 6), r.chosen.get("l2"), i == best))
        if log:
            log(f"porter: cut {c.name} ({c.kind}, {width} features): val_loss {r.val_loss:.4f}, "
                f"val_acc {r.val_accuracy:.4f}{'  <- chosen' if i == best else ''}")
    return cuts[best], fits[best] if probe is config else None, tuple(table)


def _check_merged(merged, backbone, reference, dataset: Dataset, feats: Features, g: InputGeometry,
                  spec: PreprocessSpec | None, positions: np.ndarray | None = None) -> MergeCheck:
    """The merged model's outputs == ``reference`` (torch: features -> probabilities) on the features ``backbone``
    computes, on real examples; and those features == the cached ``feats`` training used."""
    from ..graph.validate import difference
    from ..runtime.predictor import Predictor

    x, pos = sample_inputs(dataset, feats, g, spec, positions)

    def run(model) -> list[np.ndarray]:
        p = Predictor(model, device="cpu", scores="raw", cache=False, spin=False)
        out = p.run_batched(x)
        return [out[name] for name in p.output_names]

    (fresh,) = run(backbone)
    prob, label = run(merged)
    want = reference(np.asarray(fresh, np.float32))
    d = difference(prob, want)
    diff, rel = d.max_abs, d.max_rel
    # within tolerance: every |diff| <= atol + rtol * |want| (this ratio <= 1); "scaled" is the README's figure
    tolerance_ratio = float((np.abs(prob - want) / (VALIDATION_ATOL + VALIDATION_RTOL * np.abs(want))).max())
    agree = float(np.mean(prob.argmax(1) == want.argmax(1)))
    cache_diff = float(np.abs(fresh - feats.features[pos]).max())
    scale = float(np.abs(feats.features[pos]).max()) or 1.0
    problems = []
    if not np.isfinite(tolerance_ratio) or tolerance_ratio > 1.0:
        problems.append(f"probabilities differ by up to {diff:.3g} (atol {VALIDATION_ATOL}, rtol {VALIDATION_RTOL})")
    if not np.array_equal(label, prob.argmax(1)):
        problems.append("label is not the argmax of probabilities")
    if cache_diff > 2e-2 * max(1.0, scale):  # loose: GPU extraction (TF32 convs) differs from CPU by ~1e-3
        problems.append(f"the features used for training differ from the backbone's by up to {cache_diff:.3g} "
                        f"(a stale feature cache? rerun with cache=False)")
    if problems:
        raise ValidationError("the merged model does not compute backbone + head: " + "; ".join(problems))
    return MergeCheck(what="merged model vs backbone features -> head (on training examples)", examples=int(len(x)),
                      max_abs_diff=diff, max_rel_diff=rel, scaled=d.scaled, tolerance_ratio=tolerance_ratio,
                      label_agreement=agree, atol=VALIDATION_ATOL, rtol=VALIDATION_RTOL,
                      cached_feature_max_abs_diff=cache_diff, passed=True)


def _card(card: ModelCard, dataset: Dataset, spec, cut: str, metrics: FinetuneMetrics, source: Any) -> ModelCard:
    provenance = dict(card.provenance)
    provenance["finetuned_from"] = str(source) if isinstance(source, (str, os.PathLike)) else card.source
    if card.labels:
        provenance["original_classes"] = str(len(card.labels))
    t, final, p, a, check = metrics.training, metrics.final, metrics.partial, metrics.augment, metrics.check
    training = TrainingRecord(
        examples=metrics.examples.to_dict(), seed=t.seed, data=dataset.source, head=t.head, method=t.method,
        l2=t.chosen.l2, lr=t.chosen.lr, weight_decay=t.chosen.weight_decay,
        best_epoch=t.best_epoch, epochs_run=t.epochs_run, val_accuracy=final.val_accuracy,
        val_loss=round(final.val_loss, 6), train_accuracy=round(final.accuracy, 6),
        class_counts=metrics.data.class_counts, features=metrics.cut.features,
        skipped=len(metrics.data.skipped), source_parity=card.parity,
        partial=PartialTraining(p.start, len(p.layers), p.lr, p.best_epoch, p.kept,
                                p.head_only.val_accuracy) if p else None,
        augment=tuple(a.ops) if a else (), views=a.views if a else None)
    parity = ParityRecord(True, {"probabilities": OutputFigures(check.max_abs_diff, check.max_rel_diff,
                                                               check.scaled, check.label_agreement)},
                          check.atol, check.rtol, (check.examples,), t.seed, check=check.what)
    return card.with_(labels=tuple(dataset.classes), preprocess=spec, cut=cut, training=training,
                      parity=parity, provenance=provenance, porter_version=__version__)


def _write(model, output: Path, paths: dict[str, Path], metrics: FinetuneMetrics, classes: Sequence[str], trained,
           force: bool, models: dict[Path, Any] | None = None) -> Path:
    """The model, its report and ``models`` (other ONNX files beside it: the int8 copy), all or nothing."""
    from ..outputs import save_onnx_with_files
    from .report import confusion_png, curves_png, metrics_json, regularization_png

    title = f"{output.name}: val acc {metrics.final.val_accuracy:.4f}"
    blobs = {
        paths["metrics"]: metrics_json(metrics),
        paths["curves"]: (curves_png(trained.history, trained.best_epoch, title) if trained.method == "adamw" else
                          regularization_png(trained.curve, trained.chosen["l2"], metrics.cut_search, title)),
        paths["confusion"]: confusion_png(metrics.validation["confusion_matrix"], classes,
                                          f"validation confusion matrix ({metrics.examples.val} examples)"),
    }
    if "finetune" in paths:
        p = metrics.partial
        blobs[paths["finetune"]] = curves_png(p.history, p.best_epoch, f"{output.name}: partial fine-tuning of "
                                              f"{len(p.layers)} layers (epoch 0: the head alone)", first_epoch=0)
    blobs.update({p: m.SerializeToString() for p, m in (models or {}).items()})
    return save_onnx_with_files(model, output, blobs, force)
