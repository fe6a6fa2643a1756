"""Writing predictions as they arrive: an aligned table, CSV, or a JSON array (one object per input)."""

from __future__ import annotations

import csv
import json
import math
from typing import Sequence, TextIO

import numpy as np

from .results import Prediction

FORMATS = ("table", "csv", "json")


class PredictionWriter:
    """Stream Predictions to ``out`` in ``fmt``; ``close()`` finishes the document (the JSON array's ``]``)."""

    def __init__(self, out: TextIO, fmt: str = "table", top_k: int = 1, path_width: int = 20,
                 classifier: bool = True, tasks: Sequence[dict] | None = None):
        if fmt not in FORMATS:
            raise ValueError(fmt)
        self.out, self.fmt, self.top_k = out, fmt, top_k
        self.path_width = max(4, min(path_width, 80))
        self.count = 0
        self._raw = not classifier and not tasks
        self.tasks = list(tasks or [])  # a multi-task model: one column group per task
        self._csv = csv.writer(out, lineterminator="\n") if fmt == "csv" else None

    def write(self, p: Prediction) -> None:
        first = self.count == 0
        self.count += 1
        if self.fmt == "json":
            self.out.write(("[\n  " if first else ",\n  ") + json.dumps(_jsonable(p.to_dict())))
        elif self.fmt == "csv":
            self._write_csv(p, first)
        else:
            self._write_table(p, first)
        self.out.flush()

    def close(self) -> None:
        if self.fmt == "json":
            self.out.write("\n]\n" if self.count else "[]\n")
            self.out.flush()

    def _write_csv(self, p: Prediction, first: bool) -> None:
        if self.tasks:
            if first:
                head = ["path"]
                for t in self.tasks:
                    head += ([f"{t['name']}_label", f"{t['name']}_score"] if t["type"] == "classification" else
                             [f"{t['name']}_value"])
                self._csv.writerow(head + ["error"])
            row: list = [p.source]
            for t in self.tasks:
                r = (p.tasks or {}).get(t["name"])
                if t["type"] == "classification":
                    row += [r["label"], _num(r["score"])] if r else ["", ""]
                else:
                    row += [_num(r["value"])] if r else [""]
            self._csv.writerow(row + [p.error or ""])
            return
        if first:
            if self._raw:
                self._csv.writerow(["path", "output", "shape", "values", "error"])
            else:
                head = ["path", "label", "score"]
                for r in range(2, self.top_k + 1):
                    head += [f"label_{r}", f"score_{r}"]
                self._csv.writerow(head + ["error"])
        if self._raw:
            if p.error:
                self._csv.writerow([p.source, "", "", "", p.error])
            for name, v in (p.outputs or {}).items():
                arr = np.asarray(v)
                self._csv.writerow([p.source, name, "x".join(map(str, arr.shape)),
                                    " ".join(_num(x) for x in arr.ravel()), ""])
            return
        if p.error:
            self._csv.writerow([p.source, "", ""] + ["", ""] * (self.top_k - 1) + [p.error])
            return
        row = [p.source, p.label, _num(p.score)]
        for label, score in list(p.top_k[1:self.top_k]):
            row += [label, _num(score)]
        row += ["", ""] * (self.top_k - len(p.top_k[:self.top_k]))
        self._csv.writerow(row + [""])

    def _write_table(self, p: Prediction, first: bool) -> None:
        path = str(p.source)
        if len(path) > self.path_width:
            path = "..." + path[-(self.path_width - 3):]
        if first:
            if self.tasks:
                self.out.write(f"{'path'.ljust(self.path_width)}  " +
                               "; ".join(f"{t['name']} ({t['type']})" for t in self.tasks) + "\n")
            elif not self._raw:
                extra = "  top-k" if self.top_k > 1 else ""
                self.out.write(f"{'path'.ljust(self.path_width)}  {'label':<20}  {'score':>8}{extra}\n")
        if p.error:
            self.out.write(f"{path.ljust(self.path_width)}  ERROR: {p.error}\n")
            return
        if p.tasks is not None:
            parts = []
            for name, r in p.tasks.items():
                if "value" in r:
                    parts.append(f"{name}: {r['value']:.6g}")
                else:
                    top = ", ".join(f"{x['label']} {x['score']:.4f}" for x in r["top_k"][:max(1, self.top_k)])
                    parts.append(f"{name}: {top}")
            self.out.write(f"{path.ljust(self.path_width)}  {'; '.join(parts)}\n")
            return
        if p.outputs is not None:
            parts = []
            for name, v in p.outputs.items():
                arr = np.asarray(v)
                vals = " ".join(_num(x) for x in arr.ravel()[:6]) + (" ..." if arr.size > 6 else "")
                parts.append(f"{name}{list(arr.shape)}: {vals}")
            self.out.write(f"{path.ljust(self.path_width)}  {'; '.join(parts)}\n")
            return
        extra = ""
        if self.top_k > 1:
            extra = "  " + ", ".join(f"{label} {score:.4f}" for label, score in p.top_k[:self.top_k])
        self.out.write(f"{path.ljust(self.path_width)}  {str(p.label):<20}  {p.score:>8.4f}{extra}\n")


def _num(x) -> str:
    x = float(x)
    return repr(x) if math.isfinite(x) else str(x)


def _jsonable(d):
    if isinstance(d, dict):
        return {k: _jsonable(v) for k, v in d.items()}
    if isinstance(d, (list, tuple)):
        return [_jsonable(v) for v in d]
    if isinstance(d, float) and not math.isfinite(d):
        return str(d)
    if isinstance(d, np.generic):
        return d.item()
    return d
