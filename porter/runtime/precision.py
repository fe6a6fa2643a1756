"""Reduced precision on the runtime's side: an fp16 copy of a model, and the check of any reduced precision.

A Predictor asked for fp16 runs ``convert_to_fp16`` (onnxruntime's converter, float32 inputs/outputs kept) or lets
TensorRT build fp16 engines; on OpenVINO, bf16 (or its default) is a hint to its CPU plugin. Then
``compare_precision`` on seeded inputs decides whether the answers still hold against onnxruntime fp32.
``porter quantize``'s accuracy gate measures int8 with the same function, on the user's held-out images.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import numpy as np

from ..errors import UsageError, ValidationError
from ..options import PRECISIONS
from ..graph.validate import Difference, difference

FP16_TOLERANCE = 0.02  # max |fp16 - fp32| allowed, relative to max(1, max |fp32|)
# the same bound per precision: bf16 keeps 8 bits of mantissa (fp16 11); an int8 model on another engine is
# compared with the same int8 model on onnxruntime's CPU, whose rounding may differ by a step here and there
PRECISION_TOLERANCE = {"fp16": FP16_TOLERANCE, "bf16": 0.05, "default": 0.05, "int8": 0.05}


@dataclass
class PrecisionReport:
    """fp16 (or TensorRT fp16) checked against fp32 on the same seeded inputs."""

    rows: int
    max_abs_diff: dict[str, float]
    top1_agreement: float | None  # share of rows whose top-1 is fp32's; None for non-classifiers
    passed: bool
    problems: list[str] = field(default_factory=list)
    mean_abs_diff: dict[str, float] = field(default_factory=dict)
    precision: str = "fp16"  # what was compared with fp32: fp16 | bf16 | int8

    def describe(self) -> str:
        diff = ", ".join(f"{k} {v:.3g}" for k, v in self.max_abs_diff.items())
        agree = f"top-1 agreement {self.top1_agreement:.1%}, " if self.top1_agreement is not None else ""
        return f"{self.precision} vs fp32 on {self.rows} inputs: {agree}max abs diff {diff}"


def convert_to_fp16(model):
    """A float16 copy of ``model`` with float32 inputs and outputs kept (casts at the edges)."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    import onnx

    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    try:
        return convert_float_to_float16(copy, keep_io_types=True, disable_shape_infer=False)
    except Exception as e:  # noqa: BLE001
        raise ValidationError(f"can't convert the model to fp16: {' '.join(str(e).split())[:200]}; run it in fp32") from None


def compare_precision(ref: Mapping[str, np.ndarray], got: Mapping[str, np.ndarray], score_output: str | None,
                      tolerance: float = FP16_TOLERANCE, tie_margin: float = 1e-3,
                      precision: str = "fp16") -> PrecisionReport:
    """Compare a reduced-precision run with fp32: non-finite values, max and mean abs diff, top-1 agreement.
    ``tolerance`` bounds the max abs diff (relative to max(1, max |fp32|)); ``math.inf``: report it only."""
    problems = []
    diffs = {}
    means = {}
    rows = 0
    for name, r in ref.items():
        r = np.asarray(r)
        g = np.asarray(got[name])
        rows = max(rows, r.shape[0] if r.ndim else 1)
        if not r.dtype.kind == "f":
            if not np.array_equal(r, g):
                problems.append(f"{name} differs")
            continue
        if not np.all(np.isfinite(g)):
            problems.append(f"{name} has {int(np.sum(~np.isfinite(g)))} non-finite values ({precision} overflow)")
            diffs[name] = float("inf")
            continue
        diff = difference(g, r) if r.size else Difference(0.0, 0.0, 0.0)
        diffs[name] = diff.max_abs
        means[name] = float(np.mean(np.abs(g.astype(np.float64) - r))) if r.size else 0.0
        if diff.scaled > tolerance:
            scale = max(1.0, float(np.max(np.abs(r))))
            problems.append(f"{name} max abs diff {diff.max_abs:.3g} exceeds {tolerance * scale:.3g}")
    agreement = None
    if score_output and score_output in ref and np.all(np.isfinite(got[score_output])):
        r = np.asarray(ref[score_output], np.float64)
        g = np.asarray(got[score_output], np.float64)
        top_r, top_g = r.argmax(axis=1), g.argmax(axis=1)
        # a row disagrees only if fp16's pick is clearly worse than fp32's in fp32's own scores
        gap = r[np.arange(len(r)), top_r] - r[np.arange(len(r)), top_g]
        spread = np.maximum(1e-12, r.max(axis=1) - r.min(axis=1))
        clear = gap / spread > tie_margin
        agreement = float(np.mean(top_r == top_g)) if len(r) else 1.0
        if np.any(clear):
            problems.append(f"top-1 differs on {int(np.sum(clear))} of {len(r)} inputs")
    return PrecisionReport(rows=rows, max_abs_diff=diffs, top1_agreement=agreement, passed=not problems,
                           problems=problems, mean_abs_diff=means, precision=precision)


def resolve_precision(requested: str | None, fp16: bool, quantized: bool, device: str, name: str) -> str:
    """The precision a Predictor runs in (see ``load``), or a UsageError for a combination that can't run."""
    if requested is not None and requested not in PRECISIONS:
        raise UsageError(f"unknown precision {requested!r}; choose one of: {', '.join(PRECISIONS)}")
    if fp16 and requested not in (None, "fp16"):
        raise UsageError(f"fp16=True and precision={requested!r} disagree; give one")
    requested = "fp16" if fp16 else requested
    if quantized:
        if requested not in (None, "int8"):
            raise UsageError(f"{name} is an int8 model (quantized by porter quantize): it runs in int8, not "
                             f"{requested}; give the fp32 model for {requested}")
        return "int8"
    if requested == "int8":
        raise UsageError(f"{name} is not quantized; make an int8 model with porter quantize {name} --calibrate "
                         f"IMAGES -o MODEL.int8.onnx and run that")
    if requested == "bf16" and device != "openvino":
        raise UsageError("bf16 runs on --device openvino (OpenVINO's bf16 kernels); onnxruntime's CPU kernels "
                         "are fp32")
    if requested is None:
        return "default" if device == "openvino" else "fp32"
    return requested
