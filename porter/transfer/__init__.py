"""Transfer learning: cut a model's classifier off, train a new head on features, merge into one ONNX model.

The public entry point is ``porter.finetune`` (:func:`porter.transfer.api.finetune`). The package is named
``transfer`` so that it never shadows that function on the ``porter`` namespace. Its names load on first use, so
the CLI can read ``transfer.options`` (the defaults its flags show) without importing the pipeline.
"""

from __future__ import annotations

import importlib

_EXPORTS = {"FinetuneOptions": "options", "FinetuneResult": "api", "finetune": "api"}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
