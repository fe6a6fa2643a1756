"""``porter.convert``: source reference -> importer -> normalized ONNX -> parity validation -> metadata -> file."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import __version__
from .errors import NetworkError, PorterError, SourceError, UnsafeModelError, UsageError, ValidationError
from .options import ConvertOptions
from .sources import SourceRef, parse_source, source_digest
from .spec import ModelCard, PreprocessSpec

if TYPE_CHECKING:
    from .runtime.bench import SourceModel


@dataclass
class ConvertResult:
    model: Any  # onnx.ModelProto
    path: Path | None
    parity: Any  # graph.validate.ParityReport | None
    card: ModelCard
    seconds: float
    notes: list[str] = field(default_factory=list)
    source: str = ""  # the reference as the user wrote it (the card records it canonically)
    batch: Any = None  # graph.batch.BatchPlan

    @property
    def metadata(self) -> dict[str, str]:
        return self.card.to_metadata()

    def summary(self) -> str:
        from .graph.inspect import graph_inputs, graph_outputs, opset_of, parameter_count

        where = f" -> {self.path}" if self.path else ""
        lines = [f"converted {self.source or self.card.source}{where} in {self.seconds:.1f} s",
                 f"  opset {opset_of(self.model)}, {parameter_count(self.model):,} parameters, framework "
                 f"{self.card.framework}"]
        lines += [f"  input  {t.describe()}" for t in graph_inputs(self.model)]
        lines += [f"  output {t.describe()}" for t in graph_outputs(self.model)]
        pre = self.card.preprocess.describe() if self.card.preprocess else "unknown (give --preprocess to record it)"
        lines.append(f"  preprocess: {pre}")
        if self.card.labels:
            lines.append(f"  labels: {len(self.card.labels)} ({', '.join(self.card.labels[:3])}{', ...' if len(self.card.labels) > 3 else ''})")
        if self.batch is not None:
            lines.append(f"  {self.batch.describe()}")
        lines.append("  " + (self.parity.summary() if self.parity else "parity: not checked (--no-validate)"))
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def resolve_preprocess(known: PreprocessSpec | None, opts: ConvertOptions, model) -> PreprocessSpec | None:
    """The importer's preprocessing, overridden by --preprocess/--mean/--std; geometry read off the graph."""
    from .graph.inspect import graph_inputs, image_geometry

    if opts.preprocess is None and opts.mean is None and opts.std is None:
        return known
    inputs = graph_inputs(model)
    geometry = image_geometry(inputs[0].shape) if len(inputs) == 1 else None
    if geometry is None:
        raise UsageError("--preprocess/--mean/--std describe image inputs, but this model's input is not a single "
                         "rank-4 image tensor")
    layout, size, channels = geometry
    return PreprocessSpec.resolve(known, mode=opts.preprocess, mean=opts.mean, std=opts.std, layout=layout,
                                  size=size, channels=channels)


def convert(source: Any, output: str | Path | None = None, **options: Any) -> ConvertResult:
    """Import ``source``, normalize it to ONNX, prove parity, attach metadata, and write ``output`` if given.

    ``source`` is a reference string (``keras:MobileNetV2``, ``torchhub:DIR:ENTRY``, ``tfjs:URL`` ...), a path
    detected by content, or an in-memory ``torch.nn.Module`` / ``keras.Model``. Options are the fields of
    :class:`porter.options.ConvertOptions`. Raises a PorterError subclass on any user-facing failure; nothing is
    written unless everything succeeded.
    """
    from .importers import get_importer
    from .outputs import check_output, save_onnx

    start = time.perf_counter()
    opts = ConvertOptions.from_kwargs(**options)
    ref: SourceRef = parse_source(source)
    if output is not None:
        check_output(output, opts.force)  # fail before minutes of work
    if ref.importer == "onnx":
        raise UsageError(f"{ref} is already an ONNX model; use porter inspect, finetune, predict or bench on it")

    from .graph.normalize import normalize

    imported = get_importer(ref.importer)(ref, opts)
    _check_named_shapes(opts, imported)
    model = normalize(imported.onnx_model, imported.input_names, imported.output_names)
    _check_shapes_applied(opts, model)
    preprocess = resolve_preprocess(imported.preprocess, opts, model)
    model, report, plan = settle_batch(model, imported.run_source, opts, preprocess)
    labels = opts.labels if opts.labels is not None else imported.labels
    card = ModelCard(
        source=ref.canonical(), framework=imported.framework, porter_version=__version__,
        framework_versions=imported.framework_versions, preprocess=preprocess,
        labels=tuple(labels) if labels is not None else None,
        parity=report.to_record() if report else None, provenance=dict(imported.provenance), batch=plan.to_dict(),
        source_form=ref.form, weights=imported.weights, source_sha256=source_digest(ref))
    _check_labels(card, model)
    card.apply_to(model)
    model.producer_name, model.producer_version = "porter", __version__
    path = save_onnx(model, output, opts.force) if output is not None else None
    notes = opts.unused_by(ref.importer, ref.form) + list(imported.notes)
    return ConvertResult(model, path, report, card, time.perf_counter() - start, notes, str(ref),
                         plan)


def settle_batch(model, run_source, opts: ConvertOptions, preprocess):
    """Validate, and decide how the model takes batches (``graph.batch``): (model, parity report, BatchPlan).

    A model exported at a fixed batch B is freed only when the rewritten graph, at B and 3B, matches the source run
    B at a time on every output; otherwise it stays fixed and is validated at B. Without validation nothing is
    proven, so a fixed batch stays fixed."""
    from .graph.batch import BatchPlan, fixed_batch, free_batch, name_output_axes, run_in_chunks
    from .graph.inspect import graph_outputs
    from .graph.validate import validate

    check = dict(atol=opts.atol, rtol=opts.rtol, seed=opts.seed, preprocess=preprocess)
    size = fixed_batch(model)
    if size is None:
        plan = BatchPlan("dynamic")
        if not opts.validate:
            return model, None, plan
        report = validate(model, run_source, batch_sizes=opts.validation_batch_sizes, **check)
    else:
        if not opts.validate:
            return model, None, BatchPlan("fixed", size, reason="not proven: validation is off")
        freed, rewrites = free_batch(model, size)
        batch_major = [o.name for o in graph_outputs(model) if o.shape and o.shape[0] == size]
        sizes = sorted({size * b for b in opts.validation_batch_sizes} | {size, 3 * size})
        try:
            report = validate(freed, run_in_chunks(run_source, size), batch_sizes=sizes,
                              must_follow_batch=batch_major, **check)
            model, plan = freed, BatchPlan("freed", size, rewrites)
        except ValidationError as e:
            text = str(e)
            plan = BatchPlan("fixed", size, reason="a dynamic batch failed the parity proof: "
                             + (text if len(text) <= 200 else text[:200].rsplit(" ", 1)[0] + " ..."))
            report = validate(model, run_source, batch_sizes=(size,), **check)
    name_output_axes(model, report.follows_batch(), report.varies(), size if plan.mode == "fixed" else None)
    return model, report, plan


def _check_named_shapes(opts: ConvertOptions, imported) -> None:
    """``--input-shape NAME:DIMS`` for an input the model doesn't have would be ignored without a word."""
    known = imported.input_names or []
    unknown = opts.input_shapes.unmatched(known)
    if unknown:
        raise UsageError(f"--input-shape names {', '.join(map(repr, unknown))}, but the model's inputs are "
                         f"{', '.join(sorted(set(known)))}")


def _check_shapes_applied(opts: ConvertOptions, model) -> None:
    """``--input-shape`` the source could not apply (a Keras model's fixed dims stay what they are) would otherwise
    be ignored without a word: the converted input must have the dims asked for wherever it has fixed ones."""
    from .graph.inspect import format_shape, graph_inputs

    inputs = {t.name: t for t in graph_inputs(model)}
    for name, dims in opts.input_shapes.applied_to(list(inputs)):
        t = inputs[name]
        if not t.shape:
            continue
        if len(t.shape) != len(dims) + 1:
            raise UsageError(f"--input-shape {','.join(map(str, dims))}: the model's input {t.name!r} is "
                             f"{format_shape(t.shape)}, {len(t.shape) - 1} dims after the batch; give that many")
        if any(isinstance(have, int) and have != want for have, want in zip(t.shape[1:], dims)):
            raise UsageError(f"--input-shape {','.join(map(str, dims))}: the model's input {t.name!r} is "
                             f"{format_shape(t.shape)} and its source keeps those dims fixed; give only dims the "
                             f"model leaves free, or drop --input-shape")


def _check_labels(card: ModelCard, model) -> None:
    from .graph.inspect import graph_outputs

    if not card.labels:
        return
    classes = [o.shape[-1] for o in graph_outputs(model) if len(o.shape) == 2 and isinstance(o.shape[-1], int)]
    if classes and len(card.labels) not in classes:
        raise UsageError(f"{len(card.labels)} labels given but the model has {classes[0]} classes; "
                         f"the labels file needs one line per class")


def rebuild_source(predictor, *, trust_repo: bool = False, unsafe: bool = False) -> "SourceModel":
    """The model ``predictor`` (a runtime.Predictor) was converted from, rebuilt from its card's source reference
    through its importer, for ``porter bench --against-source``.

    The card is metadata inside a file someone sent: it grants no consent. Rebuilding a ``torchhub:`` source runs
    that repo's ``hubconf.py`` (local or remote), so it needs ``trust_repo``; Keras Lambda layers need ``unsafe``, as
    when converting. The SourceModel's notes say what was loaded."""
    card = predictor.card
    if card is None:
        raise SourceError(f"{predictor.name} has no porter metadata, so porter doesn't know its source model; "
                          f"--against-source needs a model written by porter convert")
    if card.cut is not None or card.training is not None:
        raise SourceError(f"{predictor.name} was fine-tuned by porter (new head on {card.source}); its source "
                          f"computes something else, so --against-source can't compare them")
    from .importers import get_importer
    from .runtime.bench import SourceModel

    if card.in_memory:  # porter.convert(model_object): nothing on disk or on a hub to rebuild it from
        raise SourceError(f"{predictor.name} was converted from an in-memory {card.framework} model "
                          f"({card.source}), which porter can't rebuild; --against-source needs a model converted "
                          f"from a file or a keras:/torchhub:/tfjs: reference")
    try:
        ref = parse_source(card.source)
    except SourceError as e:
        raise SourceError(f"--against-source: the source {card.source!r} recorded in {predictor.name} can't be "
                          f"reached ({e}); put the source model back where it was converted from") from None
    if ref.importer == "onnx":
        raise SourceError(f"the source recorded in {predictor.name} is itself ONNX ({card.source}); nothing to compare")
    if card.source_sha256 is not None and source_digest(ref) not in (None, card.source_sha256):
        raise SourceError(f"--against-source: {ref.location} has changed since {predictor.name} was converted from it "
                          f"(its sha256 differs from the one recorded), so it would be compared with another model; "
                          f"put the original back, or convert the new one")
    if ref.importer == "torchhub" and not trust_repo:
        raise UnsafeModelError(f"{predictor.name}'s metadata names the source {card.source}; rebuilding it runs that "
                               f"repo's hubconf.py, and a model file's metadata is no consent to run code: pass "
                               f"--trust-repo (trust_repo=True) if you trust {card.source}")
    try:
        importer = get_importer(ref.importer)
    except KeyError:
        raise SourceError(f"no importer {ref.importer!r} for the source {card.source!r}") from None
    shapes = {t.name: tuple(d for d in predictor.concrete_shape(t, 1)[1:]) for t in predictor.inputs}
    if len(shapes) == 1:
        shapes[None] = next(iter(shapes.values()))
    weights = card.weights
    kwargs: dict[str, Any] = dict(validate=False, input_shapes=shapes, trust_repo=trust_repo, unsafe=unsafe)
    if weights:
        kwargs["weights"] = weights
    notes: list[str] = [f"source rebuilt from the model's metadata: {card.source}"]
    compare = True
    try:
        imported = importer(ref, ConvertOptions.from_kwargs(**kwargs))
    except NetworkError as e:
        if ref.importer == "keras" and ref.form == "application" and weights != "none":
            kwargs["weights"] = "none"
            imported = importer(ref, ConvertOptions.from_kwargs(**kwargs))
            compare = False
            notes.append(f"source weights unavailable ({e}); timing the same architecture with random weights, "
                         f"outputs not compared")
        else:
            raise
    except PorterError as e:
        raise type(e)(f"--against-source: can't rebuild {card.source}: {e}") from None
    name = f"{imported.framework}"
    return SourceModel(name=name, run=imported.run_source, compare=compare, notes=notes)
