"""What a prediction is: ``Prediction`` (one input's result), and a multi-task model's outputs as per-task results
(label, score and top-k per classification task, the value per regression task, as ``porter.tasks`` records them;
``signature._tasks`` checked they match the outputs)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from ..errors import DataError


@dataclass(frozen=True)
class Prediction:
    """One input's result. Classifiers fill label/index/score/top_k; other models fill ``outputs``."""

    source: str | None
    label: str | int | None = None  # the class name from the model's labels, else the index
    index: int | None = None
    score: float | None = None
    top_k: tuple[tuple[str | int, float], ...] = ()
    outputs: dict[str, np.ndarray] | None = None
    error: str | None = None
    tasks: dict[str, dict] | None = None  # a multi-task model: task -> {label, score, top_k} | {value}

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"path": self.source}
        if self.error is not None:
            d["error"] = self.error
            return d
        if self.tasks is not None:
            d["tasks"] = self.tasks
            return d
        if self.outputs is not None:
            d["outputs"] = {k: np.asarray(v).tolist() for k, v in self.outputs.items()}
            return d
        d.update(label=self.label, score=self.score, top_k=[{"label": l, "score": s} for l, s in self.top_k])
        return d


def task_results(tasks: Sequence[dict[str, Any]], rows: dict[str, np.ndarray], top_k: int) -> dict[str, dict]:
    """``rows``: one example's row of every output (batch axis kept or not)."""
    out: dict[str, dict] = {}
    for t in tasks:
        name = t["name"]
        if t["type"] == "classification":
            p = np.asarray(rows[f"{name}/probabilities"], np.float64).reshape(-1)
            labels = t["labels"]
            k = min(top_k, p.size)
            top = np.argsort(-p, kind="stable")[:k]
            named = [(labels[j] if j < len(labels) else int(j), float(p[j])) for j in top]
            out[name] = {"label": named[0][0], "score": named[0][1],
                         "top_k": [{"label": l, "score": s} for l, s in named]}
        else:
            out[name] = {"value": float(np.asarray(rows[f"{name}/value"]).reshape(-1)[0])}
    return out


def output_rows(out: dict[str, np.ndarray], names: Sequence[str]) -> list[tuple[np.ndarray, ...]]:
    """A batch of a backbone's outputs (batch x features each) as one tuple of float32 rows per example: what
    ``porter finetune`` extracts, here and on Ray actors."""
    ys = []
    for name in names:
        y = np.asarray(out[name])
        if y.ndim != 2:
            raise DataError(f"the cut tensor has shape {list(y.shape)} at run time, not batch x features; "
                            f"choose another --cut")
        ys.append(y.astype(np.float32, copy=False))
    return list(zip(*ys))
