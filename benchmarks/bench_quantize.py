"""Issue 18 benchmark: CPU inference near the hardware's limit, measured side by side in one run.

Models (224x224 RGB):
  mobilenetv2-zoo   nsfwjs 4.3.0's MobileNetV2 (a real pretrained classifier from npm, its TF.js model.json
                    converted by porter), pixels / 255
  mobilenetv2       keras.applications.MobileNetV2(weights=None), BatchNorm statistics calibrated on images
                    (bench_runtime.calibrate_batchnorm), tf preprocessing
  resnet50          keras.applications.ResNet50(weights=None), the same way: the ResNet-50-sized model
Images: real photographs (the sample photos matplotlib and scikit-learn ship: grace_hopper, china, flower), as
  random square crops at 30-100% scale, flipped half the time, resized to 224x224 JPEGs: 600 in three folders.
int8: `porter.quantize` with its defaults (100 calibration images, the gate on the 500 others, --max-drop 1);
  also its calibration methods side by side on mobilenetv2-zoo (wall time, agreement), to choose the default.
Engines per model, batch 1 and 32, interleaved rounds (fp32, int8, OpenVINO..., fp32, ...), median of rounds:
  onnxruntime CPU fp32 (the baseline), onnxruntime CPU int8, OpenVINO fp32 / bf16 / int8 where its plugin offers a
  device (else the reason is printed). Top-1 agreement with fp32 on the 500 gate images.
predict: `porter predict`'s pipeline (JPEG decoding overlapped with inference) with the int8 model on the 600 photos,
  vs `porter bench` throughput of the same model at batch 32. Target >= 80%.
Targets on this machine: int8 >= 1.6x ORT fp32 on MobileNetV2, >= 2x on ResNet-50, top-1 agreement >= 99% on real
  images; the fastest gated path >= 2.5x ORT fp32 at batch 32.

    .venv/bin/python benchmarks/bench_quantize.py [--quick] [--json FILE] [--only NAME ...]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import numpy as np  # noqa: E402

RESULTS: dict = {}


def log(msg: str = "") -> None:
    print(msg, flush=True)


def photos(out: Path, per_photo: int, size: int = 224, seed: int = 0) -> Path:
    import matplotlib
    import sklearn
    from PIL import Image

    sources = [Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg",
               Path(sklearn.__file__).parent / "datasets" / "images" / "china.jpg",
               Path(sklearn.__file__).parent / "datasets" / "images" / "flower.jpg"]
    rng = np.random.default_rng(seed)
    for src in sources:
        img = Image.open(src).convert("RGB")
        w, h = img.size
        d = out / src.stem
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_photo):
            s = rng.uniform(0.3, 1.0) * min(w, h)
            x, y = rng.uniform(0, w - s), rng.uniform(0, h - s)
            crop = img.crop((int(x), int(y), int(x + s), int(y + s))).resize((size, size), Image.BILINEAR)
            if rng.random() < 0.5:
                crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
            crop.save(d / f"{i}.jpg", quality=90)
    return out


def zoo_mobilenet(work: Path) -> Path:
    from bench_tfjs_zoo import unpack_models

    import porter

    d = unpack_models(Path("/tmp/porter-zoo"))["nsfwjs/mobilenet_v2"]
    out = work / "mobilenetv2-zoo.onnx"
    porter.convert(f"tfjs:{d / 'model.json'}", out, preprocess="unit", force=True)
    return out


def keras_model(name: str, work: Path) -> Path:
    import keras

    import porter
    from bench_runtime import calibrate_batchnorm

    keras.utils.set_random_seed(0)
    build = {"mobilenetv2": keras.applications.MobileNetV2, "resnet50": keras.applications.ResNet50}[name]
    model = build(weights=None, input_shape=(224, 224, 3))
    calibrate_batchnorm(model)
    out = work / f"{name}.onnx"
    porter.convert(model, out, preprocess="tf", force=True)
    return out


def engines_for(fp32: Path, int8: Path | None):
    """name -> a Predictor; OpenVINO rows only where its plugin offers a device."""
    import porter
    from porter.errors import PorterError
    from porter.runtime.openvino import openvino_devices

    engines = {"ORT fp32": porter.load(fp32, device="cpu")}
    if int8 is not None:
        engines["ORT int8"] = porter.load(int8, device="cpu")
    problem = openvino_devices()[1]
    if problem:
        RESULTS.setdefault("openvino", problem)
        return engines
    for label, model, precision in (("OpenVINO fp32", fp32, "fp32"), ("OpenVINO bf16", fp32, "bf16"),
                                    ("OpenVINO int8", int8, None)):
        if model is None:
            continue
        try:
            engines[label] = porter.load(model, device="openvino", precision=precision)
        except PorterError as e:
            log(f"  {label}: refused: {e}")
    return engines


def timed(p, batch: int, seconds: float) -> float:
    from porter.runtime.bench import measure

    feeds = p.example_inputs(batch, seed=0)
    session = p.session
    times = measure(lambda: session.run(None, feeds), warmup=2, min_seconds=seconds, min_runs=3)
    return batch / statistics.median(times)


def agreement(engines, gate_x) -> dict:
    ref = engines["ORT fp32"].run_batched(gate_x)
    out = {}
    score = engines["ORT fp32"].score_output
    for name, p in engines.items():
        got = p.run_batched(gate_x)
        out[name] = {"top1": float(np.mean(ref[score].argmax(1) == got[score].argmax(1))),
                     "max_abs_diff": float(np.max(np.abs(ref[score] - got[score])))}
    return out


def run_model(name: str, fp32: Path, images: Path, work: Path, rounds: int, seconds: float) -> dict:
    import porter
    from porter.errors import ValidationError
    from porter.quantization import data as D

    log(f"\n== {name}")
    t = time.perf_counter()
    int8 = work / f"{name}.int8.onnx"
    try:
        q = porter.quantize(fp32, images, int8, force=True, log=lambda line: log(f"  quantize: {line}"))
        gate = {"passed": True, "excluded": q.excluded, **q.agreement.to_dict()}
    except ValidationError as e:
        log(f"  quantize refused: {e}")
        gate = {"passed": False, "refusal": str(e)}
        q = porter.quantize(fp32, images, int8, force=True, max_drop=100)  # timed anyway, marked as refused
        gate.update(q.agreement.to_dict())
    gate["seconds"] = round(time.perf_counter() - t, 1)
    engines = engines_for(fp32, int8)
    listed = D.list_data(images)
    _, held = D.split(listed, 100, 0, None, 500)
    gate_x = D.load_samples(held, engines["ORT fp32"]).tensors
    agree = agreement(engines, gate_x)
    speed: dict = {}
    for batch in (1, 32):
        per = {k: [] for k in engines}
        for _ in range(rounds):
            for k, p in engines.items():
                per[k].append(timed(p, batch, seconds))
        speed[batch] = {k: statistics.median(v) for k, v in per.items()}
    log("| engine | batch 1 img/s | x | batch 32 img/s | x | top-1 agreement | max |diff| |")
    log("|---|---|---|---|---|---|---|")
    for k in engines:
        b1, b32 = speed[1][k], speed[32][k]
        log(f"| {k} | {b1:.1f} | {b1 / speed[1]['ORT fp32']:.2f}x | {b32:.1f} | {b32 / speed[32]['ORT fp32']:.2f}x | "
            f"{agree[k]['top1']:.1%} | {agree[k]['max_abs_diff']:.3g} |")
    return {"gate": gate, "speed": speed, "agreement": agree}


def calibration_methods(fp32: Path, images: Path) -> dict:
    import porter

    out = {}
    for method in ("minmax", "entropy", "percentile"):
        t = time.perf_counter()
        q = porter.quantize(fp32, images, method=method, max_drop=100)
        out[method] = {"seconds": round(time.perf_counter() - t, 1), **q.agreement.to_dict()}
        log(f"  {method}: {out[method]['seconds']} s, top-1 agreement {q.agreement.top1_agreement:.1%}, "
            f"relative error {q.agreement.relative_error:.2%}")
    return out


def predict_vs_bench(int8: Path, images: Path, seconds: float) -> dict:
    import porter
    from porter.imaging import list_images
    from porter.runtime.bench import bench

    paths = [str(p) for p in list_images([images])]
    p = porter.load(int8, device="cpu", spin=False)
    list(p.iter_predictions(paths[:64]))  # warm
    t = time.perf_counter()
    n = sum(1 for r in p.iter_predictions(paths) if r.error is None)
    predict = n / (time.perf_counter() - t)
    b = porter.load(int8, device="cpu")
    bench_rate = bench(b, (32,), min_seconds=seconds).rows[0].throughput
    log(f"  porter predict {predict:.1f} img/s on {n} JPEGs vs porter bench {bench_rate:.1f} img/s at batch 32: "
        f"{predict / bench_rate:.0%}")
    return {"predict": predict, "bench": bench_rate, "ratio": predict / bench_rate}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1 round, short timings")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--only", action="append", choices=["mobilenetv2-zoo", "mobilenetv2", "resnet50"])
    ap.add_argument("--json")
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.seconds = 1, 0.5
    from porter.runtime.openvino import openvino_devices

    with tempfile.TemporaryDirectory(prefix="porter-bench-q-") as tmp:
        work = Path(tmp)
        os.environ["PORTER_CACHE"] = str(work / "cache")
        images = photos(work / "photos", 200)
        log(f"CPU: {os.cpu_count()} CPUs; OpenVINO: {openvino_devices()[1] or 'available'}")
        names = args.only or ["mobilenetv2-zoo", "mobilenetv2", "resnet50"]
        for name in names:
            fp32 = zoo_mobilenet(work) if name == "mobilenetv2-zoo" else keras_model(name, work)
            RESULTS[name] = run_model(name, fp32, images, work, args.rounds, args.seconds)
            if name == "mobilenetv2-zoo":
                log("  calibration methods (mobilenetv2-zoo):")
                RESULTS["methods"] = calibration_methods(fp32, images)
                RESULTS["predict"] = predict_vs_bench(work / f"{name}.int8.onnx", images, args.seconds)
    if args.json:
        Path(args.json).write_text(json.dumps(RESULTS, indent=2, default=str))


if __name__ == "__main__":
    main()
