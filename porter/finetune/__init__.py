"""Fine-tuning: cut a model's classifier off, train a new head on features, merge into one ONNX model.

``porter.finetune(source, data, output=None, **options)`` is :func:`porter.finetune.api.finetune`. This package
shares its name with that function, so the package itself is callable too: whichever of the two
``porter.finetune`` resolves to (it depends on import order), calling it fine-tunes.
"""

import sys as _sys
import types as _types

from .api import FinetuneOptions, FinetuneResult, finetune

__all__ = ["FinetuneOptions", "FinetuneResult", "finetune"]


class _CallablePackage(_types.ModuleType):
    def __call__(self, source, data, output=None, **options):
        return finetune(source, data, output, **options)


_sys.modules[__name__].__class__ = _CallablePackage
