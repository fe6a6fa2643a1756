"""Issue 2 benchmarks, measured side by side in one run.

1. Conversion overhead: `porter convert` (import + normalize + parity validation + metadata + write) vs calling
   tf2onnx directly on the same in-memory MobileNetV2 (weights=None, 224x224). tf2onnx's own `from_keras` can't
   read Keras 3 models, so the baseline is `tf2onnx.convert.from_function` on a tf.function — what from_keras
   does internally. Both start from an already-built model, so model construction is not counted. Target <= 1.3x.
2. Start-up: `porter --help` wall time vs `python -c "import tensorflow"`. Target <= 0.1x.

    .venv/bin/python benchmarks/bench_convert.py [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def timed(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()

    import keras
    import tensorflow as tf
    import tf2onnx

    import porter

    model = keras.applications.MobileNetV2(weights=None, input_shape=(224, 224, 3))
    spec = [tf.TensorSpec((None, 224, 224, 3), tf.float32, name="input")]

    def baseline():
        fn = tf.function(lambda x: model(x, training=False), input_signature=spec)
        proto, _ = tf2onnx.convert.from_function(fn, input_signature=spec, opset=17)
        with tempfile.TemporaryDirectory() as d:
            Path(d, "m.onnx").write_bytes(proto.SerializeToString())

    def ours():
        with tempfile.TemporaryDirectory() as d:
            porter.convert(model, Path(d) / "m.onnx")

    baseline()  # warm both paths (tracing caches, lazy imports)
    ours()
    b, o = timed(baseline, args.repeat), timed(ours, args.repeat)
    print(f"convert MobileNetV2 224x224: tf2onnx direct {b:.2f} s, porter convert (with validation) {o:.2f} s, "
          f"ratio {o / b:.2f}x (target <= 1.3x)")

    py = sys.executable
    start_help = timed(lambda: subprocess.run([py, "-m", "porter", "--help"], capture_output=True, check=True), args.repeat)
    start_tf = timed(lambda: subprocess.run([py, "-c", "import tensorflow"], capture_output=True, check=True), args.repeat)
    print(f"start-up: porter --help {start_help:.3f} s, import tensorflow {start_tf:.2f} s, "
          f"ratio {start_help / start_tf:.3f}x (target <= 0.1x)")


if __name__ == "__main__":
    main()
