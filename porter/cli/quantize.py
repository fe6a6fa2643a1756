"""``porter quantize``."""

from __future__ import annotations

import argparse
import sys

from .args import command


def add_quantize_parser(sub) -> None:
    from ..quantization import DEFAULT_EVAL_SAMPLES, DEFAULT_METHOD, DEFAULT_SAMPLES, METHODS

    p = sub.add_parser("quantize", help="INT8 quantization calibrated on your images, accepted by an accuracy gate",
                       description="Quantize an ONNX model to int8 with ONNX Runtime (QDQ, per-channel int8 weights, "
                                   "uint8 activations), calibrated on images drawn from DATA through the model's own "
                                   "preprocessing. The int8 model is compared with fp32 on other images: past "
                                   "--max-drop the nodes that lose most accuracy stay in float and it is quantized "
                                   "again; if that can't hold the budget, nothing is written. The figures are "
                                   "recorded in the model (porter inspect shows them).")
    p.add_argument("model", help="an fp32 ONNX file (from porter convert or finetune)")
    p.add_argument("--calibrate", required=True, metavar="DATA",
                   help="a folder of representative images (searched recursively; class folders named after the "
                        "model's labels make the gate score accuracy too)")
    p.add_argument("-o", "--output", required=True, help="the int8 ONNX file to write")
    p.add_argument("--samples", type=int, default=DEFAULT_SAMPLES,
                   help=f"calibration images drawn (seeded) from DATA (default {DEFAULT_SAMPLES})")
    p.add_argument("--method", choices=METHODS, default=DEFAULT_METHOD,
                   help=f"how activation ranges are set from calibration (default {DEFAULT_METHOD}, measured best "
                        f"on real images)")
    p.add_argument("--eval", metavar="DIR", help="gate on these images instead of DATA's images not drawn for calibration")
    p.add_argument("--eval-samples", type=int, default=DEFAULT_EVAL_SAMPLES,
                   help=f"held-out images the gate uses at most (default {DEFAULT_EVAL_SAMPLES})")
    p.add_argument("--max-drop", type=float, default=1.0,
                   help="classifiers: points of top-1 agreement with fp32 int8 may lose (default 1)")
    p.add_argument("--max-error", type=float, default=0.1,
                   help="other models: relative RMS output error int8 may have (default 0.1)")
    p.add_argument("--exclude", action="append", metavar="NODE", default=[],
                   help="an ONNX node name to keep in float from the start (repeatable)")
    p.add_argument("--seed", type=int, default=0, help="seed for drawing the images (default 0)")
    p.add_argument("--quiet", action="store_true", help="no per-round lines")
    p.add_argument("--force", action="store_true", help="overwrite the output if it exists")


@command("quantize")
def run_quantize(args: argparse.Namespace) -> int:
    from ..quantization.api import quantize

    result = quantize(args.model, args.calibrate, args.output, samples=args.samples, method=args.method,
                      max_drop=args.max_drop, max_error=args.max_error, eval=args.eval,
                      eval_samples=args.eval_samples, exclude=args.exclude, seed=args.seed, force=args.force,
                      log=None if args.quiet else (lambda line: print(f"porter: {line}", file=sys.stderr, flush=True)))
    print(result.summary())
    return 0


