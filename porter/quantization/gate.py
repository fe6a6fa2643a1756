"""The accuracy gate of a quantized model, and where its error comes from.

``measure`` compares int8 with fp32 on held-out inputs: top-1 agreement, max / mean output difference, and accuracy
of both where the true labels are known (``runtime.precision.compare_precision`` does the comparing, as for fp16).
A classifier passes when its agreement drop (100 - agreement %) is within ``max_drop`` points; any other model
when its outputs' relative RMS error is within ``max_error``.

``diverging_nodes`` localizes the error with ONNX Runtime's QDQ debugging tools (``qdq_loss_debug``): every
activation of the float and the int8 model is collected on the same inputs and compared (signal-to-quantization-
noise ratio, dB); a node's damage is how much the SQNR falls from its inputs to its output, so the node where an
outlier-dominated range wipes out the small values is found where it happens, not downstream of it.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..runtime.precision import compare_precision


@dataclass
class Agreement:
    """int8 against fp32 on the gate's inputs."""

    inputs: int
    top1_agreement: float | None  # classifiers: share of inputs with fp32's top-1
    max_abs_diff: float
    mean_abs_diff: float
    relative_error: float  # ||int8 - fp32|| / ||fp32|| over all float outputs
    accuracy_fp32: float | None = None  # where the true labels are known
    accuracy_int8: float | None = None

    @property
    def drop(self) -> float | None:
        """Points of top-1 agreement lost (0 = every prediction kept); None for non-classifiers."""
        return None if self.top1_agreement is None else 100.0 * (1.0 - self.top1_agreement)

    def passes(self, max_drop: float, max_error: float) -> bool:
        if self.drop is not None:
            return self.drop <= max_drop + 1e-9
        return self.relative_error <= max_error

    def describe(self) -> str:
        parts = [f"on {self.inputs} held-out inputs:"]
        if self.top1_agreement is not None:
            parts.append(f"top-1 agreement with fp32 {self.top1_agreement:.1%} (drop {self.drop:.1f} points),")
        parts.append(f"max |diff| {self.max_abs_diff:.3g}, mean {self.mean_abs_diff:.3g}, relative error "
                     f"{self.relative_error:.1%}")
        if self.accuracy_fp32 is not None:
            parts[-1] += ","
            parts.append(f"accuracy fp32 {self.accuracy_fp32:.1%}, int8 {self.accuracy_int8:.1%}")
        return " ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        d = {"inputs": self.inputs, "top1_agreement": self.top1_agreement, "drop_points": self.drop,
             "max_abs_diff": self.max_abs_diff, "mean_abs_diff": self.mean_abs_diff,
             "relative_error": self.relative_error}
        if self.accuracy_fp32 is not None:
            d.update(accuracy_fp32=self.accuracy_fp32, accuracy_int8=self.accuracy_int8)
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in d.items()}


def measure(ref: Mapping[str, np.ndarray], got: Mapping[str, np.ndarray], score_output: str | None,
            labels: np.ndarray | None = None) -> Agreement:
    report = compare_precision(ref, got, score_output, tolerance=math.inf, precision="int8")
    floats = [k for k, v in ref.items() if np.asarray(v).dtype.kind == "f"]
    num = sum(float(np.sum((np.asarray(got[k], np.float64) - np.asarray(ref[k], np.float64)) ** 2)) for k in floats)
    den = sum(float(np.sum(np.asarray(ref[k], np.float64) ** 2)) for k in floats)
    acc32 = acc8 = None
    if labels is not None and score_output is not None:
        acc32 = float(np.mean(np.asarray(ref[score_output]).argmax(axis=1) == labels))
        acc8 = float(np.mean(np.asarray(got[score_output]).argmax(axis=1) == labels))
    return Agreement(inputs=report.rows, top1_agreement=report.top1_agreement,
                     max_abs_diff=max(report.max_abs_diff.values(), default=0.0),
                     mean_abs_diff=max(report.mean_abs_diff.values(), default=0.0),
                     relative_error=math.sqrt(num / den) if den > 0 else math.sqrt(num),
                     accuracy_fp32=acc32, accuracy_int8=acc8)


SQNR_CEILING = 50.0  # dB: uniform 8-bit quantization's best (6.02 * 8 + 1.76)


@dataclass(frozen=True)
class NodeDamage:
    """The nodes computing ``tensor`` from the nearest compared tensors, and the SQNR they lose doing it."""

    nodes: tuple[str, ...]
    ops: tuple[str, ...]
    tensor: str
    db_lost: float  # SQNR of its worst compared input minus SQNR of ``tensor`` (float vs int8), in dB
    sqnr: float
    feeds: tuple[str, ...] = ()  # the compared tensors it reads
    own_sqnr: float = SQNR_CEILING  # of ``tensor``'s own rounding (before vs after its Q/DQ pair in the int8 model)
    readers: tuple[str, ...] = ()  # the nodes reading ``tensor``

    @property
    def rounding_dominates(self) -> bool:
        """Most of the noise at ``tensor`` is its own rounding (its range is the problem), not what it was computed
        from: keeping it in float means keeping its readers in float too."""
        return self.own_sqnr <= self.sqnr + 3.0

    def describe(self) -> str:
        return f"{'+'.join(self.nodes)} ({'+'.join(self.ops)}, -{self.db_lost:.1f} dB at {self.tensor})"


def diverging_nodes(float_model: Path, qdq_model: Path, reader_factory, work: Path) -> list[NodeDamage]:
    """Where ``qdq_model`` loses accuracy, worst first: per compared activation (the tensors the QDQ model quantizes),
    the nodes of ``float_model`` that compute it from the previous compared tensors and the SQNR they lose.

    ``reader_factory()`` makes a fresh CalibrationDataReader over the inputs to compare on.
    """
    import onnx
    from onnxruntime.quantization.qdq_loss_debug import (collect_activations, compute_activation_error,
                                                         create_activation_matching,
                                                         modify_model_output_intermediate_tensors)

    with tempfile.TemporaryDirectory(dir=work) as tmp:
        aug_float, aug_qdq = Path(tmp) / "float.onnx", Path(tmp) / "qdq.onnx"
        modify_model_output_intermediate_tensors(str(float_model), str(aug_float))
        modify_model_output_intermediate_tensors(str(qdq_model), str(aug_qdq))
        float_acts = collect_activations(str(aug_float), reader_factory())
        qdq_acts = collect_activations(str(aug_qdq), reader_factory())
    matching = create_activation_matching(qdq_acts, float_acts)
    errors = compute_activation_error(matching)
    # capped at what 8 bits can carry: a tensor int8 represents exactly (8-bit pixels / 255) is not 300 dB cleaner
    # than the rest, and must not make the next node look like it lost 300 dB
    sqnr = {name: min(SQNR_CEILING, e["xmodel_err"]) for name, e in errors.items()
            if "xmodel_err" in e and not math.isnan(e["xmodel_err"])}
    own = {name: _rounding_sqnr(m) for name, m in matching.items() if m.get("float") and m.get("pre_qdq")}
    graph = onnx.load(str(float_model), load_external_data=False).graph
    producer = {o: n for n in graph.node for o in n.output}
    readers: dict[str, list[str]] = {}
    for n in graph.node:
        for x in n.input:
            readers.setdefault(x, []).append(n.name)
    ceiling = SQNR_CEILING  # graph inputs and weights that were not compared

    def segment(tensor: str) -> tuple[list[Any], list[float], list[str]]:
        """The nodes back from ``tensor`` to compared tensors (or graph inputs / weights), those tensors' SQNR, and
        their names."""
        nodes, inputs, feeds, stack, seen = [], [], [], [tensor], set()
        while stack:
            t = stack.pop()
            node = producer.get(t)
            if node is None or id(node) in seen:
                if node is None:
                    inputs.append(ceiling)
                continue
            seen.add(id(node))
            nodes.append(node)
            for x in node.input:
                if not x:
                    continue
                if x in sqnr:
                    inputs.append(sqnr[x])
                    feeds.append(x)
                else:
                    stack.append(x)
        return nodes, inputs, feeds

    damage = []
    for tensor, value in sqnr.items():
        if tensor not in producer:
            continue
        nodes, inputs, feeds = segment(tensor)
        nodes.reverse()
        damage.append(NodeDamage(tuple(n.name for n in nodes), tuple(n.op_type for n in nodes), tensor,
                                 min(inputs, default=ceiling) - value, value, tuple(dict.fromkeys(feeds)),
                                 own.get(tensor, SQNR_CEILING), tuple(readers.get(tensor, ()))))
    damage.sort(key=lambda d: -d.db_lost)
    return damage


def _rounding_sqnr(match: dict[str, Any]) -> float:
    """A tensor's own rounding noise (before vs after its Q/DQ pair) against the float model's signal there, dB.
    (Against its own pre-rounding value instead, a tensor already ruined upstream would look ruined by rounding.)"""
    signal = float(np.linalg.norm(np.concatenate([np.ravel(a) for a in match["float"]])))
    noise = float(np.linalg.norm(np.concatenate([np.ravel(a) - np.ravel(b) for a, b in
                                                 zip(match["pre_qdq"], match["post_qdq"])])))
    if noise <= 1e-30:
        return SQNR_CEILING
    return min(SQNR_CEILING, 20.0 * math.log10(max(signal, 1e-30) / noise))
