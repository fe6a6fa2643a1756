"""Deploying where users run: ``triton`` (a Triton Inference Server model repository, and the client's
preprocessing helper), ``node`` (an npm package on onnxruntime-node; its ``node_template/index.js``)."""
