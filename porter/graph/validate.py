"""Prove an ONNX model computes what its source computes.

Seeded inputs at several batch sizes go through the source model and ONNX Runtime; every output is compared
(max abs, max rel, scaled difference, top-1 agreement for classifiers). Failures are collected, then raised
once as a ValidationError that names each failing output with its figures.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import onnx

from ..errors import UsageError, ValidationError, runtime_message
from ..spec import ParityRecord, PreprocessSpec
from .inspect import TensorInfo, format_shape, graph_inputs, graph_outputs


@dataclass(frozen=True)
class OutputParity:
    output: str
    batch_size: int
    max_abs: float
    max_rel: float
    scaled: float  # max_abs / max(1, max |reference|): the headline figure
    top1_agreement: float | None  # fraction of rows whose argmax agrees, for (batch, classes) outputs
    ok: bool
    problem: str = ""  # shape/dtype mismatch, NaN ...

    def describe(self) -> str:
        if self.problem:
            return f"{self.output} @batch {self.batch_size}: {self.problem}"
        top1 = f", top-1 {self.top1_agreement:.0%}" if self.top1_agreement is not None else ""
        return (f"{self.output} @batch {self.batch_size}: max abs {self.max_abs:.3g}, max rel {self.max_rel:.3g}, "
                f"scaled {self.scaled:.3g}{top1}")


@dataclass(frozen=True)
class ParityReport:
    results: tuple[OutputParity, ...]
    atol: float
    rtol: float
    batch_sizes: tuple[int, ...]
    seed: int
    failures: tuple[OutputParity, ...] = field(default=())
    leading: dict[str, tuple[int | None, ...]] = field(default_factory=dict)  # output -> its dim 0 at each batch size

    def follows_batch(self) -> dict[str, bool]:
        """Per output: did its leading axis equal the batch size at every batch size validated?"""
        return {name: all(d == b for d, b in zip(dims, self.batch_sizes)) for name, dims in self.leading.items()}

    def varies(self) -> dict[str, bool]:
        """Per output: did its leading axis change between batch sizes (without following them)?"""
        return {name: len(set(dims)) > 1 for name, dims in self.leading.items()}

    @property
    def passed(self) -> bool:
        return not self.failures

    @property
    def max_abs(self) -> float:
        return max((r.max_abs for r in self.results), default=0.0)

    @property
    def max_scaled(self) -> float:
        return max((r.scaled for r in self.results), default=0.0)

    @property
    def min_top1(self) -> float | None:
        vals = [r.top1_agreement for r in self.results if r.top1_agreement is not None]
        return min(vals) if vals else None

    def to_dict(self) -> dict:
        """Compact figures for the model card (per output: worst over batch sizes)."""
        per_output: dict[str, dict] = {}
        for r in self.results:
            cur = per_output.setdefault(r.output, {"max_abs": 0.0, "max_rel": 0.0, "scaled": 0.0})
            cur["max_abs"] = max(cur["max_abs"], _finite(r.max_abs))
            cur["max_rel"] = max(cur["max_rel"], _finite(r.max_rel))
            cur["scaled"] = max(cur["scaled"], _finite(r.scaled))
            if r.top1_agreement is not None:
                cur["top1_agreement"] = min(cur.get("top1_agreement", 1.0), r.top1_agreement)
        return {"passed": self.passed, "atol": self.atol, "rtol": self.rtol, "batch_sizes": list(self.batch_sizes),
                "seed": self.seed, "outputs": per_output}

    def to_record(self) -> ParityRecord:
        """The typed record a model card keeps (``porter.parity``)."""
        return ParityRecord.from_dict(self.to_dict())

    def summary(self) -> str:
        top1 = f", top-1 agreement {self.min_top1:.0%}" if self.min_top1 is not None else ""
        status = "passed" if self.passed else "FAILED"
        return (f"parity {status} at batch sizes {', '.join(map(str, self.batch_sizes))}: max abs diff "
                f"{self.max_abs:.2e}, max scaled diff {self.max_scaled:.2e}{top1} (atol {self.atol:g}, rtol {self.rtol:g})")


def _finite(x: float) -> float:
    return x if math.isfinite(x) else 1e30


def make_inputs(inputs: Sequence[TensorInfo], batch: int, rng: np.random.Generator,
                preprocess: PreprocessSpec | None = None) -> list[np.ndarray]:
    """Seeded inputs of the model's shapes; image inputs with known preprocessing get real-looking pixels."""
    arrays = []
    for info in inputs:
        dims = list(info.shape)
        if not dims:
            raise UsageError(f"input {info.name} has no known rank; give --input-shape")
        rest = dims[1:]
        unknown = [i + 1 for i, d in enumerate(rest) if not isinstance(d, int) or d <= 0]
        if unknown:
            raise UsageError(f"input {info.name!r} has unknown dims {info.describe()}; give concrete dims without the "
                             f"batch axis, e.g. --input-shape {info.name}:" + ",".join(
                                 str(d) if isinstance(d, int) and d > 0 else "N" for d in rest))
        shape = (batch, *rest)
        dtype = np.dtype(info.dtype) if info.dtype != "unknown" else np.dtype("float32")
        if dtype.kind == "f":
            if preprocess is not None and len(shape) == 4:
                pixels = rng.uniform(0, 255, size=shape)
                ch_axis = 3 if preprocess.layout == "NHWC" else 1
                bshape = [1, 1, 1, 1]
                bshape[ch_axis] = -1
                n = shape[ch_axis]
                mean = np.resize(np.asarray(preprocess.mean, dtype=np.float64), n).reshape(bshape)
                std = np.resize(np.asarray(preprocess.std, dtype=np.float64), n).reshape(bshape)
                arrays.append(((pixels * preprocess.scale - mean) / std).astype(dtype))
            else:
                arrays.append(rng.standard_normal(shape).astype(dtype))
        elif dtype.kind in "iu":
            # integer images (uint8 / int32 pixels, rank 4) get the 0..255 a camera gives; other integer inputs
            # (token ids, indices) small values every vocabulary has
            high = 256 if len(shape) == 4 or dtype == np.uint8 else 10
            arrays.append(rng.integers(0, high, size=shape).astype(dtype))
        elif dtype.kind == "b":
            arrays.append(rng.random(shape) > 0.5)
        else:
            raise UsageError(f"input {info.name!r} has dtype {info.dtype}, which porter can't generate test data for; "
                             f"use --no-validate")
    return arrays


@dataclass(frozen=True)
class Difference:
    """How far one output is from its reference, in the figures every porter comparison reports."""

    max_abs: float
    max_rel: float  # max |got - ref| / |ref| (|ref| floored at 1e-12)
    scaled: float  # max_abs / max(1, max |ref|): the headline figure, comparable across output scales


def difference(got: np.ndarray, ref: np.ndarray) -> Difference:
    """``got`` vs ``ref`` (same shape) over the entries finite in both: parity, fp16 checks, the finetune merge
    check and ``bench --against-source`` all measure with this."""
    return _summarize(*_finite_diffs(np.asarray(got, np.float64), np.asarray(ref, np.float64)))


def _finite_diffs(g: np.ndarray, r: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(|g - r|, |r|) over the entries finite in both."""
    finite = np.isfinite(r) & np.isfinite(g)
    return np.abs(g - r)[finite], np.abs(r)[finite]


def _summarize(diff: np.ndarray, rabs: np.ndarray) -> Difference:
    if not diff.size:
        return Difference(0.0, 0.0, 0.0)
    max_abs = float(diff.max())
    return Difference(max_abs, float((diff / np.maximum(rabs, 1e-12)).max()), max_abs / max(1.0, float(rabs.max())))


def compare(name: str, batch: int, got: np.ndarray, ref: np.ndarray, atol: float, rtol: float) -> OutputParity:
    got, ref = np.asarray(got), np.asarray(ref)
    if got.shape != ref.shape:
        return OutputParity(name, batch, math.inf, math.inf, math.inf, None, False,
                            f"shape {list(got.shape)} from ONNX vs {list(ref.shape)} from the source")
    if got.size == 0:
        return OutputParity(name, batch, 0.0, 0.0, 0.0, None, True)
    g = got.astype(np.float64)
    r = ref.astype(np.float64)
    if not np.isfinite(g).all() and not np.array_equal(np.isfinite(g), np.isfinite(r)):
        return OutputParity(name, batch, math.inf, math.inf, math.inf, None, False, "ONNX produced NaN/inf where the source did not")
    diff, rabs = _finite_diffs(g, r)
    d = _summarize(diff, rabs)
    max_abs, max_rel, scaled = d.max_abs, d.max_rel, d.scaled
    top1 = None
    if r.ndim == 2 and r.shape[1] > 1 and got.dtype.kind == "f":
        top1 = float(np.mean(np.argmax(g, axis=1) == np.argmax(r, axis=1)))
    if got.dtype.kind in "iub" or ref.dtype.kind in "iub":  # indices, counts, masks: exactly
        ok = max_abs == 0.0
    else:
        ok = bool(np.all(diff <= atol + rtol * rabs))
    return OutputParity(name, batch, max_abs, max_rel, scaled, top1, ok)


def _shapes(inputs: Sequence[TensorInfo], feed: Sequence[np.ndarray]) -> str:
    return ", ".join(f"{i.name} {a.dtype}{format_shape(a.shape)}" for i, a in zip(inputs, feed))


def validate(model: onnx.ModelProto, run_source: Callable[[Sequence[np.ndarray]], Sequence[np.ndarray]], *,
             atol: float, rtol: float, batch_sizes: Sequence[int] = (1, 3), seed: int = 0,
             preprocess: PreprocessSpec | None = None, raise_on_failure: bool = True,
             must_follow_batch: Sequence[str] = ()) -> ParityReport:
    """Run seeded inputs through ONNX Runtime and the source at each batch size and compare every output.

    Any failure to run (onnxruntime or the source refusing a shape, an op, a dtype) is one ValidationError naming
    the input shapes, the batch size and the runtime's own words. ``must_follow_batch``: outputs whose leading
    axis has to be the batch size (checked when proving a freed batch)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 4  # fatal only: a failure is reported once, as a ValidationError, not also logged
    try:
        session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types (Fail, InvalidGraph, NotImplemented ...)
        raise ValidationError(f"onnxruntime can't load the converted model: {runtime_message(e)}") from None
    inputs = graph_inputs(model)
    outputs = [o.name for o in graph_outputs(model)]
    rng = np.random.default_rng(seed)
    results: list[OutputParity] = []
    leading: dict[str, list[int | None]] = {name: [] for name in outputs}
    for batch in batch_sizes:
        feed = make_inputs(inputs, batch, rng, preprocess)
        try:
            got = session.run(outputs, {i.name: a for i, a in zip(inputs, feed)})
        except Exception as e:
            raise ValidationError(f"onnxruntime failed on the converted model at batch {batch} (inputs "
                                  f"{_shapes(inputs, feed)}): {runtime_message(e)}") from None
        try:
            ref = list(run_source(feed))
        except Exception as e:  # TensorFlow / torch / Keras errors: the source refused these inputs
            raise ValidationError(f"the source model failed at batch {batch} (inputs {_shapes(inputs, feed)}): "
                                  f"{runtime_message(e)}") from None
        if len(ref) != len(got):
            raise ValidationError(f"the source model returned {len(ref)} outputs but the ONNX model has {len(got)} "
                                  f"({', '.join(outputs)})")
        for name, g, r in zip(outputs, got, ref):
            res = compare(name, batch, g, r, atol, rtol)
            leading[name].append(int(g.shape[0]) if g.ndim else None)
            if res.ok and name in must_follow_batch and (g.ndim == 0 or g.shape[0] != batch):
                res = OutputParity(name, batch, res.max_abs, res.max_rel, res.scaled, res.top1_agreement, False,
                                   f"leading axis is {g.shape[0] if g.ndim else 'absent'}, not the batch size {batch}")
            results.append(res)
    failures = tuple(r for r in results if not r.ok)
    report = ParityReport(tuple(results), atol, rtol, tuple(batch_sizes), seed, failures,
                          {k: tuple(v) for k, v in leading.items()})
    if failures and raise_on_failure:
        bad_weights = _non_finite_weights(model) if any("NaN/inf" in f.problem for f in failures) else []
        if bad_weights:
            raise ValidationError(f"the model has non-finite weights ({', '.join(bad_weights[:5])}"
                                  f"{', ...' if len(bad_weights) > 5 else ''}), so ONNX Runtime computes NaN/inf where "
                                  f"the source does not; fix those weights in the source model", report=report)
        raise ValidationError(
            f"ONNX output differs from the source for {len(failures)} check(s): "
            + "; ".join(f.describe() for f in failures)
            + f" (atol {atol:g}, rtol {rtol:g}); loosen --atol/--rtol if this is expected, or report the model",
            report=report)
    return report


def _non_finite_weights(model: onnx.ModelProto) -> list[str]:
    """Initializers holding NaN or inf (what makes an exporter's graph produce NaN where the framework, which may
    mask or skip them, does not)."""
    from onnx import numpy_helper

    bad = []
    for init in model.graph.initializer:
        if init.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16):
            arr = numpy_helper.to_array(init)
            if arr.size and not np.isfinite(arr).all():
                bad.append(init.name)
    return bad
