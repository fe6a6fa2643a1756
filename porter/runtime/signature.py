"""What a model takes and gives, read once from its graph and porter metadata: ``ModelSignature``.

Inputs and outputs, the fixed batch (if any), the one image input and how images become it (the preprocessing,
integer pixels fed raw), the classifier output and its score transform, and the labels. The Predictor, the image
pipeline and ``porter bench`` read these facts from here instead of re-deriving them.

Scores: the score output is traced back through shape-only ops (Identity, Reshape, Flatten, Squeeze, Cast ...): out
of a ``Softmax`` (or ``Sigmoid``, multi-label) it is reported as is; out of ``LogSoftmax`` it is exponentiated;
otherwise the model emits logits and porter applies a softmax. The decision is made once from the graph.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import DataError, UsageError
from ..graph.inspect import TensorInfo, graph_inputs, graph_outputs, image_geometry, walk_back
from ..graph.validate import make_inputs
from ..imaging import to_tensor
from ..spec import ModelCard, PreprocessSpec

SCORE_MODES = ("auto", "raw", "softmax")
SHAPE_ONLY_OPS = {"Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Cast", "Transpose", "Dropout"}


@dataclass(frozen=True)
class ModelSignature:
    name: str
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    fixed_batch: int | None  # the batch every input was exported with, when the model runs only at that size
    image_input: TensorInfo | None  # the one image input: float (normalized) or integer (raw pixels)
    preprocess: PreprocessSpec | None  # how images become the image input
    score_output: str | None  # the classifier output (N x classes), if the model is a classifier
    score_transform: str  # none | softmax | exp: what turns the score output into probabilities
    labels: tuple[str, ...] | None
    notes: tuple[str, ...] = ()
    tasks: tuple[dict[str, Any], ...] | None = None  # a multi-task model's tasks (porter.tasks), when its outputs match

    @classmethod
    def read(cls, model, card: ModelCard | None, name: str, preprocess: PreprocessSpec | str | None = None,
             scores: str = "auto") -> "ModelSignature":
        if scores not in SCORE_MODES:
            raise UsageError(f"unknown scores mode {scores!r}; choose one of: {', '.join(SCORE_MODES)}")
        inputs, outputs = tuple(graph_inputs(model)), tuple(graph_outputs(model))
        notes: list[str] = []
        image = _image_input(inputs)
        spec = _resolve_preprocess(image, card, preprocess, name, inputs, notes)
        tasks = _tasks(card, outputs, notes)
        score_output, transform = _classifier(model, outputs, scores) if tasks is None else (None, "none")
        labels = _labels(score_output, outputs, card, notes)
        return cls(name, inputs, outputs, _fixed_batch(inputs), image, spec, score_output, transform, labels,
                   tuple(notes), tasks)

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    @property
    def num_classes(self) -> int | None:
        if not self.score_output:
            return None
        n = next(t.shape[1] for t in self.outputs if t.name == self.score_output)
        return n if isinstance(n, int) else (len(self.labels) if self.labels else None)

    @property
    def integer_pixels(self) -> bool:
        return self.image_input is not None and np.dtype(self.image_input.dtype).kind in "iu"

    @property
    def channels(self) -> int:
        """The image input's channels (what images are converted to)."""
        geo = image_geometry(self.image_input.shape) if self.image_input is not None else None
        return (geo[2] if geo else None) or (self.preprocess.channels if self.preprocess else None) or 3

    def as_input_dtype(self, batch: np.ndarray) -> np.ndarray:
        """A decoded batch (float32; 0..255 for an integer input, which gets raw pixels) in the input's dtype."""
        if self.integer_pixels:
            return np.rint(batch).astype(self.image_input.dtype)
        return batch

    def image_spec(self) -> tuple[PreprocessSpec, TensorInfo]:
        """The preprocessing and the image input, or a DataError saying why this model can't take images."""
        if self.image_input is None:
            raise DataError(f"{self.name} takes {', '.join(t.describe() for t in self.inputs)}, not one image "
                            f"tensor; pass preprocessed tensors (preprocessed=True)")
        if self.preprocess is None:
            raise DataError(f"{self.name} has no porter preprocessing metadata, so porter can't turn images into its "
                            f"input {self.image_input.describe()}; give --preprocess raw|unit|tf|torch|caffe "
                            f"(preprocess= in the API) or pass preprocessed tensors (preprocessed=True)")
        return self.preprocess, self.image_input

    def concrete_shape(self, t: TensorInfo, batch: int) -> tuple[int, ...]:
        """``t``'s shape at ``batch`` (the fixed batch wins), open image dims from the preprocessing (else 224)."""
        geo = image_geometry(t.shape)
        size = self.preprocess.size if self.preprocess and self.preprocess.size else (224, 224)
        dims = []
        for i, d in enumerate(t.shape):
            if isinstance(d, int) and d > 0:
                dims.append(batch if i == 0 and not self.fixed_batch else d)
            elif i == 0:
                dims.append(batch)
            elif geo and geo[0] == "NHWC" and i in (1, 2):
                dims.append(size[i - 1])
            elif geo and geo[0] == "NCHW" and i in (2, 3):
                dims.append(size[i - 2])
            else:
                dims.append(3 if geo else 1)
        return tuple(dims)

    def example_inputs(self, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
        """Seeded inputs of the model's shape: smooth random images through the preprocessing for the image
        input, else ``graph.validate.make_inputs``'s."""
        rng = np.random.default_rng(seed)
        feeds = {}
        for t in self.inputs:
            shape = self.concrete_shape(t, batch)
            if self.preprocess is not None and t is self.image_input:
                h, w = (shape[1], shape[2]) if self.preprocess.layout == "NHWC" else (shape[2], shape[3])
                coarse = rng.integers(0, 256, size=(batch, 4, 4, 3), dtype=np.uint8)
                from ..imaging import resize

                images = [resize(c, (h, w)) for c in coarse]
                feeds[t.name] = self.as_input_dtype(to_tensor(images, self.preprocess, self.channels))
            else:  # the generator validation uses: normals, 0..255 integer pixels, small ids, random masks
                (feeds[t.name],) = make_inputs([TensorInfo(t.name, t.dtype, shape)], batch, rng)
        return feeds


def probabilities(scores: np.ndarray, transform: str) -> np.ndarray:
    """Apply the score transform chosen from the graph: none | softmax | exp (of log-probabilities)."""
    if transform == "softmax":
        z = scores - scores.max(axis=-1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(axis=-1, keepdims=True)
    if transform == "exp":
        return np.exp(scores)
    return scores


def _fixed_batch(inputs: tuple[TensorInfo, ...]) -> int | None:
    dims = [t.shape[0] for t in inputs if t.shape]
    fixed = {d for d in dims if isinstance(d, int) and d > 0}
    return fixed.pop() if len(fixed) == 1 and len(dims) == len(inputs) and all(
        isinstance(d, int) and d > 0 for d in dims) else None


def _image_input(inputs: tuple[TensorInfo, ...]) -> TensorInfo | None:
    """The one image input: float (normalized by the preprocessing) or integer (uint8 / int32 pixels, which a TF.js
    or TFLite-style model scales itself)."""
    images = [t for t in inputs if t.dtype.startswith(("float", "int", "uint"))]
    if len(inputs) == 1 and images and image_geometry(images[0].shape):
        return images[0]
    return None


def _resolve_preprocess(image: TensorInfo | None, card: ModelCard | None, override: PreprocessSpec | str | None,
                        name: str, inputs, notes: list[str]) -> PreprocessSpec | None:
    geometry = image_geometry(image.shape) if image else None
    if isinstance(override, str):
        if not geometry:
            raise UsageError(f"preprocess={override!r} needs a model whose one input is an image "
                             f"(N x H x W x C or N x C x H x W); {name} takes "
                             f"{', '.join(t.describe() for t in inputs)}")
        layout, size, channels = geometry
        spec = PreprocessSpec.resolve(None, mode=override, layout=layout, size=size, channels=channels)
    else:
        spec = override if override is not None else (card.preprocess if card else None)
    if image is not None and np.dtype(image.dtype).kind in "iu":
        layout, size, channels = geometry
        raw = PreprocessSpec.preset("raw", layout=layout, size=size, channels=channels)
        if spec is not None and (spec.scale != 1.0 or any(spec.mean) or any(v != 1.0 for v in spec.std)):
            raise UsageError(f"{name} takes {image.dtype} pixels ({image.describe()}) and scales them "
                             f"itself; porter feeds it raw 0..255 pixels, so drop --preprocess {spec.mode}")
        spec = raw.with_(size=spec.size) if spec is not None and spec.size else raw
    if spec is not None and spec.size is None and geometry and geometry[1]:
        spec = spec.with_(size=geometry[1])
    if spec is not None and geometry and geometry[0] != spec.layout:
        notes.append(f"preprocessing says {spec.layout} but the input {image.describe()} looks {geometry[0]}")
    return spec


def _classifier(model, outputs: tuple[TensorInfo, ...], scores: str) -> tuple[str | None, str]:
    floats2 = [t for t in outputs if t.dtype.startswith("float") and len(t.shape) == 2]
    named = [t for t in outputs if t.name == "probabilities"]
    if named:
        out = named[0]
    elif len(floats2) == 1 and not (isinstance(floats2[0].shape[1], int) and floats2[0].shape[1] < 2):
        out = floats2[0]
    else:
        return None, "none"
    if scores == "raw":
        return out.name, "none"
    if scores == "softmax":
        return out.name, "softmax"
    producer = _producer_op(model, out.name)
    return out.name, {"Softmax": "none", "Sigmoid": "none", "LogSoftmax": "exp"}.get(producer, "softmax")


def _tasks(card: ModelCard | None, outputs, notes: list[str]) -> tuple[dict[str, Any], ...] | None:
    """The card's tasks, when every output they name is an output of the model (metadata is untrusted)."""
    if card is None or not card.tasks:
        return None
    names = {t.name for t in outputs}
    expected = {"classification": ("probabilities", "label"), "regression": ("value",)}
    for t in card.tasks:
        if any(f"{t['name']}/{o}" not in names for o in expected[t["type"]]):
            notes.append(f"the metadata's task {t['name']!r} names outputs the model doesn't have; showing raw outputs")
            return None
    return card.tasks


def _labels(score_output: str | None, outputs, card: ModelCard | None, notes: list[str]) -> tuple[str, ...] | None:
    if not score_output or not card or not card.labels:
        return None
    n = next(t.shape[1] for t in outputs if t.name == score_output)
    if isinstance(n, int) and n != len(card.labels):
        notes.append(f"the model's metadata has {len(card.labels)} labels for {n} classes; reporting class indices")
        return None
    return card.labels


def _producer_op(model, name: str) -> str | None:
    """The op behind output ``name``, looking through shape-only ops."""
    producers = {o: n for n in model.graph.node for o in n.output}
    source = walk_back(producers, name, SHAPE_ONLY_OPS)
    return producers[source].op_type if source in producers else None
