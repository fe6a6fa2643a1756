"""What several commands parse the same way: shapes, numbers, labels, hub arguments, preprocessing, the command
registry."""

from __future__ import annotations

import argparse
from typing import Callable, Sequence

from ..errors import UsageError
from ..options import InputShapes
from ..spec import PRESETS

COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {}


def command(name: str):
    def decorate(fn):
        COMMANDS[name] = fn
        return fn

    return decorate


def parse_dims(text: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(p) for p in text.replace("x", ",").split(",") if p.strip())
    except ValueError:
        raise UsageError(f"bad shape {text!r}: expected comma-separated integers such as 224,224,3") from None
    if not dims or any(d <= 0 for d in dims):
        raise UsageError(f"bad shape {text!r}: dimensions must be positive integers")
    return dims


def parse_input_shapes(values: Sequence[str] | None) -> InputShapes:
    """``--input-shape [NAME:]DIMS`` flags (repeatable; a name given twice keeps its last dims)."""
    shapes: dict[str | None, tuple[int, ...]] = {}
    for v in values or ():
        name, sep, dims = v.rpartition(":") if ":" in v else ("", "", v)
        shapes[name or None] = parse_dims(dims)
    return InputShapes.of(shapes)


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


def add_ray_args(p, what: str) -> None:
    p.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                   help=f"{what} (pip install 'porter[ray]'): a local Ray without ADDRESS, auto for the running "
                        f"cluster, or HOST:PORT / ray://HOST:PORT")
    p.add_argument("--actors", type=int, default=None, metavar="N",
                   help="with --ray: model actors (default: one per GPU of the cluster, else one per CPU)")
