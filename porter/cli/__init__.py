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
from typing import Sequence

from .. import __version__
from ..errors import PorterError
from .args import COMMANDS
from .convert import add_convert_parser, add_inspect_parser
from .export import add_export_parser
from .finetune import add_finetune_parser, finetune_options  # noqa: F401 - tests build finetune options from args
from .quantize import add_quantize_parser
from .run import add_bench_parser, add_predict_parser

# --- main -------------------------------------------------------------------------------------------------------

PARSER_BUILDERS = [add_convert_parser, add_finetune_parser, add_quantize_parser, add_predict_parser, add_bench_parser,
                   add_export_parser, add_inspect_parser]


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line naming the mistake and where help is (not the usage block), in the
    same ``porter: error:`` form as every other error."""

    def error(self, message: str):  # noqa: D102 - argparse's hook
        self.exit(2, f"porter: error: {message} (see {self.prog} --help)\n")


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


def _ray_swallowed_an_input(argv: list[str]) -> str | None:
    """``--ray`` takes an optional ADDRESS, so ``--ray MODEL DATA`` reads MODEL as the address and argparse then
    misses an input: say what happened instead of argparse's "required: data"."""
    if "--ray" not in argv:
        return None
    i = argv.index("--ray")
    if i + 1 < len(argv) and not argv[i + 1].startswith("-"):
        from ..ray.cluster import check_address  # stdlib only: no Ray import

        try:
            check_address(argv[i + 1])
        except PorterError as e:
            return str(e)
    return None


def main(argv: Sequence[str] | None = None) -> int:
    as_program = argv is None  # the porter command itself, not a caller passing arguments in-process
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv  # accepted anywhere on the line, not only before the command
    misplaced = _ray_swallowed_an_input(argv)
    if misplaced:
        print(f"porter: error: {misplaced}", file=sys.stderr)
        return 2
    args = parser.parse_args([a for a in argv if a != "--debug"])
    args.debug = debug
    if not args.command:
        parser.print_help()
        return 2
    from ..logging_setup import quiet_frameworks

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
