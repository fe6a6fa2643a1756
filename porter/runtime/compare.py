"""``porter bench --device all``: every engine and precision this machine has, side by side, on the same inputs.

The baseline is onnxruntime's CPU in fp32 on the first model. Each other row is an (engine, precision, model)
that starts here: CUDA fp32 / fp16 and TensorRT fp32 / fp16 where a GPU works, OpenVINO at its default, fp32 and
bf16 where its plugin offers a device, and every extra model given (``--with``, e.g. the int8 file ``porter
quantize`` wrote) on each engine that runs it. Each row: p50 / p95 latency and throughput per batch size, the
speed-up over the baseline at that batch size, and top-1 agreement and max |diff| with the baseline's outputs on
the same seeded inputs. A combination that does not start (its precision check refused it, say) is a row saying why.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from ..errors import PorterError
from . import session as S
from .bench import Timing, bench, parse_batch_sizes
from .openvino import openvino_devices
from .precision import compare_precision
from .predictor import Predictor

AGREEMENT_INPUTS = 32


@dataclass
class EngineRow:
    engine: str  # "onnxruntime cpu", "openvino", ...
    precision: str
    model: str
    providers: list[str] = field(default_factory=list)
    rows: list[Timing] = field(default_factory=list)
    top1_agreement: float | None = None
    max_abs_diff: float | None = None
    error: str | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"engine": self.engine, "precision": self.precision, "model": self.model, "providers": self.providers,
                "rows": [r.to_dict() for r in self.rows], "top1_agreement": self.top1_agreement,
                "max_abs_diff": self.max_abs_diff, "error": self.error, "notes": self.notes}


@dataclass
class Comparison:
    engines: list[EngineRow]
    batch_sizes: tuple[int, ...]
    inputs: str  # what the agreement was measured on
    unavailable: dict[str, str] = field(default_factory=dict)  # engine -> why it is not on this machine

    def speedup(self, row: EngineRow, batch: int) -> float | None:
        base = next((r for r in self.engines[0].rows if r.batch_size == batch), None)
        ours = next((r for r in row.rows if r.batch_size == batch), None)
        return ours.throughput / base.throughput if base and ours and base.throughput else None

    def to_dict(self) -> dict[str, Any]:
        return {"batch_sizes": list(self.batch_sizes), "agreement_inputs": self.inputs, "unavailable": self.unavailable,
                "engines": [{**e.to_dict(), "speedup": {r.batch_size: self.speedup(e, r.batch_size) for r in e.rows}}
                            for e in self.engines]}

    def to_table(self) -> str:
        head = ["engine", "precision", "model", "batch", "p50 ms", "p95 ms", "items/s", "speed-up", "top-1 agree",
                "max |diff|"]
        lines = [head]
        for e in self.engines:
            agree = f"{e.top1_agreement:.1%}" if e.top1_agreement is not None else "-"
            diff = f"{e.max_abs_diff:.2g}" if e.max_abs_diff is not None else "-"
            if e.error:
                lines.append([e.engine, e.precision, e.model, "-", "-", "-", "-", "-", "-", "-"])
                continue
            for r in e.rows:
                sp = self.speedup(e, r.batch_size)
                lines.append([e.engine, e.precision, e.model, str(r.batch_size), f"{r.p50_ms:.2f}", f"{r.p95_ms:.2f}",
                              f"{r.throughput:.1f}", f"{sp:.2f}x" if sp else "-", agree, diff])
        widths = [max(len(row[i]) for row in lines) for i in range(len(head))]
        text = [f"engines on this machine, baseline {self.engines[0].engine} {self.engines[0].precision} "
                f"(agreement on {self.inputs})"]
        text += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in lines]
        for e in self.engines:
            if e.error:
                text.append(f"note: {e.engine} {e.precision} {e.model}: {e.error}")
            text.extend(f"note: {e.engine} {e.precision} {e.model}: {n}" for n in e.notes)
        text.extend(f"not here: {engine}: {why}" for engine, why in self.unavailable.items())
        return "\n".join(text)


def candidates(quantized: bool) -> list[tuple[str, str | None]]:
    """(device, precision) pairs this machine can try for a model (int8 models run as they are)."""
    pairs: list[tuple[str, str | None]] = [("cpu", None)]
    if S.cuda_problem() is None:
        pairs += [("cuda", None)] + ([] if quantized else [("cuda", "fp16")])
    if S.tensorrt_problem() is None:
        pairs += [("tensorrt", None)] + ([] if quantized else [("tensorrt", "fp16")])
    if openvino_devices()[1] is None:
        pairs += [("openvino", None)] + ([] if quantized else [("openvino", "fp32"), ("openvino", "bf16")])
    return pairs


def compare(models: Sequence[Any], batch_sizes: Sequence[int] | str = (1, 32), *, warmup: int = 3,
            min_seconds: float = 1.0, seed: int = 0, names: Sequence[str] | None = None,
            images: Sequence[Any] | None = None) -> Comparison:
    """Time ``models`` (the first is the baseline's) on every engine and precision here; see the module docstring.

    ``images``: measure agreement on these (paths or arrays, through the baseline's preprocessing) instead of seeded
    synthetic inputs: an int8 model calibrated on real images is only proven on real images."""
    sizes = parse_batch_sizes(batch_sizes)
    names = list(names or [getattr(m, "name", None) or str(m) for m in models])
    engines: list[EngineRow] = []
    baseline: dict[str, np.ndarray] | None = None
    feeds = score = None
    for model, label in zip(models, names):
        quantized = None
        for device, precision in candidates(False):
            try:
                p = Predictor(model, device=device, precision=precision, batch_size=max(sizes))
            except PorterError as e:
                if quantized is None and device == "cpu":
                    raise  # the model itself can't load: nothing to compare
                engines.append(EngineRow(_engine(device), precision or "default", label, error=str(e)))
                continue
            if quantized is None:
                quantized = p.quantized
            if p.quantized and precision is not None:
                continue  # an int8 model runs in int8 only
            row = EngineRow(_engine(device), p.precision_label, label, list(p.providers), notes=list(p.notes))
            if feeds is None:  # the baseline: the first model on the CPU in fp32
                feeds, score = _agreement_inputs(p, images, seed), p.score_output
                baseline = p.run_batched(feeds)
            gate = ((p.card.quantization or {}).get("gate") or {}) if p.card else {}
            if isinstance(gate.get("top1_agreement"), float):
                row.notes.append(f"its porter quantize gate: top-1 agreement {gate['top1_agreement']:.1%} with fp32 "
                                 f"on {gate.get('inputs')} held-out real images")
            try:
                got = p.run_batched(feeds)
                report = compare_precision(baseline, got, score, tolerance=float("inf"), precision=p.precision)
                row.top1_agreement = report.top1_agreement
                row.max_abs_diff = max(report.max_abs_diff.values(), default=0.0)
                row.rows = bench(p, sizes, warmup=warmup, min_seconds=min_seconds, seed=seed).rows
            except PorterError as e:
                row.error = str(e)
            engines.append(row)
    what = (f"{len(images)} images" if images is not None else
            f"{AGREEMENT_INPUTS} seeded synthetic inputs; give --images for real ones")
    unavailable = {name: why for name, why in (("CUDA", S.cuda_problem()), ("TensorRT", S.tensorrt_problem()),
                                               ("OpenVINO", openvino_devices()[1])) if why}
    return Comparison(engines, sizes, what, unavailable)


def _agreement_inputs(p: Predictor, images: Sequence[Any] | None, seed: int) -> dict[str, np.ndarray]:
    if images is None:
        return p.example_inputs(AGREEMENT_INPUTS, seed=seed)
    from ..imaging import preprocess

    spec, image_input = p.image_spec()
    batch = preprocess(list(images), spec, channels=p.signature.channels)
    return {image_input.name: p.signature.as_input_dtype(batch)}


def _engine(device: str) -> str:
    return {"openvino": "openvino (onnxruntime plugin)"}.get(device, f"onnxruntime {device}")
