"""The porter command line: parse arguments, build one options object, call the public API, print.

No logic lives here that the Python API lacks. Errors: a PorterError prints one line to stderr and exits
non-zero; ``--debug`` shows the traceback. This module must not import TensorFlow or torch at start-up.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
from typing import Callable, Sequence

from . import __version__
from .errors import PorterError, UsageError
from .options import DEVICES
from .spec import PRESETS

COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {}


def command(name: str):
    def decorate(fn):
        COMMANDS[name] = fn
        return fn

    return decorate


# --- shared argument parsing ----------------------------------------------------------------------------------

def parse_dims(text: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(p) for p in text.replace("x", ",").split(",") if p.strip())
    except ValueError:
        raise UsageError(f"bad shape {text!r}: expected comma-separated integers such as 224,224,3") from None
    if not dims or any(d <= 0 for d in dims):
        raise UsageError(f"bad shape {text!r}: dimensions must be positive integers")
    return dims


def parse_input_shapes(values: Sequence[str] | None) -> dict[str | None, tuple[int, ...]]:
    shapes: dict[str | None, tuple[int, ...]] = {}
    for v in values or ():
        name, sep, dims = v.rpartition(":") if ":" in v else ("", "", v)
        shapes[name or None] = parse_dims(dims)
    return shapes


def parse_floats(text: str | None, what: str) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(float(p) for p in text.split(",") if p.strip())
    except ValueError:
        raise UsageError(f"bad --{what} {text!r}: expected comma-separated numbers such as 0.5,0.5,0.5") from None


def parse_hub_args(values: Sequence[str] | None) -> dict:
    import ast

    out = {}
    for v in values or ():
        name, sep, literal = v.partition("=")
        if not sep or not name.isidentifier():
            raise UsageError(f"bad --hub-arg {v!r}: expected name=value, e.g. pretrained=False")
        try:
            out[name] = ast.literal_eval(literal)
        except (ValueError, SyntaxError):
            raise UsageError(f"bad --hub-arg {v!r}: {literal!r} is not a Python literal "
                             f"(quote strings: {name}=\"'text'\"; use True/False/None, numbers, lists)") from None
    return out


def read_labels(path: str | None) -> tuple[str, ...] | None:
    if path is None:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            labels = tuple(line.strip() for line in f if line.strip())
    except OSError as e:
        raise UsageError(f"can't read labels file {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise UsageError(f"labels file {path} is not UTF-8 text; give a text file with one class name per line") from None
    if not labels:
        raise UsageError(f"labels file {path} is empty; put one class name per line")
    return labels


def add_preprocess_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preprocess", choices=list(PRESETS),
                   help="input normalization: raw 0..255, unit [0,1], tf [-1,1], torch ImageNet mean/std, caffe BGR mean subtraction")
    p.add_argument("--mean", help="per-channel mean override, e.g. 0.5,0.5,0.5")
    p.add_argument("--std", help="per-channel std override, e.g. 0.5,0.5,0.5")


def add_source_args(p) -> None:
    """Arguments that say how to import a non-ONNX source (shared by convert and finetune)."""
    p.add_argument("--input-shape", action="append", metavar="[NAME:]DIMS",
                   help="concrete dims without the batch axis for inputs with unknown dims, e.g. 224,224,3 (repeatable)")
    p.add_argument("--weights", help="keras.applications weights: imagenet (default), none, or a weights file")
    p.add_argument("--unsafe", action="store_true", help="allow Keras deserialization that runs code (Lambda layers)")
    p.add_argument("--hub-arg", action="append", metavar="NAME=VALUE", help="keyword argument for a hub entry point (repeatable)")
    p.add_argument("--trust-repo", action="store_true", help="allow running a remote hub repo's code")


def source_options(args: argparse.Namespace) -> dict:
    opts: dict = {}
    if args.input_shape:
        opts["input_shapes"] = parse_input_shapes(args.input_shape)
    if args.hub_arg:
        opts["hub_args"] = parse_hub_args(args.hub_arg)
    if args.weights is not None:
        opts["weights"] = args.weights
    if args.unsafe:
        opts["unsafe"] = True
    if args.trust_repo:
        opts["trust_repo"] = True
    return opts


# --- convert ----------------------------------------------------------------------------------------------------

def add_convert_parser(sub) -> None:
    from .importers import list_importers

    p = sub.add_parser("convert", help="import a model and write it as validated ONNX",
                       description="Import a model, normalize it to ONNX and prove the ONNX computes what the source "
                                   f"computes. Importers: {', '.join(list_importers())}.")
    p.add_argument("source", help="keras:NAME, keras:PATH, torchhub:OWNER/REPO[:REF]:ENTRY, torchhub:DIR:ENTRY, "
                                  "tfjs:PATH|URL, or a model file (.keras, .h5, SavedModel dir, model.json, .pt)")
    p.add_argument("-o", "--output", required=True, help="the ONNX file to write")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default 17)")
    p.add_argument("--atol", type=float, default=None, help="parity absolute tolerance (default 1e-4)")
    p.add_argument("--rtol", type=float, default=None, help="parity relative tolerance (default 1e-3)")
    p.add_argument("--no-validate", action="store_true", help="skip the parity check against the source model")
    add_source_args(p)
    p.add_argument("--labels", help="a text file with one class name per line")
    add_preprocess_args(p)
    p.add_argument("--force", action="store_true", help="overwrite the output if it exists")


def convert_options(args: argparse.Namespace) -> dict:
    opts = dict(force=args.force, validate=not args.no_validate, **source_options(args))
    for name in ("opset", "atol", "rtol", "preprocess"):
        if getattr(args, name) is not None:
            opts[name] = getattr(args, name)
    if args.mean is not None:
        opts["mean"] = parse_floats(args.mean, "mean")
    if args.std is not None:
        opts["std"] = parse_floats(args.std, "std")
    if args.labels is not None:
        opts["labels"] = read_labels(args.labels)
    return opts


@command("convert")
def run_convert(args: argparse.Namespace) -> int:
    from .conversion import convert

    result = convert(args.source, args.output, **convert_options(args))
    print(result.summary())
    return 0


# --- inspect ----------------------------------------------------------------------------------------------------

def add_inspect_parser(sub) -> None:
    p = sub.add_parser("inspect", help="show an ONNX model's inputs, outputs, opset, metadata and size")
    p.add_argument("model", help="an ONNX file")
    p.add_argument("--cuts", action="store_true", help="list the tensors a new head can be attached to")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")


@command("inspect")
def run_inspect(args: argparse.Namespace) -> int:
    from .inspection import inspect_model

    report = inspect_model(args.model, cuts=args.cuts)
    print(report.to_json() if args.json else report.to_text())
    return 0


# --- finetune ---------------------------------------------------------------------------------------------------

def add_finetune_parser(sub) -> None:
    p = sub.add_parser("finetune", help="train a new classifier head on your data; write backbone + head as one ONNX",
                       description="Cut the model's whole classifier head off at the pooled backbone (or a better "
                                   "candidate cut chosen on validation), compute backbone features once (cached), "
                                   "solve a new linear head to its optimum (L2 strength chosen on validation) or train "
                                   "an MLP head, and write backbone + head as one ONNX file "
                                   "with labels and preprocessing, plus a report (NAME.metrics.json, "
                                   "NAME.training.png, NAME.confusion.png) beside it.")
    p.add_argument("source", help="an ONNX file, or any source porter converts (keras:..., torchhub:..., tfjs:..., a path)")
    p.add_argument("data", help="an image folder with one subfolder per class, a CSV file with a label column, or a "
                                "CSV / JSON Lines table with one column per task (--task)")
    p.add_argument("-o", "--output", required=True, help="the ONNX file to write")
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=100, help="AdamW: upper bound; early stopping on validation loss decides (default 100)")
    g.add_argument("--patience", type=int, default=20, help="AdamW: epochs without a better validation loss before stopping (default 20)")
    g.add_argument("--batch-size", type=int, default=32, help="AdamW: head training batch size (default 32)")
    g.add_argument("--lr", type=float, default=None,
                   help="train with AdamW at this learning rate (halved on plateaus). Default: the linear head is "
                        "solved by L-BFGS; the mlp head's lr is chosen on validation from 0.001, 0.003")
    g.add_argument("--weight-decay", type=float, default=None,
                   help="linear probe: the L2 strength; AdamW: its weight decay. Default: chosen on validation")
    g.add_argument("--head", choices=["linear", "mlp"], default="linear", help="head architecture (default linear)")
    g.add_argument("--hidden", type=int, default=256, help="mlp hidden units (default 256)")
    g.add_argument("--dropout", type=float, default=None, help="dropout (default 0 for linear, 0.2 for mlp)")
    g.add_argument("--val-split", type=float, default=0.2, help="stratified validation fraction (default 0.2)")
    g.add_argument("--balance", action="store_true", help="weight classes by inverse frequency (imbalanced data)")
    g.add_argument("--seed", type=int, default=0, help="seed for the split, init and shuffling (default 0)")
    g = p.add_argument_group("partial fine-tuning and augmentation")
    g.add_argument("--unfreeze", type=int, default=0, metavar="N",
                   help="after the head, train it together with the last N weight-carrying layers (Conv, Gemm, "
                        "MatMul) before the cut, normalization frozen; their weights are written back into the "
                        "model's own initializers (default 0: the head only)")
    g.add_argument("--train-from", metavar="TENSOR",
                   help="instead of --unfreeze: train every layer from this tensor to the cut")
    g.add_argument("--finetune-lr", type=float, default=None,
                   help="AdamW learning rate of that phase (default 0.0001, or --lr / 10)")
    g.add_argument("--finetune-epochs", type=int, default=30,
                   help="upper bound of that phase; early stopping on validation loss decides (default 30)")
    g.add_argument("--train-precision", choices=["auto", "fp32", "bf16"], default="auto",
                   help="the tail's training steps: bf16 autocast where the CPU has AMX or AVX512-BF16 (auto), "
                        "or always fp32 / bf16; weights and checks stay fp32")
    g.add_argument("--augment", metavar="OPS",
                   help="comma-separated augmentations of the training images: flip, crop, rotate, color; their "
                        "features are computed once with the rest (validation stays unaugmented)")
    g.add_argument("--views", type=int, default=None, help="augmented views per training image (default 2)")
    g.add_argument("--memory-budget", metavar="SIZE",
                   help="features kept in memory up to this size (e.g. 2G); beyond it they stream from a "
                        "memory-mapped file (default: a quarter of the available memory)")
    g = p.add_argument_group("several tasks (DATA is a CSV or JSON Lines table, one column per task)")
    g.add_argument("--task", action="append", metavar="NAME[:TYPE]", dest="tasks",
                   help="a target column, TYPE classification or regression (default: inferred from the column); "
                        "repeat for each task. Default for a table with an image-path column: every other column")
    g.add_argument("--path-column", default="path", help="the table's column of image paths (default path)")
    g.add_argument("--shared-hidden", type=int, default=None, metavar="N",
                   help="a shared trainable layer of N units before the task heads, all trained jointly (AdamW, "
                        "early stopping on the weighted sum of validation losses); default: each head solved alone")
    g.add_argument("--task-weight", action="append", metavar="NAME=W", dest="task_weights",
                   help="weight of a task's loss with --shared-hidden (default: 1 / its initial loss)")
    g = p.add_argument_group("model and data")
    g.add_argument("--cut", metavar="MODE|TENSOR",
                   help="auto (default: search the candidate cuts while their features take at most 2x the "
                        "backbone's, pick the lowest validation loss), backbone (the pooled backbone only), search "
                        "(every candidate), or a tensor name (pooled if spatial); porter inspect MODEL --cuts lists them")
    g.add_argument("--image-size", metavar="H,W", help="image size for backbones without a fixed input size")
    add_preprocess_args(g)
    g.add_argument("--label-column", default="label", help="CSV label column (default label)")
    g.add_argument("--device", choices=DEVICES, default="auto",
                   help="where the backbone runs (default auto: CUDA if it works, else CPU)")
    g.add_argument("--feature-batch-size", type=int, default=64, help="images per backbone batch (default 64)")
    g.add_argument("--workers", type=int, default=None, help="image decoding threads (default: CPUs, at most 8)")
    g.add_argument("--no-cache", action="store_true", help="recompute backbone features; don't store them")
    g.add_argument("--quiet", action="store_true", help="no progress bar or per-epoch lines")
    g.add_argument("--force", action="store_true", help="overwrite the output and its report")
    add_source_args(p.add_argument_group("converting a non-ONNX source"))


def finetune_options(args: argparse.Namespace) -> dict:
    opts = dict(epochs=args.epochs, patience=args.patience, batch_size=args.batch_size, lr=args.lr,
                weight_decay=args.weight_decay, head=args.head, hidden=args.hidden, dropout=args.dropout,
                val_split=args.val_split, balance=args.balance, seed=args.seed, cut=args.cut,
                preprocess=args.preprocess, mean=parse_floats(args.mean, "mean"), std=parse_floats(args.std, "std"),
                label_column=args.label_column, device=args.device, feature_batch_size=args.feature_batch_size,
                workers=args.workers, cache=not args.no_cache, progress=not args.quiet, force=args.force,
                unfreeze=args.unfreeze, train_from=args.train_from, finetune_lr=args.finetune_lr,
                finetune_epochs=args.finetune_epochs, train_precision=args.train_precision, views=args.views,
                tasks=tuple(args.tasks or ()), path_column=args.path_column, shared_hidden=args.shared_hidden,
                task_weights=tuple(args.task_weights) if args.task_weights else None)
    if args.augment is not None:
        opts["augment"] = args.augment
    if args.memory_budget is not None:
        opts["memory_budget"] = args.memory_budget
    if args.image_size is not None:
        opts["image_size"] = parse_dims(args.image_size)
    opts["convert_options"] = source_options(args)
    return opts


@command("finetune")
def run_finetune(args: argparse.Namespace) -> int:
    from .transfer.api import finetune

    result = finetune(args.source, args.data, args.output, **finetune_options(args))
    print(result.summary())
    return 0


# --- predict and bench ------------------------------------------------------------------------------------------

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
    p.add_argument("--fp16", action="store_true", help="run in half precision (GPU), checked against fp32 first")
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


def add_bench_parser(sub) -> None:
    p = sub.add_parser("bench", help="measure latency and throughput with ONNX Runtime",
                       description="Warm up, then time the model per batch size: p50/p95 latency and throughput. "
                                   "--against-source also runs the original framework model on the same inputs.")
    p.add_argument("model", help="an ONNX file")
    p.add_argument("--batch-sizes", default="1,8,32", help="comma-separated batch sizes (default 1,8,32)")
    p.add_argument("--device", choices=DEVICES, default="auto", help="where to run (default auto)")
    p.add_argument("--fp16", action="store_true", help="run in half precision (GPU), checked against fp32 first")
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
    from .imaging import list_images
    from .runtime import load
    from .runtime.formatting import PredictionWriter

    if args.top_k < 1:
        raise UsageError(f"--top-k must be at least 1, got {args.top_k}")
    paths = list_images(args.inputs)
    # decoding threads share the CPU with inference: ORT's idle workers should sleep, not spin
    predictor = load(args.model, device=args.device, fp16=args.fp16, batch_size=args.batch_size,
                     preprocess=args.preprocess, spin=False, decode_workers=args.decode_workers,
                     fast_decode=args.fast_decode, streams=args.streams)
    predictor.image_spec()  # a model that can't take images fails here, before any output
    print(f"porter: {predictor.describe()}", file=sys.stderr)
    for note in predictor.notes:
        print(f"porter: {note}", file=sys.stderr)
    writer = PredictionWriter(sys.stdout, args.format, top_k=args.top_k, classifier=predictor.is_classifier,
                              tasks=predictor.tasks,
                              path_width=max(len(str(p)) for p in paths))
    failed = 0
    for prediction in predictor.iter_predictions([str(p) for p in paths], top_k=args.top_k, errors="report"):
        failed += prediction.error is not None
        writer.write(prediction)
    writer.close()
    stats = predictor.last_stats
    print(f"porter: {stats.describe()}", file=sys.stderr)
    if stats.seconds >= 2 and stats.first_batch_seconds + stats.decode_wait_seconds > 0.25 * stats.seconds:
        tips = ([f"more --decode-workers (now {predictor.decode_workers})"]
                if predictor.decode_workers < (os.cpu_count() or 1) else [])
        tips += [] if args.fast_decode else ["--fast-decode for large JPEGs"]
        if tips:
            print(f"porter: decoding is the bottleneck; try {' or '.join(tips)}", file=sys.stderr)
    if failed:
        print(f"porter: error: {failed} of {len(paths)} inputs failed; see their error fields", file=sys.stderr)
        return 1
    return 0


@command("bench")
def run_bench(args: argparse.Namespace) -> int:
    from .runtime import load
    import json

    from .runtime.bench import bench, parse_batch_sizes

    sizes = parse_batch_sizes(args.batch_sizes)
    predictor = load(args.model, device=args.device, fp16=args.fp16, batch_size=max(sizes))
    source = None
    if args.against_source:
        from .conversion import rebuild_source

        source = lambda: rebuild_source(predictor, trust_repo=args.trust_repo, unsafe=args.unsafe)  # noqa: E731
    report = bench(predictor, sizes, warmup=args.warmup, min_seconds=args.seconds, source=source,
                   streams=args.streams)
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.to_table())
    return 0


# --- main -------------------------------------------------------------------------------------------------------

PARSER_BUILDERS = [add_convert_parser, add_finetune_parser, add_predict_parser, add_bench_parser, add_inspect_parser]


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line naming the mistake and where help is (not the usage block)."""

    def error(self, message: str):  # noqa: D102 - argparse's hook
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="porter",
        description="Port pretrained models (Keras, PyTorch Hub, TF.js) to ONNX with proven parity, fine-tune a new "
                    "head on your data, and run them fast with ONNX Runtime.")
    parser.add_argument("--version", action="version", version=f"porter {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and framework logs (anywhere on the line)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for build in PARSER_BUILDERS:
        build(sub)
    return parser


def _interrupted(e: BaseException | None) -> bool:
    """A Ctrl-C, also when it surfaced as another error (onnxruntime's ImportError "initialization failed" when the
    interrupt lands inside its import)."""
    seen = 0
    while e is not None and seen < 10:
        if isinstance(e, KeyboardInterrupt):
            return True
        e, seen = e.__cause__ or e.__context__, seen + 1
    return False


def main(argv: Sequence[str] | None = None) -> int:
    as_program = argv is None  # the porter command itself, not a caller passing arguments in-process
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv  # accepted anywhere on the line, not only before the command
    args = parser.parse_args([a for a in argv if a != "--debug"])
    args.debug = debug
    if not args.command:
        parser.print_help()
        return 2
    from .logging_setup import quiet_frameworks

    quiet_frameworks(debug=args.debug)
    try:
        rc = COMMANDS[args.command](args)
        if as_program:  # done and written: a Ctrl-C now must not kill the exit half-way (as SIGINT's default would)
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        return rc
    except PorterError as e:
        if args.debug:
            raise
        print(f"porter: error: {e}", file=sys.stderr)
        return e.exit_code
    except BrokenPipeError:  # output piped into `head` and the like, which stopped reading: stop quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so that flushing stdout at exit doesn't raise again
        return 141  # what a shell reports for a process ended by SIGPIPE
    except BaseException as e:
        if not _interrupted(e):
            raise
        # outputs are atomic and their temporary files are gone by now (finally blocks ran on the way up); leave at
        # once, without waiting on background threads (imports, decoders) or running the interpreter's finalization
        print("porter: interrupted", file=sys.stderr)
        sys.stderr.flush()
        with contextlib.suppress(Exception):
            sys.stdout.flush()
        os._exit(130)
