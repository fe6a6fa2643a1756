"""Options for ``porter.convert``: one object, built by the CLI or by a pipeline, passed to every importer."""

from __future__ import annotations

import math
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

from .errors import UsageError

DEFAULT_OPSET = 17  # supported by tf2onnx 1.16+ and torch.onnx, runs on every current ONNX Runtime
# where inference (and finetune's backbone) runs: auto = CUDA when it works, else the CPU, saying why
DEVICES = ("auto", "cuda", "tensorrt", "openvino", "cpu")
# how the runtime computes: fp16 on GPUs, bf16 through OpenVINO; int8 is a model porter quantize wrote
PRECISIONS = ("fp32", "fp16", "bf16", "int8")


def as_floats(value: Any, name: str) -> tuple[float, ...] | None:
    """``--mean`` / ``--std`` values as a tuple of floats (one number, or one per channel), checked once here."""
    if value is None:
        return None
    try:
        values = (float(value),) if isinstance(value, (int, float)) else tuple(float(x) for x in value)
    except (TypeError, ValueError):
        raise UsageError(f"{name} takes numbers (one, or one per channel), got {value!r}") from None
    if any(not math.isfinite(v) for v in values) or (name == "std" and 0.0 in values):
        raise UsageError(f"--{name} must be finite numbers{' other than 0' if name == 'std' else ''}, "
                         f"got {','.join(f'{v:g}' for v in values)}")
    return values


def default(cls: type, name: str) -> Any:
    """The default of the option ``name`` of the options dataclass ``cls``: the CLI's flags take their defaults (and
    the "(default ...)" in their help) from here, so the API and the CLI can't drift apart."""
    for f in fields(cls):
        if f.name == name:
            if f.default is not MISSING:
                return f.default
            if f.default_factory is not MISSING:
                return f.default_factory()
            raise KeyError(f"{cls.__name__}.{name} has no default")
    raise KeyError(f"{cls.__name__} has no option {name!r}")


def reject_unknown(cls: type, kwargs: dict[str, Any], what: str) -> None:
    """A misspelled keyword is a UsageError naming it and the options that exist (dataclass fields of ``cls``)."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise UsageError(f"unknown {what} option(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}")


@dataclass(frozen=True)
class ConvertOptions:
    opset: int = DEFAULT_OPSET
    # input name (or None for "the only input") -> dims without the batch axis
    input_shapes: dict[str | None, tuple[int, ...]] = field(default_factory=dict)
    atol: float = 1e-4
    rtol: float = 1e-3
    validate: bool = True
    validation_batch_sizes: tuple[int, ...] = (1, 3)
    seed: int = 0
    force: bool = False
    unsafe: bool = False  # allow deserialization that runs code (Keras Lambda layers)
    weights: str | None = None  # keras.applications: imagenet | none | PATH (default imagenet)
    hub_args: dict[str, Any] = field(default_factory=dict)
    trust_repo: bool = False
    preprocess: str | None = None  # raw | unit | tf | torch | caffe: overrides what the importer knows
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    labels: tuple[str, ...] | None = None

    def unused_by(self, importer: str, form: str) -> list[str]:
        """Notes for options given that this kind of source does not use (they would be ignored without a word)."""
        hub = importer == "torchhub" and form in ("hub-local", "hub-remote")
        given = [("--weights", self.weights is not None, importer == "keras" and form == "application",
                  "keras:NAME applications"),
                 ("--hub-arg", bool(self.hub_args), hub, "torchhub: entry points"),
                 ("--trust-repo", self.trust_repo, importer == "torchhub" and form == "hub-remote",
                  "torchhub:OWNER/REPO GitHub repos (a local folder you name is trusted by naming it)"),
                 ("--unsafe", self.unsafe, importer == "keras" and form != "application",
                  "Keras model files and SavedModels")]
        return [f"{flag} is ignored: only {users} use it" for flag, on, used, users in given if on and not used]

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> "ConvertOptions":
        reject_unknown(cls, kwargs, "convert")
        if "input_shape" in kwargs:  # convenience spelling for single-input models
            raise UsageError("use input_shapes={None: (H, W, C)} (or {'name': dims}) for input shapes")
        for name in ("mean", "std"):
            if kwargs.get(name) is not None:
                kwargs[name] = as_floats(kwargs[name], name)
        for name in ("atol", "rtol"):
            if name in kwargs and not (math.isfinite(float(kwargs[name])) and float(kwargs[name]) >= 0):
                raise UsageError(f"--{name} must be a finite number >= 0, got {kwargs[name]}")
        if not 7 <= int(kwargs.get("opset", DEFAULT_OPSET)) <= 21:
            raise UsageError(f"opset {kwargs['opset']} is out of range; porter supports opsets 7 to 21 (default {DEFAULT_OPSET})")
        return cls(**kwargs)

    def shape_for(self, name: str, n_inputs: int) -> tuple[int, ...] | None:
        if name in self.input_shapes:
            return self.input_shapes[name]
        if None in self.input_shapes and n_inputs == 1:
            return self.input_shapes[None]
        return None
