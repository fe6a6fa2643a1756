"""Data with several targets: a CSV or JSON Lines table, one row per example, one column per task.

A table with a path column (``--path-column``, default ``path``; absolute, or relative to the table's folder) lists
images; without one, its non-task columns are the feature vector. A blank (or na/nan/null/none) cell means "not
labelled for this task": masked out of that task's loss and metrics. A row with no label at all is reported and
skipped. Each task is ``NAME[:classification|regression]``; the type, when not given, is inferred from the column
(non-numeric, or at most ``MAX_INFERRED_CLASSES`` distinct integers -> classification) and the summary says so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import DataError, UsageError
from .data import Dataset, _hash, _label_name, read_rows

TASK_TYPES = ("classification", "regression")
MISSING = ("", "na", "nan", "null", "none", "n/a")
MAX_INFERRED_CLASSES = 20
TABLE_SUFFIXES = (".csv", ".tsv", ".jsonl", ".ndjson")


@dataclass(frozen=True)
class TaskSpec:
    name: str
    type: str | None = None  # None: inferred from the column


def parse_tasks(values: Sequence[str] | str | None) -> tuple[TaskSpec, ...]:
    if values is None:
        return ()
    if isinstance(values, str):
        values = [values]
    specs = []
    for v in values:
        name, _, kind = str(v).partition(":")
        name, kind = name.strip(), kind.strip().lower() or None
        if not name:
            raise UsageError(f"--task {v!r}: give a column name, e.g. --task age:regression")
        if kind is not None and kind not in TASK_TYPES:
            raise UsageError(f"--task {v!r}: the type must be classification or regression")
        if any(s.name == name for s in specs):
            raise UsageError(f"--task {name!r} is given twice")
        specs.append(TaskSpec(name, kind))
    return tuple(specs)


@dataclass
class Task:
    """One target: its column, type, classes (classification) or the training split's scaling (regression)."""

    name: str
    type: str  # classification | regression
    inferred: bool
    classes: tuple[str, ...] = ()
    labels: np.ndarray = field(default=None, repr=False)  # classification: int64, -1 = not labelled
    values: np.ndarray = field(default=None, repr=False)  # regression: float64, NaN = not labelled

    @property
    def labelled(self) -> np.ndarray:
        return self.labels >= 0 if self.type == "classification" else np.isfinite(self.values)

    def describe(self) -> str:
        how = "inferred" if self.inferred else "given"
        what = f"{len(self.classes)} classes" if self.type == "classification" else "a number"
        return f"{self.name}: {self.type} ({how}; {what}; {int(self.labelled.sum())} labelled)"


DEFAULT_PATH_COLUMN = "path"


def is_table(path: Path, tasks: Sequence[TaskSpec], path_column: str) -> bool:
    """Whether ``path`` is a multi-target table: tasks or a path column were named, or its header has the path
    column."""
    if not path.is_file():
        return bool(tasks) and path.suffix.lower() in TABLE_SUFFIXES  # load_table then names what is missing
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        return True
    if tasks or path_column != DEFAULT_PATH_COLUMN:
        return True
    if path.suffix.lower() not in (".csv", ".tsv"):
        return False
    header, _ = read_rows(path, limit=1)
    return path_column in header


def _number(cell: str) -> float | None:
    try:
        v = float(cell)
    except ValueError:
        return None
    return v if math.isfinite(v) else None


def _task(spec: TaskSpec, cells: list[str], path: Path, row_numbers: Sequence[int]) -> Task:
    """The task from its column's cells (``row_numbers``: each cell's 1-based data row, for messages)."""
    present = [(i, c) for i, c in enumerate(cells) if c.lower() not in MISSING]
    numbers = {i: _number(c) for i, c in present}
    numeric = all(v is not None for v in numbers.values())
    kind = spec.type
    inferred = kind is None
    if kind is None:
        distinct = {numbers[i] for i, _ in present} if numeric else set()
        kind = ("classification" if not numeric or (all(float(v).is_integer() for v in distinct)
                                                      and len(distinct) <= MAX_INFERRED_CLASSES) else "regression")
    n = len(cells)
    if kind == "regression":
        bad = next((i for i, _ in present if numbers[i] is None), None)
        if bad is not None:
            raise DataError(f"{path}: row {row_numbers[bad]}, column {spec.name!r}: {cells[bad][:40]!r} is not a number "
                            f"(a regression target); fix the cell or give --task {spec.name}:classification")
        values = np.full(n, np.nan)
        for i, _ in present:
            values[i] = numbers[i]
        return Task(spec.name, kind, inferred, values=values)
    names = sorted({_label_name(numbers[i]) if numeric else c for i, c in present},
                   key=lambda s: (0, float(s)) if numeric else (1, s))
    index = {c: k for k, c in enumerate(names)}
    labels = np.full(n, -1, np.int64)
    for i, c in present:
        labels[i] = index[_label_name(numbers[i]) if numeric else c]
    return Task(spec.name, kind, inferred, tuple(names), labels=labels)


def load_table(path: Path, tasks: Sequence[TaskSpec], path_column: str = DEFAULT_PATH_COLUMN
               ) -> tuple[Dataset, list[Task]]:
    """The table as a Dataset (images or vectors; ``labels``: the first classification task's, for the
    stratified split) and its tasks."""
    header, rows = read_rows(path)
    if not rows:
        raise DataError(f"{path} has a header but no data rows")
    width = len(header)
    for r, row in enumerate(rows, start=1):
        if len(row) != width:
            raise DataError(f"{path}: row {r} has {len(row)} fields but the header has {width}")
    images = path_column in header
    if not images and path_column != DEFAULT_PATH_COLUMN:  # named, so the rows are meant to be images
        raise DataError(f"{path} has no column {path_column!r} (--path-column; columns: {', '.join(header[:12])}"
                        f"{', ...' if len(header) > 12 else ''})")
    if not tasks:
        if not images:
            raise UsageError(f"{path} has no {path_column!r} column; name the target columns with --task NAME "
                             f"(the other columns are the features), or the image column with --path-column")
        tasks = [TaskSpec(h) for h in header if h != path_column]
    missing = [t.name for t in tasks if t.name not in header]
    if missing:
        raise DataError(f"{path} has no column {', '.join(map(repr, missing))} (columns: {', '.join(header[:12])}"
                        f"{', ...' if len(header) > 12 else ''})")
    cols = {h: i for i, h in enumerate(header)}
    cells = {t.name: [row[cols[t.name]].strip() for row in rows] for t in tasks}
    unlabelled = [r for r in range(len(rows)) if all(cells[t.name][r].lower() in MISSING for t in tasks)]
    keep = [r for r in range(len(rows)) if r not in set(unlabelled)]
    built = [_task(t, [cells[t.name][r] for r in keep], path, [r + 1 for r in keep]) for t in tasks]
    for t in built:
        if t.type == "classification" and len(t.classes) < 2:
            raise DataError(f"task {t.name!r} has {len(t.classes)} class{'es' if len(t.classes) != 1 else ''} "
                            f"({', '.join(t.classes) or 'no labels'}); a classifier needs at least two")
        if int(t.labelled.sum()) < 4:
            raise DataError(f"task {t.name!r} has {int(t.labelled.sum())} labelled rows; the validation split needs "
                            f"at least 4")
    # the Dataset's own labels are one class: the tasks carry the targets (task_split stratifies on them)
    classes, labels = ("all",), np.zeros(len(keep), np.int64)
    skipped_rows = [f"row {r + 1}" for r in unlabelled]
    st = path.stat()
    fp = _hash({"kind": "table", "path": str(path.resolve()), "size": st.st_size, "mtime": st.st_mtime_ns,
                "tasks": [[t.name, t.type] for t in built], "path_column": path_column if images else None})
    if images:
        root = path.parent
        items = []
        for r in keep:
            cell = rows[r][cols[path_column]].strip()
            if not cell:
                raise DataError(f"{path}: row {r + 1}, column {path_column!r}: no image path")
            p = Path(cell).expanduser()
            items.append(p if p.is_absolute() else root / p)
        names = [str(p) for p in items]
        ds = Dataset("images", classes, labels, names, fp, str(path), items=items, ignored=skipped_rows)
    else:
        feature_cols = [i for i, h in enumerate(header) if h not in {t.name for t in tasks}]
        if not feature_cols:
            raise DataError(f"{path} has only task columns; add feature columns (or a {path_column!r} column of "
                            f"image paths)")
        x = np.empty((len(keep), len(feature_cols)), np.float32)
        for k, r in enumerate(keep):
            for j, ci in enumerate(feature_cols):
                v = _number(rows[r][ci].strip())
                if v is None:
                    raise DataError(f"{path}: row {r + 1}, column {header[ci]!r}: {rows[r][ci][:40]!r} is not a "
                                    f"number (a feature)")
                x[k, j] = v
        ds = Dataset("vectors", classes, labels, [f"row {r + 1}" for r in keep], fp, str(path), x=x,
                     ignored=skipped_rows)
    return ds, built


def task_split(tasks: Sequence[Task], rows: np.ndarray, val_split: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) positions into ``rows`` (the table rows that have features): stratified on the first
    classification task (rows it doesn't label form their own stratum), else a seeded shuffle."""
    from .train import stratified_split

    first = next((t for t in tasks if t.type == "classification"), None)
    strata = first.labels[rows].copy() if first is not None else np.zeros(len(rows), np.int64)
    strata[strata < 0] = strata.max(initial=0) + 1
    groups = tuple(str(g) for g in range(int(strata.max(initial=0)) + 1))
    present = [g for g in range(len(groups)) if (strata == g).any()]
    remap = {g: k for k, g in enumerate(present)}
    strata = np.array([remap[g] for g in strata], np.int64)
    names = tuple(first.classes[g] if first is not None and g < len(first.classes) else "unlabelled"
                  for g in present)
    return stratified_split(strata, names, val_split, seed)
