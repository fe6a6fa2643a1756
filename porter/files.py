"""What a model file is, read from its content (never its name), and reading ONNX files with errors that say so.

Used by ``sources`` (reference parsing and auto-detection), the runtime (``porter.load``), ``inspect`` and
``finetune``; it imports nothing else from porter but the errors.
"""

from __future__ import annotations

import gzip
import json
import os
import stat
import zipfile
from pathlib import Path
from typing import Any

from .errors import ModelLoadError, SourceError, UsageError

HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"


def sniff_file(path: Path) -> str:
    """Name the kind of a model file from its first bytes, never from its name."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO or a device: open() or read() would block
            raise SourceError(f"{path} is not a regular file (a FIFO, device or socket); give a model file")
        with open(path, "rb") as f:
            head = f.read(8192)
    except OSError as e:
        raise SourceError(f"can't read {path}: {e.strerror}") from None
    if not head:
        return "empty"
    if head.startswith(HDF5_MAGIC):
        return "hdf5"
    if head.startswith(b"PK"):
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
        except (zipfile.BadZipFile, OSError):
            return "damaged-zip"
        if "config.json" in names and any(n.endswith(".weights.h5") or n == "metadata.json" for n in names):
            return "keras-zip"
        if any(n.endswith("/constants.pkl") or "/code/" in n for n in names):
            return "torchscript"
        if any(n.endswith("data.pkl") for n in names):
            return "torch-pickle"
        return "zip"
    if head.startswith(b"\x1f\x8b"):
        try:
            with gzip.open(path, "rb") as f:
                head = f.read(8192)
        except (OSError, EOFError):
            return "unknown"
    stripped = head.lstrip()
    if stripped.startswith(b"{"):
        return "tfjs-json" if b'"modelTopology"' in head or b'"weightsManifest"' in head or _is_tfjs_json(path) else "json"
    if _looks_like_onnx(path, head):
        return "onnx"
    return "unknown"


def _is_tfjs_json(path: Path) -> bool:
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
        data = json.loads(raw)
    except (OSError, ValueError, EOFError):
        return False
    return isinstance(data, dict) and ("modelTopology" in data or "weightsManifest" in data)


def _looks_like_onnx(path: Path, head: bytes) -> bool:
    # ModelProto starts with ir_version (field 1, varint: 0x08) and usually producer_name (0x12) etc.
    if not head or head[0] != 0x08:
        return False
    try:
        import onnx

        onnx.load_model(str(path), load_external_data=False)
        return True
    except Exception:  # noqa: BLE001 - any parse failure means "not ONNX"
        return False


NOT_ONNX_KINDS = {"keras-zip": "a Keras .keras model", "hdf5": "a Keras HDF5 model", "torchscript": "a TorchScript model",
                  "torch-pickle": "a PyTorch checkpoint", "tfjs-json": "a TF.js model.json"}


def load_onnx_file(path: str | os.PathLike, external_data: bool = True):
    """Read an ONNX file (``onnx:`` prefix allowed), naming what the file is when it is not ONNX."""
    import onnx

    text = os.fspath(path)
    if text.startswith("onnx:"):
        text = text[5:]
    p = Path(text).expanduser()
    if not p.exists():
        raise SourceError(f"model not found: {text} (no such file)")
    if p.is_dir():
        raise ModelLoadError(f"{text} is a directory, not an ONNX model; give the .onnx file")
    kind = sniff_file(p)
    if kind != "onnx":
        what = NOT_ONNX_KINDS.get(kind)
        if what:
            raise ModelLoadError(f"{text} is {what}, not ONNX; convert it first: porter convert {text} -o model.onnx")
        found = {"empty": "an empty file", "json": "a JSON file", "zip": "a zip archive",
                 "damaged-zip": "a damaged zip archive"}.get(kind, "not a protobuf ONNX can read")
        raise ModelLoadError(f"{text} is not an ONNX model ({found}); give a .onnx file written by porter convert or finetune")
    try:
        return onnx.load_model(str(p), load_external_data=external_data)
    except Exception as e:  # noqa: BLE001 - protobuf DecodeError, missing external data ...
        raise ModelLoadError(f"{text} is not a readable ONNX model: {' '.join(str(e).split())[:200]}") from None


def read_model(model: Any):
    """``porter.load``'s model argument (a path, ``onnx:PATH``, a ModelProto or serialized bytes) as (display name,
    ModelProto, bytes or None for external-data models, path or None)."""
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
    text = os.fspath(model)
    proto = load_onnx_file(text, external_data=False)
    path = Path(text[5:] if text.startswith("onnx:") else text).expanduser()
    external = any(init.data_location == onnx.TensorProto.EXTERNAL for init in proto.graph.initializer)
    return path.name, proto, (None if external else path.read_bytes()), str(path)
