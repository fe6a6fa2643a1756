"""Transfer learning: cut a model's classifier off, train a new head on features, merge into one ONNX model.

The public entry point is ``porter.finetune`` (:func:`porter.transfer.api.finetune`). The package is named
``transfer`` so that it never shadows that function on the ``porter`` namespace.
"""

from .api import FinetuneOptions, FinetuneResult, finetune

__all__ = ["FinetuneOptions", "FinetuneResult", "finetune"]
