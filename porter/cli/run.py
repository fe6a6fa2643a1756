"""``porter predict`` and ``porter bench``: running a model."""

from __future__ import annotations

import argparse
import os
import sys

from ..errors import UsageError
from ..options import DEVICES, PRECISIONS
from ..spec import PRESETS
from .args import add_ray_args, command


def add_predict_parser(sub) -> None:
    p = sub.add_parser("predict", help="classify images (or run any image model) with ONNX Runtime",
                       description="Run an ONNX model on image files and directories (recursive), preprocessing them "
                                   "as the model's porter metadata says. Decoding runs in parallel with inference; a "
                                   "file that can't be read (or that the model fails on) is reported on its own line "
                                   "and the exit code is non-zero.")
    p.add_argument("model", help="an ONNX file (from porter convert or finetune)")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files or directories")
    p.add_argument("--top-k", type=int, default=5, help="classes to report per image (default 5)")
    p.add_argument("--format", choices=["table", "csv", "json"], default="table", help="output format (default table)")
    p.add_argument("--device", choices=DEVICES, default="auto", help="where to run (default auto: CUDA if it works, else CPU)")
    p.add_argument("--batch-size", type=int, default=None, help="images per batch (default 32)")
    add_precision_args(p)
    p.add_argument("--preprocess", choices=list(PRESETS),
                   help="normalization for a model without porter metadata (overrides the metadata)")
    p.add_argument("--fast-decode", action="store_true",
                   help="decode JPEGs much larger than the model's input at 1/2, 1/4 or 1/8 scale (2-3x faster on "
                        "camera photos; pixels within a level or two of exact decoding)")
    p.add_argument("--decode-workers", type=int, default=None, metavar="N",
                   help="image-decoding threads (default: one per CPU, 2 to 8)")
    p.add_argument("--streams", type=int, default=None, metavar="N",
                   help="CPU: concurrent inference streams, each with its share of the cores, for runs of 4+ "
                        "batches per stream (default: one per core, up to 4; 1 runs each batch on all cores)")
    p.add_argument("-o", "--output", metavar="FILE",
                   help="write the predictions to FILE instead of stdout: .parquet (columns path, label, "
                        "class_index, score, top_k, outputs, error), .csv or .json; written whole or not at all")
    p.add_argument("--force", action="store_true", help="overwrite --output if it exists")
    add_ray_args(p, "run the images through a pool of model actors on Ray Data")


OUTPUT_FORMATS = {".parquet": "parquet", ".csv": "csv", ".json": "json"}


def add_precision_args(p) -> None:
    p.add_argument("--precision", choices=PRECISIONS, default=None,
                   help="fp32 (default), fp16 (GPU), bf16 (--device openvino), int8 (a model porter quantize wrote; "
                        "the default for one); anything but fp32 is checked against fp32 before use. Default on "
                        "openvino: its own (bf16 on CPUs with AMX)")
    p.add_argument("--fp16", action="store_true", help="the same as --precision fp16")


def add_bench_parser(sub) -> None:
    p = sub.add_parser("bench", help="measure latency and throughput with ONNX Runtime",
                       description="Warm up, then time the model per batch size: p50/p95 latency and throughput. "
                                   "--against-source also runs the original framework model on the same inputs.")
    p.add_argument("model", help="an ONNX file")
    p.add_argument("--batch-sizes", default="1,8,32", help="comma-separated batch sizes (default 1,8,32)")
    p.add_argument("--device", choices=[*DEVICES, "all"], default="auto",
                   help="where to run (default auto); all: every engine and precision this machine has, side by side "
                        "(speed-up and top-1 agreement vs onnxruntime CPU fp32)")
    add_precision_args(p)
    p.add_argument("--with", action="append", dest="with_models", metavar="MODEL", default=[],
                   help="with --device all: another model to time beside it, e.g. the int8 file porter quantize "
                        "wrote (repeatable)")
    p.add_argument("--images", metavar="DIR",
                   help="with --device all: measure agreement on these images instead of synthetic inputs")
    p.add_argument("--against-source", action="store_true",
                   help="also time the source model (rebuilt from the metadata's source reference) and print ratios")
    p.add_argument("--trust-repo", action="store_true",
                   help="with --against-source: allow rebuilding a torchhub source (it runs the repo's hubconf.py)")
    p.add_argument("--unsafe", action="store_true",
                   help="with --against-source: allow Keras Lambda layers in the source (they run code from the file)")
    p.add_argument("--seconds", type=float, default=1.0, help="minimum timed seconds per batch size (default 1)")
    p.add_argument("--warmup", type=int, default=3, help="untimed runs before timing (default 3)")
    p.add_argument("--streams", type=int, default=1, metavar="N",
                   help="CPU: time N concurrent streams sharing the cores, as porter predict runs long jobs "
                        "(throughput = the streams' rates added up; default 1)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


@command("predict")
def run_predict(args: argparse.Namespace) -> int:
    from ..imaging import list_images

    if args.top_k < 1:
        raise UsageError(f"--top-k must be at least 1, got {args.top_k}")
    fmt = _output_format(args)
    if args.ray is None:
        if args.actors is not None:
            raise UsageError("--actors sizes the Ray actor pool: give it with --ray")
        paths = list_images(args.inputs)
        return _predict_here(args, [str(p) for p in paths], fmt)
    if args.streams is not None:
        raise UsageError("--streams is for a run on this machine; on Ray each actor is one stream (size the pool "
                         "with --actors)")
    if args.actors is not None and args.actors < 1:
        raise UsageError(f"--actors must be a positive integer, got {args.actors}")
    return _predict_on_ray(args, fmt)


def _output_format(args: argparse.Namespace) -> str:
    if args.output is None:
        if args.force:
            raise UsageError("--force overwrites --output: give --output FILE too")
        return args.format
    from pathlib import Path

    from ..outputs import check_output

    fmt = OUTPUT_FORMATS.get(Path(args.output).suffix.lower())
    if fmt is None:
        raise UsageError(f"--output {args.output}: name a .parquet, .csv or .json file")
    check_output(args.output, args.force)  # before any work
    if fmt == "parquet":
        try:
            import pyarrow.parquet  # noqa: F401
        except ImportError:
            from ..errors import RuntimeSetupError

            raise RuntimeSetupError(f"--output {args.output}: writing Parquet needs pyarrow; pip install pyarrow "
                                    f"(porter[ray] has it), or name a .csv or .json file") from None
    return fmt


def _predict_here(args: argparse.Namespace, paths: list[str], fmt: str) -> int:
    from ..runtime import load

    # decoding threads share the CPU with inference: ORT's idle workers should sleep, not spin
    predictor = load(args.model, device=args.device, fp16=args.fp16, precision=args.precision,
                     batch_size=args.batch_size,
                     preprocess=args.preprocess, spin=False, decode_workers=args.decode_workers,
                     fast_decode=args.fast_decode, streams=args.streams)
    predictor.image_spec()  # a model that can't take images fails here, before any output
    print(f"porter: {predictor.describe()}", file=sys.stderr)
    for note in predictor.notes:
        print(f"porter: {note}", file=sys.stderr)
    predictions = predictor.iter_predictions(paths, top_k=args.top_k, errors="report")
    failed = _write_predictions(args, fmt, predictions, predictor.is_classifier, predictor.tasks, paths)
    stats = predictor.last_stats
    print(f"porter: {stats.describe()}", file=sys.stderr)
    tip = decoding_tip(stats, predictor.decode_workers, args.fast_decode, paths)
    if tip:
        print(f"porter: {tip}", file=sys.stderr)
    return _failures(failed, len(paths))


def decoding_tip(stats, decode_workers: int, fast_decode: bool, paths: list[str]) -> str | None:
    """What to try when decoding held inference up for over a quarter of a run of 2 s or more: more decoding
    workers while the CPU has cores for them; --fast-decode only where there are JPEGs (it does nothing else)."""
    if stats.seconds < 2 or stats.first_batch_seconds + stats.decode_wait_seconds <= 0.25 * stats.seconds:
        return None
    tips = [f"more --decode-workers (now {decode_workers})"] if decode_workers < (os.cpu_count() or 1) else []
    if not fast_decode and any(str(p).lower().endswith((".jpg", ".jpeg")) for p in paths):
        tips.append("--fast-decode for large JPEGs")
    return f"decoding is the bottleneck; try {' or '.join(tips)}" if tips else None


def _predict_on_ray(args: argparse.Namespace, fmt: str) -> int:
    import time

    from ..ray import session
    from ..ray.cluster import check_address
    from ..ray.jobs import plan_predict

    check_address(args.ray)  # a bad address is a usage error before Ray starts
    if args.fp16:
        args.precision = "fp16"
    with session(args.ray):
        start = time.perf_counter()
        run = plan_predict(args.model, args.inputs, top_k=args.top_k, device=args.device, actors=args.actors,
                           batch_size=args.batch_size, preprocess=args.preprocess, precision=args.precision,
                           fast_decode=args.fast_decode)
        print(f"porter: {run.describe()}", file=sys.stderr)
        first: list[float] = []

        def timed(predictions):
            for p in predictions:
                if not first:
                    first.append(time.perf_counter() - start)
                yield p

        sig = run.signature
        failed = _write_predictions(args, fmt, timed(run), sig.score_output is not None, sig.tasks, None)
        seconds = time.perf_counter() - start
    n = run.inputs or 0
    print(f"porter: {n} images in {seconds:.2f} s on Ray ({n / seconds:,.1f} img/s, first result after "
          f"{first[0] if first else seconds:.2f} s)", file=sys.stderr)
    return _failures(failed, n)


def _write_predictions(args: argparse.Namespace, fmt: str, predictions, classifier: bool, tasks,
                       paths: list[str] | None) -> int:
    """Stream ``predictions`` to stdout or to --output (atomically); returns how many failed."""
    import contextlib

    from ..outputs import atomic_path
    from ..runtime.formatting import PredictionWriter

    failed = 0
    if fmt == "parquet":
        from ..runtime.records import ParquetPredictions

        sink = ParquetPredictions(args.output, force=args.force)
        try:
            for row, p in enumerate(predictions):
                failed += p.error is not None
                sink.write(p, row)
        except BaseException:
            sink.abort()
            raise
        sink.close()
        return failed
    width = max((len(p) for p in paths), default=40) if paths else 60
    with contextlib.ExitStack() as stack:
        if args.output is not None:
            out = stack.enter_context(open(stack.enter_context(atomic_path(args.output, args.force)), "w",
                                           encoding="utf-8", newline=""))
        else:
            out = sys.stdout
        writer = PredictionWriter(out, fmt, top_k=args.top_k, classifier=classifier, tasks=tasks, path_width=width)
        for p in predictions:
            failed += p.error is not None
            writer.write(p)
        writer.close()
    return failed


def _failures(failed: int, total: int) -> int:
    if failed:
        print(f"porter: error: {failed} of {total} inputs failed; see their error fields", file=sys.stderr)
        return 1
    return 0


@command("bench")
def run_bench(args: argparse.Namespace) -> int:
    from ..runtime import load
    import json

    from ..runtime.bench import bench, parse_batch_sizes

    sizes = parse_batch_sizes(args.batch_sizes)
    if args.device == "all":
        return _bench_all(args, sizes)
    if args.with_models or args.images:
        raise UsageError("--with and --images compare engines: use them with --device all")
    predictor = load(args.model, device=args.device, fp16=args.fp16, precision=args.precision,
                     batch_size=max(sizes))
    source = None
    if args.against_source:
        from ..conversion import rebuild_source

        source = lambda: rebuild_source(predictor, trust_repo=args.trust_repo, unsafe=args.unsafe)  # noqa: E731
    report = bench(predictor, sizes, warmup=args.warmup, min_seconds=args.seconds, source=source,
                   streams=args.streams)
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.to_table())
    return 0




def _bench_all(args: argparse.Namespace, sizes) -> int:
    import json

    from ..runtime.compare import compare

    if args.against_source or args.streams != 1 or args.fp16 or args.precision:
        raise UsageError("--device all times every engine and precision itself; drop --against-source, --streams, "
                         "--fp16 and --precision")
    images = None
    if args.images:
        from ..imaging import list_images

        images = [str(p) for p in list_images([args.images])][:256]
    report = compare([args.model, *args.with_models], sizes, warmup=args.warmup, min_seconds=args.seconds,
                     images=images)
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.to_table())
    return 0
