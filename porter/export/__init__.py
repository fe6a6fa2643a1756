"""Deploying where users run: ``triton`` (a Triton Inference Server model repository, and the client's
preprocessing helper), ``node`` (an npm package on onnxruntime-node; its ``node_template/index.js``)."""

# the CLI reads these at start-up: nothing heavy is imported here
KINDS = ("cpu", "gpu")
TENSORRT = ("fp16", "fp32")
