"""``porter convert`` and ``porter inspect``."""

from __future__ import annotations

import argparse
from functools import partial

from ..options import ConvertOptions, default
from .args import add_preprocess_args, add_source_args, command, parse_floats, read_labels, source_options


D = partial(default, ConvertOptions)


def add_convert_parser(sub) -> None:
    from ..importers import list_importers

    p = sub.add_parser("convert", help="import a model and write it as validated ONNX",
                       description="Import a model, normalize it to ONNX and prove the ONNX computes what the source "
                                   f"computes. Importers: {', '.join(list_importers())}.")
    p.add_argument("source", help="keras:NAME, keras:PATH, torchhub:OWNER/REPO[:REF]:ENTRY, torchhub:DIR:ENTRY, "
                                  "tfjs:PATH|URL, or a model file (.keras, .h5, SavedModel dir, model.json, .pt)")
    p.add_argument("-o", "--output", required=True, help="the ONNX file to write")
    # None: "not given", so ConvertOptions' own default applies (and is what the help shows)
    p.add_argument("--opset", type=int, default=None, help=f"ONNX opset (default {D('opset')})")
    p.add_argument("--atol", type=float, default=None, help=f"parity absolute tolerance (default {D('atol'):g})")
    p.add_argument("--rtol", type=float, default=None, help=f"parity relative tolerance (default {D('rtol'):g})")
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
    from ..conversion import convert

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
    from ..inspection import inspect_model

    report = inspect_model(args.model, cuts=args.cuts)
    print(report.to_json() if args.json else report.to_text())
    return 0


