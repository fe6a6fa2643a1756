"""``porter finetune``."""

from __future__ import annotations

import argparse
import sys
from functools import partial

from ..options import DEVICES, default
from ..transfer.options import HEADS, FinetuneOptions
from .args import add_preprocess_args, add_ray_args, add_source_args, command, parse_dims, parse_floats, source_options


D = partial(default, FinetuneOptions)  # every flag's default is FinetuneOptions' (the API's)


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
    g.add_argument("--epochs", type=int, default=D("epochs"), help=f"AdamW: upper bound; early stopping on validation loss decides (default {D('epochs')})")
    g.add_argument("--patience", type=int, default=D("patience"), help=f"AdamW: epochs without a better validation loss before stopping (default {D('patience')})")
    g.add_argument("--batch-size", type=int, default=D("batch_size"), help=f"AdamW: head training batch size (default {D('batch_size')})")
    g.add_argument("--lr", type=float, default=None,
                   help="train with AdamW at this learning rate (halved on plateaus). Default: the linear head is "
                        "solved by L-BFGS; the mlp head's lr is chosen on validation from 0.001, 0.003")
    g.add_argument("--weight-decay", type=float, default=None,
                   help="linear probe: the L2 strength; AdamW: its weight decay. Default: chosen on validation")
    g.add_argument("--head", choices=HEADS, default=D("head"), help=f"head architecture (default {D('head')})")
    g.add_argument("--hidden", type=int, default=D("hidden"), help=f"mlp hidden units (default {D('hidden')})")
    g.add_argument("--dropout", type=float, default=None, help="dropout (default 0 for linear, 0.2 for mlp)")
    g.add_argument("--val-split", type=float, default=D("val_split"), help=f"stratified validation fraction (default {D('val_split')})")
    g.add_argument("--balance", action="store_true", help="weight classes by inverse frequency (imbalanced data)")
    g.add_argument("--seed", type=int, default=D("seed"), help=f"seed for the split, init and shuffling (default {D('seed')})")
    g = p.add_argument_group("partial fine-tuning and augmentation")
    g.add_argument("--unfreeze", type=int, default=D("unfreeze"), metavar="N",
                   help="after the head, train it together with the last N weight-carrying layers (Conv, Gemm, "
                        "MatMul) before the cut, normalization frozen; their weights are written back into the "
                        f"model's own initializers (default {D('unfreeze')}: the head only)")
    g.add_argument("--train-from", metavar="TENSOR",
                   help="instead of --unfreeze: train every layer from this tensor to the cut")
    g.add_argument("--finetune-lr", type=float, default=None,
                   help="AdamW learning rate of that phase (default 0.0001, or --lr / 10)")
    g.add_argument("--finetune-epochs", type=int, default=D("finetune_epochs"),
                   help=f"upper bound of that phase; early stopping on validation loss decides (default {D('finetune_epochs')})")
    g.add_argument("--train-precision", choices=["auto", "fp32", "bf16"], default=D("train_precision"),
                   help="the tail's training steps: bf16 autocast where the CPU has AMX or AVX512-BF16 (auto), "
                        "or always fp32 / bf16; weights and checks stay fp32")
    g.add_argument("--augment", metavar="OPS",
                   help="comma-separated augmentations of the training images: flip, crop, rotate, color; their "
                        "features are computed once with the rest (validation stays unaugmented)")
    g.add_argument("--views", type=int, default=None, help="augmented views per training image (default 2)")
    g.add_argument("--memory-budget", metavar="SIZE",
                   help="features kept in memory up to this size (e.g. 2G); beyond it they stream from a "
                        "memory-mapped file (default: a quarter of the available memory)")
    g = p.add_argument_group("int8")
    g.add_argument("--int8", action="store_true",
                   help="also write NAME.int8.onnx: quantized as porter quantize does, calibrated on the training "
                        "split, kept only if its top-1 agreement with fp32 on the validation split holds --max-drop")
    g.add_argument("--max-drop", type=float, default=D("max_drop"),
                   help=f"with --int8: points of top-1 agreement with fp32 it may lose (default {D('max_drop')})")
    g = p.add_argument_group("several tasks (DATA is a CSV or JSON Lines table, one column per task)")
    g.add_argument("--task", action="append", metavar="NAME[:TYPE]", dest="tasks",
                   help="a target column, TYPE classification or regression (default: inferred from the column); "
                        "repeat for each task. Default for a table with an image-path column: every other column")
    g.add_argument("--path-column", default=D("path_column"), help=f"the table's column of image paths (default {D('path_column')})")
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
    g.add_argument("--label-column", default=D("label_column"), help=f"CSV label column (default {D('label_column')})")
    g.add_argument("--device", choices=DEVICES, default=D("device"),
                   help=f"where the backbone runs (default {D('device')}: CUDA if it works, else CPU)")
    g.add_argument("--feature-batch-size", type=int, default=D("feature_batch_size"), help=f"images per backbone batch (default {D('feature_batch_size')})")
    g.add_argument("--workers", type=int, default=None, help="image decoding threads (default: CPUs, at most 8)")
    add_ray_args(g, "run the backbone pass (the features) on Ray Data; the head trains here")
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
                task_weights=tuple(args.task_weights) if args.task_weights else None, int8=args.int8,
                max_drop=args.max_drop, ray=args.ray, actors=args.actors)
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
    from ..transfer.api import finetune

    result = finetune(args.source, args.data, args.output, **finetune_options(args))
    print(result.summary())
    if result.int8_refusal:
        print(f"porter: error: int8 model not written ({result.path} is): {result.int8_refusal}", file=sys.stderr)
        return 1
    return 0


