"""Steps both finetune pipelines (one head: ``api``; several targets: ``multitask_run``) take the same way."""

from __future__ import annotations

import importlib
import os
import sys
import threading
from typing import Any

from .. import __version__
from ..errors import UsageError
from ..spec import ModelCard
from .options import FinetuneOptions


def prefetch_imports(report: bool, optimizer: bool) -> None:
    """Import in the background what training and the report need later, overlapping feature extraction: the
    probe's scipy.optimize (~0.4 s); torch.optim's first optimizer imports torch._dynamo (~1.3 s; only when a
    stochastic optimizer will train: the default linear probe never imports torch); the report matplotlib (~0.6 s)."""
    modules = ["scipy.optimize"] + (["torch._dynamo"] if optimizer else []) + (
        ["matplotlib.backends.backend_agg", "matplotlib.figure"] if report else [])
    modules = [m for m in modules if m not in sys.modules]

    def load() -> None:
        for name in modules:
            try:
                importlib.import_module(name)
            except Exception:  # noqa: BLE001 - the real import later reports a real failure
                pass

    if modules:
        # not a daemon: the interpreter waits for it before finalizing (a daemon thread still importing at exit
        # crashed it: "PyThreadState_Get ... finalizing"); the CLI leaves at once on Ctrl-C (os._exit)
        threading.Thread(target=load, name="porter-prefetch-imports", daemon=False).start()


def logger(enabled: bool):
    def log(line: str) -> None:
        if enabled:
            print(line, file=sys.stderr, flush=True)

    return log


def load_source(source: Any, opts: FinetuneOptions):
    """(model, card, notes): an ONNX model as is, anything else through porter.convert (with parity)."""
    import onnx

    from ..files import load_onnx_file
    from ..sources import parse_source

    notes: list[str] = []
    if isinstance(source, onnx.ModelProto):
        model = source
        card = ModelCard.from_onnx(model) or ModelCard(source=model.graph.name or "onnx-model", framework="onnx",
                                                       porter_version=__version__)
        return model, card, notes
    ref = parse_source(os.fspath(source) if isinstance(source, os.PathLike) else source)
    if ref.importer == "onnx":
        if opts.convert_options:
            raise UsageError(f"{ref} is already ONNX; convert options ({', '.join(sorted(opts.convert_options))}) "
                             f"don't apply to it")
        model = load_onnx_file(ref.location)
        card = ModelCard.from_onnx(model) or ModelCard(source=str(ref), framework="onnx", porter_version=__version__)
        return model, card, notes
    from ..conversion import convert

    result = convert(ref, None, **opts.convert_options)
    notes += list(result.notes)
    if result.parity is not None:
        notes.append(f"converted {ref} first: {result.parity.summary()}")
    return result.model, result.card, notes


def featurize(model: Any, cuts: Any, data: Any, geometry: Any, spec: Any, opts: FinetuneOptions,
              ray: Any = None) -> dict[str, Any]:
    """``features.compute_features`` with the options of ``opts`` (``ray``: its ``ray_connection``)."""
    from .features import compute_features

    return compute_features(model, cuts, data, geometry, spec, batch_size=opts.feature_batch_size,
                            device=opts.device, cache=opts.cache, cache_dir=opts.cache_dir, progress=opts.progress,
                            workers=opts.workers, memory_budget=opts.memory_budget, ray=ray, actors=opts.actors)


def ray_connection(opts: FinetuneOptions):
    """``--ray``: a ``porter.ray.cluster.Connection`` for the run (Ray checked installed and the address reachable
    now, before any work; connected when features are computed), else a no-op context yielding None."""
    import contextlib

    if opts.ray is None:
        return contextlib.nullcontext()
    from ..ray.cluster import Connection, probe, require_ray

    require_ray()
    connection = Connection(opts.ray)
    if connection.address not in (None, "auto"):
        probe(connection.address)  # an unreachable cluster is said now, not after the data and the model load
    return connection
