"""Write scikit-learn's digits 5-9 as PNG files: an image folder per class for training, and a held-out test set.

    python examples/digits/prepare_data.py out/example/digits [--test-fraction 0.5] [--seed 0] [--force]

Creates OUT/train/<digit>/<n>.png and OUT/test/<digit>/<n>.png (32x32 grey: the 8x8 digits scaled from 0..16 to
0..255 and resized with PIL's bilinear filter -- the same pixels fixtures/backbone/make_backbone.py pretrained on,
for the other digits). The split is stratified and seeded. Works offline: the digits ship with scikit-learn.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

SIZE = 32
CLASSES = (5, 6, 7, 8, 9)


def digit_images(classes) -> tuple[np.ndarray, np.ndarray]:
    d = load_digits()
    keep = np.isin(d.target, classes)
    small = np.clip(np.round(d.images[keep] * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    big = np.stack([np.asarray(Image.fromarray(im).resize((SIZE, SIZE), Image.Resampling.BILINEAR)) for im in small])
    return big, d.target[keep]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path, help="directory to create (train/ and test/ go inside)")
    p.add_argument("--test-fraction", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="replace train/ and test/ if they exist")
    args = p.parse_args(argv)
    if not 0 < args.test_fraction < 1:
        p.error("--test-fraction must be between 0 and 1")
    parts = [args.out / "train", args.out / "test"]
    if any(d.exists() for d in parts):
        if not args.force:
            print(f"prepare_data: {args.out}/train or /test exists; use --force to replace them", file=sys.stderr)
            return 1
        for d in parts:
            shutil.rmtree(d, ignore_errors=True)
    images, labels = digit_images(CLASSES)
    rng = np.random.default_rng(args.seed)
    counts = {"train": 0, "test": 0}
    for c in CLASSES:
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_test = int(round(len(idx) * args.test_fraction))
        for split, chosen in (("test", idx[:n_test]), ("train", idx[n_test:])):
            folder = args.out / split / str(c)
            folder.mkdir(parents=True, exist_ok=True)
            for i in chosen:
                Image.fromarray(images[i]).save(folder / f"{i:04d}.png")
            counts[split] += len(chosen)
    print(f"wrote {counts['train']} training and {counts['test']} test images of digits "
          f"{', '.join(map(str, CLASSES))} under {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
