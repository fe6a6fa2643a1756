"""Augmented views of the training images (``--augment flip,crop,rotate,color --views K``).

Each view is an ``imaging.ImageSource``: decoded at full size, transformed, then resized by the same pipeline as
every image, so the backbone featurizes views exactly as it does the originals (once, cached). Every random choice
comes from ``numpy.random.default_rng([seed, example, view])``: the same seed gives the same views, in any thread
order. Only the training split gets views; validation stays the original images.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from ..errors import UsageError
from ..imaging import ImageSource, load_image
from .data import Dataset

AUGMENTS = ("flip", "crop", "rotate", "color")
CROP_AREA = (0.64, 1.0)  # fraction of the image a crop keeps
CROP_ASPECT = (3 / 4, 4 / 3)
ROTATE_DEGREES = 15.0
COLOR_JITTER = 0.2  # brightness, contrast and saturation factors in 1 +- this


def parse_augment(value: Any) -> tuple[str, ...]:
    """``"flip,crop"`` (or a sequence) -> ('flip', 'crop'); unknown names refused by name."""
    if value is None or value == "" or value == ():
        return ()
    names = [v.strip() for v in value.split(",")] if isinstance(value, str) else [str(v).strip() for v in value]
    names = [n for n in names if n]
    bad = [n for n in names if n not in AUGMENTS]
    if bad:
        raise UsageError(f"unknown augmentation {', '.join(map(repr, bad))}; choose from: {', '.join(AUGMENTS)} "
                         f"(comma-separated, e.g. --augment crop,color)")
    return tuple(dict.fromkeys(names))


@dataclass(frozen=True, eq=False)  # eq=False: a pixel-array source can't be hashed
class AugmentedView(ImageSource):
    source: Any  # the original: a path or a pixel array
    ops: tuple[str, ...]
    seed: tuple[int, int, int]  # (seed, example, view)

    def rgb(self, label: str) -> np.ndarray:
        from PIL import Image, ImageEnhance

        rng = np.random.default_rng(list(self.seed))
        img = Image.fromarray(load_image(self.source, None, name=label))
        w, h = img.size
        if "crop" in self.ops:
            area = rng.uniform(*CROP_AREA) * w * h
            aspect = np.exp(rng.uniform(np.log(CROP_ASPECT[0]), np.log(CROP_ASPECT[1])))
            cw = int(round(min(w, np.sqrt(area * aspect))))
            ch = int(round(min(h, np.sqrt(area / aspect))))
            x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            img = img.crop((x0, y0, x0 + max(1, cw), y0 + max(1, ch)))
        if "flip" in self.ops and rng.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if "rotate" in self.ops:
            img = img.rotate(float(rng.uniform(-ROTATE_DEGREES, ROTATE_DEGREES)), Image.Resampling.BILINEAR)
        if "color" in self.ops:
            for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
                img = enhance(img).enhance(float(rng.uniform(1 - COLOR_JITTER, 1 + COLOR_JITTER)))
        return np.asarray(img.convert("RGB"), dtype=np.uint8)


def augmented_views(dataset: Dataset, positions: Sequence[int], ops: Sequence[str], views: int,
                    seed: int) -> Dataset:
    """A dataset of ``views`` augmented views of each example at ``positions`` (dataset indices), in order:
    example 0's views, example 1's, ... Its fingerprint names the originals, the positions, the ops and the seed."""
    if dataset.kind not in ("images", "pixels"):
        raise UsageError("--augment is for image data; these examples are vectors")
    items, labels, names = [], [], []
    for i in positions:
        for k in range(views):
            items.append(AugmentedView(dataset.items[i], tuple(ops), (int(seed), int(i), k)))
            labels.append(dataset.labels[i])
            names.append(f"{dataset.names[i]} (view {k + 1})")
    fingerprint = hashlib.sha256(json.dumps({"data": dataset.fingerprint, "positions": [int(p) for p in positions],
                                             "ops": list(ops), "views": views, "seed": seed}).encode()).hexdigest()
    return Dataset(dataset.kind, dataset.classes, np.asarray(labels, np.int64), names, fingerprint,
                   f"{dataset.source} ({views} augmented view{'s' if views != 1 else ''} of {len(positions)} "
                   f"training examples: {', '.join(ops)})", items)
