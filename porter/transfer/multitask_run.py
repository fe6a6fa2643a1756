"""``porter.finetune`` on a table of several targets: read the table, one backbone pass, the heads of
``multitask.py``, one ONNX checked output by output, the report and the summary."""

from __future__ import annotations

import math
import re
import time
from dataclasses import replace
from typing import Any, Sequence

import numpy as np

from ..spec import ParityRecord, TaskTraining, TrainingRecord
from .metrics import (Chosen, CutRecord, SkippedFile, Split, TableData, TableFeatures, TaskMetrics, TasksCheck,
                      TasksMetrics)
from .multitask import TaskResult, card_tasks, fit_joint, fit_tasks, heads_to_onnx, output_names, reference_outputs
from .tables import Task

CHECK_ATOL, CHECK_RTOL = 1e-4, 1e-3


def report_paths(output, tasks: Sequence[Task], shared: bool = False) -> dict[str, Any]:
    """The report beside ``output``: metrics, a training curve per task (its L2 / ridge strength curve), a
    confusion matrix per classification task; with a shared trunk, the joint training's loss curves instead of
    the per-task strength curves."""
    from pathlib import Path

    out = Path(output)
    stem = out.name[: -len(out.suffix)] if out.suffix else out.name
    paths = {"metrics": out.with_name(f"{stem}.metrics.json")}
    used: set[str] = set()
    for k, t in enumerate(tasks):
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", t.name)
        if safe in used or safe == "shared":  # two names that sanitize alike ("a b", "a_b") get their position
            safe = f"{safe}-{k + 1}"
        used.add(safe)
        if not shared:
            paths[f"training/{t.name}"] = out.with_name(f"{stem}.{safe}.training.png")
        if t.type == "classification":
            paths[f"confusion/{t.name}"] = out.with_name(f"{stem}.{safe}.confusion.png")
    if shared:
        paths["training/shared"] = out.with_name(f"{stem}.shared.training.png")
    return paths


def finetune_tasks(source: Any, table, output, opts, start: float, ray: Any = None):
    """``porter.finetune`` on a table of several targets: one backbone pass, a head per task, one ONNX."""
    from pathlib import Path

    from .. import __version__
    from ..errors import UsageError, ValidationError
    from ..graph.cuts import plan_cuts
    from ..graph.inspect import format_shape, opset_of
    from ..graph.surgery import extract_backbone, merge_head
    from ..outputs import check_output, save_onnx_with_files
    from ..runtime.predictor import Predictor
    from .api import FinetuneResult
    from .steps import featurize, load_source, logger, prefetch_imports
    from .inputs import batch_dim, input_geometry, resolve_preprocess, sample_inputs
    from .report import confusion_png, metrics_json, regularization_png, series_png
    from .tables import load_table, parse_tasks, task_split

    if opts.int8:
        raise UsageError("--int8 quantizes single-task models; quantize a multi-task model with porter quantize "
                         "MODEL --calibrate IMAGES (its gate then bounds the outputs' relative error)")
    if opts.partial or opts.augment:
        raise UsageError("--unfreeze, --train-from and --augment train one task; give one label column (or an image "
                         "folder) to use them")
    if opts.head != "linear" or (opts.lr is not None and not opts.shared_hidden):
        raise UsageError("several tasks train linear heads solved to their optimum (the probe, ridge), or a shared "
                         "trunk (--shared-hidden N, whose AdamW takes --lr); --head mlp is a single-task option")
    log = logger(opts.progress)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    dataset, tasks = load_table(Path(table), parse_tasks(opts.tasks), opts.path_column)
    timings["data"] = time.perf_counter() - t0
    weights = parse_task_weights(opts.task_weights, tasks)  # checked before any work
    if weights and not opts.shared_hidden:
        raise UsageError("--task-weight weights the joint loss of --shared-hidden; without it every task's head is "
                         "solved on its own")
    paths = report_paths(output, tasks, bool(opts.shared_hidden)) if output is not None else {}
    if output is not None:
        for p in [Path(output), *paths.values()]:
            check_output(p, opts.force)
    stochastic = bool(opts.shared_hidden) or opts.train_config.method == "adamw"  # else every head is the probe
    prefetch_imports(report=output is not None, optimizer=stochastic)
    t0 = time.perf_counter()
    model, card, notes = load_source(source, opts)
    timings["load"] = time.perf_counter() - t0
    geometry = input_geometry(model, opts, card)
    spec, note = resolve_preprocess(card, opts, geometry)
    if note:
        notes.append(note)
    cut = plan_cuts(model, "backbone" if opts.cut in (None, "auto", "search") else opts.cut)[0]
    if cut.note and cut.kind != "user":
        notes.append(cut.note)
    inferred = [t.describe() for t in tasks]
    log(f"porter: {len(dataset)} examples, {len(tasks)} tasks ({'; '.join(inferred)}) from {dataset.source}; "
        f"cut at {cut.describe()}")
    if dataset.ignored:
        notes.append(f"skipped {len(dataset.ignored)} row(s) with no label for any task: "
                     f"{', '.join(dataset.ignored[:5])}{' ...' if len(dataset.ignored) > 5 else ''}")
    t0 = time.perf_counter()
    feats = featurize(model, [cut], dataset, geometry, spec, opts, ray)[cut.key]
    timings["features"] = time.perf_counter() - t0
    if feats.skipped:
        notes.append(f"skipped {len(feats.skipped)} unreadable file(s): "
                     f"{', '.join(s[0] for s in feats.skipped[:3])}{' ...' if len(feats.skipped) > 3 else ''}")
    rows = feats.index
    t0 = time.perf_counter()
    train_idx, val_idx = task_split(tasks, rows, opts.val_split, opts.seed)
    x = np.asarray(feats.features, np.float32)
    trunk, joint = None, None
    if opts.shared_hidden:
        trunk, results, joint = fit_joint(x, rows, tasks, train_idx, val_idx, hidden=opts.shared_hidden,
                                          weights=weights, epochs=opts.epochs, patience=opts.patience,
                                          batch_size=opts.batch_size, seed=opts.seed, dropout=opts.dropout or 0.0,
                                          lr=opts.lr or 1e-3,
                                          log=log if opts.progress else None)
    else:
        config = opts.train_config  # each classification task: the linear probe with these settings
        results = fit_tasks(x, rows, tasks, train_idx, val_idx, config, log if opts.progress else None)
    timings["train"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    backbone = extract_backbone(model, cut)
    head = heads_to_onnx(results, opset=opset_of(backbone), ir_version=backbone.ir_version,
                         batch_dim=batch_dim(backbone), in_features=x.shape[1], trunk=trunk)
    merged = merge_head(backbone, head)
    sample, pos = sample_inputs(dataset, feats, geometry, spec, val_idx)

    def run(m) -> dict[str, np.ndarray]:
        return Predictor(m, device="cpu", scores="raw", cache=False, spin=False).run_batched(sample)

    fresh = run(backbone)["porter/features"]
    want = reference_outputs(results, np.asarray(fresh, np.float32), trunk)
    got = run(merged)
    outputs: dict[str, dict[str, Any]] = {}  # output -> its figures
    problems = []
    for name, w in want.items():
        g = np.asarray(got[name])
        if name.endswith("/label"):
            ok = np.array_equal(g, w)
            outputs[name] = {"equal": bool(ok)}
        else:
            diff = float(np.abs(g - w).max(initial=0.0))
            ok = bool(np.all(np.abs(g - w) <= CHECK_ATOL + CHECK_RTOL * np.abs(w)))
            outputs[name] = {"max_abs": diff}
        if not ok:
            problems.append(name)
    cached_diff = float(np.abs(np.asarray(fresh) - x[pos]).max(initial=0.0))
    if cached_diff > 2e-2 * max(1.0, float(np.abs(x[pos]).max(initial=0.0))):
        problems.append(f"the cached features (they differ from the backbone's by {cached_diff:.3g}; rerun with "
                        f"cache=False)")
    if problems:
        raise ValidationError(f"the merged model does not compute backbone + heads for {', '.join(problems)}")
    check = TasksCheck(int(len(sample)), CHECK_ATOL, CHECK_RTOL, outputs, True)
    timings["merge"] = time.perf_counter() - t0

    metrics = TasksMetrics(
        porter_version=__version__, source=card.source,
        data=TableData(dataset.source, dataset.kind, len(dataset), tuple(SkippedFile(n, e) for n, e in feats.skipped),
                       dataset.ignored[:100], len(dataset.ignored)),
        examples=Split(int(len(train_idx)), int(len(val_idx))),
        cut=CutRecord(cut.name, format_shape(cut.shape), cut.reason, list(cut.pool_axes) if cut.pool_axes else None,
                      int(x.shape[1])),
        preprocess=spec,
        features=TableFeatures(feats.cached, feats.cache_path, int(len(feats.index)), round(feats.seconds, 4),
                               feats.device if not feats.cached else None),
        tasks=tuple(TaskMetrics(r.task.name, r.task.type, r.task.inferred, list(r.task.classes) or None, r.train_rows,
                                r.val_rows, int(r.task.labelled.sum()), Chosen.of(r.chosen), r.curve, r.validation,
                                output_names(r.task), round(r.seconds, 4)) for r in results),
        shared_trunk=joint, check=check, timings={k: round(v, 4) for k, v in timings.items()}, notes=notes,
        seed=opts.seed, val_split=opts.val_split,
    )
    new_card = card.with_(labels=None, preprocess=spec, cut=cut.name, tasks=card_tasks(results),
                          training=TrainingRecord(
                              tasks=tuple(_task_training(r) for r in results),
                              examples=metrics.examples.to_dict(), seed=opts.seed, data=dataset.source),
                          parity=ParityRecord.from_dict({
                              "check": "merged model vs backbone features -> heads (on validation examples)",
                              "passed": True, "atol": CHECK_ATOL, "rtol": CHECK_RTOL,
                              "batch_sizes": [int(len(sample))], "outputs": check.outputs}),
                          porter_version=__version__)
    new_card.apply_to(merged)
    merged.producer_name, merged.producer_version = "porter", __version__
    metrics = replace(metrics, seconds=round(time.perf_counter() - start, 4))
    path = None
    if output is not None:
        blobs = {paths["metrics"]: metrics_json(metrics)}
        for r in results:
            name = r.task.name
            if r.task.type == "classification":
                blobs[paths[f"confusion/{name}"]] = confusion_png(
                    r.validation["confusion_matrix"], r.task.classes, f"{name}: validation confusion matrix")
            if joint:  # every task trained at once: its figures sit in the shared curve
                continue
            if r.task.type == "classification":
                blobs[paths[f"training/{name}"]] = regularization_png(r.curve, r.chosen["l2"], (),
                                                                      f"{name}: linear probe")
            else:
                blobs[paths[f"training/{name}"]] = series_png(
                    [c["alpha"] for c in r.curve], {"train RMSE": [c["train_rmse"] for c in r.curve],
                                                    "validation RMSE": [c["val_rmse"] for c in r.curve]},
                    xlabel="ridge strength (x rows)", mark=r.chosen["alpha"], log_x=True, title=f"{name}: ridge")
        if joint:
            h = joint.history
            series = {"train (weighted)": h["loss"], "validation (weighted)": h["val_loss"]}
            series.update({f"{name} validation loss": [math.nan if v is None else v for v in t["val_loss"]]
                           for name, t in h["tasks"].items()})
            blobs[paths["training/shared"]] = series_png(
                range(1, len(h["loss"]) + 1), series,
                xlabel="epoch", mark=joint.best_epoch, title=f"shared trunk ({joint.hidden} units)")
        path = save_onnx_with_files(merged, output, blobs, opts.force)
    return FinetuneResult(merged, path, new_card, metrics, paths, time.perf_counter() - start, timings, notes,
                          feats.cached, [r.head for r in results])


def parse_task_weights(values: Sequence[str] | dict | None, tasks: Sequence[Task]) -> dict[str, float]:
    """``["age=2", "pose=0.5"]`` (or a dict) -> {task: weight}; unknown tasks and bad numbers refused."""
    from ..errors import UsageError

    if not values:
        return {}
    items = values.items() if isinstance(values, dict) else [str(v).partition("=")[::2] for v in values]
    names = {t.name for t in tasks}
    out = {}
    for name, w in items:
        if name not in names:
            raise UsageError(f"--task-weight {name}=...: no task {name!r} (tasks: {', '.join(sorted(names))})")
        try:
            out[name] = float(w)
        except (TypeError, ValueError):
            raise UsageError(f"--task-weight {name}={w}: the weight must be a number") from None
        if not out[name] >= 0 or out[name] == float("inf"):
            raise UsageError(f"--task-weight {name}={w}: the weight must be 0 or more")
    return out


def tasks_summary(m: TasksMetrics, source: str, path, seconds: float, report: dict, notes: Sequence[str]) -> str:
    where = f" -> {path}" if path else ""
    ex = m.examples
    lines = [f"fine-tuned {source} on {m.data.source}: {len(m.tasks)} tasks, {ex.train} train / "
             f"{ex.val} val rows{where} in {seconds:.1f} s",
             f"  cut: {m.cut.tensor} {m.cut.shape}, {m.cut.features} features ({m.cut.reason})"]
    f = m.features
    lines.append(f"  features: from cache ({f.cache})" if f.cached else
                 f"  features: {f.examples} examples in {f.seconds:.2f} s ({f.device})")
    j = m.shared_trunk
    if j:
        lines.append(f"  shared trunk: {j.hidden} hidden units, trained jointly (AdamW), best epoch "
                     f"{j.best_epoch}/{j.epochs_run}; task weights "
                     + ", ".join(f"{k} {v:.3g}" for k, v in j.weights.items()))
    for t in m.tasks:
        how = "inferred" if t.inferred else "given"
        v = t.validation
        if j:
            fig = (f"val_acc {v['accuracy']:.4f}, val_loss {v['loss']:.4f}" if t.type == "classification" else
                   f"val R² {v['r2']:.4f}, MAE {v['mae']:.4g}, RMSE {v['rmse']:.4g}")
            own = j.task_best[t.name]
            key, label = ("val_accuracy", "val_acc") if t.type == "classification" else ("val_r2", "val R²")
            if own["epoch"] is not None and own[key] is not None:
                fig += (f" at the kept epoch; its own best epoch {own['epoch']}: val_loss {own['val_loss']:.4f}, "
                        f"{label} {own[key]:.4f}")
        elif t.type == "classification":
            fig = (f"{len(t.classes)} classes; linear probe L2 {t.chosen.l2:.3g}; val_acc {v['accuracy']:.4f}, "
                   f"val_loss {v['loss']:.4f}")
        else:
            fig = f"ridge alpha {t.chosen.alpha:.3g}; val R² {v['r2']:.4f}, MAE {v['mae']:.4g}, RMSE {v['rmse']:.4g}"
        lines.append(f"  task {t.name} ({t.type}, {how}): {t.train_rows} train / {t.val_rows} val "
                     f"labelled rows; {fig}")
    c = m.check
    lines.append(f"  check: merged model == backbone + heads on {c.examples} validation examples "
                 f"({len(c.outputs)} outputs)")
    if report:
        lines.append("  report: " + ", ".join(str(p) for p in report.values()))
    lines += [f"  note: {n}" for n in notes]
    return "\n".join(lines)


def _task_training(r: TaskResult) -> TaskTraining:
    """A task's line in the card's training record: what was chosen on validation, and its headline scores."""
    v = r.validation
    return TaskTraining(r.task.name, r.task.type, l2=r.chosen.get("l2"), alpha=r.chosen.get("alpha"),
                        hidden=r.chosen.get("hidden"), weight=r.chosen.get("weight"), accuracy=v.get("accuracy"),
                        mae=v.get("mae"), rmse=v.get("rmse"), r2=v.get("r2"))
