"""What runs inside Ray: one model actor per slot of the pool, loading the model once and running every batch
Ray Data gives it through ``porter.runtime.Predictor`` (the same decode, resize, normalize and score code as
``porter predict``, so a distributed run and a local one compute the same numbers).

A batch carries the images in one of three columns: ``bytes`` (files read by Ray Data's ``read_binary_files``,
decoded here by porter's decoder: EXIF rotation, alpha over white, 16-bit scaling, exactly as locally),
``image`` (pixel arrays, e.g. from ``ray.data.read_images``), or ``source`` (what ``porter finetune`` listed: a
path, a pixel array or an augmented view, read where the actor runs). ``path`` names each image; ``row``, when
present, is its position in the caller's list.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import DataError, InferenceError


def batch_sources(batch: dict[str, Any]) -> tuple[list[Any], list[str]]:
    """The images of a Ray Data batch and what to call each."""
    if "bytes" in batch:
        sources = [bytes(b) for b in batch["bytes"]]
    elif "image" in batch:
        sources = [np.asarray(im) for im in batch["image"]]
    elif "source" in batch:
        sources = list(batch["source"])
    else:
        raise DataError("a Ray Dataset to predict on needs a 'bytes', 'image' or 'source' column (e.g. from "
                        "ray.data.read_binary_files or read_images, with include_paths=True); it has: "
                        + ", ".join(sorted(batch)))
    paths = [str(p) for p in batch["path"]] if "path" in batch else [f"image {i}" for i in range(len(sources))]
    return sources, paths


class ModelActor:
    """Ray Data's callable class (``map_batches(ModelActor, ...)``): ``job`` is ``predict`` (one row per image,
    ``runtime.records.COLUMNS``) or ``features`` (``row``, ``error``, ``inference_error`` and ``output_J``: the
    backbone's J-th output, one float32 row per image, zeros where ``error`` is not empty)."""

    def __init__(self, model: Any, options: dict[str, Any], job: str = "predict", top_k: int = 5):
        from ..runtime.predictor import Predictor

        self.predictor = Predictor(model, **options)
        self.job, self.top_k = job, top_k

    def __call__(self, batch: dict[str, Any]) -> Any:
        sources, paths = batch_sources(batch)
        rows = np.asarray(batch["row"], np.int64) if "row" in batch else np.full(len(sources), -1, np.int64)
        if self.job == "features":
            return self._features(sources, paths, rows)
        from ..runtime.records import to_record, to_table

        predictions = self.predictor.iter_predictions(sources, names=paths, top_k=self.top_k)
        return to_table(to_record(p, int(r)) for p, r in zip(predictions, rows))

    def _features(self, sources: list[Any], paths: list[str], rows: np.ndarray) -> dict[str, np.ndarray]:
        from ..runtime.results import output_rows

        names = self.predictor.output_names
        got = list(self.predictor.iter_outputs(sources, names=paths, postprocess=lambda out, ids: dict(
            zip(ids, output_rows(out, names)))))
        widths = next(([r.shape[-1] for r in row] for _, row, error in got if error is None), [0] * len(names))
        feats = [np.zeros((len(sources), w), np.float32) for w in widths]
        errors = np.full(len(sources), "", object)  # "" for none: a None column comes back as NaN
        inference = np.zeros(len(sources), bool)
        for i, row, error in got:
            if error is None:
                for f, r in zip(feats, row):
                    f[i] = r
            else:
                errors[i], inference[i] = str(error), isinstance(error, InferenceError)
        return {"row": rows, "error": errors, "inference_error": inference,
                **{f"output_{j}": f for j, f in enumerate(feats)}}
