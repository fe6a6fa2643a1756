"""Issue 4 benchmark: porter's TF.js import + ONNX conversion vs loading the same model in TF.js itself.

A MobileNet-v1-sized layers-model (224x224, 1000 classes, 4.2 M parameters, 17 MB of weights in 4 MB shards) is
written by TF.js under node into a temp directory (not committed). Then, in one run:

  TF.js       node: tf.loadLayersModel(file handler), @tensorflow/tfjs CPU backend (the first load in the node
              process, and the median of the later ones; a predict after each load is timed separately)
  porter      model.json + shards -> Keras 3 -> ONNX (porter.convert(..., validate=False)), in-process, after
              TensorFlow is imported; the loading half alone (read, decode, rebuild Keras); and convert with
              the parity check (validate=True, batch 1 and 3)
  porter cold `python -m porter convert ... --no-validate` in a fresh process (TensorFlow import included)

Needs node and fixtures/tfjs/node_modules (npm install in fixtures/tfjs); not part of CI.

    .venv/bin/python benchmarks/bench_tfjs.py [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "fixtures" / "tfjs" / "tfjs_fixtures.js"


def node(*args: str) -> str:
    if shutil.which("node") is None:
        sys.exit("bench_tfjs needs node (>= 18) on PATH")
    if not (SCRIPT.parent / "node_modules" / "@tensorflow" / "tfjs").exists():
        sys.exit("run `npm install` in fixtures/tfjs first (see fixtures/tfjs/make_fixtures.sh)")
    r = subprocess.run(["node", str(SCRIPT), *args], capture_output=True, text=True, cwd=SCRIPT.parent)
    if r.returncode != 0:
        sys.exit(f"node failed: {r.stderr[-2000:]}")
    return r.stdout


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="porter-bench-tfjs-"))
    try:
        model_dir = tmp / "mobilenet"
        print(node("mobilenet", str(model_dir)).strip().splitlines()[-1])
        size = sum(p.stat().st_size for p in model_dir.iterdir())
        print(f"model: {size / 2**20:.1f} MiB in {len(list(model_dir.iterdir()))} files")

        # TF.js itself, measured inside node (node start-up and `require` not counted)
        line = [l for l in node("time-load", str(model_dir), str(args.repeat + 1)).splitlines() if l.startswith("{")][-1]
        tfjs = json.loads(line)
        tfjs_first, tfjs_warm = tfjs["load"][0], statistics.median(tfjs["load"][1:])
        tfjs_predict = statistics.median(tfjs["predict"][1:])

        # porter in-process (TensorFlow already imported; the first run also pays tracing/graph set-up)
        import tensorflow  # noqa: F401
        import porter

        src = str(model_dir / "model.json")
        t = time.perf_counter()
        porter.convert(src, tmp / "first.onnx", validate=False)
        porter_first = time.perf_counter() - t
        times = []
        for i in range(args.repeat):
            t = time.perf_counter()
            porter.convert(src, tmp / f"m{i}.onnx", validate=False)
            times.append(time.perf_counter() - t)
        porter_warm = statistics.median(times)
        # the loading half alone: read + decode shards, rebuild the Keras model, assign weights
        from porter.importers.tfjs import LocalSource, load_model_json, load_weights
        from porter.importers.tfjs.layers import build_keras_model

        loads = []
        for _ in range(args.repeat):
            t = time.perf_counter()
            source = LocalSource(src)
            mj = load_model_json(source)
            build_keras_model(mj.topology, load_weights(mj, source))
            loads.append(time.perf_counter() - t)
        porter_load = statistics.median(loads)
        t = time.perf_counter()
        result = porter.convert(src, tmp / "validated.onnx")
        porter_validated = time.perf_counter() - t

        # porter cold: a fresh process, as a user at a terminal runs it
        t = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", "porter", "convert", f"tfjs:{src}", "-o", str(tmp / "cli.onnx"),
                            "--no-validate"], capture_output=True, text=True, cwd=ROOT)
        porter_cold = time.perf_counter() - t
        if r.returncode != 0:
            sys.exit(f"porter CLI failed: {r.stderr}")

        print(f"\nTF.js {tfjs['runtime']}: tf.loadLayersModel(file handler)")
        print(f"  first load        {tfjs_first:7.2f} s")
        print(f"  later loads       {tfjs_warm:7.2f} s (median of {len(tfjs['load']) - 1}; one predict after each: "
              f"{tfjs_predict:.2f} s)")
        print("porter (model.json -> Keras 3 -> ONNX)")
        print(f"  first, in-process {porter_first:7.2f} s   ratio vs TF.js first load {porter_first / tfjs_first:5.2f}x")
        print(f"  later, in-process {porter_warm:7.2f} s   ratio vs TF.js later loads {porter_warm / tfjs_warm:5.2f}x")
        print(f"  load only         {porter_load:7.2f} s   ratio vs TF.js later loads {porter_load / tfjs_warm:5.2f}x "
              f"(read + decode shards + rebuild Keras; the rest is tf2onnx)")
        print(f"  with parity check {porter_validated:7.2f} s   ({result.parity.summary()})")
        print(f"  cold CLI process  {porter_cold:7.2f} s   (TensorFlow import included)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
