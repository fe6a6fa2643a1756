"""Backbone features, computed once and cached on disk.

The backbone runs through ``porter.runtime.Predictor`` (CUDA where it works, else CPU): images go through the
same pipeline as ``porter predict`` (decoding ahead in a thread pool, concurrent inference streams on the CPU),
so a model is trained and served on identical pixels. Unreadable images are skipped, counted and named. Features
are cached per cut under ``<porter cache>/features/<key>.npz``, the key hashing the model (a fingerprint of its graph
and weights that ignores tensor names, which converters generate differently each time), the cut (the tensor's
position and its pooling), the data (paths, sizes, mtimes; or the array bytes) and the preprocessing, so a second run
with other head settings skips extraction. Several cuts are extracted in one backbone pass.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from ..errors import DataError, InferenceError, UsageError
from ..runtime.results import output_rows
from .data import Dataset

if TYPE_CHECKING:
    import onnx

    from ..graph.cuts import Cut
    from ..spec import PreprocessSpec

CACHE_FORMAT = 2  # 2: keyed by the model's name-blind fingerprint and the cut's position in it


@dataclass(frozen=True)
class InputGeometry:
    """What the backbone's single input takes: an image (layout, size, channels) or a vector of ``dims``."""

    name: str
    kind: str  # image | vector
    layout: str | None = None
    size: tuple[int, int] | None = None
    channels: int | None = None
    dims: tuple[Any, ...] = ()


@dataclass
class Features:
    features: np.ndarray  # float32 N_valid x F
    labels: np.ndarray  # int64 N_valid
    index: np.ndarray  # positions of the valid examples in the dataset
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (example name, why)
    seconds: float = 0.0
    cached: bool = False
    cache_path: str | None = None
    device: str = "cpu"
    providers: list[str] = field(default_factory=list)

    @property
    def per_second(self) -> float:
        n = len(self.index) + len(self.skipped)
        return n / self.seconds if self.seconds > 0 else float("inf")


# --- progress bar -----------------------------------------------------------------------------------------------

class Progress:
    """A one-line progress bar on stderr (redrawn on a terminal, a few plain lines otherwise)."""

    def __init__(self, total: int, label: str, enabled: bool = True, stream=None):
        self.total, self.label, self.enabled = total, label, enabled
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.start = time.perf_counter()
        self.done = 0
        self._last_pct = -1

    def update(self, n: int) -> None:
        self.done += n
        if not self.enabled:
            return
        pct = int(100 * self.done / max(1, self.total))
        if self.tty:
            self._draw("\r", "")
        elif pct // 25 > self._last_pct // 25 and self.done < self.total:
            self._draw("", "\n")
        self._last_pct = pct

    def close(self) -> None:
        if self.enabled:
            self._draw("\r" if self.tty else "", "\n")

    def _draw(self, pre: str, post: str) -> None:
        elapsed = time.perf_counter() - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        width = 24
        fill = int(width * self.done / max(1, self.total))
        bar = "#" * fill + "." * (width - fill)
        self.stream.write(f"{pre}{self.label} [{bar}] {self.done}/{self.total} {rate:,.0f}/s {elapsed:.1f}s{post}")
        self.stream.flush()


# --- cache ------------------------------------------------------------------------------------------------------

def feature_cache_dir(override: str | os.PathLike | None = None) -> Path:
    """``override`` (finetune's ``cache_dir``: the features folder itself), else ``$PORTER_CACHE/features``."""
    from ..cache import cache_dir

    return Path(override).expanduser() if override is not None else cache_dir("features")


def cache_key(model_digest: str, cut_id: str, dataset: Dataset, spec: "PreprocessSpec | None",
              geometry: InputGeometry) -> str:
    payload = {"format": CACHE_FORMAT, "model": model_digest, "cut": cut_id, "data": dataset.fingerprint,
               "preprocess": spec.to_dict() if spec is not None and geometry.kind == "image" else None,
               "size": geometry.size, "channels": geometry.channels, "layout": geometry.layout}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]


def _load_cached(path: Path, dataset: Dataset) -> Features | None:
    try:
        with np.load(path, allow_pickle=False) as z:
            index = z["index"]
            skipped = [tuple(s) for s in json.loads(str(z["skipped"]))]
            # a large entry keeps its features beside it, memory-mapped (they may not fit in memory)
            if "features" in z:
                feats = z["features"]
            else:  # the file holds a row per example; rows past the readable ones were never written
                feats = np.load(_mapped_path(path), mmap_mode="r", allow_pickle=False)[:len(index)]
    except Exception:  # noqa: BLE001 - a corrupt or foreign cache file is recomputed
        return None
    # an entry must describe this data: every example featurized once or skipped, finite values; anything else
    # (an entry cut short, one from other files, NaNs) is recomputed, not trained on
    if feats.ndim != 2 or len(feats) != len(index) or (len(index) and (index.min() < 0 or index.max() >= len(dataset))):
        return None
    if len(np.unique(index)) != len(index) or len(index) + len(skipped) != len(dataset):
        return None
    names = {dataset.names[i] for i in range(len(dataset))} if skipped else set()
    if any(not s or s[0] not in names for s in skipped) or not all_finite(feats):
        return None
    return Features(feats, dataset.labels[index], index, skipped, cached=True, cache_path=str(path))


def all_finite(x: np.ndarray, rows: int = 4096) -> bool:
    """``np.isfinite(x).all()`` in slices: a memory-mapped array is never read whole into memory."""
    return all(bool(np.isfinite(x[i:i + rows]).all()) for i in range(0, len(x), rows))


def _mapped_path(path: Path) -> Path:
    return path.with_suffix(".features.npy")


def _save_cached(path: Path, f: Features) -> None:
    with contextlib.suppress(OSError):  # a read-only cache only costs a recomputation next time
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".feat-", suffix=".npz", dir=path.parent)
        try:
            mapped = isinstance(f.features, np.memmap) and f.features.filename
            with os.fdopen(fd, "wb") as out:
                if mapped:
                    np.savez(out, index=f.index, skipped=np.array(json.dumps(f.skipped)))
                else:
                    np.savez(out, features=f.features, index=f.index, skipped=np.array(json.dumps(f.skipped)))
            if mapped:  # the memory-mapped file is already the .npy the entry needs: the rows are written in place
                f.features.flush()
                os.replace(f.features.filename, _mapped_path(path))
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)


def format_size(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} bytes"


class RowStore:
    """Feature rows of one output, in memory while they fit what is left of a shared ``budget`` (bytes, a
    one-element list: outputs allocated first take from it first), else in a memory-mapped ``.npy`` file in
    ``folder`` (the cache entry when caching; otherwise unlinked at once, living as long as the mapping)."""

    def __init__(self, n: int, budget: list[int], folder: Path, keep: bool, hint: str):
        self.n, self.budget, self.folder, self.keep, self.hint = n, budget, folder, keep, hint
        self.rows: np.ndarray | None = None
        self.count = 0

    def _allocate(self, width: int) -> None:
        need = self.n * width * 4
        if need <= self.budget[0]:
            self.budget[0] -= need
            self.rows = np.empty((self.n, width), np.float32)
            return
        import shutil
        from numpy.lib.format import open_memmap

        self.folder.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(self.folder).free
        if need > free * 0.9:
            raise UsageError(f"the features of {self.n} examples ({width:,} values each) need {format_size(need)}: "
                             f"more than the memory budget left ({format_size(self.budget[0])}) and than the "
                             f"{format_size(free)} free in {self.folder}; {self.hint}")
        fd, name = tempfile.mkstemp(prefix=".rows-", suffix=".npy", dir=self.folder)
        os.close(fd)
        self.rows = open_memmap(name, mode="w+", dtype=np.float32, shape=(self.n, width))
        if not self.keep:
            with contextlib.suppress(OSError):
                os.unlink(name)
            self.rows.filename = None  # nothing to move into the cache

    def add(self, row: np.ndarray) -> None:
        if self.rows is None:
            self._allocate(row.shape[-1])
        self.rows[self.count] = row
        self.count += 1

    def discard(self) -> None:
        name = getattr(self.rows, "filename", None)
        if name:
            with contextlib.suppress(OSError):
                os.unlink(name)

    def result(self) -> np.ndarray:
        if self.rows is None:
            return np.zeros((0, 0), np.float32)
        if isinstance(self.rows, np.memmap):
            return self.rows[:self.count] if self.count < self.n else self.rows
        return self.rows[:self.count]


# --- extraction -------------------------------------------------------------------------------------------------

def compute_features(model: "onnx.ModelProto", cuts: "Sequence[Cut]", dataset: Dataset, geometry: InputGeometry,
                     spec: "PreprocessSpec | None", *, batch_size: int = 64, device: str = "auto", cache: bool = True,
                     cache_dir: str | os.PathLike | None = None, progress: bool = True,
                     workers: int | None = None, memory_budget: int | None = None, ray: Any = None,
                     actors: int | None = None) -> dict[str, Features]:
    """Features at every cut (``Cut.key`` -> Features) for every readable example of ``dataset``.

    Cuts found in the cache are read from it; the others are computed together, in one pass of a backbone with
    one output per cut. The cache key is the model's name-blind fingerprint, so the same source converted again
    (other generated tensor names) still hits. Features larger than ``memory_budget`` bytes (default: a quarter of
    the available memory) are written to a memory-mapped file instead of memory (the cache entry itself).
    ``ray``: a ``porter.ray.cluster.Connection``: the backbone pass over images runs on a pool of ``actors`` Ray
    actors (``porter.ray.jobs.RayBackbone``), connected only when some cut is not cached; vectors run here.
    """
    from ..graph.surgery import Fingerprint, extract_backbone

    fingerprint = Fingerprint(model)
    paths = {c.key: feature_cache_dir(cache_dir) / (
        cache_key(fingerprint.digest, _cut_id(fingerprint, c), dataset, spec, geometry) + ".npz") for c in cuts}
    found: dict[str, Features] = {}
    if cache:
        for c in cuts:
            if paths[c.key].is_file():
                hit = _load_cached(paths[c.key], dataset)
                if hit is not None:
                    _check_classes(dataset, hit)
                    found[c.key] = hit
    missing = [c for c in cuts if c.key not in found]
    if missing:
        start = time.perf_counter()
        _check_vectors(dataset, geometry)
        backbone = extract_backbone(model, missing)
        if ray is not None and dataset.kind != "vectors":
            from ..ray.jobs import RayBackbone

            ray.connect()
            predictor = RayBackbone(backbone, backbone_options(geometry, spec, batch_size), device=device,
                                    actors=actors)
        else:
            predictor = backbone_predictor(backbone, geometry, spec, device=device, batch_size=batch_size,
                                           workers=workers)
        folder = feature_cache_dir(cache_dir)
        budget = [memory_budget if memory_budget is not None else default_memory_budget()]
        stores = [RowStore(len(dataset), budget, folder, cache,
                           "give a smaller --unfreeze or a later --train-from, or free disk space" if c.kind == "tail"
                           else "choose a narrower --cut, or free disk space") for c in missing]
        try:
            outputs, index, skipped = _run(predictor, dataset, geometry, progress, stores)
        except BaseException:
            for store in stores:
                store.discard()
            raise
        seconds = time.perf_counter() - start
        for c, feats in zip(missing, outputs):
            result = Features(feats, dataset.labels[index], index, skipped, seconds, device=predictor.device,
                              providers=list(predictor.providers))
            _check_classes(dataset, result)
            if cache:
                _save_cached(paths[c.key], result)
                result.cache_path = str(paths[c.key])
            found[c.key] = result
    return {c.key: found[c.key] for c in cuts}


def default_memory_budget() -> int:
    """A quarter of the memory available now (training needs room beside the features); 1 GiB if unknown."""
    from ..runtime.session import available_memory

    free = available_memory()
    return free // 4 if free else 2**30


def _cut_id(fingerprint, cut: "Cut") -> str:
    return fingerprint.tensor_id(cut.name) + cut.pooling  # the tensor by position, then its pooling


def backbone_options(g: InputGeometry, spec: "PreprocessSpec | None", batch_size: int | None) -> dict[str, Any]:
    """The Predictor options of a backbone pass: images of ``g.size`` preprocessed by ``spec``, raw outputs, and
    no optimized-model cache (every cut is a new model)."""
    if g.kind == "image" and spec is not None and g.size is not None:
        spec = spec.with_(size=g.size)
    return dict(batch_size=batch_size, preprocess=spec, scores="raw", cache=False)


def backbone_predictor(backbone: "onnx.ModelProto", g: InputGeometry, spec: "PreprocessSpec | None", *,
                       device: str = "cpu", batch_size: int | None = None, workers: int | None = None):
    """A Predictor running the backbone here (``backbone_options``); spin off: the decoding threads need the
    cores."""
    from ..runtime.predictor import Predictor

    return Predictor(backbone, device=device, spin=False, decode_workers=workers,
                     **backbone_options(g, spec, batch_size))


def _check_vectors(dataset: Dataset, g: InputGeometry) -> None:
    if dataset.kind == "vectors":
        if g.kind == "image" and dataset.x is not None and dataset.x.ndim == 2:
            raise DataError(f"the data are vectors of {dataset.x.shape[1]} numbers but the model takes images "
                            f"{_fmt(g.dims)}; give an image folder (or pixel arrays)")
        want = tuple(g.dims[1:])
        got = tuple(dataset.x.shape[1:])
        if len(want) != len(got) or any(isinstance(w, int) and w > 0 and w != h for w, h in zip(want, got)):
            what = "CSV has" if dataset.source.lower().endswith((".csv", ".tsv", ".txt")) else "x has"
            if len(got) == 1 and len(want) == 1:
                raise DataError(f"{what} {got[0]} feature columns but the model takes {want[0]} features "
                                f"(input {g.name!r} {_fmt(g.dims)})")
            raise DataError(f"{what} examples of shape {list(got)} but the model input {g.name!r} is {_fmt(g.dims)}")
    elif g.kind != "image":
        raise DataError(f"the data are images but the model input {g.name!r} is {_fmt(g.dims)}, not an image; "
                        f"give a CSV (or an array) of {_fmt(g.dims[1:])} values per example")


def _fmt(dims) -> str:
    return "[" + ", ".join("?" if not isinstance(d, int) or d <= 0 else str(d) for d in dims) + "]"


def _check_classes(dataset: Dataset, f: Features) -> None:
    counts = np.bincount(f.labels, minlength=len(dataset.classes))
    position = {name: i for i, name in enumerate(dataset.names)} if f.skipped else {}
    for c, name in enumerate(dataset.classes):
        if counts[c] == 0:
            bad = [s for s in f.skipped if dataset.labels[position[s[0]]] == c]
            example = f" (e.g. {bad[0][1]})" if bad else ""
            raise DataError(f"class {name!r} has no readable image: all {int((dataset.labels == c).sum())} of its "
                            f"files failed to decode{example}")


def _run(predictor, dataset: Dataset, g: InputGeometry, progress: bool, stores: "list[RowStore]"):
    n = len(dataset)
    batch_size = predictor.batch_size
    bar = Progress(n, "features", enabled=progress)
    index: list[int] = []
    skipped: list[tuple[str, str]] = []
    names = predictor.output_names

    def features(out: dict[str, np.ndarray]) -> list[tuple[np.ndarray, ...]]:
        return output_rows(out, names)

    def add(row: tuple[np.ndarray, ...]) -> None:
        for store, r in zip(stores, row):
            store.add(r)

    if dataset.kind == "vectors":
        for i in range(0, n, batch_size):
            ids = list(range(i, min(n, i + batch_size)))
            try:
                out = predictor.run_batched(np.ascontiguousarray(dataset.x[i:i + batch_size], np.float32))
            except InferenceError as e:
                raise DataError(f"the backbone failed on a batch: {e}") from None
            for row in features(out):
                add(row)
            index.extend(ids)
            bar.update(len(ids))
    else:
        if predictor.preprocess is None:
            raise DataError("the model's preprocessing is unknown; give --preprocess (raw, unit, tf, torch or caffe)")
        if g.size is None:
            raise DataError(f"the model input {g.name!r} {_fmt(g.dims)} has no fixed image size; give --image-size H,W")
        done = 0
        for i, row, error in predictor.iter_outputs(dataset.items, names=dataset.names,
                                                    postprocess=lambda out, ids: dict(zip(ids, features(out)))):
            if isinstance(error, InferenceError):
                if not index:  # the very first batch: the image size is what doesn't fit
                    size = "x".join(map(str, g.size or ()))
                    raise UsageError(f"image size {size} doesn't fit the backbone (input {g.name!r} {_fmt(g.dims)}): "
                                     f"{error}; give --image-size with a size the model accepts") from None
                raise DataError(f"the backbone failed on a batch: {error}") from None
            if error is not None:
                skipped.append((dataset.names[i], str(error)))
            else:
                add(row)
                index.append(i)
            done += 1
            if done % batch_size == 0 or done == n:
                bar.update(done - bar.done)
    bar.close()
    if not index:
        first = skipped[0][1] if skipped else "no examples"
        raise DataError(f"none of the {n} images could be read (e.g. {first})")
    outputs = [store.result() for store in stores]
    for feats in outputs:
        if not all_finite(feats):
            bad = sum(int((~np.isfinite(feats[i:i + 4096])).any(axis=1).sum()) for i in range(0, len(feats), 4096))
            raise DataError(f"the backbone produced NaN or inf features for {bad} of {len(feats)} examples; check "
                            f"the preprocessing (--preprocess, --mean, --std)")
    return outputs, np.asarray(index, np.int64), skipped
