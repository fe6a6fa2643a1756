"""The driver's side: build the Ray Dataset, run it through a pool of ``ModelActor``s, and hand the results
back in the caller's order."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np

from ..errors import DataError, InferenceError, PorterError, RuntimeSetupError, first_line
from .cluster import READ_CPUS, ActorPlan, plan_actors, require_ray
from .workers import ModelActor

BATCHES_PER_CALL = 2  # model batches per actor call: its decode-ahead pipeline overlaps them; 1 gave the first result 0.7 s sooner and finished 0.7 s later on 1000 images here
REMOTE_SCHEMES = ("s3://", "gs://", "gcs://", "abfs://", "abfss://", "az://", "hdfs://", "http://", "https://")


@dataclass(frozen=True)
class Job:
    """What a model run on Ray needs: the model (bytes, or a path every node can read), the Predictor options,
    and the actor plan."""

    model: Any
    options: dict[str, Any]
    plan: ActorPlan
    batch_size: int
    top_k: int = 5

    @property
    def call_size(self) -> int:
        return self.batch_size * BATCHES_PER_CALL

    def run(self, ds, job: str):
        options = dict(self.options, device=self.plan.device, threads=self.plan.threads,
                       decode_workers=max(2, self.plan.threads), spin=False)
        # the model travels once: Ray Data puts the actor's constructor arguments in the object store (and says
        # so on stderr, ray-project/ray#53727; harmless while the job runs)
        return ds.map_batches(ModelActor, fn_constructor_args=(self.model, options, job, self.top_k),
                              batch_size=self.call_size, batch_format="numpy", concurrency=self.plan.actors,
                              num_cpus=self.plan.cpus, num_gpus=self.plan.gpus or None)


def plan_job(model: Any, options: dict[str, Any], *, device: str, actors: int | None, threads: int | None,
             batch_size: int, top_k: int = 5) -> Job:
    ray = require_ray()
    if not ray.is_initialized():
        from .cluster import quiet_ray_data

        ray.init(address="local", include_dashboard=False, log_to_driver=False)
        quiet_ray_data()
    plan = plan_actors(ray.cluster_resources(), device, actors, threads)
    return Job(model, options, plan, batch_size, top_k)


def model_payload(model: Any) -> tuple[str, Any]:
    """(name, what the actors load): the serialized model, or the path of one with external data."""
    from ..files import read_model

    name, proto, model_bytes, path = read_model(model)
    return name, (model_bytes if model_bytes is not None else str(path)), proto


def items_dataset(sources: Sequence[Any], names: Sequence[str], job: Job):
    """A Ray Dataset of (row, path, source): the actors read each source where they run (a path must be readable
    on every node, as for any local path in Ray). Blocks of one actor call each, and at least one per actor."""
    import ray.data

    rows = [{"row": i, "path": str(n), "source": (os.fspath(s) if isinstance(s, os.PathLike) else s)}
            for i, (s, n) in enumerate(zip(sources, names))]
    blocks = max(job.plan.actors, -(-len(rows) // job.call_size))
    return ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows), blocks)))


def files_dataset(paths: Sequence[str]):
    """Ray Data reading the files (``read_binary_files``): remote URIs (s3://, gs://, ...) and folders there."""
    import ray.data

    from ..imaging import IMAGE_EXTENSIONS

    return ray.data.read_binary_files(list(paths), include_paths=True,
                                      file_extensions=[e.lstrip(".") for e in IMAGE_EXTENSIONS],
                                      ray_remote_args={"num_cpus": READ_CPUS})


def ordered(pairs: Iterator[tuple[int, Any]], n: int) -> Iterator[tuple[int, Any]]:
    """``(row, item)`` pairs back in row order 0..n-1, whatever order the actors finished in."""
    waiting: dict[int, Any] = {}
    want = 0
    for row, item in pairs:
        waiting[int(row)] = item
        while want in waiting:
            yield want, waiting.pop(want)
            want += 1
    if want != n:
        raise RuntimeSetupError(f"Ray returned {want} of {n} results")


@contextlib.contextmanager
def ray_errors(where: str) -> Iterator[None]:
    """A failure inside Ray as porter's one-line error: the actor's own PorterError when it raised one."""
    try:
        yield
    except PorterError:
        raise
    except Exception as e:  # noqa: BLE001 - RayTaskError, RayActorError, ObjectLostError, ...
        cause = getattr(e, "cause", None)
        if isinstance(cause, PorterError):
            raise type(cause)(str(cause)) from None
        raise RuntimeSetupError(f"{where} failed on Ray: {first_line(cause or e)}") from None


# --- features (porter finetune --ray) ---------------------------------------------------------------------------

class RayBackbone:
    """The backbone pass of ``porter finetune --ray``: what ``transfer.features`` asks of its local Predictor
    (``output_names``, ``batch_size``, ``preprocess``, ``device``, ``providers``, ``iter_outputs``), run by a pool
    of Ray actors, each a ``Predictor`` built with the same ``options`` (so the same pixels and the same numbers)."""

    def __init__(self, backbone: Any, options: dict[str, Any], *, device: str = "auto", actors: int | None = None,
                 batch_size: int | None = None):
        from ..runtime.predictor import DEFAULT_BATCH
        from ..runtime.signature import ModelSignature
        from ..spec import ModelCard

        name, payload, proto = model_payload(backbone)
        self.signature = ModelSignature.read(proto, ModelCard.from_onnx(proto), name, options.get("preprocess"),
                                             options.get("scores", "raw"))
        self.batch_size = self.signature.fixed_batch or batch_size or DEFAULT_BATCH
        self.job = plan_job(payload, dict(options, batch_size=self.batch_size), device=device, actors=actors,
                            threads=None, batch_size=self.batch_size)
        self.output_names = self.signature.output_names
        self.preprocess = self.signature.preprocess
        self.device = f"{self.job.plan.device}, {self.job.plan.describe()}"
        self.providers = [f"Ray: {self.job.plan.describe()}"]

    def iter_outputs(self, sources: Sequence[Any], names: Sequence[str], postprocess: Any = None
                     ) -> Iterator[tuple[int, tuple[np.ndarray, ...] | None, DataError | None]]:
        """``(index, per-output rows, error)`` in order, as ``Predictor.iter_outputs`` yields them with
        ``runtime.results.output_rows`` as its postprocess (which the actors apply; ``postprocess`` is not
        shipped): ``error`` an InferenceError when the model failed on the batch, else a DataError for an
        unreadable image."""
        ds = self.job.run(items_dataset(sources, names, self.job), "features")
        with ray_errors("feature extraction"):
            pairs = ((row, (b, j)) for b in ds.iter_batches(batch_size=None, batch_format="numpy")
                     for j, row in enumerate(b["row"]))
            for i, (b, j) in ordered(pairs, len(sources)):
                error = b["error"][j]
                if error:
                    yield i, None, (InferenceError if b["inference_error"][j] else DataError)(str(error))
                else:
                    yield i, tuple(b[f"output_{m}"][j] for m in range(len(self.output_names))), None


# --- predictions (porter predict --ray, porter.ray.predict) -------------------------------------------------------

@dataclass
class PredictRun:
    """A prediction job, planned: the lazy Ray Dataset of records (``runtime.records.COLUMNS``), the model's
    signature, and how many inputs (None for a Dataset the caller built)."""

    dataset: Any
    job: Job
    signature: Any
    name: str
    inputs: int | None

    def describe(self) -> str:
        import ray

        res = ray.cluster_resources()
        gpus = int(res.get("GPU", 0))
        return (f"{self.name} on Ray: {self.job.plan.describe()} (cluster: {int(res.get('CPU', 0))} CPUs"
                f"{f', {gpus} GPUs' if gpus else ''}), batches of {self.job.batch_size}")

    def __iter__(self) -> Iterator[Any]:
        """The Predictions, in input order (for paths listed locally)."""
        from ..runtime.records import from_record

        raw = self.signature.score_output is None and not self.signature.tasks
        with ray_errors("prediction"):
            records = (r for b in self.dataset.iter_batches(batch_size=None, batch_format="pyarrow")
                       for r in b.to_pylist())
            if self.inputs is None:
                for r in records:
                    yield from_record(r, raw)
                return
            for _, r in ordered(((r["row"], r) for r in records), self.inputs):
                yield from_record(r, raw)


def plan_predict(model: Any, data: Any, *, top_k: int = 5, device: str = "auto", actors: int | None = None,
                 threads: int | None = None, batch_size: int | None = None, preprocess: Any = None,
                 precision: str | None = None, fast_decode: bool = False, scores: str = "auto") -> PredictRun:
    from ..errors import UsageError
    from ..runtime.predictor import DEFAULT_BATCH
    from ..runtime.signature import ModelSignature
    from ..spec import ModelCard

    if top_k < 1:
        raise UsageError(f"top-k must be at least 1, got {top_k}")
    name, payload, proto = model_payload(model)
    signature = ModelSignature.read(proto, ModelCard.from_onnx(proto), name, preprocess, scores)
    signature.image_spec()  # a model that can't take images fails here, before Ray does any work
    fixed = signature.fixed_batch
    options = dict(batch_size=batch_size, preprocess=preprocess, precision=precision, fast_decode=fast_decode,
                   scores=scores)
    job = plan_job(payload, options, device=device, actors=actors, threads=threads,
                   batch_size=fixed or batch_size or DEFAULT_BATCH, top_k=top_k)
    ds, n = input_dataset(data, job)
    return PredictRun(job.run(ds, "predict"), job, signature, name, n)


def input_dataset(data: Any, job: Job):
    """(Ray Dataset, number of inputs or None): a Dataset as given (columns bytes/image/source, path); remote
    URIs read by Ray Data; local files and folders listed as ``porter predict`` lists them."""
    ray = require_ray()
    if isinstance(data, ray.data.Dataset):
        return data, None
    items = [data] if isinstance(data, (str, os.PathLike)) else list(data)
    if not items:
        raise DataError("no inputs to predict on")
    if any(str(p).startswith(REMOTE_SCHEMES) for p in items):
        return files_dataset([str(p) for p in items]), None
    from ..imaging import list_images

    paths = [str(p) for p in list_images(items)]
    return items_dataset(paths, paths, job), len(paths)
