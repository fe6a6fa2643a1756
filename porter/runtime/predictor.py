"""``porter.load(model) -> Predictor``: batched, device-aware inference on an ONNX model.

What the Predictor accepts (``predict`` / ``iter_predictions``):

* image paths, PIL images, uint8 numpy arrays of raw pixels (H x W, H x W x C, or a N x H x W x C stack):
  decoded in a thread pool while the previous batch runs, resized and normalized as the model's porter
  metadata (``ModelCard.preprocess``) says, or as ``preprocess=`` overrides;
* already-preprocessed tensors with ``preprocessed=True``: numpy arrays, torch tensors or any DLPack object
  (on CUDA they are bound without a copy when they already live on the GPU); a dict for several inputs.

What it returns: for a classifier, one ``Prediction`` per input (label, score, top-k); for anything else, the
model's named outputs. A classifier is a model with an output named ``probabilities`` or exactly one float
output of rank 2 (N x classes).

Scores. porter reports probabilities, transformed as ``signature.py`` decides once from the graph
(``Predictor.score_transform`` says which); ``scores="raw"`` reports the output untouched, ``scores="softmax"``
always applies one.

The Predictor is a facade: what the model takes and gives is ``signature.ModelSignature``, feed checks and IO
binding ``feeds.py``, fp16 ``precision.py``, the decode-ahead image pipeline ``pipeline.py``, sessions and
providers ``session.py``.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import replace
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from ..errors import DataError, InferenceError, PorterError, RuntimeSetupError, UsageError, \
    ValidationError, runtime_message
from ..files import read_model
from ..graph.inspect import TensorInfo
from ..imaging import describe_source
from ..spec import ModelCard, PreprocessSpec
from . import session as S
from .feeds import as_sources, bind_and_run, check_feed, feeds_dict, host_array, shape_dtype
from .pipeline import ImageLayout, PipelineStats, plan_batches, run_images
from .precision import (FP16_TOLERANCE, PRECISION_TOLERANCE, PrecisionReport, compare_precision, convert_to_fp16,
                        resolve_precision)
from .signature import SCORE_MODES, ModelSignature, probabilities
from .results import Prediction, task_results

DEFAULT_BATCH = 32
MAX_STREAMS = 4  # concurrent CPU inference streams by default (each holds one batch's activations)
STREAMS_MAX_MODEL_BYTES = 1 << 30  # bigger models get streams only when asked (streams=): their weights are loaded twice

__all__ = ["DEFAULT_BATCH", "PipelineStats", "PrecisionReport", "Prediction", "Predictor", "SCORE_MODES",
           "compare_precision", "convert_to_fp16", "load", "plan_batches", "probabilities"]


def load(model: Any, device: str = "auto", fp16: bool = False, batch_size: int | None = None,
         precision: str | None = None, **options: Any) -> "Predictor":
    """Load an ONNX model for inference.

    ``model``: a path (``.onnx`` or ``onnx:PATH``), an ``onnx.ModelProto`` or serialized bytes.
    ``device``: ``auto`` (CUDA when it works, else CPU, and ``Predictor.notes`` says why), ``cuda``,
    ``tensorrt``, ``openvino`` (Intel CPUs, through the OpenVINO plugin for ONNX Runtime) or ``cpu``; an
    unavailable one raises RuntimeSetupError naming what is missing.
    ``precision``: ``fp32``, ``fp16`` (GPUs: a half-precision copy, inputs/outputs stay float32), ``bf16``
    (OpenVINO) or ``int8`` (a model ``porter quantize`` wrote); default fp32, an int8 model's int8, and on OpenVINO
    its own default (bf16 on CPUs with AMX). Anything but fp32 is checked against ONNX Runtime fp32 on seeded inputs
    before use (a ValidationError past the tolerance). ``fp16=True`` is ``precision="fp16"``.
    ``batch_size``: the largest batch sent to the model (default 32, or the model's fixed batch).
    Options: ``preprocess`` (a PreprocessSpec or preset name overriding the model's metadata), ``scores``
    (auto|raw|softmax), ``threads`` (CPU intra-op threads), ``cache`` / ``cache_dir`` (optimized-model cache),
    ``decode_workers`` (image-decoding threads), ``fast_decode`` (large JPEGs decoded at reduced scale, see
    ``porter.imaging.load_image``), ``spin`` (ORT thread spinning), ``max_batch`` (TensorRT profile).
    """
    return Predictor(model, device=device, fp16=fp16, batch_size=batch_size, precision=precision, **options)


class Predictor:
    """An ONNX model on a device. See the module docstring for inputs, outputs and scores."""

    def __init__(self, model: Any, *, device: str = "auto", fp16: bool = False, batch_size: int | None = None,
                 preprocess: PreprocessSpec | str | None = None, scores: str = "auto", threads: int | None = None,
                 cache: bool = True, cache_dir: str | os.PathLike | None = None, decode_workers: int | None = None,
                 fast_decode: bool = False, spin: bool = True, max_batch: int | None = None,
                 streams: int | None = None, precision: str | None = None):
        if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
            raise UsageError(f"batch size must be a positive integer, got {batch_size!r}")
        if threads is not None and threads < 1:
            raise UsageError(f"threads must be a positive integer, got {threads!r}")
        self.name, self.model, model_bytes, self._model_path = read_model(model)
        self.card = ModelCard.from_onnx(self.model)
        self.signature = ModelSignature.read(self.model, self.card, self.name, preprocess, scores)
        sig = self.signature
        self.requested_device = device
        self.device, device_note = S.resolve_device(device)
        notes: list[str] = []
        self.quantized = any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in self.model.graph.node)
        self.precision = resolve_precision(precision, bool(fp16), self.quantized, self.device, self.name)
        fp16 = self.precision == "fp16"
        self.fp16 = bool(fp16)
        if self.fp16 and self.device == "cpu":
            if device == "auto":
                self.fp16, self.precision = False, "fp32"
                notes.append("fp16 ignored: no GPU, the CPU runs the model in fp32")
            else:
                notes.append("fp16 on CPU: onnxruntime's CPU kernels are fp32-first, expect it to be slower")
        fixed = self.fixed_batch
        if fixed and batch_size and batch_size != fixed:
            notes.append(f"the model takes batches of exactly {fixed}; batch size {batch_size} ignored")
        self.batch_size = fixed or batch_size or DEFAULT_BATCH
        notes.extend(sig.notes)
        if decode_workers is not None and (not isinstance(decode_workers, int) or decode_workers < 1):
            raise UsageError(f"decode workers must be a positive integer, got {decode_workers!r}")
        self.decode_workers = decode_workers or min(8, max(2, (os.cpu_count() or 2)))
        self.fast_decode = bool(fast_decode)
        if streams is not None and (not isinstance(streams, int) or streams < 1):
            raise UsageError(f"streams must be a positive integer, got {streams!r}")
        self.streams = streams  # CPU pipelines: concurrent inference streams; None: one per core, up to MAX_STREAMS
        self._stream_session: tuple[int, Any] | None = None  # (threads, session) shared by the streams
        self._external_data = model_bytes is None
        self.config = S.SessionConfig(device=self.device, fp16=self.fp16 and self.device == "tensorrt",
                                       precision=self.precision if self.device == "openvino" else None,
                                       threads=threads, spin=spin, cache=cache and model_bytes is not None,
                                       cache_dir=str(cache_dir) if cache_dir else None,
                                       max_batch=max(max_batch or 0, self.batch_size, 64 if not fixed else 0),
                                       opt_batch=self.batch_size)
        self.precision_report: PrecisionReport | None = None
        self.last_stats: PipelineStats | None = None  # of the latest iter_predictions / predict on images
        try:
            self.session, self._info = self._open(model_bytes)
        except RuntimeSetupError as e:
            if device != "auto" or self.device == "cpu":
                raise
            # auto: the GPU looked usable but its provider did not start for this model; say so, run on CPU
            device_note = f"auto: running on CPU; the {self.device} provider did not start ({e})"
            self.device, self.fp16 = "cpu", False
            self.precision = "int8" if self.quantized else "fp32"
            self.config = replace(self.config, device="cpu", fp16=False)
            self.session, self._info = self._open(model_bytes)
        self.notes: list[str] = ([device_note] if device_note else []) + notes
        self.providers: list[str] = self._info.providers
        self.notes.extend(self._info.notes)

    # --- what the model takes and gives: read off its signature (see signature.ModelSignature) --------------------

    inputs = property(lambda self: list(self.signature.inputs))
    outputs = property(lambda self: list(self.signature.outputs))
    input_names = property(lambda self: self.signature.input_names)
    output_names = property(lambda self: self.signature.output_names)
    preprocess = property(lambda self: self.signature.preprocess)
    labels = property(lambda self: self.signature.labels)
    tasks = property(lambda self: self.signature.tasks)
    score_output = property(lambda self: self.signature.score_output)
    score_transform = property(lambda self: self.signature.score_transform)
    fixed_batch = property(lambda self: self.signature.fixed_batch, doc="The only batch size the model takes, or None.")
    session_info = property(lambda self: self._info, doc="How the session was opened (session.SessionInfo): its "
                                                         "providers, and whether the optimized model came from cache.")

    # --- construction helpers -------------------------------------------------------------------------------------

    @property
    def _input_profiles(self) -> dict[str, tuple[Any, ...]]:
        return {t.name: t.shape for t in self.inputs}

    def _open(self, model_bytes: bytes | None):
        profiles = self._input_profiles
        source: Any = model_bytes if model_bytes is not None else self._model_path
        if self.device == "openvino" and self.precision != "fp32":
            return self._checked(source, S.create_session(source, self.config, input_profiles=profiles),
                                 replace(self.config, device="cpu", precision=None))
        if not self.fp16:
            return S.create_session(source, self.config, input_profiles=profiles)
        if model_bytes is None:
            raise UsageError(f"fp16 needs the model in one file; {self.name} keeps its weights in external data")
        ref_config = replace(self.config, fp16=False, device="cuda" if self.device == "tensorrt" else self.device)
        ref_session, _ = S.create_session(source, ref_config, input_profiles=profiles)
        if self.device == "tensorrt":  # TensorRT builds fp16 engines from the fp32 model
            session, info = S.create_session(source, self.config, variant="-fp16", input_profiles=profiles)
        else:
            session, info = S.create_session(source, self.config, variant="-fp16", input_profiles=profiles,
                                             transform=lambda: convert_to_fp16(self.model).SerializeToString())
        return self._checked(source, (session, info), ref_config, ref_session)

    def _checked(self, source: Any, opened, ref_config: S.SessionConfig, ref_session=None):
        """``opened`` (session, info) in reduced precision, accepted only if it answers as ONNX Runtime's fp32 does
        (``ref_config``) on seeded inputs."""
        session, info = opened
        if ref_session is None:
            ref_session, _ = S.create_session(source, ref_config, input_profiles=self._input_profiles)
        feeds = self.example_inputs(min(8, self.batch_size), seed=1234)
        ref = dict(zip(self.output_names, ref_session.run(None, feeds)))
        got = dict(zip(self.output_names, session.run(None, feeds)))
        label = self.precision if self.device != "openvino" else f"OpenVINO {self.precision_label}"
        report = compare_precision(ref, got, self.score_output, tolerance=PRECISION_TOLERANCE.get(self.precision,
                                                                                                   FP16_TOLERANCE),
                                   precision=label)
        self.precision_report = report
        if not report.passed:
            fix = "drop --fp16" if self.fp16 else "use --precision fp32"
            raise ValidationError(f"{label} gives different answers from fp32 for {self.name}: "
                                  f"{'; '.join(report.problems)} ({report.describe()}); run it in fp32 ({fix})", report)
        info.notes.append(report.describe())
        return session, info

    @property
    def precision_label(self) -> str:
        """What computes: ``fp32``, ``fp16``, ``bf16``, ``int8``; OpenVINO's unset default named as such."""
        if self.precision == "default":
            return "default precision (bf16 on CPUs with AMX, else fp32)"
        return self.precision

    # --- facts ----------------------------------------------------------------------------------------------------

    @property
    def is_classifier(self) -> bool:
        return self.score_output is not None

    @property
    def num_classes(self) -> int | None:
        return self.signature.num_classes

    def describe(self) -> str:
        prec = f" {self.precision_label}" if self.precision != "fp32" else ""
        return f"{self.name} on {self.device}{prec} ({S.describe_providers(self.providers)}), batch {self.batch_size}"

    def example_inputs(self, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
        """Seeded inputs of the model's shape: smooth random images through the preprocessing, else normals."""
        return self.signature.example_inputs(batch, seed)

    def concrete_shape(self, t: TensorInfo, batch: int) -> tuple[int, ...]:
        """Input ``t``'s shape at ``batch``, open image dims filled from the preprocessing."""
        return self.signature.concrete_shape(t, batch)

    # --- running --------------------------------------------------------------------------------------------------

    def run(self, feeds: Mapping[str, Any] | Any, output_device: str = "cpu") -> dict[str, Any]:
        """Run ONE batch of preprocessed inputs as given (no splitting, no preprocessing).

        ``feeds``: a dict by input name, or one array/tensor for a single-input model. Values may be numpy
        arrays, torch tensors or DLPack objects. ``output_device="cuda"`` (GPU devices) keeps the outputs on
        the GPU and returns ``onnxruntime.OrtValue``s (``torch.from_dlpack(value)`` wraps one without a copy).
        """
        feeds = self.check_feeds(feeds)
        if output_device not in ("cpu", "cuda"):
            raise UsageError(f"output_device must be 'cpu' or 'cuda', got {output_device!r}")
        if self.device == "cpu":
            if output_device == "cuda":
                raise UsageError("output_device='cuda' needs a GPU device; this predictor runs on the CPU")
            return self._run_on(self.session, feeds)
        with self._failures(feeds):
            return bind_and_run(self.session, feeds, self.output_names, output_device, self.config.device_id)

    def check_feeds(self, given: Any) -> dict[str, Any]:
        """``given`` as checked feeds by input name (see ``feeds.check_feed``), or a DataError."""
        info = {t.name: t for t in self.inputs}
        return {k: check_feed(info[k], v, self.name) for k, v in feeds_dict(self.inputs, given, self.name).items()}

    def _run_on(self, session, feeds: dict[str, Any]) -> dict[str, np.ndarray]:
        """``session`` (this model, on the CPU) on checked feeds, its failures as InferenceErrors."""
        arrays = {k: host_array(v) for k, v in feeds.items()}
        with self._failures(feeds):
            return dict(zip(self.output_names, session.run(None, arrays)))

    @contextlib.contextmanager
    def _failures(self, feeds: Mapping[str, Any]):
        """onnxruntime failing on inputs that passed the checks (an image too small for a convolution, say): an
        InferenceError naming the model and the inputs, ORT's own words kept, not a traceback."""
        try:
            yield
        except PorterError:
            raise
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own types
            given = ", ".join(f"{k} {'x'.join(map(str, shape_dtype(v)[0] or ()))}" for k, v in feeds.items())
            raise InferenceError(f"{self.name} failed on {given}: {runtime_message(e)}") from None

    # --- predicting -----------------------------------------------------------------------------------------------

    def predict(self, inputs: Any, *, top_k: int = 5, preprocessed: bool = False,
                batch_size: int | None = None) -> list[Prediction] | dict[str, np.ndarray]:
        """Predict for images (paths, PIL images, raw uint8 arrays) or preprocessed tensors, in batches.

        Classifiers: a list of ``Prediction`` (label, score, top-k), one per input. Other models: the named
        outputs, concatenated over the batches. A bad input raises DataError naming it (``iter_predictions``
        reports per input instead).
        """
        if preprocessed:
            outputs = self.run_batched(inputs, batch_size=batch_size)
            if self.tasks:
                n = len(next(iter(outputs.values())))
                return [Prediction(None, tasks=task_results(self.tasks, {k: v[i] for k, v in outputs.items()}, top_k))
                        for i in range(n)]
            if not self.is_classifier:
                return outputs
            n = len(outputs[self.score_output])
            return [self._classify(outputs[self.score_output][i], None, top_k) for i in range(n)]
        results = list(self.iter_predictions(as_sources(inputs), top_k=top_k, errors="raise",
                                             batch_size=batch_size))
        if self.is_classifier or self.tasks:
            return results
        return {name: np.concatenate([r.outputs[name] for r in results]) for name in self.output_names} if results else {}

    def run_batched(self, inputs: Any, batch_size: int | None = None) -> dict[str, np.ndarray]:
        """Preprocessed inputs of any batch length, run in chunks of ``batch_size``; outputs concatenated."""
        feeds = feeds_dict(self.inputs, inputs, self.name)
        lengths = {name: shape_dtype(v)[0][0] if shape_dtype(v)[0] else None for name, v in feeds.items()}
        if len(set(lengths.values())) != 1 or None in lengths.values():
            raise DataError(f"inputs must share one batch length (the first axis), got {lengths}")
        n = next(iter(lengths.values()))
        bs = self._batch(batch_size)
        parts: dict[str, list[np.ndarray]] = {name: [] for name in self.output_names}
        for start in range(0, n, bs):
            chunk = {k: v[start:start + bs] for k, v in feeds.items()}
            out = self._run_padded(chunk, min(bs, n - start))
            for name in self.output_names:
                parts[name].append(out[name])
        return {name: np.concatenate(v) if v else np.zeros((0,)) for name, v in parts.items()}

    def _batch(self, batch_size: int | None) -> int:
        if self.fixed_batch:
            return self.fixed_batch
        if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
            raise UsageError(f"batch size must be a positive integer, got {batch_size!r}")
        return batch_size or self.batch_size

    def _run_padded(self, feeds: dict[str, Any], n: int, runner=None) -> dict[str, np.ndarray]:
        fixed = self.fixed_batch
        if fixed and n < fixed:  # a model with a fixed batch: pad the last chunk, drop the padding after
            feeds = {k: np.concatenate([host_array(v), np.zeros((fixed - n, *np.shape(v)[1:]), host_array(v).dtype)])
                     for k, v in feeds.items()}
        out = (runner or self.run)(feeds)
        return {k: (v[:n] if np.ndim(v) and np.shape(v)[0] == (fixed or n) else v) for k, v in out.items()}

    def iter_predictions(self, sources: Sequence[Any], *, top_k: int = 5, errors: str = "report",
                         batch_size: int | None = None, names: Sequence[str] | None = None) -> Iterator[Prediction]:
        """Yield one Prediction per source, in order, decoding ahead in a thread pool while batches run.

        ``errors="report"``: an input that can't be read (or that the model fails on) yields a Prediction with
        ``error`` set and the rest go on; ``errors="raise"``: the first one raises its DataError.
        ``names``: each Prediction's ``source`` (default: the path, or "array N"). See ``iter_outputs`` for the
        pipeline.
        """
        if top_k < 1:
            raise UsageError(f"top-k must be at least 1, got {top_k}")
        sources = list(sources)
        name_of = (lambda i: names[i]) if names is not None else (lambda i: _source_name(sources[i], i))

        def predictions(out: dict[str, np.ndarray], indices: list[int]) -> dict[int, Prediction]:
            return self._predictions(out, indices, name_of, top_k)

        for i, result, error in self.iter_outputs(sources, errors=errors, batch_size=batch_size, names=names,
                                                  postprocess=predictions):
            name = name_of(i)
            yield result if error is None else Prediction(source=name, error=_strip_name(str(error), name))

    def iter_outputs(self, sources: Sequence[Any], *, errors: str = "report", batch_size: int | None = None,
                     names: Sequence[str] | None = None,
                     postprocess: Callable[[dict[str, np.ndarray], list[int]], dict[int, Any]] | None = None,
                     ) -> Iterator[tuple[int, Any, DataError | None]]:
        """The image pipeline: decode, resize and normalize ahead in a thread pool while batches run; yield
        ``(index, result, error)`` per source, in order.

        ``result`` is ``postprocess(outputs, indices)[index]`` for each batch's named outputs (run on the inference
        threads; default: the source's row of every output), ``error`` a DataError when the source can't be read
        or the model failed on its batch (an ``InferenceError``). ``errors="raise"`` raises the first instead.
        ``names``: what error messages call each source (default: its path, or "array N").

        On the CPU, a long run goes through ``pipeline_streams()`` concurrent inference streams, each with its
        share of the cores (2 cores: two single-threaded streams), instead of one batch at a time on every core:
        a multi-threaded run waits at every layer for its slowest thread, so each slice of CPU the decoders take
        stalls all cores (measured: a load taking 15% of a 2-core machine cost one 2-thread run 30% of its
        throughput), while independent streams only lose the share the decoders use.
        """
        if errors not in ("report", "raise"):
            raise UsageError(f"errors must be 'report' or 'raise', got {errors!r}")
        sources = list(sources)
        if not sources:
            raise DataError("no inputs to predict on")
        if names is not None and len(names) != len(sources):
            raise UsageError(f"{len(names)} names for {len(sources)} inputs")
        spec, image = self.image_spec()
        bs = self._batch(batch_size)
        streams = self.pipeline_streams(-(-len(sources) // bs))
        runner = self._stream_runner(streams) if streams > 1 else None

        def run_batch(batch: np.ndarray, n: int) -> dict[str, np.ndarray]:
            return self._run_padded({self.input_names[0]: self.signature.as_input_dtype(batch)}, n, runner)

        self.last_stats = PipelineStats(streams=streams)
        yield from run_images(sources, ImageLayout(spec, self.signature.channels), batch_size=bs, streams=streams,
                              padded=self.fixed_batch is not None, run_batch=run_batch,
                              postprocess=postprocess or self._rows, stats=self.last_stats, errors=errors,
                              names=names, decode_workers=self.decode_workers, fast_decode=self.fast_decode)

    def pipeline_streams(self, n_batches: int) -> int:
        """How many concurrent inference streams a pipeline of ``n_batches`` batches uses (see iter_predictions).

        CPU fp32 only; ``streams=`` if given, else one per intra-op thread up to MAX_STREAMS (each stream holds a
        batch of activations, so a 32-core machine gets 4 streams of 8 threads, not 32 of 1) for models up to
        STREAMS_MAX_MODEL_BYTES (the streams share a second session, a second copy of the weights); and only for runs of
        at least 4 batches per stream: a stream with 1/N of the threads takes N times as long per batch, which a
        short run can't make up for.
        """
        if self.device != "cpu" or self.fp16:
            return 1
        if self.streams is None and (self._external_data or self.model.ByteSize() > STREAMS_MAX_MODEL_BYTES):
            return 1  # the streams' session is a second copy of the weights: not unasked for a big model
        n = self.streams or min(self._cpu_threads, MAX_STREAMS)
        return n if n > 1 and n_batches >= 4 * n else 1

    @property
    def _cpu_threads(self) -> int:
        return self.config.threads or S.cpu_threads()

    def _stream_runner(self, streams: int):
        """A run function on ``stream_session(streams)``, checking its feeds as ``run()`` does."""
        session = self.stream_session(streams)
        # the same checks as run(): a batch that can't fit is one clear error, however many streams
        return lambda feeds: self._run_on(session, self.check_feeds(feeds))

    def stream_threads(self, streams: int) -> int:
        """Intra-op threads of each of ``streams`` concurrent CPU streams: the cores shared out."""
        return max(1, self._cpu_threads // streams)

    def stream_session(self, streams: int):
        """The onnxruntime session ``streams`` concurrent CPU streams share: the same model with
        ``stream_threads(streams)`` threads, idle threads not spinning (created once per thread count, from the
        optimized-model cache)."""
        if self.device != "cpu":
            raise UsageError(f"concurrent streams are for the CPU; this predictor runs on {self.device}")
        threads = self.stream_threads(streams)
        if self._stream_session is None or self._stream_session[0] != threads:
            # the bytes of the model this Predictor checked (not re-read from disk, which may have changed since);
            # they serialize to what _open saw, so the optimized-model cache hits
            source = self._model_path if self._external_data else self.model.SerializeToString()
            config = replace(self.config, threads=threads, spin=False)
            session, _ = S.create_session(source, config, input_profiles=self._input_profiles)
            self._stream_session = (threads, session)
        return self._stream_session[1]

    def image_spec(self) -> tuple[PreprocessSpec, TensorInfo]:
        """The preprocessing and the image input, or a DataError saying why this model can't take images."""
        return self.signature.image_spec()

    def _predictions(self, out: dict[str, np.ndarray], indices: list[int], name_of: Callable[[int], str],
                     top_k: int) -> dict[int, Prediction]:
        """One batch's outputs as Predictions: labels and top-k for classifiers, else each source's rows."""
        if self.tasks:
            return {i: Prediction(source=name_of(i), tasks=task_results(self.tasks, rows, top_k))
                    for i, rows in self._rows(out, indices).items()}
        if not self.is_classifier:
            return {i: Prediction(source=name_of(i), outputs=rows) for i, rows in self._rows(out, indices).items()}
        scores = out[self.score_output]
        return {i: self._classify(scores[row], name_of(i), top_k) for row, i in enumerate(indices)}

    def _rows(self, out: dict[str, np.ndarray], indices: list[int]) -> dict[int, dict[str, np.ndarray]]:
        """Each source's row of every output, keeping the batch axis (outputs without one are shared)."""
        n = len(indices)
        return {i: {k: (v[row:row + 1] if np.ndim(v) and np.shape(v)[0] == n else v) for k, v in out.items()}
                for row, i in enumerate(indices)}

    def _classify(self, row: np.ndarray, source: str | None, top_k: int) -> Prediction:
        scores = probabilities(np.asarray(row, dtype=np.float64).reshape(-1), self.score_transform)
        k = min(top_k, scores.size)
        top = np.argpartition(-scores, k - 1)[:k] if k < scores.size else np.arange(scores.size)
        top = top[np.argsort(-scores[top], kind="stable")]
        named = [(self._label(int(j)), float(scores[j])) for j in top]
        return Prediction(source=source, label=named[0][0], index=int(top[0]), score=named[0][1], top_k=tuple(named))

    def _label(self, index: int) -> str | int:
        return self.labels[index] if self.labels else index

    def close(self) -> None:
        self.session = None

    def __enter__(self) -> "Predictor":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Predictor({self.describe()})"


# --- helpers ------------------------------------------------------------------------------------------------------

def _strip_name(message: str, name: str) -> str:
    """Per-input errors sit beside the input's path: drop the 'PATH: ' prefix the DataError carries."""
    return message[len(name) + 2:] if message.startswith(name + ": ") else message


def _source_name(src: Any, index: int) -> str:
    return describe_source(src, index)
