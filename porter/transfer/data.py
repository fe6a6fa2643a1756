"""Training data for fine-tuning: an image folder (one subfolder per class), a CSV, or numpy arrays.

Class order is the sorted class names (folder names, CSV label values, or array label values), and a label's
index in that order is what the model predicts. Files are listed here, not decoded: decoding happens while the
backbone runs (``features.py``), where unreadable images are skipped, counted and reported.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import DataError


@dataclass
class Dataset:
    """Examples and their class indices.

    ``kind``: ``images`` (paths in ``items``), ``pixels`` (raw uint8 images in ``items``) or ``vectors``
    (``x`` is already the model input, N x ...). ``fingerprint`` identifies the data for the feature cache.
    """

    kind: str
    classes: tuple[str, ...]
    labels: np.ndarray  # int64, index into classes
    names: list[str]  # how each example is named in messages and the report
    fingerprint: str
    source: str  # what the user passed, for the report
    items: list[Any] = field(default_factory=list, repr=False)
    x: np.ndarray | None = field(default=None, repr=False)
    ignored: list[str] = field(default_factory=list)  # files in the folder that aren't images

    def __len__(self) -> int:
        return len(self.labels)

    def counts(self) -> dict[str, int]:
        c = np.bincount(self.labels, minlength=len(self.classes))
        return {name: int(n) for name, n in zip(self.classes, c)}


def load_data(data: Any, *, label_column: str = "label", preprocessed: bool = False) -> Dataset:
    """Recognise ``data``: a folder of class folders, a ``.csv`` file, or an ``(x, y)`` pair of arrays."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and not isinstance(data[0], (str, os.PathLike)):
        return from_arrays(data[0], data[1], preprocessed=preprocessed)
    if isinstance(data, dict) and {"x", "y"} <= set(data):
        return from_arrays(data["x"], data["y"], preprocessed=preprocessed)
    if not isinstance(data, (str, os.PathLike)):
        raise DataError(f"can't use {type(data).__name__} as training data; give an image folder (one subfolder per "
                        f"class), a CSV file, or an (x, y) pair of numpy arrays")
    path = Path(data).expanduser()
    if not path.exists():
        raise DataError(f"data not found: {data} (no such file or directory); give an image folder with one "
                        f"subfolder per class, or a CSV file")
    if path.is_dir():
        return image_folder(path)
    if path.suffix.lower() in (".csv", ".tsv", ".txt"):
        return from_csv(path, label_column)
    raise DataError(f"{data}: not a folder or a CSV file; give an image folder (one subfolder per class) or a .csv")


# --- image folders ----------------------------------------------------------------------------------------------

def image_folder(root: Path) -> Dataset:
    from ..imaging import IMAGE_EXTENSIONS, is_image_file

    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    loose = [p for p in root.iterdir() if p.is_file() and is_image_file(p)]
    if not subdirs:
        what = f"{len(loose)} images but no class subfolders" if loose else "no class subfolders"
        raise DataError(f"data folder {root} has {what}; put each class's images in a subfolder named after "
                        f"the class (e.g. {root}/cat/1.jpg, {root}/dog/2.jpg)")
    if len(subdirs) < 2:
        raise DataError(f"data folder {root} has one class ({subdirs[0].name!r}); fine-tuning a classifier needs at "
                        f"least 2 class subfolders")
    items: list[Path] = []
    labels: list[int] = []
    ignored: list[str] = []
    stats: list[tuple[str, int, int]] = []
    prefix = os.path.join(str(root), "")  # scandir paths start with it: slicing beats os.path.relpath (a getcwd each)
    for c, d in enumerate(subdirs):
        files = _scan(d)
        images = [e for e in files if is_image_file(e.name)]
        ignored += [e.path[len(prefix):] for e in files if not is_image_file(e.name)]
        if not images:
            exts = ", ".join(e.lstrip(".") for e in IMAGE_EXTENSIONS)
            raise DataError(f"class folder {d.name!r} in {root} has no readable image (looked for {exts}); add "
                            f"images or remove the folder")
        for e in images:
            try:
                st = e.stat()
            except OSError as err:
                raise DataError(f"can't read {e.path}: {err.strerror}") from None
            stats.append((e.path[len(prefix):], st.st_size, st.st_mtime_ns))
            items.append(Path(e.path))
            labels.append(c)
    classes = tuple(d.name for d in subdirs)
    fp = _hash({"kind": "images", "root": str(root.resolve()), "classes": classes, "files": stats})
    return Dataset("images", classes, np.asarray(labels, np.int64), [rel for rel, _, _ in stats], fp,
                   str(root), items=items, ignored=ignored)


def _scan(folder: Path) -> list[os.DirEntry]:
    """Files under ``folder`` (recursively, hidden entries skipped, directory symlinks not followed), sorted by path.

    ``os.scandir`` reads file types from the directory itself: one stat per file, later, instead of three.
    """
    found: list[os.DirEntry] = []
    stack = [str(folder)]
    while stack:
        try:
            with os.scandir(stack.pop()) as entries:
                for e in entries:
                    if e.name.startswith("."):
                        continue
                    if e.is_dir(follow_symlinks=False):
                        stack.append(e.path)
                    elif e.is_file():
                        found.append(e)
        except OSError as err:
            raise DataError(f"can't list {err.filename or folder}: {err.strerror}") from None
    found.sort(key=lambda e: e.path)
    return found


# --- CSV --------------------------------------------------------------------------------------------------------

def from_csv(path: Path, label_column: str = "label") -> Dataset:
    header, rows = read_rows(path)
    rows = [header] + rows
    if label_column not in header:
        raise DataError(f"CSV file {path} has no column {label_column!r} (columns: {', '.join(header[:12])}"
                        f"{', ...' if len(header) > 12 else ''}); name the label column with --label-column")
    li = header.index(label_column)
    feature_cols = [i for i in range(len(header)) if i != li]
    if not feature_cols:
        raise DataError(f"CSV file {path} has only the label column; add feature columns")
    if len(rows) < 2:
        raise DataError(f"CSV file {path} has a header but no data rows")
    x = np.empty((len(rows) - 1, len(feature_cols)), np.float32)
    raw_labels: list[str] = []
    for r, row in enumerate(rows[1:], start=1):
        line = r + 1
        if len(row) != len(header):
            raise DataError(f"{path}: row {r} (line {line}) has {len(row)} fields but the header has {len(header)}")
        label = row[li].strip()
        if not label:
            raise DataError(f"{path}: row {r} (line {line}), column {label_column!r}: missing label")
        raw_labels.append(label)
        for j, ci in enumerate(feature_cols):
            cell = row[ci].strip()
            if not cell or cell.lower() in ("na", "nan", "null", "none"):
                raise DataError(f"{path}: row {r} (line {line}), column {header[ci]!r}: missing value; fill it in "
                                f"or drop the row")
            try:
                v = float(cell)
            except ValueError:
                raise DataError(f"{path}: row {r} (line {line}), column {header[ci]!r}: {cell[:40]!r} is not a "
                                f"number") from None
            if not math.isfinite(v):
                raise DataError(f"{path}: row {r} (line {line}), column {header[ci]!r}: {cell!r} is not a finite number")
            x[r - 1, j] = v
    classes, labels = _classes(raw_labels, f"column {label_column!r} of {path}")
    st = path.stat()
    fp = _hash({"kind": "csv", "path": str(path.resolve()), "size": st.st_size, "mtime": st.st_mtime_ns,
                "label": label_column})
    names = [f"row {r}" for r in range(1, len(raw_labels) + 1)]
    return Dataset("vectors", classes, labels, names, fp, str(path), x=x)


def read_rows(path: Path, limit: int | None = None) -> tuple[list[str], list[list[str]]]:
    """(header, data rows of strings) from a CSV/TSV (dialect sniffed) or JSON Lines file; blank lines dropped;
    ``limit``: stop after that many data rows."""
    try:
        if path.suffix.lower() in (".jsonl", ".ndjson"):
            header: list[str] = []
            objs = []
            with open(path, encoding="utf-8") as f:
                for n, line in enumerate(f, start=1):
                    if not line.strip():
                        continue
                    try:
                        obj = json.loads(line)
                    except ValueError as e:
                        raise DataError(f"{path}: line {n} is not JSON ({e.msg})") from None
                    if not isinstance(obj, dict):
                        raise DataError(f"{path}: line {n} is not a JSON object")
                    for k in obj:
                        if k not in header:
                            header.append(str(k))
                    objs.append(obj)
                    if limit is not None and len(objs) >= limit:
                        break
            rows = [["" if o.get(h) is None else str(o[h]) if not isinstance(o.get(h), (dict, list)) else
                     json.dumps(o[h]) for h in header] for o in objs]
            return header, rows
        with open(path, newline="", encoding="utf-8-sig") as f:
            sample = f.read(65536)
            f.seek(0)
            try:
                dialect = csv.Sniffer().sniff(sample, delimiters=",;\t")
            except csv.Error:
                dialect = csv.excel
            reader = csv.reader(f, dialect)
            rows = []
            for r in reader:
                if any(c.strip() for c in r):
                    rows.append(r)
                    if limit is not None and len(rows) > limit:
                        break
    except OSError as e:
        raise DataError(f"can't read {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise DataError(f"{path} is not a UTF-8 text file") from None
    except RecursionError:
        raise DataError(f"{path}: a JSON value nests too deeply") from None
    if not rows:
        raise DataError(f"{path} is empty; it needs a header row and one row per example")
    header = [h.strip() for h in rows[0]]
    return header, rows[1:]


# --- arrays -----------------------------------------------------------------------------------------------------

def from_arrays(x: Any, y: Any, *, preprocessed: bool = False) -> Dataset:
    """``x``: raw images (N x H x W [x C], uint8 0..255) or, with ``preprocessed`` or for vector models,
    model-input rows; ``y``: N labels (ints or strings)."""
    x = np.asarray(x)
    y = np.asarray(y)
    if y.ndim != 1:
        raise DataError(f"labels must be a 1-d array (one label per example), got shape {y.shape}")
    if len(x) != len(y):
        raise DataError(f"x has {len(x)} examples but y has {len(y)} labels; they must match")
    if len(x) == 0:
        raise DataError("no examples: x and y are empty")
    if y.dtype.kind == "f" and not np.all(np.isfinite(y)):
        raise DataError("labels contain NaN or inf")
    classes, labels = _classes(list(y.tolist()), "the labels")
    h = hashlib.sha256()
    h.update(str((x.shape, x.dtype.str)).encode())
    h.update(np.ascontiguousarray(x).tobytes())
    h.update(json.dumps([str(v) for v in y.tolist()]).encode())
    kind = "vectors" if preprocessed or x.ndim == 2 else "pixels"
    if kind == "vectors" and x.dtype.kind not in "fiub":
        raise DataError(f"x must be numeric, got dtype {x.dtype}")
    names = [f"example {i}" for i in range(len(x))]
    return Dataset(kind, classes, labels, names, _hash({"kind": kind, "arrays": h.hexdigest()}), "arrays",
                   items=list(x) if kind == "pixels" else [], x=x.astype(np.float32) if kind == "vectors" else None)


# --- helpers ----------------------------------------------------------------------------------------------------

def _classes(raw: Sequence[Any], what: str) -> tuple[tuple[str, ...], np.ndarray]:
    """Sorted unique labels (numbers sorted as numbers) and each example's index; needs two classes."""
    uniq = sorted(set(raw), key=lambda v: (0, float(v), "") if _is_number(v) else (1, 0.0, str(v)))
    if len(uniq) < 2:
        raise DataError(f"{what} hold one class ({_label_name(uniq[0])!r}); fine-tuning a classifier needs at "
                        f"least 2 classes" if uniq else f"{what} are empty")
    names = tuple(_label_name(v) for v in uniq)
    if len(set(names)) != len(names):
        raise DataError(f"{what} contain labels that read the same as text ({', '.join(names[:6])}); make them distinct")
    index = {v: i for i, v in enumerate(uniq)}
    return names, np.asarray([index[v] for v in raw], np.int64)


def _is_number(v: Any) -> bool:
    if isinstance(v, bool):
        return False
    if isinstance(v, (int, float, np.integer, np.floating)):
        return True
    try:
        float(v)
        return True
    except (TypeError, ValueError):
        return False


def _label_name(v: Any) -> str:
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v)


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()
