"""porter finetune vs the classic Keras transfer-learning recipe, measured side by side on the same data and split.

    .venv/bin/python benchmarks/bench_finetune.py [--backbone digits|mobilenetv2] [--epochs 20] [--copies N]
                                                  [--with-convert] [--json]

Backbones: ``digits`` is fixtures/backbone/backbone.keras (a 23k-parameter CNN pretrained on digits 0-4, 32x32
grey); ``mobilenetv2`` is keras.applications.MobileNetV2 at 96x96 (ImageNet weights when Keras has them cached,
else random weights with BatchNorm statistics taken from the data -- fine for timing, weak features). Both methods
cut at the input of the backbone's classifier (its global average pooling).
Data: scikit-learn's digits 5-9 as PNG files; half of them held out for testing, the other half (plus ``--copies - 1``
randomly jittered copies of each, so the run is not all start-up) in a class-per-folder training set. Both methods
hold out a 20% validation split of the training folder.

Baseline (the recipe from the Keras transfer-learning guide): ``image_dataset_from_directory`` (cached,
prefetched), the backbone frozen under a ``Rescaling`` layer and a new ``Dense(softmax)``, ``fit`` for E epochs.
porter: ``porter.finetune`` on the converted ONNX backbone for the same E epochs (early stopping off: patience E),
once with an empty feature cache and once more with the features cached.

Each method runs in its own process, so peak memory (VmHWM) is its own; the framework (TensorFlow, torch) is
imported before the clock starts in each, everything else is timed: loading the model, reading and decoding the
images, training, and (porter) merging, checking and writing the model and its report. Test accuracy is measured
afterwards on the held-out images. Prints the ratios against the targets (>= 5x faster at equal or better test
accuracy; >= 20x faster with cached features); exits 1 when a target is missed.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# name -> (image size, colour mode, porter preprocessing); the cut is the layer before the classifier in both methods
BACKBONES = {
    "digits": (32, "grayscale", "unit"),  # fixtures/backbone/backbone.keras, pretrained on digits 0-4
    "mobilenetv2": (96, "rgb", "tf"),  # keras.applications.MobileNetV2 at 96x96 (ImageNet weights if cached)
}


# --- data -------------------------------------------------------------------------------------------------------

def prepare(out: Path, copies: int, size: int, seed: int = 0) -> dict:
    import numpy as np
    from PIL import Image

    sys.path.insert(0, str(ROOT / "examples" / "digits"))
    sys.path.insert(0, str(ROOT / "fixtures" / "backbone"))
    from make_backbone import augment  # the same jitter the backbone was pretrained with
    from prepare_data import CLASSES, digit_images

    images, labels = digit_images(CLASSES)
    rng = np.random.default_rng(seed)

    def png(im, path):
        img = Image.fromarray(im)
        if img.size != (size, size):
            img = img.resize((size, size), Image.Resampling.BILINEAR)
        img.save(path)

    for d in ("train", "test"):
        shutil.rmtree(out / d, ignore_errors=True)
    n_train = n_test = 0
    for c in CLASSES:
        idx = rng.permutation(np.flatnonzero(labels == c))
        test, train = idx[: len(idx) // 2], idx[len(idx) // 2:]
        for split, chosen in (("test", test), ("train", train)):
            (out / split / str(c)).mkdir(parents=True, exist_ok=True)
        for i in test:
            png(images[i], out / "test" / str(c) / f"{i:04d}.png")
            n_test += 1
        for k in range(copies):
            batch = images[train] if k == 0 else augment(images[train], rng)
            for i, im in zip(train, batch):
                png(im, out / "train" / str(c) / f"{i:04d}_{k}.png")
                n_train += 1
    return {"train": n_train, "test": n_test}


# --- children ---------------------------------------------------------------------------------------------------

def peak_rss_mb() -> float:
    """This process's peak resident memory. VmHWM, not ru_maxrss: a forked child inherits its parent's ru_maxrss."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # elsewhere: an upper bound


def child_keras(args) -> dict:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras
    import tensorflow as tf

    size, colour, preprocess = BACKBONES[args.backbone]
    keras.utils.set_random_seed(0)
    start = time.perf_counter()
    backbone = keras.models.load_model(args.source)
    features = keras.Model(backbone.input, backbone.layers[-2].output)  # the input of its classifier
    features.trainable = False
    inp = keras.Input((size, size, 1 if colour == "grayscale" else 3))
    x = keras.layers.Rescaling(1.0 / 255)(inp) if preprocess == "unit" else keras.layers.Rescaling(1 / 127.5, offset=-1)(inp)
    x = features(x, training=False)
    out = keras.layers.Dense(5, activation="softmax")(x)
    model = keras.Model(inp, out)
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    opts = dict(color_mode=colour, image_size=(size, size), batch_size=32, seed=0, verbose=False)
    train = keras.utils.image_dataset_from_directory(args.data / "train", validation_split=0.2, subset="training", **opts)
    val = keras.utils.image_dataset_from_directory(args.data / "train", validation_split=0.2, subset="validation", **opts)
    auto = tf.data.AUTOTUNE
    model.fit(train.cache().prefetch(auto), validation_data=val.cache().prefetch(auto), epochs=args.epochs, verbose=0)
    wall = time.perf_counter() - start
    rss = peak_rss_mb()
    test = keras.utils.image_dataset_from_directory(args.data / "test", shuffle=False, **{**opts, "seed": None})
    acc = float(model.evaluate(test, verbose=0)[1])
    return {"wall_s": wall, "test_accuracy": acc, "peak_rss_mb": rss}


def make_mobilenetv2(path: Path, size: int, calibration: Path) -> str:
    """A MobileNetV2 classifier saved as .keras: ImageNet weights when Keras has them cached, else random weights
    whose BatchNorm statistics are set from 256 training images (random features, but not degenerate ones)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras
    import numpy as np
    from PIL import Image

    keras.utils.set_random_seed(0)
    try:
        base = keras.applications.MobileNetV2(input_shape=(size, size, 3), include_top=False, pooling="avg",
                                              weights="imagenet")
        weights = "imagenet"
    except Exception:  # noqa: BLE001 - offline without the weights file
        base = keras.applications.MobileNetV2(input_shape=(size, size, 3), include_top=False, pooling="avg",
                                              weights=None)
        weights = "random weights, BatchNorm statistics from the data (ImageNet weights not cached; offline)"
        files = sorted(calibration.glob("*/*.png"))[::max(1, len(sorted(calibration.glob("*/*.png"))) // 256)][:256]
        x = np.stack([np.asarray(Image.open(f).convert("RGB"), np.float32) / 127.5 - 1 for f in files])
        bns = [layer for layer in base.layers if isinstance(layer, keras.layers.BatchNormalization)]
        for layer in bns:
            layer.momentum = 0.0  # moving statistics := this batch's statistics
        base(x, training=True)
        for layer in bns:
            layer.momentum = 0.99
    out = keras.layers.Dense(10, activation="softmax", name="old_classifier")(base.output)
    keras.Model(base.input, out, name="mobilenetv2_classifier").save(path)
    return weights


def child_porter(args) -> dict:
    import torch  # noqa: F401 - the framework, imported before the clock like TensorFlow is for the baseline

    import porter
    from porter.transfer import finetune

    out = args.data / f"porter_{args.child}.onnx"
    start = time.perf_counter()
    result = finetune(args.source, args.data / "train", out, epochs=args.epochs, patience=args.epochs,
                      val_split=0.2, seed=0, cache_dir=str(args.data / "cache"), force=True, progress=False,
                      convert_options={"preprocess": BACKBONES[args.backbone][2]} if str(args.source).endswith(".keras") else {})
    wall = time.perf_counter() - start
    rss = peak_rss_mb()
    acc = _test_accuracy(out, args.data / "test")
    f = result.metrics.features
    return {"wall_s": wall, "test_accuracy": acc, "peak_rss_mb": rss, "features_cached": result.features_cached,
            "extract_images_per_s": f.per_second, "extract_s": f.seconds, "timings": result.timings,
            "epochs_run": result.metrics.training.epochs_run, "version": porter.__version__}


def _test_accuracy(model_path: Path, test_dir: Path) -> float:
    import numpy as np
    import onnx
    import onnxruntime as ort

    from porter.imaging import preprocess
    from porter.spec import ModelCard

    card = ModelCard.from_onnx(onnx.load(model_path))
    files = sorted(test_dir.glob("*/*.png"))
    x = preprocess(files, card.preprocess, channels=card.preprocess.channels)
    sess = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    _, label = sess.run(None, {sess.get_inputs()[0].name: x})
    truth = np.array([card.labels.index(f.parent.name) for f in files])
    return float((label == truth).mean())


def run_child(name: str, args, source: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", name, "--data", str(args.data), "--epochs", str(args.epochs),
           "--backbone", args.backbone, "--source", str(source)]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONWARNINGS="ignore")
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if r.returncode != 0:
        sys.exit(f"bench_finetune: {name} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


# --- main -------------------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--copies", type=int, default=None, help="training set = this many (jittered) copies of each "
                   "image (default 8 for digits, 2 for mobilenetv2)")
    p.add_argument("--backbone", choices=list(BACKBONES), default="digits",
                   help="digits: the bundled fixture (tiny, 32x32); mobilenetv2: a real-size backbone at 96x96")
    p.add_argument("--out", type=Path, default=None, help="work directory (default out/bench_finetune/BACKBONE)")
    p.add_argument("--with-convert", action="store_true", help="also time porter straight from the .keras file")
    p.add_argument("--json", action="store_true")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--source", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        fn = child_keras if args.child == "keras" else child_porter
        print(json.dumps(fn(args)))
        return 0

    size = BACKBONES[args.backbone][0]
    args.copies = args.copies or (8 if args.backbone == "digits" else 2)
    args.out = args.out or ROOT / "out" / "bench_finetune" / args.backbone
    args.out.mkdir(parents=True, exist_ok=True)
    args.data = args.out
    counts = prepare(args.out, args.copies, size)
    if args.backbone == "digits":
        keras_path, weights = ROOT / "fixtures" / "backbone" / "backbone.keras", "pretrained on digits 0-4"
    else:
        keras_path = args.out / "mobilenetv2.keras"
        weights = make_mobilenetv2(keras_path, size, args.out / "train")
    onnx_path = args.out / "backbone.onnx"
    subprocess.run([sys.executable, "-m", "porter", "convert", str(keras_path), "-o", str(onnx_path), "--preprocess",
                    BACKBONES[args.backbone][2], "--force"], check=True, capture_output=True, cwd=ROOT)
    shutil.rmtree(args.out / "cache", ignore_errors=True)

    results = {"keras": run_child("keras", args, keras_path)}
    results["porter_fresh"] = run_child("fresh", args, onnx_path)
    results["porter_cached"] = run_child("cached", args, onnx_path)
    if args.with_convert:
        results["porter_from_keras"] = run_child("from_keras", args, keras_path)
    base = results["keras"]
    fresh, cached = results["porter_fresh"], results["porter_cached"]
    assert not fresh["features_cached"] and cached["features_cached"]
    summary = {
        "backbone": {"name": args.backbone, "weights": weights},
        "data": {**counts, "copies": args.copies, "image": f"{size}x{size}"}, "epochs": args.epochs,
        "results": results,
        "speedup_fresh": base["wall_s"] / fresh["wall_s"], "speedup_cached": base["wall_s"] / cached["wall_s"],
        "accuracy_gain": fresh["test_accuracy"] - base["test_accuracy"],
    }
    summary["targets_met"] = {"fresh >= 5x": summary["speedup_fresh"] >= 5,
                              "cached >= 20x": summary["speedup_cached"] >= 20,
                              "accuracy >= baseline": summary["accuracy_gain"] >= 0}
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"backbone: {args.backbone} ({weights}); data: {counts['train']} training images ({args.copies} copies of "
          f"{counts['train'] // args.copies} digits 5-9, 20% held for validation), {counts['test']} test images, "
          f"{size}x{size}; {args.epochs} epochs each")
    print(f"{'method':44} {'wall s':>8} {'test acc':>9} {'peak RSS MB':>12}")
    rows = [("keras: frozen backbone + Dense, fit", base), ("porter finetune (features extracted)", fresh),
            ("porter finetune (features cached)", cached)]
    if "porter_from_keras" in results:
        rows.append(("porter finetune from .keras (incl. convert)", results["porter_from_keras"]))
    for name, r in rows:
        print(f"{name:44} {r['wall_s']:8.2f} {r['test_accuracy']:9.4f} {r['peak_rss_mb']:12.0f}")
    print(f"feature extraction: {fresh['extract_images_per_s']:,.0f} images/s ({fresh['extract_s']:.2f} s, CPU, "
          f"decoding in parallel with inference)")
    print(f"porter fresh run: {summary['speedup_fresh']:.1f}x faster than the baseline (target >= 5x), "
          f"test accuracy {summary['accuracy_gain'] * 100:+.2f} points (target >= 0)")
    print(f"porter cached run: {summary['speedup_cached']:.1f}x faster than the baseline (target >= 20x)")
    return 0 if all(summary["targets_met"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
