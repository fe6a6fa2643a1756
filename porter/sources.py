"""The one place that parses source references and recognises model files by their content.

Spellings:
    keras:NAME                     a keras.applications model (MobileNetV2, ResNet50, ...)
    keras:PATH                     a .keras / .h5 file or a SavedModel directory
    torchhub:OWNER/REPO[:REF]:ENTRY  a GitHub hub repo (through torch.hub's download and cache)
    torchhub:PATH:ENTRY            a local directory with a hubconf.py
    tfjs:PATH | tfjs:URL           a TF.js model.json (layers-model or graph-model)
    onnx:PATH                      an ONNX file (finetune, predict)
    PATH                           any of the files above, detected by content
    URL                            http(s)://.../model.json
An nn.Module or keras.Model passed to the Python API is wrapped as a SourceRef with ``obj`` set.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import SourceError
from .files import sniff_file

PREFIXES = ("keras", "torchhub", "tfjs", "onnx")
# what a file's content says it is (sniff_file) -> (importer, form)
FILE_KINDS = {"keras-zip": ("keras", "keras-file"), "hdf5": ("keras", "h5-file"),
              "torchscript": ("torchhub", "torchscript"), "torch-pickle": ("torchhub", "state-dict"),
              "tfjs-json": ("tfjs", "json-file"), "onnx": ("onnx", "onnx-file")}


@dataclass(frozen=True)
class SourceRef:
    """A parsed source. ``importer`` names the importer; ``form`` says which of its spellings was used."""

    importer: str  # keras | torchhub | tfjs | onnx
    form: str  # application | keras-file | h5-file | savedmodel | hub-local | hub-remote | torchscript | state-dict | module | json-file | url | onnx-file | object
    location: str  # path, URL, application name, or owner/repo
    entry: str | None = None  # torchhub entry point
    ref: str | None = None  # torchhub git ref
    text: str = ""  # what the user wrote
    obj: Any = None  # an in-memory model (API only)

    def __str__(self) -> str:
        return self.text or self.location

    def canonical(self) -> str:
        """The reference as it should be recorded in a model card: local paths made absolute, so tools that
        rebuild the source later (``porter bench --against-source``) find it from any working directory."""
        if self.form in ("application", "hub-remote", "url", "module", "object"):
            return str(self)
        location = str(Path(self.location).expanduser().resolve())
        if self.form == "hub-local":
            return f"torchhub:{location}:{self.entry}"
        prefix = {"keras": "keras", "torchhub": "torchhub", "tfjs": "tfjs", "onnx": "onnx"}[self.importer]
        if self.form in ("torchscript", "state-dict"):
            return location  # detected by content; torchhub: prefix needs an entry point
        return f"{prefix}:{location}"


HUB_FILES = ("*.py", "*.pt", "*.pth", "*.bin", "*.safetensors", "*.ckpt")  # a hub repo's code and weights


def _digest_files(ref: SourceRef) -> list[Path]:
    """The files that decide what a local source computes."""
    import json

    root = Path(ref.location).expanduser()
    if ref.form == "savedmodel":
        graph = [root / n for n in ("saved_model.pb", "saved_model.pbtxt")]
        return [f for f in graph if f.is_file()] + sorted((root / "variables").glob("*"))
    if ref.form == "hub-local":
        return sorted({f for pattern in HUB_FILES for f in root.rglob(pattern)
                       if not any(part.startswith(".") for part in f.relative_to(root).parts)})
    files = [root]
    if ref.form == "json-file":  # a TF.js model.json and the weight shards its manifest names, beside it
        try:
            manifest = json.loads(root.read_text(encoding="utf-8")).get("weightsManifest") or []
            folder = root.parent.resolve()
            for group in manifest:
                for rel in group.get("paths", []):
                    shard = (folder / str(rel)).resolve()
                    if shard.is_relative_to(folder):
                        files.append(shard)
        except (OSError, ValueError, AttributeError, TypeError, RecursionError):
            pass  # the importer reports what is wrong with the file
    return files


def source_digest(ref: SourceRef) -> str | None:
    """sha256 over what a local source is made of (its file; a TF.js model.json with its weight shards; a
    SavedModel's graph and variables; a hub repo's code and weight files), recorded at conversion so a later rebuild
    can tell the source was replaced; None for sources that aren't local files (applications, remote hubs, URLs,
    in-memory models), can't be read, or hold none of those files."""
    import hashlib

    if ref.form in ("application", "hub-remote", "url", "module", "object"):
        return None
    h, hashed = hashlib.sha256(), 0
    try:
        for f in _digest_files(ref):
            if not f.is_file():
                continue
            h.update(f.name.encode() + b"\0")
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
            hashed += 1
    except OSError:
        return None
    return h.hexdigest() if hashed else None


def parse_source(source: Any) -> SourceRef:
    """Parse a reference string, a path, or an in-memory model into a SourceRef."""
    if isinstance(source, SourceRef):
        return source
    if isinstance(source, os.PathLike):
        return _detect_path(Path(source), str(source))
    if not isinstance(source, str):
        return _from_object(source)
    text = source.strip()
    if not text:
        raise SourceError("empty source reference; give a model path or a reference such as keras:MobileNetV2")
    if text.startswith(("http://", "https://")):
        return SourceRef("tfjs", "url", text, text=text)
    prefix, sep, rest = text.partition(":")
    if sep and prefix in PREFIXES and not _is_windows_drive(text):
        return _PARSERS[prefix](rest, text)
    if sep and prefix.lower() in PREFIXES:
        raise SourceError(f"unknown prefix {prefix!r} in {text!r}; prefixes are lower case: {', '.join(p + ':' for p in PREFIXES)}")
    path = Path(text).expanduser()
    if path.exists():
        return _detect_path(path, text)
    if sep and prefix not in PREFIXES and "/" in prefix and not prefix.startswith((".", "/", "~")):
        raise SourceError(
            f"{text!r} is neither a file nor a prefixed reference; did you mean torchhub:{text} "
            f"(a GitHub hub repo) or ./{text} (a local path)?")
    if sep and "://" not in text and prefix not in PREFIXES and not prefix.startswith((".", "/", "~")):
        raise SourceError(f"unknown source prefix {prefix!r} in {text!r}; use one of: {', '.join(p + ':' for p in PREFIXES)} or a path")
    raise SourceError(f"model not found: {text} (no such file or directory); check the path, or use a "
                      f"reference such as keras:MobileNetV2 or torchhub:OWNER/REPO:ENTRY")


def _is_windows_drive(text: str) -> bool:
    return len(text) > 2 and text[1] == ":" and text[0].isalpha() and text[2] in "\\/"


def _from_object(obj: Any) -> SourceRef:
    mod = type(obj).__module__
    for base in type(obj).__mro__:
        name = f"{base.__module__}.{base.__qualname__}"
        if name == "torch.nn.modules.module.Module":
            return SourceRef("torchhub", "module", type(obj).__name__, text=f"module:{type(obj).__name__}", obj=obj)
        if name in ("keras.src.models.model.Model", "keras.src.layers.layer.Layer"):
            return SourceRef("keras", "object", obj.name, text=f"keras-object:{obj.name}", obj=obj)
    raise SourceError(f"can't convert an object of type {mod}.{type(obj).__name__}; pass a path, a reference "
                      f"string, a torch.nn.Module or a keras.Model")


# --- prefixed forms -------------------------------------------------------------------------------------------

def _parse_keras(rest: str, text: str) -> SourceRef:
    if not rest:
        raise SourceError("keras: needs an application name or a path, e.g. keras:MobileNetV2 or keras:model.keras")
    path = Path(rest).expanduser()
    if path.exists() or any(c in rest for c in "/\\") or path.suffix in (".keras", ".h5", ".hdf5"):
        if not path.exists():
            raise SourceError(f"model not found: {rest} (no such file or directory)")
        ref = _detect_path(path, text)
        if ref.importer != "keras":
            raise SourceError(f"{rest} is not a Keras model: it looks like a {ref.importer} model ({ref.form}); "
                              f"drop the keras: prefix to let porter detect it")
        return ref
    return SourceRef("keras", "application", rest, text=text)


def _parse_torchhub(rest: str, text: str) -> SourceRef:
    location, sep, entry = rest.rpartition(":")
    if not sep or not location or not entry:
        raise SourceError(f"{text!r}: a hub reference needs an entry point: torchhub:OWNER/REPO[:REF]:ENTRY "
                          f"or torchhub:PATH:ENTRY")
    local = Path(location).expanduser()
    if local.is_dir() or location.startswith((".", "/", "~")):
        if not local.is_dir():
            raise SourceError(f"hub directory not found: {location}")
        return SourceRef("torchhub", "hub-local", str(local), entry=entry, text=text)
    repo, _, ref = location.partition(":")
    parts = repo.split("/")
    if len(parts) != 2 or not all(parts) or any(p in (".", "..") for p in parts):
        raise SourceError(f"{text!r}: expected torchhub:OWNER/REPO[:REF]:ENTRY (or a local directory that exists)")
    return SourceRef("torchhub", "hub-remote", repo, entry=entry, ref=ref or None, text=text)


def _parse_tfjs(rest: str, text: str) -> SourceRef:
    if rest.startswith(("http://", "https://")):
        return SourceRef("tfjs", "url", rest, text=text)
    if "://" in rest:
        raise SourceError(f"{text!r}: only http(s) URLs are supported for TF.js models")
    path = Path(rest).expanduser()
    if path.is_dir():
        path = path / "model.json"
    if not path.exists():
        raise SourceError(f"model not found: {rest} (no such file or directory)")
    return SourceRef("tfjs", "json-file", str(path), text=text)


def _parse_onnx(rest: str, text: str) -> SourceRef:
    path = Path(rest).expanduser()
    if not path.is_file():
        raise SourceError(f"model not found: {rest} (no such file)")
    return SourceRef("onnx", "onnx-file", str(path), text=text)


_PARSERS = {"keras": _parse_keras, "torchhub": _parse_torchhub, "tfjs": _parse_tfjs, "onnx": _parse_onnx}


# --- detection by content -------------------------------------------------------------------------------------

def _detect_path(path: Path, text: str) -> SourceRef:
    if path.is_dir():
        if (path / "saved_model.pb").exists() or (path / "saved_model.pbtxt").exists():
            return SourceRef("keras", "savedmodel", str(path), text=text)
        if (path / "hubconf.py").exists():
            raise SourceError(f"{text} is a hub directory; name the entry point: torchhub:{text}:ENTRY")
        if (path / "model.json").exists():
            return SourceRef("tfjs", "json-file", str(path / "model.json"), text=text)
        raise SourceError(f"{text} is a directory but not a model: no saved_model.pb, model.json or hubconf.py in it")
    kind = sniff_file(path)
    suffix = path.suffix.lower()
    if kind in FILE_KINDS:
        importer, form = FILE_KINDS[kind]
        return SourceRef(importer, form, str(path), text=text)
    expected = {".keras": "a Keras zip archive holding config.json", ".h5": "an HDF5 file", ".hdf5": "an HDF5 file",
                ".json": "a TF.js model.json", ".onnx": "an ONNX protobuf", ".pt": "a TorchScript archive",
                ".pth": "a TorchScript archive"}.get(suffix)
    found = {"empty": "an empty file", "zip": "a zip archive of another kind",
             "damaged-zip": "a damaged or truncated zip archive", "json": "JSON that is not a TF.js model",
             "truncated-hdf5": "a truncated HDF5 file"}.get(kind, "not a model file porter knows")
    if expected:
        raise SourceError(f"{path} is not {expected}: it is {found}; check that the file is complete and of the kind its name says")
    raise SourceError(f"{path}: unrecognised model file ({found}); porter reads .keras, .h5, SavedModel directories, "
                      f"TF.js model.json, TorchScript .pt and ONNX files")
