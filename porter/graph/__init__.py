"""ONNX-level work that knows nothing of the source framework: normalize, validate, inspect, surgery."""
