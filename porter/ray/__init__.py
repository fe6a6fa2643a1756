"""Batch inference and feature extraction on Ray Data (``pip install 'porter[ray]'``).

``porter.ray.predict(model, data, ...)`` returns a lazy Ray Dataset of predictions, one row per image with the
columns of ``porter.runtime.records`` (path, label, class_index, score, top_k, outputs, error): write it anywhere
Ray writes (``.write_parquet("s3://...")``) or iterate it. ``data``: image files or folders (listed on the driver
as ``porter predict`` lists them; every node must see them at the same path), remote URIs (``s3://bucket/images``,
read by Ray Data's ``read_binary_files``), or a Ray Dataset with a ``bytes`` or ``image`` column (``path``
naming the rows), e.g. ``ray.data.read_images(..., include_paths=True)``.

How it runs: a pool of ``workers.ModelActor``s, each loading the model once and running ``porter.runtime``'s
``Predictor`` on its batches: porter's decoding, resizing, normalization and scores, so a row equals what
``porter predict`` prints for that image. On a cluster with GPUs one actor per GPU (``num_gpus=1``); on CPUs one
single-threaded actor per CPU (``cluster.plan_actors``). ``porter finetune --ray`` runs the backbone pass the same
way (``jobs.RayBackbone``); the head trains on the driver, and the features are cached as locally.

Connecting: ``porter.ray.session(address)`` (None: a local Ray; ``auto``: the running cluster; ``HOST:PORT`` or
``ray://HOST:PORT``). The functions here use the caller's Ray session when one is up, else start a local one.
"""

from __future__ import annotations

from typing import Any

from .cluster import ActorPlan, plan_actors, session

__all__ = ["ActorPlan", "plan_actors", "predict", "session"]


def predict(model: Any, data: Any, *, top_k: int = 5, device: str = "auto", actors: int | None = None,
            threads: int | None = None, batch_size: int | None = None, preprocess: Any = None,
            precision: str | None = None, fast_decode: bool = False):
    """A lazy Ray Dataset of predictions (see the module docstring). ``actors``: the pool size (default: one per
    GPU, else one per CPU); ``threads``: onnxruntime threads per CPU actor (default 1); the rest as
    ``porter.load`` / ``Predictor.predict`` take them."""
    from .jobs import plan_predict

    return plan_predict(model, data, top_k=top_k, device=device, actors=actors, threads=threads,
                        batch_size=batch_size, preprocess=preprocess, precision=precision,
                        fast_decode=fast_decode).dataset
