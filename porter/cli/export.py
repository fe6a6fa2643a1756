"""``porter export``: deploy targets (a Triton model repository, an npm package on onnxruntime-node)."""

from __future__ import annotations

import argparse

from .args import command


def add_export_parser(sub) -> None:
    from ..export import KINDS, TENSORRT

    p = sub.add_parser("export", help="write a model where users serve it: a Triton repository or an npm package",
                       description="--triton REPO: write MODEL into a Triton model repository for the ONNX Runtime "
                                   "backend: REPO/NAME/config.pbtxt (inputs and outputs with the batch axis told "
                                   "truthfully, dynamic batching, instance group, labels, porter's preprocessing in "
                                   "parameters), REPO/NAME/1/model.onnx and labels.txt. --node DIR: a small npm "
                                   "package running it on onnxruntime-node (load(), predict(images)).")
    p.add_argument("model", help="an ONNX file (from porter convert, finetune or quantize)")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--triton", metavar="REPO", help="the model repository folder (created if needed)")
    where.add_argument("--node", metavar="DIR", help="the npm package folder (created if needed)")
    p.add_argument("--name", help="the model's name in the repository or package (default: the file's stem)")
    p.add_argument("--max-batch-size", type=int, default=64, help="largest batch Triton forms (default 64)")
    p.add_argument("--instances", type=int, default=1, help="model instances per device (default 1)")
    p.add_argument("--kind", choices=KINDS, default="cpu", help="instance kind (default cpu)")
    p.add_argument("--tensorrt", choices=TENSORRT, help="with --kind gpu: run through TensorRT at this precision")
    p.add_argument("--force", action="store_true", help="replace the files of an existing model of that name")


@command("export")
def run_export(args: argparse.Namespace) -> int:
    if args.node:
        from ..export.node import export_node

        print(export_node(args.model, args.node, name=args.name, force=args.force).summary())
        return 0
    from ..export.triton import export_triton

    result = export_triton(args.model, args.triton, name=args.name, max_batch_size=args.max_batch_size,
                           instances=args.instances, kind=args.kind, tensorrt=args.tensorrt, force=args.force)
    print(result.summary())
    return 0
