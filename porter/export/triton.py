"""``porter export MODEL --triton REPO``: a Triton Inference Server model repository for the ONNX Runtime backend,
and ``porter.triton.preprocess``, the client's half: images into the request tensor as the repository says.

Written: ``REPO/NAME/config.pbtxt``, ``REPO/NAME/1/model.onnx`` and, for classifiers, ``REPO/NAME/labels.txt``
(one file per classification task of a multi-task model) named by ``label_filename`` on the score output.

The batch axis, told truthfully: ``max_batch_size: N`` with dims without it only when every input's and output's
first axis is the model's dynamic batch (porter's batch plan names it); a fixed-batch model (exported at batch 1,
say) or one whose outputs don't follow the batch (NMS selections) gets ``max_batch_size: 0`` and its full dims, -1
for each dynamic one. ``dynamic_batching`` (with preferred sizes) comes with a batch axis only. The preprocessing
spec, the labels' score transform and porter's version go into the config's ``parameters``, so a client reads how to
feed the model from the server (``GET v2/models/NAME/config``) or the file. Refused in one line: a tensor without
a known rank, a rank-0 tensor, a type Triton has no name for, an unsafe model name.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import DataError, UnsupportedError, UsageError
from ..spec import PreprocessSpec

TRITON_TYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "float64": "TYPE_FP64", "int8": "TYPE_INT8",
                "int16": "TYPE_INT16", "int32": "TYPE_INT32", "int64": "TYPE_INT64", "uint8": "TYPE_UINT8",
                "uint16": "TYPE_UINT16", "uint32": "TYPE_UINT32", "uint64": "TYPE_UINT64", "bool": "TYPE_BOOL",
                "bfloat16": "TYPE_BF16", "object": "TYPE_STRING", "str": "TYPE_STRING"}
from . import KINDS, TENSORRT
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


@dataclass
class TritonExport:
    repository: Path
    name: str
    config: str  # config.pbtxt's text
    files: list[Path] = field(default_factory=list)
    max_batch_size: int = 0
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        batch = (f"max_batch_size {self.max_batch_size}, dynamic batching" if self.max_batch_size else
                 "max_batch_size 0 (the model's own batch axis; full dims)")
        lines = [f"wrote Triton model {self.name!r} to {self.repository / self.name} ({batch})"]
        lines += [f"  {p}" for p in self.files]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def export_triton(model: Any, repository: str | os.PathLike, *, name: str | None = None, max_batch_size: int = 64,
                  instances: int = 1, kind: str = "cpu", tensorrt: str | None = None,
                  force: bool = False) -> TritonExport:
    """Write ``model`` (an ONNX path or ModelProto) into the Triton repository ``repository`` as ``name``
    (default: the file's stem)."""
    from ..files import read_model
    from ..runtime.signature import ModelSignature
    from ..spec import ModelCard

    display, proto, _, path = read_model(model)
    name = name or (Path(path).stem if path else "model")
    if not NAME.match(name) or name in (".", ".."):
        raise UsageError(f"bad Triton model name {name!r}: use letters, digits, '_', '-' or '.' (it is a folder name)")
    if kind not in KINDS:
        raise UsageError(f"unknown --kind {kind!r}; choose one of: {', '.join(KINDS)}")
    if tensorrt is not None and tensorrt not in TENSORRT:
        raise UsageError(f"unknown --tensorrt {tensorrt!r}; choose one of: {', '.join(TENSORRT)}")
    if tensorrt and kind != "gpu":
        raise UsageError("--tensorrt runs on GPU instances: add --kind gpu")
    if not isinstance(max_batch_size, int) or max_batch_size < 1 or not isinstance(instances, int) or instances < 1:
        raise UsageError(f"--max-batch-size and --instances must be positive integers, got {max_batch_size}, "
                         f"{instances}")
    card = ModelCard.from_onnx(proto)
    sig = ModelSignature.read(proto, card, display)
    batchable, notes = _batch_axis(sig)
    label_files = _label_files(sig)
    config = _config(name, sig, batchable, max_batch_size if batchable else 0, instances, kind, tensorrt,
                     label_files, card)
    folder = Path(repository).expanduser() / name
    files = _write(folder, proto, config, label_files, force)
    return TritonExport(Path(repository).expanduser(), name, config, files, max_batch_size if batchable else 0, notes)


def _batch_axis(sig) -> tuple[bool, list[str]]:
    """Whether every input and output leads with the same dynamic batch axis (Triton's max_batch_size > 0)."""
    for t in (*sig.inputs, *sig.outputs):
        if not t.shape and t.shape != ():
            raise UnsupportedError(f"{t.name} has no known rank; Triton needs every tensor's dims (re-export the model "
                                   f"with shapes, or run porter convert on its source)")
        if len(t.shape) == 0:
            raise UnsupportedError(f"{t.name} is a scalar (rank 0); Triton's config can't express it")
        if t.dtype not in TRITON_TYPES:
            raise UnsupportedError(f"{t.name} has type {t.dtype}, which Triton has no type for")
    if sig.fixed_batch:
        return False, [f"the model takes batches of exactly {sig.fixed_batch}: max_batch_size 0, clients send "
                       f"[{sig.fixed_batch}, ...]"]
    heads = {t.shape[0] for t in sig.inputs}
    if len(heads) != 1 or isinstance(next(iter(heads)), int):
        return False, ["the inputs don't share one dynamic first axis: max_batch_size 0, full dims"]
    batch = next(iter(heads))
    odd = [t.name for t in sig.outputs if t.shape[0] != batch]
    if odd:
        return False, [f"outputs {', '.join(odd)} don't lead with the batch axis: max_batch_size 0, full dims"]
    return True, []


def _label_files(sig) -> dict[str, tuple[str, list[str]]]:
    """output name -> (label file name, labels) for the classification outputs."""
    if sig.tasks:
        return {f"{t['name']}/probabilities": (f"labels_{_safe(t['name'])}.txt", list(t["labels"]))
                for t in sig.tasks if t["type"] == "classification"}
    if sig.score_output and sig.labels:
        return {sig.score_output: ("labels.txt", [str(l) for l in sig.labels])}
    return {}


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", text)


def _dims(shape: Sequence[Any], batched: bool) -> str:
    dims = shape[1:] if batched else shape
    return "[ " + ", ".join(str(d) if isinstance(d, int) and d > 0 else "-1" for d in dims) + " ]"


def _q(text: str) -> str:
    return json.dumps(text)  # a protobuf text-format string literal: JSON's escaping is a subset it reads


def _config(name: str, sig, batchable: bool, max_batch: int, instances: int, kind: str, tensorrt: str | None,
            label_files: dict[str, tuple[str, list[str]]], card) -> str:
    from .. import __version__

    lines = [f"name: {_q(name)}", 'platform: "onnxruntime_onnx"', f"max_batch_size: {max_batch}"]
    for section, tensors in (("input", sig.inputs), ("output", sig.outputs)):
        for t in tensors:
            lines.append(f"{section} {{")
            lines.append(f"  name: {_q(t.name)}")
            lines.append(f"  data_type: {TRITON_TYPES[t.dtype]}")
            lines.append(f"  dims: {_dims(t.shape, batchable)}")
            if section == "output" and t.name in label_files:
                lines.append(f"  label_filename: {_q(label_files[t.name][0])}")
            lines.append("}")
    if batchable:
        preferred = sorted({b for b in (8, 16, 32, max_batch) if b <= max_batch})
        lines += ["dynamic_batching {", f"  preferred_batch_size: [ {', '.join(map(str, preferred))} ]",
                  "  max_queue_delay_microseconds: 100", "}"]
    lines += ["instance_group [", "  {", f"    count: {instances}", f"    kind: KIND_{kind.upper()}", "  }", "]"]
    if tensorrt:
        lines += ["optimization {", "  execution_accelerators {", "    gpu_execution_accelerator : [ {",
                  '      name : "tensorrt"',
                  f'      parameters {{ key: "precision_mode" value: "{tensorrt.upper()}" }}',
                  '      parameters { key: "max_workspace_size_bytes" value: "4294967296" }',
                  '      parameters { key: "trt_engine_cache_enable" value: "1" }', "    } ]", "  }", "}"]
    params = {"porter.version": __version__, "porter.score_transform": sig.score_transform}
    if sig.preprocess is not None:
        params["porter.preprocess"] = json.dumps(sig.preprocess.to_dict(), sort_keys=True)
    if sig.image_input is not None:
        params["porter.image_input"] = sig.image_input.name
        params["porter.image_dtype"] = sig.image_input.dtype
    if card is not None:
        params["porter.source"] = card.source
    for key, value in params.items():
        lines += ["parameters {", f"  key: {_q(key)}", f"  value: {{ string_value: {_q(value)} }}", "}"]
    return "\n".join(lines) + "\n"


def _write(folder: Path, proto, config: str, label_files: dict[str, tuple[str, list[str]]],
           force: bool) -> list[Path]:
    from ..outputs import check_output, save_onnx, write_bytes

    targets = [folder / "config.pbtxt", folder / "1" / "model.onnx",
               *[folder / f for f, _ in label_files.values()]]
    for d in (folder.parent, folder, folder / "1"):
        if d.exists() and not d.is_dir():
            raise UsageError(f"{d} exists and is not a folder; remove it or give another --name")
    for t in targets:  # all checked before anything is written (a folder not there yet holds nothing to replace)
        if t.parent.is_dir():
            check_output(t, force)
    (folder / "1").mkdir(parents=True, exist_ok=True)
    save_onnx(proto, folder / "1" / "model.onnx", force)
    for f, labels in label_files.values():
        write_bytes(folder / f, ("\n".join(labels) + "\n").encode(), force)
    write_bytes(folder / "config.pbtxt", config.encode(), force)  # last: a repository is complete once it exists
    return targets


# --- the client's side ------------------------------------------------------------------------------------------

def read_config(config: str | os.PathLike) -> dict[str, Any]:
    """The parts of a porter-written ``config.pbtxt`` (a path, a folder holding one, or its text) a client needs:
    ``preprocess`` (PreprocessSpec), ``image_input``, ``max_batch_size``, ``score_transform``."""
    text = str(config)
    p = Path(text).expanduser() if "\n" not in text and len(text) < 4096 else None
    if p is not None and p.is_dir():
        p = p / "config.pbtxt"
    if p is not None and p.is_file():
        text = p.read_text(encoding="utf-8")
    elif p is not None and "{" not in text:
        raise DataError(f"Triton config not found: {config}")
    params = dict(re.findall(r'parameters\s*\{\s*key:\s*("(?:[^"\\]|\\.)*")\s*value:\s*\{\s*string_value:\s*'
                             r'("(?:[^"\\]|\\.)*")\s*\}\s*\}', text))
    params = {json.loads(k): json.loads(v) for k, v in params.items()}
    if "porter.preprocess" not in params:
        raise DataError("this Triton config has no porter.preprocess parameter (not written by porter export); "
                        "preprocess the images yourself")
    batch = re.search(r"^max_batch_size:\s*(\d+)", text, re.M)
    return {"preprocess": PreprocessSpec.from_dict(json.loads(params["porter.preprocess"])),
            "image_input": params.get("porter.image_input"), "max_batch_size": int(batch.group(1)) if batch else 0,
            "score_transform": params.get("porter.score_transform", "none"),
            "image_dtype": params.get("porter.image_dtype", "float32")}


def preprocess(images: Sequence[Any], config: str | os.PathLike) -> np.ndarray:
    """Images (paths, PIL images, uint8 arrays) as the request tensor the Triton model ``config`` takes: decoded,
    resized and normalized as ``porter predict`` does (N first; with max_batch_size 0 too, as the model's own axis)."""
    from ..imaging import preprocess as to_batch

    info = read_config(config)
    spec = info["preprocess"]
    if spec.size is None:
        raise DataError("the model takes any image size; resize the images to one size first, or give the sizes")
    batch = to_batch(list(images), spec, channels=spec.channels)
    dtype = np.dtype(info["image_dtype"]) if info["image_dtype"] in TRITON_TYPES else np.dtype("float32")
    return np.rint(batch).astype(dtype) if dtype.kind in "iu" else batch.astype(dtype)
