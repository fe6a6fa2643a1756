"""Importers: one module per ecosystem, each turning a SourceRef into an ``ImportedModel``.

Modules register themselves with ``@register_importer(name)``; a second registration of a name raises. The
module map below lets ``list_importers()`` answer without importing TensorFlow or torch.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Sequence

if TYPE_CHECKING:  # heavy imports stay out of start-up
    import numpy as np
    import onnx

    from ..options import ConvertOptions
    from ..sources import SourceRef
    from ..spec import PreprocessSpec

_MODULES = {
    "keras": "porter.importers.keras",
    "torchhub": "porter.importers.torchhub",
    "tfjs": "porter.importers.tfjs",
}
_REGISTRY: dict[str, Callable[..., "ImportedModel"]] = {}


@dataclass
class ImportedModel:
    """What an importer hands to the rest of porter: raw ONNX plus a way to run the source model.

    ``run_source`` takes arrays in ONNX input order and returns arrays in ONNX output order; validation
    calls it with the same inputs it feeds ONNX Runtime. ``input_names``/``output_names`` are the names the
    normalized model should carry (the source's own names), in ONNX order; None keeps the exporter's.
    """

    onnx_model: "onnx.ModelProto"
    run_source: Callable[[Sequence["np.ndarray"]], Sequence["np.ndarray"]]
    framework: str
    framework_versions: dict[str, str] = field(default_factory=dict)
    input_names: list[str] | None = None
    output_names: list[str] | None = None
    preprocess: "PreprocessSpec | None" = None
    labels: tuple[str, ...] | None = None
    provenance: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # lines for the CLI summary (e.g. exporter fallback)
    weights: str | None = None  # pretrained weights the importer loaded by name (keras.applications: imagenet | none)


def register_importer(name: str):
    def decorate(fn):
        if name in _REGISTRY:
            raise RuntimeError(f"importer {name!r} is registered twice ({_REGISTRY[name].__module__} and {fn.__module__})")
        _REGISTRY[name] = fn
        return fn

    return decorate


def list_importers() -> list[str]:
    return sorted(_MODULES)


def get_importer(name: str) -> Callable[["SourceRef", "ConvertOptions"], ImportedModel]:
    if name not in _MODULES:
        raise KeyError(name)
    if name not in _REGISTRY:
        importlib.import_module(_MODULES[name])
    return _REGISTRY[name]
