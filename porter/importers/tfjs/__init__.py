"""The TensorFlow.js importer: layers-models and graph-models from a ``model.json``, local or over http(s).

    manifest.py  model.json parsing and checks (format, weight groups, untrusted shard paths)
    weights.py   shard joining and weight decoding (dtypes, uint8/uint16/float16 quantization)
    layers.py    layers-model: Keras-2 JSON topology -> Keras 3 model (then the shared Keras -> ONNX path)
    graph.py     graph-model: GraphDef JSON + weights -> plain TF graph -> tf2onnx
    fetch.py     downloads with timeouts, a size limit, a progress bar and a cache keyed by URL

TF.js models take NHWC input; model.json doesn't record preprocessing, so it stays unknown unless the user
gives ``--preprocess``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from ...errors import ModelLoadError, SourceError
from ...options import ConvertOptions
from ...sources import SourceRef
from .. import ImportedModel, register_importer
from .manifest import ModelJSON, check_shard_path, parse_model_json

MAX_MODEL_JSON_BYTES = 512 * 1024 * 1024


def _regular_file(path: Path, what: str) -> None:
    """Refuse a FIFO, a device or a socket before opening it: reading one blocks forever or never ends."""
    import stat

    mode = path.stat().st_mode  # FileNotFoundError propagates: callers word it
    if not stat.S_ISREG(mode) and not stat.S_ISDIR(mode):
        raise ModelLoadError(f"{what} ({path}) is not a regular file (a FIFO, device or socket); porter reads model "
                             f"files only from regular files")


class LocalSource:
    """A model.json on disk; shards are read from its directory and may not leave it."""

    def __init__(self, path: str):
        self.path = Path(path)
        self.label = str(self.path)
        self.dir = self.path.resolve().parent

    def model_json(self) -> bytes:
        try:
            _regular_file(self.path, "model.json")
            if self.path.stat().st_size > MAX_MODEL_JSON_BYTES:
                raise ModelLoadError(f"{self.path} is larger than {MAX_MODEL_JSON_BYTES // 2**20} MiB; that is not "
                                     f"a TF.js model.json")
            return self.path.read_bytes()
        except FileNotFoundError:
            raise SourceError(f"model not found: {self.path} (no such file)") from None
        except IsADirectoryError:
            raise SourceError(f"{self.path} is a directory; give the model.json inside it") from None
        except OSError as e:
            raise SourceError(f"can't read {self.path}: {e.strerror}") from None

    def read_shard(self, rel: str) -> bytes:
        rel = check_shard_path(rel, self.label)
        target = (self.dir / rel).resolve()
        if not target.is_relative_to(self.dir):
            raise ModelLoadError(f"{self.label}: shard path {rel!r} resolves to {target}, outside the model's "
                                 f"directory {self.dir}; porter refuses to read it")
        try:
            _regular_file(target, f"{self.label}: weight shard {rel!r}")
            return target.read_bytes()
        except FileNotFoundError:
            raise ModelLoadError(f"{self.label}: weight shard {rel!r} listed in weightsManifest is missing "
                                 f"(looked for {target}); copy every .bin file that came with model.json") from None
        except OSError as e:
            raise ModelLoadError(f"{self.label}: can't read weight shard {rel!r}: {e.strerror}") from None

    def forget(self) -> None:
        pass


class HttpSource:
    """A model.json URL; shards are fetched relative to it, on the same origin, through the cache."""

    def __init__(self, url: str):
        from . import fetch

        self.fetch = fetch
        self.url = fetch.check_model_url(url)
        self.label = url
        self.fetched: list[str] = []

    def model_json(self) -> bytes:
        self.fetched.append(self.url)
        return self.fetch.fetch(self.url, max_bytes=min(MAX_MODEL_JSON_BYTES, self.fetch.default_max_bytes()),
                                what="model.json")

    def read_shard(self, rel: str) -> bytes:
        url = self.fetch.shard_url(self.url, rel)
        self.fetched.append(url)
        return self.fetch.fetch(url, same_origin=self.fetch.origin(self.url))

    def forget(self) -> None:
        """Drop this model's cached files (after they turned out inconsistent), so a retry downloads afresh."""
        for url in self.fetched:
            self.fetch.cached_path(url).unlink(missing_ok=True)


def open_source(ref: SourceRef) -> LocalSource | HttpSource:
    if ref.form == "url" or ref.location.startswith(("http://", "https://")):
        return HttpSource(ref.location)
    if ref.form == "json-file":
        return LocalSource(ref.location)
    raise SourceError(f"the TF.js importer can't read {ref} ({ref.form}); give a model.json path or URL")


def framework_versions(mj: ModelJSON) -> dict[str, str]:
    from ..keras import framework_versions as tf_versions

    versions = dict(tf_versions())
    if mj.generated_by:
        versions["tfjs_generatedBy"] = mj.generated_by
    if mj.converted_by:
        versions["tfjs_convertedBy"] = mj.converted_by
    return versions


def provenance(mj: ModelJSON, label: str) -> dict[str, str]:
    prov = {"tfjs_format": mj.kind, "exporter": "tf2onnx", "source_model": label}
    if mj.generated_by:
        prov["generatedBy"] = mj.generated_by
    if mj.converted_by:
        prov["convertedBy"] = mj.converted_by
    if mj.user_metadata is not None:
        prov["userDefinedMetadata"] = json.dumps(mj.user_metadata, sort_keys=True)
    return prov


def load_model_json(source: LocalSource | HttpSource) -> ModelJSON:
    return parse_model_json(source.model_json(), source.label)


def load_weights(mj: ModelJSON, source: LocalSource | HttpSource) -> dict:
    from .weights import read_all_weights

    try:
        return read_all_weights(mj.groups, source.read_shard, source.label)
    except ModelLoadError:
        source.forget()
        raise


def _import_layers(mj: ModelJSON, source, opts: ConvertOptions) -> ImportedModel:
    from ..keras import keras_model_to_imported
    from .layers import build_keras_model, check_supported, model_config

    check_supported(model_config(mj.topology))  # before any shard is read or downloaded
    weights = load_weights(mj, source)
    model, notes = build_keras_model(mj.topology, weights)
    imported = keras_model_to_imported(model, opts, _short_label(source))
    imported.notes.extend(notes)
    return imported


def _import_graph(mj: ModelJSON, source, opts: ConvertOptions) -> ImportedModel:
    from ..keras import refuse_soft_nms
    from . import control_flow, graph

    gd, inputs, outputs = graph.prepare_graph(mj.topology, mj.signature, opts, source.label)
    weights = load_weights(mj, source)
    notes = graph.fill_constants(gd, weights, source.label)
    refuse_soft_nms(gd, source.label)
    run = graph.make_runner(gd, inputs, outputs)  # the graph as TF.js runs it: parity proves what follows
    loops = control_flow.raise_while_loops(gd)
    if loops:
        notes.append(f"{loops} lowered while loop{'s' if loops > 1 else ''} raised to While for tf2onnx")
    onnx_model = graph.to_onnx(gd, inputs, outputs, opts.opset)
    return ImportedModel(onnx_model=onnx_model, run_source=run, framework="tfjs",
                         input_names=[e.name for e in inputs], output_names=[e.name for e in outputs], notes=notes)


def _short_label(source) -> str:
    if isinstance(source, LocalSource):
        return f"{source.path.parent.name}/{source.path.name}"
    return source.url


@register_importer("tfjs")
def import_tfjs(ref: SourceRef, opts: ConvertOptions) -> ImportedModel:
    from ..keras import check_tf2onnx_opset

    check_tf2onnx_opset(opts.opset)  # before anything is downloaded
    source = open_source(ref)
    mj = load_model_json(source)
    importer: Callable[..., ImportedModel] = _import_layers if mj.kind == "layers" else _import_graph
    imported = importer(mj, source, opts)
    imported.framework = "tfjs"
    imported.framework_versions = framework_versions(mj)
    imported.provenance = {**imported.provenance, **provenance(mj, _short_label(source))}
    imported.preprocess = None
    origin = mj.converted_by or mj.generated_by
    imported.notes.append(f"TF.js {mj.kind}-model{f' ({origin})' if origin else ''}; NHWC input; model.json "
                          f"records no preprocessing")
    return imported
