"""``porter inspect``: what an ONNX file holds. Imports onnx only — never TensorFlow or torch."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ModelLoadError
from .spec import ModelCard


@dataclass
class InspectReport:
    path: str
    ir_version: int
    opset: int
    producer: str
    inputs: list[Any]
    outputs: list[Any]
    parameters: int
    size_bytes: int
    card: ModelCard | None
    other_metadata: dict[str, str]
    cuts: list[Any] | None = field(default=None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path, "ir_version": self.ir_version, "opset": self.opset, "producer": self.producer,
            "inputs": [{"name": t.name, "dtype": t.dtype, "shape": list(t.shape)} for t in self.inputs],
            "outputs": [{"name": t.name, "dtype": t.dtype, "shape": list(t.shape)} for t in self.outputs],
            "parameters": self.parameters, "size_bytes": self.size_bytes,
            "porter": self.card.to_metadata() if self.card else None, "metadata": self.other_metadata,
            "cuts": [_cut_dict(c) for c in self.cuts] if self.cuts is not None else None,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def to_text(self) -> str:
        lines = [f"{self.path}: ONNX IR {self.ir_version}, opset {self.opset}, producer {self.producer or '?'}, "
                 f"{self.parameters:,} parameters, {self.size_bytes / 1e6:.2f} MB"]
        lines += [f"  input  {t.describe()}" for t in self.inputs]
        lines += [f"  output {t.describe()}" for t in self.outputs]
        c = self.card
        if c is None:
            lines.append("  porter metadata: none (not written by porter; preprocessing unknown)")
        else:
            lines.append(f"  source: {c.source} ({c.framework}; porter {c.porter_version})")
            if c.framework_versions:
                lines.append("  versions: " + ", ".join(f"{k} {v}" for k, v in sorted(c.framework_versions.items())))
            lines.append(f"  preprocess: {c.preprocess.describe() if c.preprocess else 'unknown'}")
            if c.labels is not None:
                shown = ", ".join(c.labels[:8]) + (", ..." if len(c.labels) > 8 else "")
                lines.append(f"  labels ({len(c.labels)}): {shown}")
            if c.parity:
                lines.append(f"  parity: {'passed' if c.parity.passed else 'FAILED'}, max scaled diff "
                             f"{c.parity.max_scaled:.2e} at batch sizes {list(c.parity.batch_sizes)}")
            if c.batch:
                from .graph.batch import BatchPlan

                lines.append(f"  {BatchPlan.from_dict(c.batch).describe()}")
            for t in c.tasks or ():
                if t["type"] == "classification":
                    what = f"{len(t['labels'])} classes: {', '.join(t['labels'][:6])}{', ...' if len(t['labels']) > 6 else ''}"
                else:
                    u = t.get("units") or {}
                    what = (f"a value (training range {u['min']:.4g} to {u['max']:.4g}, mean {u['mean']:.4g})"
                            if {"min", "max", "mean"} <= set(u) else "a value")
                lines.append(f"  task {t['name']} ({t['type']}): {what}")
            if c.quantization:
                lines.append(f"  {describe_quantization(c.quantization)}")
            if c.cut:
                lines.append(f"  cut: {c.cut}")
            training = c.training.to_dict() if c.training else {}
            shown = [f"{k} {v}" for k, v in sorted(training.items()) if v is not None and not isinstance(v, (list, dict))]
            if shown:
                lines.append("  training: " + ", ".join(shown))
            for k, v in sorted(c.provenance.items()):
                lines.append(f"  {k}: {v}")
        for k, v in sorted(self.other_metadata.items()):
            lines.append(f"  {k}: {v}")
        if self.cuts is not None:
            lines.append("  cut candidates (best first; porter finetune --cut auto searches those within 2x the "
                         "backbone's width, --cut search all):" if self.cuts else "  cut candidates: none found")
            lines += [f"    {cut.kind:<10} {cut.describe()}" for cut in self.cuts]
        return "\n".join(lines)


def describe_quantization(q: dict[str, Any]) -> str:
    """One line for ``porter.quantization`` (metadata: any field may be missing or odd)."""
    gate = q.get("gate") if isinstance(q.get("gate"), dict) else {}
    parts = [f"quantization: int8 {q.get('format', '?')} ({q.get('weights', '?')} weights, "
             f"{q.get('activations', '?')} activations), {q.get('method', '?')} calibration on "
             f"{q.get('samples', '?')} images"]
    excluded = q.get("excluded") if isinstance(q.get("excluded"), list) else []
    parts.append(f"{len(excluded)} node(s) kept in float" + (f" ({', '.join(map(str, excluded[:6]))}"
                                                           f"{', ...' if len(excluded) > 6 else ''})" if excluded else ""))
    agree, drop = gate.get("top1_agreement"), gate.get("drop_points")
    if isinstance(agree, (int, float)) and isinstance(drop, (int, float)):
        parts.append(f"gate on {gate.get('inputs', '?')} held-out images: top-1 agreement {agree:.1%} "
                     f"(drop {drop:.1f} of {q.get('max_drop_points', '?')} points allowed)")
    elif isinstance(gate.get("relative_error"), (int, float)):
        parts.append(f"gate on {gate.get('inputs', '?')} held-out inputs: relative error {gate['relative_error']:.1%}")
    a32, a8 = gate.get("accuracy_fp32"), gate.get("accuracy_int8")
    if isinstance(a32, (int, float)) and isinstance(a8, (int, float)):
        parts.append(f"accuracy fp32 {a32:.1%}, int8 {a8:.1%}")
    return "; ".join(parts)


def _cut_dict(cut: Any) -> dict[str, Any]:
    return {"tensor": cut.name, "shape": list(cut.shape) if cut.shape is not None else None, "kind": cut.kind,
            "pooled_axes": list(cut.pool_axes) if cut.pool_axes else None, "features": cut.features,
            "reason": cut.reason}


def inspect_model(path: str | Path, cuts: bool = False) -> InspectReport:
    from .graph.inspect import graph_inputs, graph_outputs, opset_of, parameter_count

    from .files import load_onnx_file

    model = load_onnx_file(path)
    if not model.graph.node and not model.graph.input:
        raise ModelLoadError(f"{path} is not an ONNX model (it parsed as an empty graph); convert it first with porter convert")
    props = {p.key: p.value for p in model.metadata_props}
    cut_list = None
    if cuts:
        from .graph.cuts import cut_candidates

        cut_list = list(cut_candidates(model))
    return InspectReport(
        path=str(path), ir_version=model.ir_version, opset=opset_of(model), producer=model.producer_name,
        inputs=graph_inputs(model), outputs=graph_outputs(model), parameters=parameter_count(model),
        size_bytes=Path(path).stat().st_size, card=ModelCard.from_metadata(props),
        other_metadata={k: v for k, v in props.items() if not k.startswith("porter.")}, cuts=cut_list)
