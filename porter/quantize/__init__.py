"""INT8 quantization calibrated on the user's data and proven by an accuracy gate: ``api`` (the steps, with ONNX
Runtime's quantization tools), ``data`` (the images, through the model's own preprocessing), ``gate`` (int8 vs
fp32, and which nodes lose the accuracy)."""
