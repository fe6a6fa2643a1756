"""INT8 quantization calibrated on the user's data and proven by an accuracy gate: ``api`` (the steps, with ONNX
Runtime's quantization tools), ``data`` (the images, through the model's own preprocessing), ``gate`` (int8 vs
fp32, and which nodes lose the accuracy)."""

# the CLI reads these at start-up: nothing heavy is imported here
METHODS = ("minmax", "entropy", "percentile")
DEFAULT_METHOD = "minmax"  # measured best on real MobileNetV2 images (benchmarks/bench_quantize.py)
DEFAULT_SAMPLES = 100
DEFAULT_EVAL_SAMPLES = 500
