"""``porter export MODEL --node DIR``: a small npm package running the model on onnxruntime-node.

Written: ``DIR/package.json`` (its dependencies: onnxruntime-node, and decoders that carry what they run -- pngjs,
libjpeg-turbo as WebAssembly (@jsquash/jpeg), jpeg-js for CMYK -- since packages that fetch native binaries at
install can't be relied on), ``DIR/index.js`` (``load()`` then
``predict(images)``: decoding, Pillow's bilinear resize bit for bit, the model's normalization in float32 as porter
computes it, scores as ``porter predict`` reports them), ``DIR/model.onnx``, ``DIR/model.json`` (what index.js
needs to know of the model: input, score output, score transform, fixed batch), ``DIR/preprocess.json`` and
``DIR/labels.json``. Refused in one line: a model without one image input or without preprocessing metadata.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UsageError

TEMPLATE = Path(__file__).with_name("node_template") / "index.js"
# decoders that ship what they run (no install script fetching binaries): pngjs; libjpeg-turbo's decoder as
# WebAssembly (@jsquash/jpeg: bit-exact with Pillow's libjpeg-turbo); jpeg-js for CMYK JPEGs, which it refuses
DEPENDENCIES = {"onnxruntime-node": "^1.20.0", "@jsquash/jpeg": "^1.6.0", "jpeg-js": "^0.4.4", "pngjs": "^7.0.0"}


@dataclass
class NodeExport:
    folder: Path
    files: list[Path] = field(default_factory=list)

    def summary(self) -> str:
        return "\n".join([f"wrote npm package {self.folder} (cd {self.folder} && npm install)",
                          *[f"  {p}" for p in self.files]])


def export_node(model: Any, folder: str | os.PathLike, *, name: str | None = None, force: bool = False) -> NodeExport:
    from .. import __version__
    from ..files import read_model
    from ..outputs import check_output, save_onnx, write_bytes
    from ..runtime.signature import ModelSignature
    from ..spec import ModelCard

    display, proto, _, path = read_model(model)
    sig = ModelSignature.read(proto, ModelCard.from_onnx(proto), display)
    spec, image = sig.image_spec()  # one image input and its preprocessing, or a DataError saying why not
    if image.dtype not in ("float32", "uint8", "int32"):
        raise UsageError(f"{display}'s image input is {image.dtype}; the Node package feeds float32, uint8 or int32")
    if spec.size is None:
        raise UsageError(f"{display} takes any image size; the Node package needs one: convert it with "
                         f"--input-shape, or give --image-size when fine-tuning")
    out = Path(folder).expanduser()
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out} exists and is not a folder")
    package = re.sub(r"[^a-z0-9._-]", "-", (name or (Path(path).stem if path else "model")).lower()).strip("-._")
    files = {"package.json": json.dumps({"name": package or "model", "version": "1.0.0", "private": True,
                                         "description": f"{display} on onnxruntime-node (written by porter "
                                                        f"{__version__})", "main": "index.js",
                                         "dependencies": DEPENDENCIES}, indent=2) + "\n",
             "model.json": json.dumps({"image_input": image.name, "image_dtype": image.dtype,
                                       "score_output": sig.score_output, "score_transform": sig.score_transform,
                                       "fixed_batch": sig.fixed_batch, "outputs": sig.output_names}, indent=2) + "\n",
             "preprocess.json": json.dumps(spec.to_dict(), indent=2) + "\n",
             "index.js": TEMPLATE.read_text()}
    if sig.labels:
        files["labels.json"] = json.dumps([str(l) for l in sig.labels]) + "\n"
    targets = [out / "model.onnx", *[out / f for f in files]]
    if out.is_dir():
        for t in targets:
            check_output(t, force)
    out.mkdir(parents=True, exist_ok=True)
    save_onnx(proto, out / "model.onnx", force)
    for f, text in files.items():
        write_bytes(out / f, text.encode(), force)
    return NodeExport(out, targets)
