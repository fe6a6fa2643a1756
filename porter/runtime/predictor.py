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

Scores. porter reports probabilities. The score output is traced back through shape-only ops (Identity,
Reshape, Flatten, Squeeze, Cast ...): if it comes out of a ``Softmax`` (or ``Sigmoid``, multi-label) it is
reported as is; out of ``LogSoftmax`` it is exponentiated; otherwise the model emits logits and porter applies a
softmax. The decision is made once from the graph, never from the numbers of a batch, and
``Predictor.score_transform`` says which; ``scores="raw"`` reports the output untouched, ``scores="softmax"``
always applies one.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np

from ..errors import (DataError, InferenceError, ModelLoadError, PorterError, RuntimeSetupError, UsageError,
                      ValidationError)
from ..graph.inspect import TensorInfo, graph_inputs, graph_outputs, image_geometry
from ..imaging import describe_source, load_image, tensor_shape, to_tensor
from ..spec import ModelCard, PreprocessSpec
from . import session as S

DEFAULT_BATCH = 32
MAX_STREAMS = 4  # concurrent CPU inference streams by default (each holds one batch's activations)
STREAMS_MAX_MODEL_BYTES = 1 << 30  # bigger models get streams only when asked (streams=): their weights are loaded twice
SCORE_MODES = ("auto", "raw", "softmax")
SHAPE_ONLY_OPS = {"Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Cast", "Transpose", "Dropout"}
FP16_TOLERANCE = 0.02  # max |fp16 - fp32| allowed, relative to max(1, max |fp32|)


@dataclass(frozen=True)
class Prediction:
    """One input's result. Classifiers fill label/index/score/top_k; other models fill ``outputs``."""

    source: str | None
    label: str | int | None = None  # the class name from the model's labels, else the index
    index: int | None = None
    score: float | None = None
    top_k: tuple[tuple[str | int, float], ...] = ()
    outputs: dict[str, np.ndarray] | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"path": self.source}
        if self.error is not None:
            d["error"] = self.error
            return d
        if self.outputs is not None:
            d["outputs"] = {k: np.asarray(v).tolist() for k, v in self.outputs.items()}
            return d
        d.update(label=self.label, score=self.score, top_k=[{"label": l, "score": s} for l, s in self.top_k])
        return d


@dataclass
class PipelineStats:
    """Where the time of one ``iter_predictions`` pass went: is decoding keeping up with inference?"""

    images: int = 0
    failed: int = 0
    seconds: float = 0.0  # first image submitted to last result yielded (the caller's own time included)
    inference_seconds: float = 0.0  # in the model (onnxruntime) and turning its outputs into predictions
    first_batch_seconds: float = 0.0  # decoding the first batch: nothing to run yet, so nothing to overlap
    decode_wait_seconds: float = 0.0  # after the first batch: a stream idle, waiting for images still decoding
    streams: int = 1  # concurrent inference streams (CPU pipelines; see Predictor.iter_predictions)

    @property
    def throughput(self) -> float:
        return self.images / self.seconds if self.seconds else 0.0

    def describe(self) -> str:
        def share(t: float) -> str:
            return f"{t / self.seconds:.0%}" if self.seconds else "-"

        failed = f", {self.failed} failed" if self.failed else ""
        streams = f" ({self.streams} streams)" if self.streams > 1 else ""
        return (f"{self.images} image{'' if self.images == 1 else 's'}{failed} in {self.seconds:.2f} s ({self.throughput:.1f}/s); inference busy "
                f"{share(self.inference_seconds / self.streams)} of the time{streams}, waiting for decoding "
                f"{share(self.decode_wait_seconds)} after the first batch ({self.first_batch_seconds:.2f} s)")

    def to_dict(self) -> dict[str, Any]:
        return {"images": self.images, "failed": self.failed, "seconds": round(self.seconds, 4),
                "throughput": round(self.throughput, 2), "inference_seconds": round(self.inference_seconds, 4),
                "first_batch_seconds": round(self.first_batch_seconds, 4),
                "decode_wait_seconds": round(self.decode_wait_seconds, 4), "streams": self.streams}


@dataclass
class PrecisionReport:
    """fp16 (or TensorRT fp16) checked against fp32 on the same seeded inputs."""

    rows: int
    max_abs_diff: dict[str, float]
    top1_agreement: float | None  # over rows whose fp32 top-1 isn't a near tie; None for non-classifiers
    passed: bool
    problems: list[str] = field(default_factory=list)

    def describe(self) -> str:
        diff = ", ".join(f"{k} {v:.3g}" for k, v in self.max_abs_diff.items())
        agree = f"top-1 agreement {self.top1_agreement:.0%}, " if self.top1_agreement is not None else ""
        return f"fp16 vs fp32 on {self.rows} inputs: {agree}max abs diff {diff}"


def load(model: Any, device: str = "auto", fp16: bool = False, batch_size: int | None = None,
         **options: Any) -> "Predictor":
    """Load an ONNX model for inference.

    ``model``: a path (``.onnx`` or ``onnx:PATH``), an ``onnx.ModelProto`` or serialized bytes.
    ``device``: ``auto`` (CUDA when it works, else CPU, and ``Predictor.notes`` says why), ``cuda``,
    ``tensorrt`` or ``cpu``; an unavailable one raises RuntimeSetupError naming what is missing.
    ``fp16``: run a half-precision copy (inputs/outputs stay float32), checked against fp32 before use.
    ``batch_size``: the largest batch sent to the model (default 32, or the model's fixed batch).
    Options: ``preprocess`` (a PreprocessSpec or preset name overriding the model's metadata), ``scores``
    (auto|raw|softmax), ``threads`` (CPU intra-op threads), ``cache`` / ``cache_dir`` (optimized-model cache),
    ``decode_workers`` (image-decoding threads), ``fast_decode`` (large JPEGs decoded at reduced scale, see
    ``porter.imaging.load_image``), ``spin`` (ORT thread spinning), ``max_batch`` (TensorRT profile).
    """
    return Predictor(model, device=device, fp16=fp16, batch_size=batch_size, **options)


class Predictor:
    """An ONNX model on a device. See the module docstring for inputs, outputs and scores."""

    def __init__(self, model: Any, *, device: str = "auto", fp16: bool = False, batch_size: int | None = None,
                 preprocess: PreprocessSpec | str | None = None, scores: str = "auto", threads: int | None = None,
                 cache: bool = True, cache_dir: str | os.PathLike | None = None, decode_workers: int | None = None,
                 fast_decode: bool = False, spin: bool = True, max_batch: int | None = None,
                 streams: int | None = None):
        if scores not in SCORE_MODES:
            raise UsageError(f"unknown scores mode {scores!r}; choose one of: {', '.join(SCORE_MODES)}")
        if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
            raise UsageError(f"batch size must be a positive integer, got {batch_size!r}")
        if threads is not None and threads < 1:
            raise UsageError(f"threads must be a positive integer, got {threads!r}")
        self.name, self.model, model_bytes, self._model_path = _read_model(model)
        self.card = ModelCard.from_onnx(self.model)
        self.inputs: list[TensorInfo] = graph_inputs(self.model)
        self.outputs: list[TensorInfo] = graph_outputs(self.model)
        self.input_names = [t.name for t in self.inputs]
        self.output_names = [t.name for t in self.outputs]
        self.notes: list[str] = []
        self.requested_device = device
        self.device, why = S.resolve_device(device)
        if why:
            self.notes.append(why)
        self.fp16 = bool(fp16)
        if self.fp16 and self.device == "cpu":
            if device == "auto":
                self.fp16 = False
                self.notes.append("fp16 ignored: no GPU, the CPU runs the model in fp32")
            else:
                self.notes.append("fp16 on CPU: onnxruntime's CPU kernels are fp32-first, expect it to be slower")
        fixed = self._fixed_batch()
        if fixed and batch_size and batch_size != fixed:
            self.notes.append(f"the model takes batches of exactly {fixed}; batch size {batch_size} ignored")
        self.batch_size = fixed or batch_size or DEFAULT_BATCH
        self.preprocess = self._resolve_preprocess(preprocess)
        self.score_output, self.score_transform = self._classifier(scores)
        self.labels = self._labels()
        if decode_workers is not None and (not isinstance(decode_workers, int) or decode_workers < 1):
            raise UsageError(f"decode workers must be a positive integer, got {decode_workers!r}")
        self.decode_workers = decode_workers or min(8, max(2, (os.cpu_count() or 2)))
        self.fast_decode = bool(fast_decode)
        if streams is not None and (not isinstance(streams, int) or streams < 1):
            raise UsageError(f"streams must be a positive integer, got {streams!r}")
        self.streams = streams  # CPU pipelines: concurrent inference streams; None: one per core, up to MAX_STREAMS
        self._stream_session: tuple[int, Any] | None = None  # (threads, session) shared by the streams
        self._external_data = model_bytes is None
        self._config = S.SessionConfig(device=self.device, fp16=self.fp16 and self.device == "tensorrt",
                                       threads=threads, spin=spin, cache=cache and model_bytes is not None,
                                       cache_dir=str(cache_dir) if cache_dir else None,
                                       max_batch=max(max_batch or 0, self.batch_size, 64 if not fixed else 0),
                                       opt_batch=self.batch_size)
        self.precision_report: PrecisionReport | None = None
        self.last_stats: PipelineStats | None = None  # of the latest iter_predictions / predict on images
        try:
            self._session, self._info = self._open(model_bytes)
        except RuntimeSetupError as e:
            if device != "auto" or self.device == "cpu":
                raise
            # auto: the GPU looked usable but its provider did not start for this model; say so, run on CPU
            self.notes = [n for n in self.notes if not n.startswith("auto:")]
            self.notes.append(f"auto: running on CPU; the {self.device} provider did not start ({e})")
            self.device, self.fp16 = "cpu", False
            self._config = replace(self._config, device="cpu", fp16=False)
            self._session, self._info = self._open(model_bytes)
        self.providers: list[str] = self._info.providers
        self.notes.extend(self._info.notes)

    # --- construction helpers -------------------------------------------------------------------------------------

    def _fixed_batch(self) -> int | None:
        dims = [t.shape[0] for t in self.inputs if t.shape]
        fixed = {d for d in dims if isinstance(d, int) and d > 0}
        return fixed.pop() if len(fixed) == 1 and len(dims) == len(self.inputs) and all(
            isinstance(d, int) and d > 0 for d in dims) else None

    def _image_input(self) -> TensorInfo | None:
        """The one image input: float (normalized by the preprocessing) or integer (uint8 / int32 pixels, which
        a TF.js or TFLite-style model scales itself)."""
        images = [t for t in self.inputs if t.dtype.startswith(("float", "int", "uint"))]
        if len(self.inputs) == 1 and images and image_geometry(images[0].shape):
            return images[0]
        return None

    def _integer_pixels(self) -> bool:
        image = self._image_input()
        return image is not None and np.dtype(image.dtype).kind in "iu"

    def _as_input_dtype(self, batch: np.ndarray) -> np.ndarray:
        """The decoded batch (float32 0..255 for an integer input, which gets raw pixels) in the input's dtype."""
        if self._integer_pixels():
            return np.rint(batch).astype(self._image_input().dtype)
        return batch

    def _resolve_preprocess(self, override: PreprocessSpec | str | None) -> PreprocessSpec | None:
        image = self._image_input()
        geometry = image_geometry(image.shape) if image else None
        if isinstance(override, str):
            if not geometry:
                raise UsageError(f"preprocess={override!r} needs a model whose one input is an image "
                                 f"(N x H x W x C or N x C x H x W); {self.name} takes "
                                 f"{', '.join(t.describe() for t in self.inputs)}")
            layout, size, channels = geometry
            spec = PreprocessSpec.preset(override, layout=layout, size=size, channels=channels)
        else:
            spec = override if override is not None else (self.card.preprocess if self.card else None)
        if self._integer_pixels():
            layout, size, channels = geometry
            raw = PreprocessSpec.preset("raw", layout=layout, size=size, channels=channels)
            if spec is not None and (spec.scale != 1.0 or any(spec.mean) or any(v != 1.0 for v in spec.std)):
                raise UsageError(f"{self.name} takes {image.dtype} pixels ({image.describe()}) and scales them "
                                 f"itself; porter feeds it raw 0..255 pixels, so drop --preprocess {spec.mode}")
            spec = raw.with_(size=spec.size) if spec is not None and spec.size else raw
        if spec is not None and spec.size is None and geometry and geometry[1]:
            spec = spec.with_(size=geometry[1])
        if spec is not None and geometry and geometry[0] != spec.layout:
            self.notes.append(f"preprocessing says {spec.layout} but the input {image.describe()} looks {geometry[0]}")
        return spec

    def _classifier(self, scores: str) -> tuple[str | None, str]:
        floats2 = [t for t in self.outputs if t.dtype.startswith("float") and len(t.shape) == 2]
        named = [t for t in self.outputs if t.name == "probabilities"]
        if named:
            out = named[0]
        elif len(floats2) == 1 and not (isinstance(floats2[0].shape[1], int) and floats2[0].shape[1] < 2):
            out = floats2[0]
        else:
            return None, "none"
        if scores == "raw":
            return out.name, "none"
        if scores == "softmax":
            return out.name, "softmax"
        producer = _producer_op(self.model, out.name)
        return out.name, {"Softmax": "none", "Sigmoid": "none", "LogSoftmax": "exp"}.get(producer, "softmax")

    def _labels(self) -> tuple[str, ...] | None:
        if not self.score_output or not self.card or not self.card.labels:
            return None
        n = next(t.shape[1] for t in self.outputs if t.name == self.score_output)
        if isinstance(n, int) and n != len(self.card.labels):
            self.notes.append(f"the model's metadata has {len(self.card.labels)} labels for {n} classes; "
                              f"reporting class indices")
            return None
        return self.card.labels

    @property
    def _input_profiles(self) -> dict[str, tuple[Any, ...]]:
        return {t.name: t.shape for t in self.inputs}

    def _open(self, model_bytes: bytes | None):
        profiles = self._input_profiles
        source: Any = model_bytes if model_bytes is not None else self._model_path
        if not self.fp16:
            return S.create_session(source, self._config, input_profiles=profiles)
        if model_bytes is None:
            raise UsageError(f"fp16 needs the model in one file; {self.name} keeps its weights in external data")
        ref_config = replace(self._config, fp16=False, device="cuda" if self.device == "tensorrt" else self.device)
        ref_session, _ = S.create_session(source, ref_config, input_profiles=profiles)
        if self.device == "tensorrt":  # TensorRT builds fp16 engines from the fp32 model
            session, info = S.create_session(source, self._config, variant="-fp16", input_profiles=profiles)
        else:
            session, info = S.create_session(source, self._config, variant="-fp16", input_profiles=profiles,
                                             transform=lambda: convert_to_fp16(self.model).SerializeToString())
        feeds = self.example_inputs(min(8, self.batch_size), seed=1234)
        ref = dict(zip(self.output_names, ref_session.run(None, feeds)))
        got = dict(zip(self.output_names, session.run(None, feeds)))
        report = compare_precision(ref, got, self.score_output)
        self.precision_report = report
        if not report.passed:
            raise ValidationError(f"fp16 gives different answers from fp32 for {self.name}: {'; '.join(report.problems)} "
                                  f"({report.describe()}); run it in fp32 (drop --fp16)", report)
        info.notes.append(report.describe())
        return session, info

    # --- facts ----------------------------------------------------------------------------------------------------

    @property
    def is_classifier(self) -> bool:
        return self.score_output is not None

    @property
    def num_classes(self) -> int | None:
        if not self.score_output:
            return None
        n = next(t.shape[1] for t in self.outputs if t.name == self.score_output)
        return n if isinstance(n, int) else (len(self.labels) if self.labels else None)

    def describe(self) -> str:
        prec = " fp16" if self.fp16 else ""
        return f"{self.name} on {self.device}{prec} ({S.describe_providers(self.providers)}), batch {self.batch_size}"

    def example_inputs(self, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
        """Seeded inputs of the model's shape: smooth random images through the preprocessing, else normals."""
        rng = np.random.default_rng(seed)
        feeds = {}
        for t in self.inputs:
            shape = self._concrete_shape(t, batch)
            if self.preprocess is not None and t is self._image_input():
                h, w = (shape[1], shape[2]) if self.preprocess.layout == "NHWC" else (shape[2], shape[3])
                coarse = rng.integers(0, 256, size=(batch, 4, 4, 3), dtype=np.uint8)
                from ..imaging import resize

                images = [resize(c, (h, w)) for c in coarse]
                feeds[t.name] = self._as_input_dtype(to_tensor(images, self.preprocess, _channels(t, self.preprocess)))
            elif t.dtype.startswith("float"):
                feeds[t.name] = rng.standard_normal(shape).astype(t.dtype)
            elif t.dtype == "bool":
                feeds[t.name] = np.zeros(shape, bool)
            else:
                feeds[t.name] = np.zeros(shape, t.dtype)
        return feeds

    def _concrete_shape(self, t: TensorInfo, batch: int) -> tuple[int, ...]:
        geo = image_geometry(t.shape)
        size = self.preprocess.size if self.preprocess and self.preprocess.size else (224, 224)
        dims = []
        for i, d in enumerate(t.shape):
            if isinstance(d, int) and d > 0:
                dims.append(batch if i == 0 and not self._fixed_batch() else d)
            elif i == 0:
                dims.append(batch)
            elif geo and geo[0] == "NHWC" and i in (1, 2):
                dims.append(size[i - 1])
            elif geo and geo[0] == "NCHW" and i in (2, 3):
                dims.append(size[i - 2])
            else:
                dims.append(3 if geo else 1)
        return tuple(dims)

    # --- running --------------------------------------------------------------------------------------------------

    def run(self, feeds: Mapping[str, Any] | Any, output_device: str = "cpu") -> dict[str, Any]:
        """Run ONE batch of preprocessed inputs as given (no splitting, no preprocessing).

        ``feeds``: a dict by input name, or one array/tensor for a single-input model. Values may be numpy
        arrays, torch tensors or DLPack objects. ``output_device="cuda"`` (GPU devices) keeps the outputs on
        the GPU and returns ``onnxruntime.OrtValue``s (``torch.from_dlpack(value)`` wraps one without a copy).
        """
        feeds = self._feeds_dict(feeds)
        for name, value in feeds.items():
            feeds[name] = self._check_feed(name, value)
        if output_device not in ("cpu", "cuda"):
            raise UsageError(f"output_device must be 'cpu' or 'cuda', got {output_device!r}")
        if self.device == "cpu":
            if output_device == "cuda":
                raise UsageError("output_device='cuda' needs a GPU device; this predictor runs on the CPU")
            return self._run_on(self._session, feeds)
        with self._failures(feeds):
            return self._run_bound(feeds, output_device)

    def _run_on(self, session, feeds: dict[str, Any]) -> dict[str, np.ndarray]:
        """``session`` (this model, on the CPU) on checked feeds, its failures as InferenceErrors."""
        arrays = {k: _host_array(v) for k, v in feeds.items()}
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
            given = ", ".join(f"{k} {'x'.join(map(str, _shape_dtype(v)[0] or ()))}" for k, v in feeds.items())
            raise InferenceError(f"{self.name} failed on {given}: {_ort_message(e)}") from None

    def _run_bound(self, feeds: dict[str, Any], output_device: str) -> dict[str, Any]:
        import onnxruntime as ort

        binding = self._session.io_binding()
        keep = []  # OrtValues must outlive the run
        for name, value in feeds.items():
            if isinstance(value, np.ndarray):
                binding.bind_cpu_input(name, value)
            elif isinstance(value, ort.OrtValue):
                binding.bind_ortvalue_input(name, value)
            elif hasattr(value, "__dlpack__"):
                ov = ort.OrtValue.from_dlpack(value)  # zero-copy: GPU tensors stay on the GPU
                keep.append(ov)
                binding.bind_ortvalue_input(name, ov)
            else:
                binding.bind_cpu_input(name, np.ascontiguousarray(value))
        for name in self.output_names:
            if output_device == "cuda":
                binding.bind_output(name, "cuda", self._config.device_id)
            else:
                binding.bind_output(name)
        binding.synchronize_inputs()
        self._session.run_with_iobinding(binding)
        if output_device == "cuda":
            return dict(zip(self.output_names, binding.get_outputs()))
        return dict(zip(self.output_names, binding.copy_outputs_to_cpu()))

    def _feeds_dict(self, inputs: Any) -> dict[str, Any]:
        if isinstance(inputs, Mapping):
            unknown = sorted(set(inputs) - set(self.input_names))
            missing = [n for n in self.input_names if n not in inputs]
            if unknown or missing:
                raise DataError(f"{self.name} takes inputs {self.input_names}; "
                                + (f"missing {missing}" if missing else "") + ("; " if unknown and missing else "")
                                + (f"unknown {unknown}" if unknown else ""))
            return dict(inputs)
        if isinstance(inputs, (list, tuple)) and len(self.inputs) > 1:
            if len(inputs) != len(self.inputs):
                raise DataError(f"{self.name} takes {len(self.inputs)} inputs {self.input_names}, got {len(inputs)}")
            return dict(zip(self.input_names, inputs))
        if len(self.inputs) != 1:
            raise DataError(f"{self.name} takes {len(self.inputs)} inputs {self.input_names}; pass a dict by name")
        return {self.input_names[0]: inputs}

    def _check_feed(self, name: str, value: Any) -> Any:
        info = next(t for t in self.inputs if t.name == name)
        shape, dtype = _shape_dtype(value)
        expected = f"{info.dtype}[{', '.join('?' if d is None else str(d) for d in info.shape)}]"
        if shape is not None:
            bad_rank = len(shape) != len(info.shape)
            bad_dims = [i for i, (d, s) in enumerate(zip(info.shape, shape)) if isinstance(d, int) and d > 0 and d != s]
            if bad_rank or bad_dims:
                hint = ""
                if bad_rank and len(shape) == len(info.shape) - 1:
                    hint = "; add the batch axis (x[None])"
                elif not bad_rank and len(shape) == 4 and tuple(shape[i] for i in (0, 3, 1, 2)) == tuple(
                        d if isinstance(d, int) and d > 0 else shape[i] for i, d in zip((0, 3, 1, 2), info.shape)):
                    hint = "; it looks channels-last where the model is channels-first (x.transpose(0, 3, 1, 2))"
                elif not bad_rank and len(shape) == 4 and tuple(shape[i] for i in (0, 2, 3, 1)) == tuple(
                        d if isinstance(d, int) and d > 0 else shape[i] for i, d in zip((0, 2, 3, 1), info.shape)):
                    hint = "; it looks channels-first where the model is channels-last (x.transpose(0, 2, 3, 1))"
                raise DataError(f"input {name!r} of {self.name} expects {expected}, received "
                                f"{dtype or '?'}[{', '.join(map(str, shape))}]{hint}")
        if dtype is not None and dtype != info.dtype and info.dtype != "unknown":
            same_kind = np.dtype(dtype).kind == np.dtype(info.dtype).kind or (
                np.dtype(dtype).kind in "iu" and np.dtype(info.dtype).kind in "iu")
            if same_kind and isinstance(value, np.ndarray):
                return value.astype(info.dtype)
            hint = ("; raw pixels? leave out preprocessed=True so porter decodes and normalizes them"
                    if np.dtype(dtype).kind in "iu" and info.dtype.startswith("float") else "")
            raise DataError(f"input {name!r} of {self.name} expects {expected}, received {dtype}"
                            f"[{', '.join(map(str, shape or ()))}]{hint}")
        if isinstance(value, np.ndarray) and not value.flags.c_contiguous:
            return np.ascontiguousarray(value)
        return value

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
            if not self.is_classifier:
                return outputs
            n = len(outputs[self.score_output])
            return [self._classify(outputs[self.score_output][i], None, top_k) for i in range(n)]
        results = list(self.iter_predictions(_as_sources(inputs), top_k=top_k, errors="raise",
                                             batch_size=batch_size))
        if self.is_classifier:
            return results
        return {name: np.concatenate([r.outputs[name] for r in results]) for name in self.output_names} if results else {}

    def run_batched(self, inputs: Any, batch_size: int | None = None) -> dict[str, np.ndarray]:
        """Preprocessed inputs of any batch length, run in chunks of ``batch_size``; outputs concatenated."""
        feeds = self._feeds_dict(inputs)
        lengths = {name: _shape_dtype(v)[0][0] if _shape_dtype(v)[0] else None for name, v in feeds.items()}
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
        fixed = self._fixed_batch()
        if fixed:
            return fixed
        if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
            raise UsageError(f"batch size must be a positive integer, got {batch_size!r}")
        return batch_size or self.batch_size

    def _run_padded(self, feeds: dict[str, Any], n: int, runner=None) -> dict[str, np.ndarray]:
        fixed = self._fixed_batch()
        if fixed and n < fixed:  # a model with a fixed batch: pad the last chunk, drop the padding after
            feeds = {k: np.concatenate([_host_array(v), np.zeros((fixed - n, *np.shape(v)[1:]), _host_array(v).dtype)])
                     for k, v in feeds.items()}
        out = (runner or self.run)(feeds)
        return {k: (v[:n] if np.ndim(v) and np.shape(v)[0] == (fixed or n) else v) for k, v in out.items()}

    def iter_predictions(self, sources: Sequence[Any], *, top_k: int = 5, errors: str = "report",
                         batch_size: int | None = None) -> Iterator[Prediction]:
        """Yield one Prediction per source, in order, decoding ahead in a thread pool while batches run.

        ``errors="report"``: an input that can't be read (or that the model fails on) yields a Prediction with
        ``error`` set and the rest go on; ``errors="raise"``: the first one raises its DataError.
        See ``iter_outputs`` for the pipeline.
        """
        if top_k < 1:
            raise UsageError(f"top-k must be at least 1, got {top_k}")
        sources = list(sources)

        def predictions(out: dict[str, np.ndarray], indices: list[int]) -> dict[int, Prediction]:
            return self._predictions(out, indices, sources, top_k)

        for i, result, error in self.iter_outputs(sources, errors=errors, batch_size=batch_size, postprocess=predictions):
            name = _source_name(sources[i], i)
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
        label = (lambda i: names[i]) if names is not None else (lambda i: describe_source(sources[i], i))
        post = postprocess or self._rows
        spec, image = self.image_spec()
        channels = _channels(image, spec)
        bs = self._batch(batch_size)
        target = spec.size
        streams = self.pipeline_streams(-(-len(sources) // bs))
        batches = plan_batches(len(sources), bs, streams, padded=self._fixed_batch() is not None)
        runner = self._stream_runner(streams) if streams > 1 else None
        window = 2 + streams  # batches in flight: decoding ahead, or in inference
        # With a known size, workers normalize straight into a ring of reused batch buffers: no per-batch
        # allocation (fresh pages cost as much as a copy) and no concatenation on the inference thread. A batch's
        # buffer is reused once its inference is done, `window` batches later.
        ring = ([np.empty(tensor_shape(len(batches[0]), target, spec, channels), np.float32)
                 for _ in range(min(window, len(batches)))] if target else None)

        def decode(i: int, k: int, row: int) -> np.ndarray | None:
            img = load_image(sources[i], target, name=label(i), fast_decode=self.fast_decode)
            if ring is not None:
                to_tensor([img], spec, channels, out=ring[k % len(ring)][row:row + 1])
                return None
            return to_tensor([img], spec, channels)

        def run(batch: np.ndarray, indices: list[int], failed: dict[int, DataError]) -> dict[int, Any]:
            try:
                out = self._run_padded({self.input_names[0]: self._as_input_dtype(batch)}, len(indices), runner)
            except InferenceError as e:  # the whole batch: each of its inputs reports it
                if errors == "raise":
                    raise InferenceError(f"{label(indices[0])} (in a batch of {len(indices)}): {e}") from None
                failed.update((i, e) for i in indices)
                return {}
            return post(out, indices)

        def infer(k: int, tensors: dict[int, np.ndarray | None], failed: dict[int, DataError]):
            started = time.perf_counter()
            idx = [i for i in batches[k] if i not in failed]
            results: dict[int, Any] = {}
            if ring is not None and idx:
                buf = ring[k % len(ring)]
                ok = [row for row, i in enumerate(batches[k]) if i not in failed]
                results = run(buf[:len(ok)] if len(ok) == len(batches[k]) else buf[ok], idx, failed)
            while ring is None and idx:  # consecutive images of one size form a batch (no fixed size)
                shape = tensors[idx[0]].shape
                same = [i for i in idx if tensors[i].shape == shape]
                idx = [i for i in idx if tensors[i].shape != shape]
                results.update(run(np.concatenate([tensors[i] for i in same]), same, failed))
            return results, time.perf_counter() - started

        stats = self.last_stats = PipelineStats(streams=streams)
        start = time.perf_counter()
        decoding: dict[int, list[Future]] = {}
        running: deque[tuple[int, dict[int, DataError], Future]] = deque()
        next_decode = 0
        with ThreadPoolExecutor(max_workers=self.decode_workers, thread_name_prefix="porter-decode") as pool, \
                ThreadPoolExecutor(max_workers=streams, thread_name_prefix="porter-infer") as inference:

            def top_up(first_unfinished: int) -> None:
                nonlocal next_decode
                while next_decode < min(len(batches), first_unfinished + window):
                    decoding[next_decode] = [pool.submit(decode, i, next_decode, row)
                                             for row, i in enumerate(batches[next_decode])]
                    next_decode += 1

            top_up(0)
            try:
                for k, idx in enumerate(batches):
                    tensors: dict[int, np.ndarray | None] = {}
                    failed: dict[int, DataError] = {}
                    waiting = time.perf_counter()
                    for i, fut in zip(idx, decoding.pop(k)):
                        try:
                            tensors[i] = fut.result()
                        except DataError as e:
                            if errors == "raise":
                                raise
                            failed[i] = e
                    waited = time.perf_counter() - waiting  # a stream's slot stood free meanwhile
                    if k == 0:
                        stats.first_batch_seconds = waited
                    else:
                        stats.decode_wait_seconds += waited
                    if streams > 1:
                        running.append((k, failed, inference.submit(infer, k, tensors, failed)))
                    else:  # one stream: run here, no hand-over
                        done: Future = Future()
                        done.set_result(infer(k, tensors, failed))
                        running.append((k, failed, done))
                    # hand results out in order once every stream is busy (or nothing is left to start)
                    while running and (len(running) >= streams or k == len(batches) - 1):
                        k0, failed0, fut0 = running.popleft()
                        results, seconds = fut0.result()
                        top_up(k0 + 1)  # its buffer is free: start decoding the batch that reuses it
                        stats.inference_seconds += seconds
                        stats.images += len(batches[k0])
                        stats.failed += len(failed0)
                        for i in batches[k0]:
                            yield (i, None, failed0[i]) if i in failed0 else (i, results[i], None)
                        stats.seconds = time.perf_counter() - start
            finally:  # an error, or a consumer that stopped early: drop the decoding nobody will read
                for rest in decoding.values():
                    for f in rest:
                        f.cancel()

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
        return self._config.threads or S.cpu_threads()

    def _stream_runner(self, streams: int):
        """A run function on ``stream_session(streams)``, checking its feeds as ``run()`` does."""
        session = self.stream_session(streams)
        # the same checks as run(): a batch that can't fit is one clear error, however many streams
        return lambda feeds: self._run_on(session, {k: self._check_feed(k, v) for k, v in feeds.items()})

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
            config = replace(self._config, threads=threads, spin=False)
            session, _ = S.create_session(source, config, input_profiles=self._input_profiles)
            self._stream_session = (threads, session)
        return self._stream_session[1]

    def image_spec(self) -> tuple[PreprocessSpec, TensorInfo]:
        """The preprocessing and the image input, or a DataError saying why this model can't take images."""
        image = self._image_input()
        if image is None:
            raise DataError(f"{self.name} takes {', '.join(t.describe() for t in self.inputs)}, not one image "
                            f"tensor; pass preprocessed tensors (preprocessed=True)")
        if self.preprocess is None:
            raise DataError(f"{self.name} has no porter preprocessing metadata, so porter can't turn images into its "
                            f"input {image.describe()}; give --preprocess raw|unit|tf|torch|caffe (preprocess= in "
                            f"the API) or pass preprocessed tensors (preprocessed=True)")
        return self.preprocess, image

    def _predictions(self, out: dict[str, np.ndarray], indices: list[int], sources: Sequence[Any],
                     top_k: int) -> dict[int, Prediction]:
        """One batch's outputs as Predictions: labels and top-k for classifiers, else each source's rows."""
        if not self.is_classifier:
            return {i: Prediction(source=_source_name(sources[i], i), outputs=rows)
                    for i, rows in self._rows(out, indices).items()}
        scores = out[self.score_output]
        return {i: self._classify(scores[row], _source_name(sources[i], i), top_k) for row, i in enumerate(indices)}

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
        self._session = None

    def __enter__(self) -> "Predictor":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Predictor({self.describe()})"


# --- helpers ------------------------------------------------------------------------------------------------------

def plan_batches(n: int, batch_size: int, streams: int = 1, padded: bool = False) -> list[list[int]]:
    """Indices 0..n-1 in batches of ``batch_size``, the last ``streams`` of them sharing their images evenly.

    With one stream the last batch is simply short. With several, a short last batch would leave its stream idle
    while another runs a full one (on 2 cores: one core idle for most of a batch at the end of every run), so
    the tail is spread: 1000 images, batches of 32, 2 streams -> 30 x 32, then 20 + 20. ``padded``: the model
    takes exactly ``batch_size`` (short batches are padded), so spreading would only add padding: no change.
    """
    bounds = list(range(0, n, batch_size)) + [n]
    tail = len(bounds) - 1 - streams  # first batch of the tail
    if streams > 1 and not padded and tail >= 0 and n % batch_size:
        start = bounds[tail]
        share, extra = divmod(n - start, streams)
        bounds = bounds[:tail] + [start + k * share + min(k, extra) for k in range(streams)] + [n]
    return [list(range(a, b)) for a, b in zip(bounds, bounds[1:])]


def probabilities(scores: np.ndarray, transform: str) -> np.ndarray:
    """Apply the score transform chosen from the graph: none | softmax | exp (of log-probabilities)."""
    if transform == "softmax":
        z = scores - scores.max(axis=-1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(axis=-1, keepdims=True)
    if transform == "exp":
        return np.exp(scores)
    return scores


def _producer_op(model, name: str) -> str | None:
    producers = {o: n for n in model.graph.node for o in n.output}
    seen = 0
    while name in producers and seen < 50:
        node = producers[name]
        if node.op_type not in SHAPE_ONLY_OPS:
            return node.op_type
        name, seen = node.input[0], seen + 1
    return None


def _read_model(model: Any):
    """(display name, ModelProto, bytes or None for external-data models, path or None)."""
    import onnx

    if isinstance(model, onnx.ModelProto):
        return "model", model, model.SerializeToString(), None
    if isinstance(model, (bytes, bytearray)):
        try:
            return "model", onnx.load_model_from_string(bytes(model)), bytes(model), None
        except Exception:  # noqa: BLE001
            raise ModelLoadError("the bytes given are not a serialized ONNX model") from None
    if not isinstance(model, (str, os.PathLike)):
        raise UsageError(f"porter.load takes a path to an .onnx file, an onnx.ModelProto or bytes, not "
                         f"{type(model).__module__}.{type(model).__name__}; convert framework models first with porter.convert")
    from ..sources import load_onnx_file

    text = os.fspath(model)
    proto = load_onnx_file(text, external_data=False)
    path = Path(text[5:] if text.startswith("onnx:") else text).expanduser()
    external = any(init.data_location == onnx.TensorProto.EXTERNAL for init in proto.graph.initializer)
    return path.name, proto, (None if external else path.read_bytes()), str(path)


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
                      tolerance: float = FP16_TOLERANCE, tie_margin: float = 1e-3) -> PrecisionReport:
    """Compare a reduced-precision run with fp32: non-finite values, max abs diff, top-1 agreement."""
    problems = []
    diffs = {}
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
            problems.append(f"{name} has {int(np.sum(~np.isfinite(g)))} non-finite values (fp16 overflow)")
            diffs[name] = float("inf")
            continue
        d = float(np.max(np.abs(g.astype(np.float64) - r))) if r.size else 0.0
        diffs[name] = d
        scale = max(1.0, float(np.max(np.abs(r)))) if r.size else 1.0
        if d > tolerance * scale:
            problems.append(f"{name} max abs diff {d:.3g} exceeds {tolerance * scale:.3g}")
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
                           problems=problems)


def _channels(image: TensorInfo, spec: PreprocessSpec) -> int:
    geo = image_geometry(image.shape)
    return (geo[2] if geo else None) or spec.channels or 3


def _shape_dtype(value: Any) -> tuple[tuple[int, ...] | None, str | None]:
    if isinstance(value, np.ndarray):
        return tuple(value.shape), value.dtype.name
    shape = getattr(value, "shape", None)
    if callable(shape):  # OrtValue.shape()
        shape = shape()
    dtype = getattr(value, "dtype", None)
    name = None
    if dtype is not None:
        name = str(dtype).replace("torch.", "")
        name = {"float": "float32", "double": "float64", "half": "float16", "long": "int64", "int": "int32"}.get(name, name)
        try:
            name = np.dtype(name).name
        except TypeError:
            name = None
    elif hasattr(value, "data_type"):  # OrtValue: 'tensor(float)'
        t = value.data_type().replace("tensor(", "").rstrip(")")
        name = {"float": "float32", "double": "float64", "float16": "float16"}.get(t, t)
    return (tuple(int(d) for d in shape) if shape is not None else None), name


def _host_array(value: Any) -> np.ndarray:
    if isinstance(value, np.ndarray):
        return value
    if hasattr(value, "numpy") and hasattr(value, "device_name"):  # OrtValue
        return value.numpy()
    if hasattr(value, "detach"):  # torch
        return value.detach().cpu().numpy()
    if hasattr(value, "__dlpack__"):
        return np.from_dlpack(value)
    return np.asarray(value)


def _ort_message(e: Exception) -> str:
    """onnxruntime's message without its status-code prefix, on one line."""
    msg = " ".join(str(e).split())
    return re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", msg)[:300]


def _strip_name(message: str, name: str) -> str:
    """Per-input errors sit beside the input's path: drop the 'PATH: ' prefix the DataError carries."""
    return message[len(name) + 2:] if message.startswith(name + ": ") else message


def _source_name(src: Any, index: int) -> str:
    return describe_source(src, index)


def _as_sources(inputs: Any) -> list[Any]:
    """Normalize predict()'s image inputs to a list of single images."""
    if isinstance(inputs, (str, os.PathLike)) or _is_single_image(inputs):
        return [inputs]
    if isinstance(inputs, np.ndarray):
        if inputs.ndim == 4:
            return list(inputs)
        raise DataError(f"a numpy batch of raw images is N x H x W x C, got shape {inputs.shape}")
    if isinstance(inputs, Iterable):
        return list(inputs)
    raise DataError(f"can't predict on a {type(inputs).__name__}; give image paths, PIL images, uint8 arrays, "
                    f"or preprocessed tensors with preprocessed=True")


def _is_single_image(obj: Any) -> bool:
    if isinstance(obj, np.ndarray):
        return obj.ndim in (2, 3)
    return type(obj).__module__.startswith("PIL.")
