"""The fine-tuning report: metrics, a training-curve plot and a confusion-matrix plot.

Files sit beside the model and share its stem: ``NAME.onnx`` gets ``NAME.metrics.json``,
``NAME.training.png`` and ``NAME.confusion.png``. Everything is rendered to bytes first (matplotlib's Agg
canvas, no pyplot global state) and written atomically by the caller, so a failure leaves nothing behind.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .metrics import CutCandidate, FinetuneMetrics, TasksMetrics


def report_paths(output: str | Path, partial: bool = False) -> dict[str, Path]:
    """The report files beside ``output``; with partial fine-tuning, its curves too (``NAME.finetune.png``)."""
    out = Path(output)
    stem = out.name[: -len(out.suffix)] if out.suffix else out.name
    paths = {"metrics": out.with_name(f"{stem}.metrics.json"), "curves": out.with_name(f"{stem}.training.png"),
             "confusion": out.with_name(f"{stem}.confusion.png")}
    if partial:
        paths["finetune"] = out.with_name(f"{stem}.finetune.png")
    return paths


def summary_text(metrics: FinetuneMetrics | TasksMetrics, source: str, path: Path | None, seconds: float,
                 report: dict[str, Path], notes: Sequence[str]) -> str:
    """What ``porter finetune`` prints: one line per step, the figures from ``metrics``."""
    if isinstance(metrics, TasksMetrics):
        from .multitask_run import tasks_summary

        return tasks_summary(metrics, source, path, seconds, report, notes)
    m = metrics
    where = f" -> {path}" if path else ""
    ex = m.examples
    lines = [f"fine-tuned {source} on {m.data.source}: {len(m.labels)} classes, "
             f"{ex.train} train / {ex.val} val examples{where} in {seconds:.1f} s"]
    cut = m.cut
    pooled = ", average-pooled" if cut.pooled else ""
    lines.append(f"  cut: {cut.tensor} {cut.shape}{pooled}, {cut.features} features ({cut.reason})")
    if m.cut_search:
        lines.append(f"  cut {cut.choice} (linear probe; another cut replaces the backbone only if its "
                     f"validation loss is lower by more than one standard error):")
        for row in m.cut_search:
            mark = "  <- chosen" if row.chosen else ""
            lines.append(f"    {row.kind:<10} {row.features:>6}  val_loss {row.val_loss:.4f}  "
                         f"val_acc {row.val_accuracy:.4f}  {row.tensor}{mark}")
    f = m.features
    if f.cached:
        lines.append(f"  features: from cache ({f.cache})")
    else:
        lines.append(f"  features: {f.examples} examples in {f.seconds:.2f} s "
                     f"({f.per_second:,.0f}/s, {f.device})")
    t = m.training
    final = m.final
    shown = m.partial.head_only if m.partial else final  # the head's own scores, before the tail trains
    scores = f"val_loss {shown.val_loss:.4f}, val_acc {shown.val_accuracy:.4f}"
    if t.method == "lbfgs":
        grid = m.regularization
        how = "given" if t.weight_decay is not None else f"chosen on validation over {len(grid)} strengths"
        refit = ", refit on train + validation" if t.refit_on_train_and_val else ""
        lines.append(f"  head: linear probe (L-BFGS logistic regression), L2 {t.chosen.l2:.3g} {how}"
                     f"{refit}; {scores}")
    else:
        stop = "early stop" if t.stopped_early else "all epochs"
        tried = f" (best of {len(m.grid)} settings)" if len(m.grid) > 1 else ""
        lines.append(f"  head: {t.head}, AdamW lr {t.chosen.lr:g} weight decay "
                     f"{t.chosen.weight_decay:g}{tried}, best epoch {t.best_epoch}/{t.epochs_run} "
                     f"({stop}); {scores}")
    if m.augment:
        a = m.augment
        lines.append(f"  augment: {a.views} view{'s' if a.views != 1 else ''} ({', '.join(a.ops)}) of "
                     f"each training image, {a.examples} featurized in {a.seconds:.2f} s")
    if m.partial:
        p = m.partial
        h, f = p.head_only, p.partial
        lines.append(f"  tail: {len(p.layers)} layer{'s' if len(p.layers) != 1 else ''} from {p.start} "
                     f"{list(p.start_shape)} ({', '.join(l.op for l in p.layers)}): "
                     f"{p.trainable_parameters:,} trainable, {p.frozen_parameters:,} frozen parameters")
        kept = (f"best epoch {p.best_epoch}/{p.epochs_run}" if p.improved else
                "no epoch beat the head alone: kept the head-only model, weights unchanged")
        lines.append(f"  fine-tune: AdamW lr {p.lr:g} ({p.precision}), {kept}; head only val_loss {h.val_loss:.4f} "
                     f"val_acc {h.val_accuracy:.4f} -> partial val_loss {f.val_loss:.4f} "
                     f"val_acc {f.val_accuracy:.4f}")
    c = m.check
    what = ("torch tail + head on the tail's cached input" if m.partial else "backbone + head")
    held = " validation" if m.partial else ""
    lines.append(f"  check: merged model == {what} (max |diff| {c.max_abs_diff:.2g} on "
                 f"{c.examples}{held} examples, labels agree)")
    q = m.int8
    if q and q.refused:
        lines.append(f"  int8: not written: {q.refused}")
    elif q:
        g = q.gate
        kept = f", {len(q.excluded)} node(s) kept in float" if q.excluded else ""
        where = f" -> {q.path}" if q.path else ""
        lines.append(f"  int8: {q.method} calibration on {q.samples} training images{kept}; on {g['inputs']} "
                     f"validation examples: val_acc fp32 {q.val_accuracy_fp32:.4f}, int8 "
                     f"{q.val_accuracy_int8:.4f}, top-1 agreement {g['top1_agreement']:.1%}{where}")
    if m.data.skipped:
        lines.append(f"  skipped: {len(m.data.skipped)} unreadable file(s), listed in the report")
    if report:
        lines.append("  report: " + ", ".join(str(p) for p in report.values()))
    lines += [f"  note: {n}" for n in notes]
    return "\n".join(lines)


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray, classes: Sequence[str]) -> dict[str, Any]:
    """Accuracy, per-class precision/recall/F1/support and the confusion matrix (rows: true, cols: predicted)."""
    k = len(classes)
    cm = np.zeros((k, k), np.int64)
    np.add.at(cm, (np.asarray(y_true, np.int64), np.asarray(y_pred, np.int64)), 1)
    per_class = {}
    for c, name in enumerate(classes):
        tp = int(cm[c, c])
        predicted, actual = int(cm[:, c].sum()), int(cm[c, :].sum())
        p = tp / predicted if predicted else 0.0
        r = tp / actual if actual else 0.0
        per_class[name] = {"precision": round(p, 6), "recall": round(r, 6),
                           "f1": round(2 * p * r / (p + r), 6) if p + r else 0.0, "support": actual}
    total = int(cm.sum())
    return {"accuracy": round(float(np.trace(cm)) / total, 6) if total else 0.0, "per_class": per_class,
            "confusion_matrix": cm.tolist()}


def curves_png(history: dict[str, list[float]], best_epoch: int, title: str = "", first_epoch: int = 1) -> bytes:
    """Loss and accuracy per epoch (``first_epoch``: the number of the first entry; partial fine-tuning's 0 is
    the head alone)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 3.6), dpi=100)
    FigureCanvasAgg(fig)
    epochs = np.arange(first_epoch, first_epoch + len(history["loss"]))
    ax1, ax2 = fig.subplots(1, 2)
    ax1.plot(epochs, history["loss"], label="train")
    ax1.plot(epochs, history["val_loss"], label="validation")
    ax1.set_title("loss")
    ax2.plot(epochs, history["accuracy"], label="train")
    ax2.plot(epochs, history["val_accuracy"], label="validation")
    ax2.set_title("accuracy")
    for ax in (ax1, ax2):
        ax.axvline(best_epoch, color="grey", linestyle="--", linewidth=1, label=f"best (epoch {best_epoch})")
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.14, top=0.86, wspace=0.22)  # tight_layout costs ~50 ms
    return _png(fig)


def regularization_png(curve: Sequence[dict], chosen: float, search: Sequence[CutCandidate] = (),
                       title: str = "") -> bytes:
    """The linear probe's regularization curve: train and validation loss and accuracy per L2 strength; with a cut
    search, a third panel with each candidate cut's validation loss."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = 3 if search else 2
    fig = Figure(figsize=(4.5 * panels, 3.6), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, panels)
    l2 = [p["l2"] for p in curve]
    for ax, key, name in ((axes[0], "loss", "loss"), (axes[1], "accuracy", "accuracy")):
        ax.plot(l2, [p[key] for p in curve], marker="o", markersize=3, label="train")
        ax.plot(l2, [p["val_" + key] for p in curve], marker="o", markersize=3, label="validation")
        ax.axvline(chosen, color="grey", linestyle="--", linewidth=1, label=f"chosen ({chosen:.3g})")
        _log_x(ax)
        ax.set_xlabel("L2 strength")
        ax.set_title(name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if search:
        ax = axes[2]
        names = [f"{r.kind} {r.features}" for r in search]
        ax.barh(range(len(search)), [r.val_loss for r in search],
                color=["tab:green" if r.chosen else "tab:grey" for r in search])
        ax.set_yticks(range(len(search)), names, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("validation loss")
        ax.set_title("cut candidates")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.14, top=0.86, wspace=0.35)
    return _png(fig)


def series_png(x: Sequence[float], series: dict[str, Sequence[float]], *, xlabel: str, mark: float | None = None,
               log_x: bool = False, title: str = "") -> bytes:
    """One panel of named series over ``x`` (a ridge strength curve, a joint training's losses), ``mark`` a
    dashed line at the chosen x."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5, 3.6), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.subplots(1, 1)
    for name, ys in series.items():
        ax.plot(list(x), list(ys), marker="o" if len(x) < 30 else None, markersize=3, label=name)
    if mark is not None:
        ax.axvline(mark, color="grey", linestyle="--", linewidth=1, label=f"chosen ({mark:.3g})")
    if log_x:
        _log_x(ax)
    ax.set_xlabel(xlabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    fig.subplots_adjust(left=0.12, right=0.97, bottom=0.14, top=0.88)
    return _png(fig)


def confusion_png(cm: Sequence[Sequence[int]], classes: Sequence[str], title: str = "") -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    m = np.asarray(cm)
    k = len(classes)
    side = min(16.0, max(4.0, 0.45 * k + 2.5))
    fig = Figure(figsize=(side, side), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    rows = m.sum(axis=1, keepdims=True)
    norm = np.divide(m, rows, out=np.zeros(m.shape, float), where=rows > 0)
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of true class")
    ticks = np.arange(k)
    names = [c if len(c) <= 14 else c[:13] + "…" for c in classes]
    tilt = k > 4 and max(len(n) for n in names) > 2
    ax.set_xticks(ticks, names, rotation=45 if tilt else 0, ha="right" if tilt else "center", fontsize=8)
    ax.set_yticks(ticks, names, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if k <= 30:
        for i in range(k):
            for j in range(k):
                if m[i, j]:
                    ax.text(j, i, str(m[i, j]), ha="center", va="center", fontsize=7,
                            color="white" if norm[i, j] > 0.5 else "black")
    ax.set_title(title or "validation confusion matrix", fontsize=10)
    fig.tight_layout()
    return _png(fig)


def _log_x(ax) -> None:
    """A log x axis with decade ticks only: matplotlib's log minor ticks (8 labelled ticks per decade) cost more to
    draw than the rest of the figure."""
    from matplotlib.ticker import NullLocator

    ax.set_xscale("log")
    ax.xaxis.set_minor_locator(NullLocator())


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def metrics_json(metrics: FinetuneMetrics | TasksMetrics) -> bytes:
    return (json.dumps(metrics.to_dict(), indent=2, sort_keys=False, default=_jsonable) + "\n").encode()


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")
