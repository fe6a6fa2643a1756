"""What a finetune feeds the backbone: the input's geometry (image or vector), the preprocessing, and sample inputs
for the merged-model check."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ..errors import UsageError
from ..spec import ModelCard, PreprocessSpec
from .data import Dataset
from .features import Features, InputGeometry

if TYPE_CHECKING:
    from .options import FinetuneOptions

VALIDATION_EXAMPLES = 16  # examples the merged model is checked on


def input_geometry(model, opts: FinetuneOptions, card: ModelCard) -> InputGeometry:
    from ..graph.inspect import graph_inputs, image_geometry

    inputs = graph_inputs(model)
    if len(inputs) != 1:
        raise UsageError(f"porter finetune needs a model with one input; this one has {len(inputs)} "
                         f"({', '.join(i.name for i in inputs)})")
    t = inputs[0]
    geo = image_geometry(t.shape)
    if geo is None:
        if opts.image_size is not None:
            raise UsageError(f"--image-size is for image models; this model's input {t.describe()} is not an image")
        if t.dtype not in ("float32", "unknown"):
            raise UsageError(f"the model input {t.describe()} is {t.dtype}; porter finetune feeds float32 vectors: "
                             f"give a model with a float32 input (re-export it, or cut the integer input off)")
        return InputGeometry(t.name, "vector", dims=t.shape)
    if t.dtype not in ("float32", "unknown"):
        raise UsageError(f"the model input {t.describe()} is {t.dtype}; porter finetune feeds float32 images, not "
                         f"{t.dtype} pixels yet: re-export the model with a float32 image input (its own Cast then "
                         f"does nothing) and give --preprocess raw")
    layout, size, channels = geo
    if opts.image_size is not None:
        if size is not None and tuple(opts.image_size) != tuple(size):
            raise UsageError(f"image size {opts.image_size[0]}x{opts.image_size[1]} doesn't fit the backbone: its "
                             f"input {t.describe()} takes {size[0]}x{size[1]}; drop --image-size or give "
                             f"{size[0]},{size[1]}")
        size = tuple(opts.image_size)
    elif size is None and card.preprocess is not None and card.preprocess.size:
        size = tuple(card.preprocess.size)
    return InputGeometry(t.name, "image", layout, size, channels, dims=t.shape)


def resolve_preprocess(card: ModelCard, opts: FinetuneOptions, g: InputGeometry) -> tuple[PreprocessSpec | None, str | None]:
    known = card.preprocess
    if g.kind != "image":
        if opts.preprocess or opts.mean or opts.std:
            raise UsageError("--preprocess/--mean/--std describe image inputs; this model takes vectors")
        return known, None
    spec = PreprocessSpec.resolve(known, mode=opts.preprocess, mean=opts.mean, std=opts.std, layout=g.layout,
                                  size=g.size, channels=g.channels)
    if spec is None:
        return (PreprocessSpec.preset("raw", layout=g.layout, size=g.size, channels=g.channels),
                "the model records no preprocessing; feeding raw 0..255 pixels (give --preprocess unit|tf|torch|caffe "
                "if the backbone was trained on normalized input)")
    return spec, None


def batch_dim(model) -> str | int:
    dims = model.graph.input[0].type.tensor_type.shape.dim
    if dims and dims[0].HasField("dim_param"):
        return dims[0].dim_param
    if dims and dims[0].HasField("dim_value"):
        return dims[0].dim_value
    return "batch"


def sample_inputs(dataset: Dataset, feats: Features, g: InputGeometry, spec: PreprocessSpec | None,
                   positions: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Up to VALIDATION_EXAMPLES model inputs, spread over the data (or ``positions``), and their positions in
    ``feats``."""
    from ..imaging import load_image, to_tensor

    among = np.arange(len(feats.index)) if positions is None else np.asarray(positions)
    n = len(among)
    pos = among[np.unique(np.linspace(0, n - 1, min(n, VALIDATION_EXAMPLES)).round().astype(np.int64))]
    idx = feats.index[pos]
    if dataset.kind == "vectors":
        return np.ascontiguousarray(dataset.x[idx], np.float32), pos
    images = [load_image(dataset.items[i], g.size, name=dataset.names[i]) for i in idx]
    return to_tensor(images, spec, g.channels), pos
