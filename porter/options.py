"""Options for ``porter.convert``: one object, built by the CLI or by a pipeline, passed to every importer."""

from __future__ import annotations

import math
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, Mapping, Sequence

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


def names_input(given: str, name: str) -> bool:
    """Whether ``--input-shape GIVEN:...`` names the input ``name`` (TensorFlow's ``x:0`` spelling either way)."""
    return given == name or given == f"{name}:0" or given.split(":")[0] == name.split(":")[0]


@dataclass(frozen=True)
class InputShapes:
    """``--input-shape [NAME:]DIMS`` as given: each input name (None for "the only input") with its dims without the
    batch axis, in the order given. Built once (``of``) from the CLI's parse or the API's dict; the importers and the
    conversion's checks ask it questions instead of indexing a mapping."""

    entries: tuple[tuple[str | None, tuple[int, ...]], ...] = ()

    @classmethod
    def of(cls, shapes: "InputShapes | Mapping[str | None, Sequence[int]] | None") -> "InputShapes":
        """The API's ``input_shapes={None: (H, W, C)}`` / ``{'name': dims}`` (or an InputShapes, or None: none)."""
        if isinstance(shapes, InputShapes):
            return shapes
        return cls(tuple((name, tuple(dims)) for name, dims in (shapes or {}).items()))

    def __bool__(self) -> bool:  # none given reads as false, as the dict this replaces did
        return bool(self.entries)

    @property
    def named(self) -> tuple[str, ...]:
        """The input names given (``NAME:DIMS``), in the order given."""
        return tuple(name for name, _ in self.entries if name is not None)

    @property
    def unnamed(self) -> tuple[int, ...] | None:
        """The dims given without a name (for a model's only input), if any."""
        return next((dims for name, dims in self.entries if name is None), None)

    def shape_for(self, name: str | None, n_inputs: int) -> tuple[int, ...] | None:
        """The dims for the input ``name`` of a model with ``n_inputs`` inputs: given under exactly that name, else
        the unnamed dims when it is the only input."""
        for given, dims in self.entries:
            if given == name:
                return dims
        return self.unnamed if n_inputs == 1 else None

    def only_shape(self) -> tuple[int, ...] | None:
        """The dims for a model with one input whose name is only known after it is built (keras:NAME picks
        input_layer, input_1 ...): the unnamed dims, else the dims given under any one name."""
        if self.unnamed is not None:
            return self.unnamed
        return self.entries[0][1] if len(self.entries) == 1 else None

    def unmatched(self, input_names: Sequence[str]) -> list[str]:
        """The names given that name none of ``input_names`` (by ``names_input``); none when those are unknown."""
        if not input_names:
            return []
        return [n for n in self.named if not any(names_input(n, k) for k in input_names)]

    def applied_to(self, input_names: Sequence[str]) -> list[tuple[str, tuple[int, ...]]]:
        """Each shape given with the one input of ``input_names`` it is for; a shape that names no single input is
        left out (unnamed dims name the only input, and a lone shape the lone input whatever the name it was given
        under: its source chose the name after reading the shape)."""
        applied = []
        for name, dims in self.entries:
            if name is None and len(self.entries) > 1:
                continue
            matches = [k for k in input_names if name is None or names_input(name, k)]
            if not matches and len(input_names) == 1 == len(self.entries):
                matches = list(input_names)
            if len(matches) == 1:
                applied.append((matches[0], dims))
        return applied


@dataclass(frozen=True)
class ConvertOptions:
    opset: int = DEFAULT_OPSET
    # the API takes the dict input_shapes={None: dims} / {'name': dims}: made an InputShapes on construction
    input_shapes: InputShapes = field(default_factory=InputShapes)
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

    def __post_init__(self) -> None:
        object.__setattr__(self, "input_shapes", InputShapes.of(self.input_shapes))

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
