"""Reading and checking TF.js ``model.json``: the JSON itself, its format, and its weights manifest.

The format (tfjs-core ``io/types.ts`` ``ModelJSON``)::

    {"format": "layers-model" | "graph-model",      # absent in files written before TF.js 1.0
     "generatedBy": "...", "convertedBy": "...",
     "modelTopology": {...},                        # Keras-2 JSON config (layers) or a GraphDef as JSON (graph)
     "signature": {"inputs": {...}, "outputs": {...}},   # graph-models
     "userDefinedMetadata": {...},
     "weightsManifest": [{"paths": ["group1-shard1of2.bin", ...],
                          "weights": [{"name", "shape", "dtype", "quantization"?, "group"?}, ...]}, ...]}

Nothing here imports TensorFlow. Every malformed input is a PorterError naming the file and what is wrong.
"""

from __future__ import annotations

import gzip
import json
import re
import urllib.parse
import zlib
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

from ...errors import ModelLoadError, SourceError, first_line

GZIP_MAGIC = b"\x1f\x8b"
MAX_JSON_BYTES = 512 * 1024 * 1024  # a model.json that decompresses past this is refused (zip-bomb guard)


@dataclass(frozen=True)
class WeightEntry:
    name: str
    shape: tuple[int, ...]
    dtype: str  # float32 | int32 | bool | string | complex64 (the dtype of the decoded tensor)
    quantization: dict[str, Any] | None = None
    group: str | None = None  # "optimizer" for optimizer state (skipped)


@dataclass(frozen=True)
class WeightGroup:
    paths: tuple[str, ...]
    weights: tuple[WeightEntry, ...]


@dataclass
class ModelJSON:
    kind: str  # "layers" | "graph"
    topology: dict[str, Any]
    groups: list[WeightGroup]
    format: str | None = None
    generated_by: str | None = None
    converted_by: str | None = None
    signature: dict[str, Any] | None = None
    user_metadata: Any = None
    raw_keys: list[str] = field(default_factory=list)


def decompress_if_gzip(data: bytes, what: str, limit: int = MAX_JSON_BYTES) -> bytes:
    """Gunzip ``data`` when it starts with the gzip magic (detected by content, never by name)."""
    if not data.startswith(GZIP_MAGIC):
        return data
    try:
        d = zlib.decompressobj(16 + zlib.MAX_WBITS)
        out = d.decompress(data, limit + 1)
        if len(out) > limit:
            raise ModelLoadError(f"{what} decompresses to more than {limit // (1024 * 1024)} MiB; refusing it")
        if not d.eof:
            raise zlib.error("the gzip stream ends early")
        return out
    except (zlib.error, EOFError, gzip.BadGzipFile) as e:
        raise ModelLoadError(f"{what} starts like gzip but can't be decompressed ({e}); the file is truncated or corrupt") from None


def parse_model_json(data: bytes, where: str) -> ModelJSON:
    """Parse the bytes of a model.json (plain or gzip) into a checked ``ModelJSON``."""
    data = decompress_if_gzip(data, where)
    try:
        text = data.decode("utf-8-sig")
        obj = json.loads(text)
    except (UnicodeDecodeError, ValueError) as e:
        raise ModelLoadError(f"{where} is not JSON ({first_line(e, 160)}); a TF.js model is a model.json file written by "
                             f"tensorflowjs_converter or model.save()") from None
    except RecursionError:  # thousands of nested brackets: no model is shaped like that
        raise ModelLoadError(f"{where} nests its JSON too deeply to be a model.json; porter refuses it") from None
    if not isinstance(obj, dict) or not ("modelTopology" in obj or "weightsManifest" in obj):
        keys = ", ".join(list(obj)[:6]) if isinstance(obj, dict) else type(obj).__name__
        raise SourceError(f"{where} is JSON but not a TF.js model: it has no modelTopology/weightsManifest "
                          f"(found: {keys or 'nothing'}); point porter at the model.json that TF.js wrote")
    topology = obj.get("modelTopology")
    if not isinstance(topology, dict):
        raise ModelLoadError(f"{where} has no modelTopology (only weights); porter needs the model's architecture: "
                             f"convert the model with its topology (tensorflowjs_converter, model.save())")
    kind = _kind(obj, topology, where)
    groups = _parse_manifest(obj.get("weightsManifest", []), where)
    sig = obj.get("signature")
    return ModelJSON(kind=kind, topology=topology, groups=groups, format=obj.get("format"),
                     generated_by=_opt_str(obj.get("generatedBy")), converted_by=_opt_str(obj.get("convertedBy")),
                     signature=sig if isinstance(sig, dict) else None,
                     user_metadata=obj.get("userDefinedMetadata"), raw_keys=list(obj))


def _kind(obj: dict, topology: dict, where: str) -> str:
    fmt = obj.get("format")
    if fmt == "layers-model":
        return "layers"
    if fmt == "graph-model":
        return "graph"
    if fmt is not None:
        raise ModelLoadError(f"{where} has format {fmt!r}; porter reads TF.js 'layers-model' and 'graph-model' files")
    # Files written before the "format" key: tell them apart by the topology's shape.
    if "node" in topology:
        return "graph"
    if "model_config" in topology or ("class_name" in topology and "config" in topology):
        return "layers"
    raise ModelLoadError(f"{where}: can't tell whether this is a layers-model or a graph-model (no 'format' key, and "
                         f"modelTopology has neither 'node' nor 'class_name'/'model_config')")


def _parse_manifest(manifest: Any, where: str) -> list[WeightGroup]:
    if not isinstance(manifest, list):
        raise ModelLoadError(f"{where}: weightsManifest must be a list of weight groups, got {type(manifest).__name__}")
    groups = []
    for gi, g in enumerate(manifest, 1):
        if not isinstance(g, dict) or not isinstance(g.get("paths"), list) or not isinstance(g.get("weights"), list):
            raise ModelLoadError(f"{where}: weight group {gi} must be an object with 'paths' and 'weights' lists")
        paths = tuple(g["paths"])
        if not all(isinstance(p, str) and p for p in paths):
            raise ModelLoadError(f"{where}: weight group {gi} has a shard path that is not a non-empty string")
        entries = []
        for wi, w in enumerate(g["weights"], 1):
            if not isinstance(w, dict) or not isinstance(w.get("name"), str) or "dtype" not in w:
                raise ModelLoadError(f"{where}: weight {wi} of group {gi} needs 'name', 'shape' and 'dtype'")
            shape = w.get("shape", [])
            if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                      for d in shape):
                raise ModelLoadError(f"{where}: weight {w['name']!r} has an invalid shape {shape!r} "
                                     f"(expected a list of non-negative integers)")
            q = w.get("quantization")
            if q is not None and not isinstance(q, dict):
                raise ModelLoadError(f"{where}: weight {w['name']!r} has an invalid quantization {q!r}")
            entries.append(WeightEntry(w["name"], tuple(shape), str(w["dtype"]), q, w.get("group")))
        if entries and not paths:
            raise ModelLoadError(f"{where}: weight group {gi} lists {len(entries)} weights but no shard files")
        groups.append(WeightGroup(paths, tuple(entries)))
    return groups


# --- untrusted shard paths --------------------------------------------------------------------------------------

_DRIVE = re.compile(r"^[A-Za-z]:")
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


def check_shard_path(path: str, where: str) -> str:
    """Refuse shard paths that could leave the model's directory: ``..``, absolute, drive letters, URLs.

    Returns the path with ``\\`` separators normalised to ``/``. Local callers must still check that the
    resolved file lies inside the model directory (symlinks).
    """
    bad = None
    if "\x00" in path:
        bad = "contains a NUL byte"
    elif path.startswith("//") or (_SCHEME.match(path) and not _DRIVE.match(path)):
        bad = "is a URL, not a path relative to model.json"
    elif path.startswith(("/", "\\")):
        bad = "is absolute"
    elif _DRIVE.match(path):
        bad = "names a drive"
    else:
        parts = PurePosixPath(path.replace("\\", "/")).parts
        decoded = PurePosixPath(urllib.parse.unquote(path).replace("\\", "/")).parts  # %2e%2e is '..' to a server
        if any(p == ".." for p in parts + decoded):
            bad = "climbs out with '..'"
        elif not parts or parts == (".",):
            bad = "is empty"
    if bad:
        raise ModelLoadError(f"{where}: shard path {path!r} {bad}; shard paths must stay inside the model's "
                             f"directory — porter refuses to read it")
    return path.replace("\\", "/")


def _opt_str(v: Any) -> str | None:
    return None if v is None else str(v)
