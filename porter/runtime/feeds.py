"""Feeds on their way into onnxruntime: checked against the model's inputs, bound without copies where possible.

``check_feed`` turns a wrong shape or dtype into one DataError naming what was expected and received (with a hint
for a missing batch axis or a channels-first/last mix-up); ``bind_and_run`` runs through IO binding, so torch / DLPack
tensors already on the GPU are used where they are and outputs can stay on the device.
"""

from __future__ import annotations

import os
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from ..errors import DataError
from ..graph.inspect import TensorInfo, format_shape


def feeds_dict(inputs: Sequence[TensorInfo], given: Any, model_name: str) -> dict[str, Any]:
    """``given`` (a dict by name, a list for several inputs, or the one input's value) as a dict by input name."""
    names = [t.name for t in inputs]
    if isinstance(given, Mapping):
        unknown = sorted(set(given) - set(names))
        missing = [n for n in names if n not in given]
        if unknown or missing:
            raise DataError(f"{model_name} takes inputs {names}; "
                            + (f"missing {missing}" if missing else "") + ("; " if unknown and missing else "")
                            + (f"unknown {unknown}" if unknown else ""))
        return dict(given)
    if isinstance(given, (list, tuple)) and len(inputs) > 1:
        if len(given) != len(inputs):
            raise DataError(f"{model_name} takes {len(inputs)} inputs {names}, got {len(given)}")
        return dict(zip(names, given))
    if len(inputs) != 1:
        raise DataError(f"{model_name} takes {len(inputs)} inputs {names}; pass a dict by name")
    return {names[0]: given}


def check_feed(info: TensorInfo, value: Any, model_name: str) -> Any:
    """``value`` fit for input ``info`` (same-kind dtypes converted, made contiguous), or a DataError."""
    name = info.name
    shape, dtype = shape_dtype(value)
    expected = f"{info.dtype}{format_shape(info.shape)}"
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
            raise DataError(f"input {name!r} of {model_name} expects {expected}, received "
                            f"{dtype or '?'}[{', '.join(map(str, shape))}]{hint}")
    if dtype is not None and dtype != info.dtype and info.dtype != "unknown":
        same_kind = np.dtype(dtype).kind == np.dtype(info.dtype).kind or (
            np.dtype(dtype).kind in "iu" and np.dtype(info.dtype).kind in "iu")
        if same_kind and isinstance(value, np.ndarray):
            return value.astype(info.dtype)
        hint = ("; raw pixels? leave out preprocessed=True so porter decodes and normalizes them"
                if np.dtype(dtype).kind in "iu" and info.dtype.startswith("float") else "")
        raise DataError(f"input {name!r} of {model_name} expects {expected}, received {dtype}"
                        f"[{', '.join(map(str, shape or ()))}]{hint}")
    if isinstance(value, np.ndarray) and not value.flags.c_contiguous:
        return np.ascontiguousarray(value)
    return value


def bind_and_run(session, feeds: dict[str, Any], output_names: Sequence[str], output_device: str,
                 device_id: int = 0) -> dict[str, Any]:
    """Run ``session`` through IO binding: numpy inputs bound on the host, OrtValues and DLPack tensors where they
    live (zero-copy on the GPU); outputs copied to the host, or left on the GPU for ``output_device="cuda"``."""
    import onnxruntime as ort

    binding = session.io_binding()
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
    for name in output_names:
        if output_device == "cuda":
            binding.bind_output(name, "cuda", device_id)
        else:
            binding.bind_output(name)
    binding.synchronize_inputs()
    session.run_with_iobinding(binding)
    if output_device == "cuda":
        return dict(zip(output_names, binding.get_outputs()))
    return dict(zip(output_names, binding.copy_outputs_to_cpu()))


def shape_dtype(value: Any) -> tuple[tuple[int, ...] | None, str | None]:
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


def host_array(value: Any) -> np.ndarray:
    if isinstance(value, np.ndarray):
        return value
    if hasattr(value, "numpy") and hasattr(value, "device_name"):  # OrtValue
        return value.numpy()
    if hasattr(value, "detach"):  # torch
        return value.detach().cpu().numpy()
    if hasattr(value, "__dlpack__"):
        return np.from_dlpack(value)
    return np.asarray(value)


def as_sources(inputs: Any) -> list[Any]:
    """predict()'s image inputs as a list of single images."""
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
