"""Predictions as flat records: the columns of ``porter predict --output FILE.parquet`` and of
``porter.ray.predict``'s Ray Dataset, both ways (``to_record`` / ``from_record``), and the Parquet file writer.

Columns: ``row`` (the input's position, -1 when unknown), ``path``, ``label`` (text), ``class_index``, ``score``,
``top_k`` (list of {label, score}), ``outputs`` (JSON: a multi-task model's per-task results, or a non-classifier's
raw outputs) and ``error`` (why this input failed; the other fields are then empty).
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterable

from .formatting import _jsonable
from .results import Prediction

COLUMNS = ("row", "path", "label", "class_index", "score", "top_k", "outputs", "error")


def schema():
    import pyarrow as pa

    return pa.schema([("row", pa.int64()), ("path", pa.string()), ("label", pa.string()),
                      ("class_index", pa.int64()), ("score", pa.float64()),
                      ("top_k", pa.list_(pa.struct([("label", pa.string()), ("score", pa.float64())]))),
                      ("outputs", pa.string()), ("error", pa.string())])


def to_record(p: Prediction, row: int = -1) -> dict[str, Any]:
    ok = p.error is None
    extra = (p.tasks if p.tasks is not None else p.outputs) if ok else None
    if isinstance(extra, dict) and p.outputs is not None:
        extra = {k: v.tolist() if hasattr(v, "tolist") else v for k, v in extra.items()}
    return {"row": int(row), "path": p.source, "label": str(p.label) if ok and p.label is not None else None,
            "class_index": p.index if ok else None, "score": p.score if ok else None,
            "top_k": [{"label": str(l), "score": float(s)} for l, s in p.top_k] if ok else [],
            "outputs": json.dumps(_jsonable(extra)) if extra is not None else None, "error": p.error}


def to_table(records: Iterable[dict[str, Any]]):
    import pyarrow as pa

    records = list(records)
    return pa.table({c: [r[c] for r in records] for c in COLUMNS}, schema=schema())


def from_record(r: dict[str, Any], raw_outputs: bool = False) -> Prediction:
    """A Prediction back from a record (labels come back as text). ``raw_outputs``: the record's ``outputs`` are
    a non-classifier's tensors (else a multi-task model's tasks)."""
    import numpy as np

    if r.get("error") is not None:
        return Prediction(source=r["path"], error=r["error"])
    if r.get("outputs") is not None:
        extra = json.loads(r["outputs"])
        if raw_outputs:
            return Prediction(source=r["path"], outputs={k: np.asarray(v) for k, v in extra.items()})
        return Prediction(source=r["path"], tasks=extra)
    top = tuple((t["label"], float(t["score"])) for t in r.get("top_k") or ())
    return Prediction(source=r["path"], label=r["label"], index=r["class_index"], score=r["score"], top_k=top)


class ParquetPredictions:
    """Predictions streamed into a Parquet file, written atomically (a temp file renamed onto ``path`` by
    ``close()``; ``abort()`` or an exception leaves nothing), never over an existing file without ``force``."""

    ROWS_PER_GROUP = 4096

    def __init__(self, path: str | os.PathLike, force: bool = False):
        import contextlib

        from ..outputs import atomic_path

        self._stack = contextlib.ExitStack()
        self._tmp = self._stack.enter_context(atomic_path(path, force))
        self._writer = None
        self._pending: list[dict[str, Any]] = []
        self.count = 0

    def write(self, p: Prediction, row: int = -1) -> None:
        self.write_record(to_record(p, row))

    def write_record(self, record: dict[str, Any]) -> None:
        self._pending.append(record)
        self.count += 1
        if len(self._pending) >= self.ROWS_PER_GROUP:
            self._flush()

    def _flush(self) -> None:
        import pyarrow.parquet as pq

        if self._writer is None:
            self._writer = pq.ParquetWriter(str(self._tmp), schema())
        if self._pending:
            self._writer.write_table(to_table(self._pending))
            self._pending = []

    def close(self) -> None:
        self._flush()
        self._writer.close()
        self._stack.close()  # renames the temp file onto the output

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._stack.__exit__(RuntimeError, RuntimeError("aborted"), None)  # the temp file is removed
