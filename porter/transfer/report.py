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


def report_paths(output: str | Path, partial: bool = False) -> dict[str, Path]:
    """The report files beside ``output``; with partial fine-tuning, its curves too (``NAME.finetune.png``)."""
    out = Path(output)
    stem = out.name[: -len(out.suffix)] if out.suffix else out.name
    paths = {"metrics": out.with_name(f"{stem}.metrics.json"), "curves": out.with_name(f"{stem}.training.png"),
             "confusion": out.with_name(f"{stem}.confusion.png")}
    if partial:
        paths["finetune"] = out.with_name(f"{stem}.finetune.png")
    return paths


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


def regularization_png(curve: Sequence[dict], chosen: float, search: Sequence[dict] = (), title: str = "") -> bytes:
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
        ax.set_xscale("log")
        ax.set_xlabel("L2 strength")
        ax.set_title(name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if search:
        ax = axes[2]
        names = [f"{r['kind']} {r['features']}" for r in search]
        ax.barh(range(len(search)), [r["val_loss"] for r in search],
                color=["tab:green" if r["chosen"] else "tab:grey" for r in search])
        ax.set_yticks(range(len(search)), names, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("validation loss")
        ax.set_title("cut candidates")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.14, top=0.86, wspace=0.35)
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


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def metrics_json(metrics: dict[str, Any]) -> bytes:
    return (json.dumps(metrics, indent=2, sort_keys=False, default=_jsonable) + "\n").encode()


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")
