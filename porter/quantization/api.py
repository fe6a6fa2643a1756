"""``porter.quantize``: static INT8 quantization with ONNX Runtime's tools, calibrated on the user's images and
accepted only when an accuracy gate on held-out images says it still answers as fp32 does.

The steps: ``quant_pre_process`` (shape inference and the optimizations quantization needs), then
``quantize_static`` in QDQ format: per-channel signed int8 weights, uint8 activations (the pairing that runs on
VNNI's u8 x s8 dot products; signed activations measured no faster), ranges from the calibration method. The gate
compares int8 with fp32 on other images; past ``max_drop`` the nodes losing most SQNR (``gate.diverging_nodes``)
stay in float and the model is quantized again from the same calibration ranges (ORT's calibration cache), the
number kept in float doubling each round, until it passes or more than ``MAX_FLOAT_SHARE`` of the quantizable nodes
would stay float: then a ValidationError gives the figures. The written model records how it was made and the
measured agreement under ``porter.quantization`` (``porter inspect`` shows it).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import ModelLoadError, UsageError, ValidationError, first_line
from ..spec import ModelCard
from . import data as D
from .gate import Agreement, diverging_nodes, measure

from . import DEFAULT_EVAL_SAMPLES, DEFAULT_METHOD, DEFAULT_SAMPLES, METHODS
MAX_FLOAT_SHARE = 0.25  # more than this many of the quantizable nodes in float: int8 is not worth it, refuse
MAX_ROUNDS = 6  # quantize + gate at most this often (a ResNet-50 round takes a minute on 2 cores)
QUANTIZED_OPS = ("Conv", "Gemm", "MatMul", "ConvTranspose")  # the nodes whose weights int8 carries
FLOAT_OUTPUT_OPS = ("Softmax", "LogSoftmax", "Sigmoid")
DIAGNOSE_INPUTS = 16  # inputs the SQNR comparison runs on (every activation of both models is kept)


@dataclass
class QuantizeResult:
    output: Path | None
    model: Any  # onnx.ModelProto (int8, QDQ)
    agreement: Agreement
    excluded: list[str]
    method: str
    samples: int
    rounds: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> str:
        lines = [f"quantized to int8 (QDQ, {self.method} calibration on {self.samples} images): "
                 f"{self.agreement.describe()}"]
        if self.excluded:
            lines.append(f"kept in float ({len(self.excluded)}): {', '.join(self.excluded[:8])}"
                         f"{', ...' if len(self.excluded) > 8 else ''}")
        lines += [f"note: {n}" for n in self.notes]
        if self.output is not None:
            lines.append(f"wrote {self.output} ({self.output.stat().st_size / 1e6:.2f} MB) in {self.seconds:.1f} s")
        return "\n".join(lines)


def quantize(model: Any, calibrate: Any, output: str | os.PathLike | None = None, *, samples: int = DEFAULT_SAMPLES,
             method: str = DEFAULT_METHOD, max_drop: float = 1.0, max_error: float = 0.1, eval: Any = None,
             eval_samples: int = DEFAULT_EVAL_SAMPLES, exclude: Sequence[str] = (), seed: int = 0,
             force: bool = False, log=None) -> QuantizeResult:
    """Quantize ``model`` (a path or ModelProto) to int8, calibrated on ``calibrate`` (a folder of images, class
    folders for accuracy too; or preprocessed tensors), gated on held-out images (``eval``: a folder instead).

    ``max_drop``: points of top-1 agreement with fp32 a classifier may lose (default 1); ``max_error``: relative
    RMS output error for other models. ``exclude``: node names kept in float from the start.
    """

    t0 = time.perf_counter()
    method = _check(method, samples, eval_samples, max_drop, max_error)
    if output is not None:
        from ..outputs import check_output

        check_output(output, force)
    proto = _read(model)
    _refuse_quantized(proto)

    def samples_for(fp32) -> tuple[D.Samples, D.Samples]:
        return _samples(fp32, calibrate, eval, samples, eval_samples, seed)

    source = str(calibrate) if isinstance(calibrate, (str, os.PathLike)) else "tensors"
    result = quantize_samples(proto, samples_for, method=method, max_drop=max_drop, max_error=max_error,
                              exclude=exclude, log=log, record={"seed": seed, "calibration": source})
    if output is not None:
        from ..outputs import save_onnx

        result.output = save_onnx(result.model, output, force)
    result.seconds = time.perf_counter() - t0
    return result


def quantize_samples(proto, samples_for, *, method: str = DEFAULT_METHOD, max_drop: float = 1.0,
                     max_error: float = 0.1, exclude: Sequence[str] = (), log=None,
                     record: dict[str, Any] | None = None) -> QuantizeResult:
    """The steps on an fp32 ModelProto: ``samples_for(fp32 Predictor)`` gives the (calibration, gate) Samples.
    Returns the int8 model (not written) with ``porter.quantization`` recorded; raises ValidationError when the
    gate can't be met."""
    from ..runtime.predictor import Predictor

    t0 = time.perf_counter()
    log = log or (lambda line: None)
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="porter-quantize-") as tmp:
        work = Path(tmp)
        prepared = _prepare(proto, work, notes)
        names = [n.name for n in prepared.graph.node]
        unknown = sorted(set(exclude) - set(names))
        if unknown:
            raise UsageError(f"--exclude names no node of the model: {', '.join(unknown[:5])}; give ONNX node "
                             f"names (as the quantize log prints them, e.g. {names[0]!r})")
        fp32 = Predictor(proto, device="cpu")
        cal, ev = samples_for(fp32)
        truth = _true_labels(ev, fp32, notes)
        if cal.skipped or ev.skipped:
            notes.append(f"{len(cal.skipped) + len(ev.skipped)} unreadable images skipped")
        log(f"calibrating on {len(cal)} inputs, gating on {len(ev)} held-out inputs")
        ref = fp32.run_batched(ev.tensors)
        kinds = {n.name: n.op_type for n in prepared.graph.node}
        weighty = lambda nodes: [n for n in nodes if kinds.get(n) in QUANTIZED_OPS]  # noqa: E731
        quantizable = weighty(names)
        limit = max(1, int(len(quantizable) * MAX_FLOAT_SHARE))
        prepared_path = work / "prepared.onnx"
        _save(prepared, prepared_path)
        cache = work / "calibration.json"  # ORT's calibration cache: every round quantizes from the same ranges
        outputs = {o.name for o in prepared.graph.output}
        # a uint8 softmax carries probabilities in steps of 1/255 (a 1000-class model's are mostly below one step):
        # the output activations stay float, at no measurable cost
        kept = [n.name for n in prepared.graph.node if n.op_type in FLOAT_OUTPUT_OPS and set(n.output) & outputs]
        if kept:
            notes.append(f"kept in float by default (output activations): {', '.join(kept)}")
        excluded = list(dict.fromkeys([*exclude, *kept]))
        rounds: list[dict[str, Any]] = []
        step = 1
        while True:
            qpath = work / f"int8-{len(rounds)}.onnx"
            _quantize(prepared_path, qpath, cal, fp32, method, excluded, cache)
            qbytes = qpath.read_bytes()
            got = Predictor(qbytes, device="cpu", cache=False).run_batched(ev.tensors)
            agreement = measure(ref, got, fp32.score_output, truth)
            rounds.append({"excluded": list(excluded), **agreement.to_dict()})
            log(f"round {len(rounds)}: {len(excluded)} node(s) in float: {agreement.describe()}")
            if agreement.passes(max_drop, max_error):
                break
            take: list[str] = []
            if len(rounds) < MAX_ROUNDS:
                diagnosis = ev.rows(range(min(DIAGNOSE_INPUTS, len(ev))))
                damage = diverging_nodes(prepared_path, qpath, lambda: _reader(diagnosis, fp32), work)
                take = _next_exclusions(damage, excluded, step, limit, weighty, kinds, log)
            if not take:
                raise ValidationError(_refusal(agreement, max_drop, max_error, weighty(excluded), limit,
                                               len(quantizable)))
            excluded += take
            step *= 2
        qmodel = _onnx().load_model_from_string(qbytes)
    card = (ModelCard.from_onnx(proto) or ModelCard(source="onnx", framework="onnx", porter_version=_version()))
    meta = {"format": "QDQ", "weights": "int8 per-channel", "activations": "uint8", "method": method,
            "samples": len(cal), "excluded": excluded, "gate": agreement.to_dict(), "max_drop_points": max_drop,
            "rounds": len(rounds), **(record or {})}
    card.with_(quantization=meta).apply_to(qmodel)
    return QuantizeResult(None, qmodel, agreement, excluded, method, len(cal), rounds, notes,
                          time.perf_counter() - t0)


def _next_exclusions(damage, excluded: list[str], step: int, limit: int, weighty, kinds: dict[str, str],
                     log) -> list[str]:
    """The nodes to keep in float next: the ``step`` worst-damaged segments that still fit within ``limit``
    weight-carrying float nodes, each with what keeps the damaged tensors in float."""
    from onnxruntime.quantization.registry import QDQRegistry

    quantized_ops = set(QDQRegistry) | {"Add", "Mul", "Concat", "Softmax"}  # the ops ORT's QDQ pass touches
    by_tensor = {d.tensor: d for d in damage}
    take: list[str] = []
    for d in damage:
        if d.db_lost <= 0 or step == 0:
            break
        # A tensor stays quantized while its producer or any reader is (ORT puts a Q/DQ pair on it for either).
        # Its own rounding the culprit: keep it float with its readers. Else the damage came from what it was
        # computed from: keep that computation float with the producers of the tensors it reads.
        producers = [n for x in d.feeds if x in by_tensor for n in by_tensor[x].nodes]
        group = list(d.nodes) + (list(d.readers) if d.rounding_dominates else producers)
        new = [n for n in dict.fromkeys(group) if n not in excluded and n not in take]
        if not any(kinds.get(n) in quantized_ops for n in new):  # nothing ORT quantizes: it would change nothing
            group += list(d.readers) + producers
        new = [n for n in dict.fromkeys(group) if n not in excluded and n not in take]
        if not new or len(weighty(excluded + take + new)) > limit:
            continue
        take += new
        step -= 1
        log(f"keeping in float: {', '.join(new)} (SQNR falls {d.db_lost:.1f} dB at {d.tensor})")
    return take


def _refuse_quantized(proto) -> None:
    if any(n.op_type in ("QuantizeLinear", "DequantizeLinear", "QLinearConv", "ConvInteger") for n in proto.graph.node):
        raise UsageError("this model is already quantized; quantize the fp32 model it came from")


def _check(method: str, samples: int, eval_samples: int, max_drop: float, max_error: float) -> str:
    if method not in METHODS:
        raise UsageError(f"unknown calibration method {method!r}; choose one of: {', '.join(METHODS)}")
    if not isinstance(samples, int) or samples < 1 or not isinstance(eval_samples, int) or eval_samples < 1:
        raise UsageError(f"--samples and --eval-samples must be positive integers, got {samples!r}, {eval_samples!r}")
    if not (0 <= max_drop <= 100) or not (0 <= max_error):
        raise UsageError(f"--max-drop is points of agreement (0 to 100), --max-error a ratio >= 0; got {max_drop}, "
                         f"{max_error}")
    return method


def _read(model: Any):
    import onnx

    if isinstance(model, onnx.ModelProto):
        return model
    if not isinstance(model, (str, os.PathLike)):
        raise UsageError(f"porter.quantize takes an ONNX file or an onnx.ModelProto, not {type(model).__name__}")
    from ..files import load_onnx_file

    return load_onnx_file(model)


def _samples(fp32, calibrate: Any, eval: Any, samples: int, eval_samples: int, seed: int):
    """(calibration, gate) samples: images through the model's preprocessing, or the API's tensors."""
    held = D.list_data(eval) if eval is not None else None
    if not isinstance(calibrate, (str, os.PathLike)):
        cal, ev = D.from_tensors(calibrate, fp32.input_names, samples, seed, held_out=held is None)
    else:
        cal_list, ev_list = D.split(D.list_data(calibrate), samples, seed, held, eval_samples)
        cal, ev = D.load_samples(cal_list, fp32), D.load_samples(ev_list, fp32)
    if held is not None and not isinstance(calibrate, (str, os.PathLike)):
        ev = D.load_samples(D.draw(held, eval_samples, seed), fp32)
    return cal, ev.rows(range(min(len(ev), eval_samples)))


def _true_labels(ev: D.Samples, fp32, notes: list[str]) -> np.ndarray | None:
    """The gate's true labels as indices of the model's classes: class folders named after the model's labels."""
    if ev.labels is None or not fp32.is_classifier:
        return None
    labels = [str(l) for l in (fp32.labels or ())]
    if not set(ev.classes) <= set(labels):
        notes.append(f"accuracy not scored: the class folders ({', '.join(ev.classes[:4])}"
                     f"{', ...' if len(ev.classes) > 4 else ''}) are not all among the model's labels")
        return None
    index = np.asarray([labels.index(c) for c in ev.classes], np.int64)
    return index[ev.labels]


def _prepare(proto, work: Path, notes: list[str]):
    """``quant_pre_process`` (symbolic shape inference, then ORT's basic optimizations); every node named, since
    exclusions go by name."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    src, dst = work / "fp32.onnx", work / "pre.onnx"
    _save(proto, src)
    attempts = ({}, {"skip_symbolic_shape": True}, {"skip_symbolic_shape": True, "skip_optimization": True})
    for i, options in enumerate(attempts):
        try:
            with _quiet():
                quant_pre_process(str(src), str(dst), **options)
            if i:
                notes.append(f"quantization pre-processing ran with {', '.join(options)} (the full pass failed)")
            break
        except Exception as e:  # noqa: BLE001 - ORT's shape inference raises anything
            last = e
    else:
        raise ModelLoadError(f"onnxruntime's quantization pre-processing failed on this model: {first_line(last)}")
    model = _onnx().load_model(str(dst))
    seen: set[str] = set()
    for i, node in enumerate(model.graph.node):
        if not node.name or node.name in seen:
            node.name = f"{node.op_type}_{i}"
        seen.add(node.name)
    return model


def _quantize(src: Path, dst: Path, cal: D.Samples, fp32, method: str, excluded: list[str], cache: Path) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    calib = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
             "percentile": CalibrationMethod.Percentile}[method]
    try:
        with _quiet():
            quantize_static(str(src), str(dst), _reader(cal, fp32), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, calibrate_method=calib,
                            nodes_to_exclude=list(excluded), calibration_cache_path=str(cache),
                            extra_options={"ActivationSymmetric": False, "WeightSymmetric": True})
    except Exception as e:  # noqa: BLE001
        raise ModelLoadError(f"onnxruntime could not quantize this model: {first_line(e)}") from None


def _reader(samples: D.Samples, fp32):
    """A CalibrationDataReader over ``samples``, one model-sized batch at a time (the fixed batch, else 1: equal
    batches keep the histogram methods' per-batch statistics comparable)."""
    from onnxruntime.quantization import CalibrationDataReader

    batch = fp32.fixed_batch or 1
    n = len(samples)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.start = 0

        def get_next(self):
            if self.start >= n:
                return None
            rows = np.arange(self.start, self.start + batch) % n  # a fixed batch: wrap round to fill the last one
            self.start += batch
            return {k: v[rows] for k, v in samples.tensors.items()}

        def __len__(self):
            return -(-n // batch)

        def rewind(self):
            self.start = 0

    return Reader()


def _refusal(agreement: Agreement, max_drop: float, max_error: float, excluded: list[str], limit: int,
             quantizable: int) -> str:
    """``excluded``: the weight-carrying nodes already kept in float."""
    budget = (f"the {max_drop:g}-point budget (--max-drop)" if agreement.drop is not None
              else f"the {max_error:.0%} error budget (--max-error)")
    return (f"int8 does not hold this model's answers within {budget} even with {len(excluded)} of its "
            f"{quantizable} quantizable nodes in float (porter keeps at most {limit} float, in up to {MAX_ROUNDS} "
            f"rounds): "
            f"{agreement.describe()}; run it in fp32, calibrate on more representative images (--calibrate, "
            f"--samples), or allow a larger --max-drop")


def _save(model, path: Path) -> None:
    import onnx

    onnx.save_model(model, str(path), save_as_external_data=model.ByteSize() > 2**31 - 2**26)


@contextlib.contextmanager
def _quiet():
    """ORT's quantization tools log at INFO and print: keep porter's output to porter's lines."""
    logger = logging.getLogger()
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        logger.setLevel(level)


def _onnx():
    import onnx

    return onnx


def _version() -> str:
    from .. import __version__

    return __version__
