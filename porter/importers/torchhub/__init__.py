"""The PyTorch Hub importer: hub repos (local or GitHub), TorchScript files and in-memory ``nn.Module`` s.

    torchhub:OWNER/REPO[:REF]:ENTRY   GitHub, through torch.hub's download and cache (needs trust_repo)
    torchhub:DIR:ENTRY                a local directory with a hubconf.py
    model.pt                          a TorchScript archive, detected by content
    porter.convert(module)            an nn.Module from the Python API

The module is put in eval mode, traced at batch 2 and exported with ``torch.onnx.export`` (the dynamo exporter
first, the TorchScript-based one as a fallback, the reason recorded). ``run_source`` runs the same module
under ``no_grad`` for the parity check. Heavy imports (torch, onnx) happen inside the functions.
"""

from __future__ import annotations

from typing import Any, Sequence

from .. import ImportedModel, register_importer
from ...errors import UsageError, first_line
from .exporting import (export, flatten_outputs, is_scripted, make_examples, module_device, resolve_inputs)
from .hub import load_module

LABEL_ATTRS = ("labels", "categories", "class_names", "classes")


@register_importer("torchhub")
def import_torchhub(ref, opts) -> ImportedModel:
    import torch

    loaded = load_module(ref, opts)
    module, what = loaded.module, loaded.what
    module.eval()
    specs = resolve_inputs(module, opts, what)
    device = module_device(module)
    examples = make_examples(specs, device)
    with torch.no_grad():
        try:
            sample = module(*examples)
        except Exception as e:  # noqa: BLE001 - usually a wrong --input-shape
            shapes = ", ".join(s.describe() for s in specs)
            raise UsageError(f"running {what} on example input(s) {shapes} failed: {type(e).__name__}: "
                             f"{first_line(e)}; check --input-shape (dims without the batch axis, NCHW for images)") from e
    outputs = flatten_outputs(sample, what)
    if not outputs:
        raise UsageError(f"{what} returned no tensors; porter converts models whose forward() returns tensors")
    input_names = [s.name for s in specs]
    output_names = [name for name, _ in outputs]
    exported = export(module, examples, input_names, output_names, [t.dim() for _, t in outputs], opts.opset, what)

    def run_source(arrays: Sequence[Any]) -> list[Any]:
        import numpy as np

        tensors = [torch.from_numpy(np.ascontiguousarray(a)).to(device) for a in arrays]
        module.eval()
        with torch.no_grad():
            result = module(*tensors)
        return [t.detach().cpu().numpy() for _, t in flatten_outputs(result, what)]

    provenance = dict(loaded.provenance)
    provenance["exporter"] = exported.exporter
    if exported.fallback_reason:
        provenance["exporter_fallback_reason"] = exported.fallback_reason
    labels = find_labels(module, [tuple(t.shape) for _, t in outputs])
    return ImportedModel(
        onnx_model=exported.model,
        run_source=run_source,
        framework="torch",
        framework_versions=_versions(exported.exporter),
        input_names=input_names,
        output_names=output_names,
        preprocess=default_preprocess(specs),
        labels=labels,
        provenance=provenance,
        notes=loaded.notes + exported.notes + (["the model is TorchScript"] if is_scripted(module) else []),
    )


def default_preprocess(specs):
    """torchvision's ImageNet normalisation for a single NCHW image input (1 or 3 channels); None otherwise."""
    from ...spec import PreprocessSpec

    if len(specs) != 1 or len(specs[0].shape) != 3 or not specs[0].dtype.is_floating_point:
        return None
    channels, height, width = specs[0].shape
    if channels not in (1, 3):
        return None
    return PreprocessSpec.preset("torch", layout="NCHW", size=(height, width), channels=channels)


def find_labels(module, output_shapes: list[tuple[int, ...]]) -> tuple[str, ...] | None:
    """Class names the model exposes (``labels``/``categories``/``class_names``/``classes``, or a torchvision-style
    ``meta['categories']``), kept only when some (batch, classes) output has one logit per name."""
    candidates = []
    for holder in (module, getattr(module, "weights", None)):
        if holder is None:
            continue
        for name in LABEL_ATTRS:
            candidates.append(_safe_attr(holder, name))
        meta = _safe_attr(holder, "meta")
        if isinstance(meta, dict):
            candidates.append(meta.get("categories"))
    classes = {s[-1] for s in output_shapes if len(s) == 2}
    for c in candidates:
        if isinstance(c, (list, tuple)) and c and all(isinstance(x, str) for x in c) and len(c) in classes:
            return tuple(c)
    return None


def _safe_attr(obj, name: str):
    try:
        return getattr(obj, name, None)
    except Exception:  # noqa: BLE001
        return None


def _versions(exporter: str) -> dict[str, str]:
    import onnx
    import torch

    versions = {"torch": torch.__version__, "onnx": onnx.__version__}
    if exporter == "dynamo":
        import onnxscript

        versions["onnxscript"] = onnxscript.__version__
    return versions
