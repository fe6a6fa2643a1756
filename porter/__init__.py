"""porter: port pretrained models across frameworks, with proof.

Public API (imports are lazy: ``import porter`` loads neither TensorFlow nor torch):

    porter.convert(source, output=None, **options) -> ConvertResult
    porter.finetune(source, data, output=None, **options) -> FinetuneResult
    porter.quantize(model, calibrate, output=None, **options) -> QuantizeResult
    porter.load(model, device="auto", fp16=False, batch_size=32) -> Predictor
    porter.inspect(model) -> InspectReport
    porter.export_triton(model, repository, name=None, ...) -> TritonExport; porter.triton.preprocess(images, config)
and the errors in ``porter.errors`` (PorterError and its subclasses).
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

from .errors import (  # noqa: E402  (cheap, no heavy imports)
    ConversionError, DataError, ModelLoadError, NetworkError, OutputError, PorterError, RuntimeSetupError,
    SourceError, UnsafeModelError, UnsupportedError, UsageError, ValidationError,
)

_LAZY = {
    "convert": ("porter.conversion", "convert"),
    "ConvertResult": ("porter.conversion", "ConvertResult"),
    "finetune": ("porter.transfer.api", "finetune"),
    "load": ("porter.runtime.predictor", "load"),
    "quantize": ("porter.quantization.api", "quantize"),
    "QuantizeResult": ("porter.quantization.api", "QuantizeResult"),
    "export_triton": ("porter.export.triton", "export_triton"),
    "export_node": ("porter.export.node", "export_node"),
    "triton": ("porter.export.triton", None),  # porter.triton.preprocess(images, config): the client's helper
    "inspect": ("porter.inspection", "inspect_model"),
    "ModelCard": ("porter.spec", "ModelCard"),
    "PreprocessSpec": ("porter.spec", "PreprocessSpec"),
}

__all__ = sorted([*_LAZY, "PorterError", "ValidationError", "UsageError", "SourceError", "ModelLoadError",
                  "UnsafeModelError", "UnsupportedError", "ConversionError", "OutputError", "DataError",
                  "NetworkError", "RuntimeSetupError", "__version__"])


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        value = importlib.import_module(module) if attr is None else getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'porter' has no attribute {name!r}")
