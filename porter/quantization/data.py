"""The images a quantization is calibrated and checked on: drawn seeded from the user's data, fed through the
model's own preprocessing (the decoding and normalization ``porter predict`` uses).

DATA is a folder of images (searched recursively) or a folder of class folders, whose names then are the true
labels the accuracy gate scores; or, from the API, already-preprocessed tensors (an array, or a dict by input).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import DataError
from ..imaging import is_image_file, list_images, load_image, to_tensor

MIN_EVAL = 20  # fewer held-out inputs can't tell a 1-point drop from noise


@dataclass
class Samples:
    """Model inputs by input name (N x ...), what each row is called, and its class index where DATA has classes."""

    tensors: dict[str, np.ndarray]
    names: list[str]
    labels: np.ndarray | None = None
    classes: tuple[str, ...] | None = None
    skipped: list[str] = field(default_factory=list)  # images that could not be read

    def __len__(self) -> int:
        return len(self.names)

    def rows(self, index: Sequence[int] | np.ndarray) -> "Samples":
        index = np.asarray(index, np.int64)
        return Samples({k: v[index] for k, v in self.tensors.items()}, [self.names[i] for i in index],
                       None if self.labels is None else self.labels[index], self.classes)


@dataclass
class ImageList:
    paths: list[Path]
    labels: np.ndarray | None  # class index per image when DATA is a folder of class folders
    classes: tuple[str, ...] | None
    source: str


def list_data(data: str | os.PathLike) -> ImageList:
    """The images of ``data``; with class folders (two or more subfolders holding images) their labels too."""
    root = Path(data).expanduser()
    if not root.exists():
        raise DataError(f"calibration data not found: {data} (no such file or directory); give a folder of images")
    if not root.is_dir():
        raise DataError(f"{data} is not a folder; give a folder of images (class subfolders make the gate score "
                        f"accuracy too)")
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    loose = [p for p in root.iterdir() if p.is_file() and is_image_file(p)]
    classes = []
    paths: list[Path] = []
    labels: list[int] = []
    if len(subdirs) >= 2 and not loose:
        for d in subdirs:
            try:
                found = list_images([d])
            except DataError:
                continue  # an empty class folder: not a class
            labels += [len(classes)] * len(found)
            classes.append(d.name)
            paths += found
    if len(classes) >= 2:
        return ImageList(paths, np.asarray(labels, np.int64), tuple(classes), str(data))
    return ImageList(list_images([root]), None, None, str(data))


def split(images: ImageList, samples: int, seed: int, eval_images: ImageList | None,
          eval_samples: int) -> tuple[ImageList, ImageList]:
    """(calibration, evaluation): a seeded draw of ``samples`` images for calibration, the gate on others."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(images.paths))
    if eval_images is not None:
        cal = order[:samples]
        ev = rng.permutation(len(eval_images.paths))[:eval_samples]
        return _take(images, cal), _take(eval_images, ev)
    if len(order) < samples + MIN_EVAL:
        raise DataError(f"{images.source} has {len(order)} images: calibration takes {samples} (--samples) and the "
                        f"accuracy gate needs at least {MIN_EVAL} others; add images, lower --samples, or give "
                        f"--eval DIR")
    return _take(images, order[:samples]), _take(images, order[samples:samples + eval_samples])


def draw(images: ImageList, n: int, seed: int) -> ImageList:
    """A seeded draw of up to ``n`` of ``images``."""
    return _take(images, np.random.default_rng(seed).permutation(len(images.paths))[:n])


def _take(images: ImageList, index: np.ndarray) -> ImageList:
    index = np.sort(index)  # read in folder order (locality); the draw stays seeded
    return ImageList([images.paths[i] for i in index], None if images.labels is None else images.labels[index],
                     images.classes, images.source)


def load_samples(images: ImageList, predictor: Any, workers: int | None = None) -> Samples:
    """Decode, resize and normalize ``images`` as ``predictor`` (a fp32 Predictor) does for ``porter predict``.
    Unreadable images are skipped and listed."""
    spec, image_input = predictor.image_spec()
    size = spec.size or tuple(predictor.concrete_shape(image_input, 1)[1:3] if spec.layout == "NHWC"
                              else predictor.concrete_shape(image_input, 1)[2:4])
    channels = predictor.signature.channels

    def one(path: Path) -> np.ndarray | None:
        try:
            return to_tensor([load_image(path, size, name=str(path))], spec, channels)
        except DataError:
            return None

    with ThreadPoolExecutor(max_workers=workers or predictor.decode_workers) as pool:
        tensors = list(pool.map(one, images.paths))
    ok = [i for i, t in enumerate(tensors) if t is not None]
    skipped = [str(images.paths[i]) for i, t in enumerate(tensors) if t is None]
    if not ok:
        raise DataError(f"none of the {len(images.paths)} images drawn from {images.source} could be read")
    batch = predictor.signature.as_input_dtype(np.concatenate([tensors[i] for i in ok]))
    labels = None if images.labels is None else images.labels[ok]
    return Samples({image_input.name: batch}, [str(images.paths[i]) for i in ok], labels, images.classes, skipped)


def from_tensors(given: Any, input_names: Sequence[str], samples: int, seed: int,
                 held_out: bool = True) -> tuple[Samples, Samples | None]:
    """Already-preprocessed calibration data from the API: (calibration, evaluation) rows of the same arrays;
    ``held_out=False`` (the gate has its own images): (the first ``samples`` of a seeded draw, None)."""
    tensors = given if isinstance(given, dict) else {input_names[0]: given}
    if set(tensors) != set(input_names):
        raise DataError(f"calibration tensors are for inputs {sorted(tensors)}, the model takes {list(input_names)}")
    arrays = {k: np.asarray(v) for k, v in tensors.items()}
    n = {len(v) for v in arrays.values()}
    if len(n) != 1:
        raise DataError("calibration tensors must share one batch length (the first axis)")
    n = n.pop()
    order = np.random.default_rng(seed).permutation(n)
    whole = Samples(arrays, [f"row {i}" for i in range(n)])
    if not held_out:
        return whole.rows(np.sort(order[:samples])), None
    if n < samples + MIN_EVAL:
        raise DataError(f"{n} calibration rows given: calibration takes {samples} and the gate needs at least "
                        f"{MIN_EVAL} others")
    return whole.rows(np.sort(order[:samples])), whole.rows(np.sort(order[samples:]))
