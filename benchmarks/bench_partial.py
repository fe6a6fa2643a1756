"""Partial fine-tuning (LP-FT): porter ``--unfreeze N`` and ``--augment`` vs head-only vs the Keras recipe.

    .venv/bin/python benchmarks/bench_partial.py [--tasks classmap,dense2,backbone] [--unfreeze 1,2,3] [--json]
    .venv/bin/python benchmarks/bench_partial.py --tasks "" --graph-tasks emotion --copies 4 --unfreeze 1,2

Real transfer: each backbone was pretrained on scikit-learn's digits 0-4 (fixtures/heads, fixtures/backbone) and is
fine-tuned on digits 5-9; half of each class is held out for testing, the other half is the training folder (PNG
files). Per task, each run in the same process, each porter run with an empty feature cache:

* porter head-only: ``porter.finetune`` defaults on the pooled backbone (``cut="backbone"``, as the tail needs).
* porter ``--unfreeze N``: the linear probe, then the last N weight-carrying layers before the cut trained with the
  head (AdamW lr 1e-4, up to 30 epochs, early stopping on validation).
* porter ``--unfreeze N --augment crop,rotate --views 2`` for the largest N (no flips: digits aren't symmetric).
* the Keras recipe that does the same: the loaded Keras backbone up to the same cut frozen, a new Dense softmax,
  Adam fit 20 epochs; then the same layers porter trained unfrozen, Adam at 1e-4 for 30 epochs, on porter's
  very split (its stratified 80/20 train/validation indices); images decoded from the same PNG files in the clock.

Test accuracy from the written ONNX model (porter) and ``model.predict`` (Keras) on the held-out images. Targets
(issue 16): partial fine-tuning beats head-only where the Keras recipe does, matches its accuracy (within 1 point),
and is >= 3x faster.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "examples" / "digits"))
sys.path.insert(0, str(ROOT / "fixtures" / "backbone"))

from bench_transfer import write_split  # noqa: E402 - one data split for both benchmarks

CLASSES = (5, 6, 7, 8, 9)
# name -> (Keras file, the layer at porter's backbone cut, whether porter pools it, input size, channels)
TASKS = {
    "classmap": (ROOT / "fixtures" / "heads" / "classmap.keras", "features", True, 32, 1),
    "dense2": (ROOT / "fixtures" / "heads" / "dense2.keras", "gap", False, 32, 1),
    "backbone": (ROOT / "fixtures" / "backbone" / "backbone.keras", "gap", False, 32, 1),
    # a real pretrained MobileNetV2 (nsfwjs 4.3.0's TF.js layers-model, from npm), its head pool -> Flatten ->
    # Dense(relu) -> Dropout -> Dense(relu) -> Dropout -> Dense(5, softmax); 224x224 RGB, pixels / 255
    "mobilenetv2": (None, "average_pooling2d_1", False, 224, 3),
}


def nsfwjs_mobilenet(work: Path) -> Path:
    """nsfwjs's MobileNetV2 as a .keras file, built from its model.json by porter's TF.js importer (both methods
    start from this one file). Downloads the npm package on first use (cached in /tmp/porter-zoo)."""
    from bench_tfjs_zoo import unpack_models

    from porter.importers.tfjs import load_model_json, load_weights, open_source
    from porter.importers.tfjs.layers import build_keras_model
    from porter.sources import parse_source

    d = unpack_models(Path("/tmp/porter-zoo"))["nsfwjs/mobilenet_v2"]
    src = open_source(parse_source(f"tfjs:{d / 'model.json'}"))
    mj = load_model_json(src)
    model, _ = build_keras_model(mj.topology, load_weights(mj, src))
    out = work / "nsfwjs_mobilenet_v2.keras"
    model.save(out)
    return out


def test_accuracy(model, test_x, test_y) -> float:
    import numpy as np
    import onnxruntime as ort

    from porter.imaging import preprocess
    from porter.spec import ModelCard

    card = ModelCard.from_onnx(model)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = preprocess(list(test_x[..., 0]), card.preprocess, channels=card.preprocess.channels)
    labels = np.concatenate([sess.run(None, {sess.get_inputs()[0].name: x[i:i + 64]})[1]
                             for i in range(0, len(x), 64)])
    return float((np.array([int(card.labels[i]) for i in labels]) == test_y).mean())
HEAD_EPOCHS, FINETUNE_EPOCHS, FINETUNE_LR = 20, 30, 1e-4


def porter_run(src: Path, train: Path, out: Path, test_x, test_y, **options) -> dict:
    from porter.transfer import finetune

    cache = out.with_suffix(".cache")
    t = time.perf_counter()
    r = finetune(src, train, out, cut="backbone", cache_dir=cache, progress=False, force=True, **options)
    wall = time.perf_counter() - t
    p = r.metrics.partial
    row = {"wall_s": round(wall, 3), "test_accuracy": test_accuracy(r.model, test_x, test_y),
           "val_accuracy": r.val_accuracy}
    if p:
        row.update(layers=len(p.layers), layer_names=[l.node for l in p.layers],
                   head_only_val_accuracy=p.head_only.val_accuracy, best_epoch=p.best_epoch,
                   kept=p.kept, trainable_parameters=p.trainable_parameters)
    shutil.rmtree(cache, ignore_errors=True)
    return row


def keras_recipe(path: Path, layer: str, pool: bool, train_dir: Path, test_x, test_y, unfrozen: int, size: int,
                 channels: int) -> dict:
    import keras
    import numpy as np
    from PIL import Image

    from porter.transfer.data import load_data
    from porter.transfer.train import stratified_split

    keras.utils.set_random_seed(0)
    start = time.perf_counter()
    data = load_data(train_dir)
    def pixels(im: Image.Image) -> np.ndarray:  # decoded and resized as porter's pipeline does (PIL, bilinear)
        im = im.convert("L" if channels == 1 else "RGB").resize((size, size), Image.Resampling.BILINEAR)
        a = np.asarray(im)
        return a[..., None] if channels == 1 else a

    x = np.stack([pixels(Image.open(f)) for f in data.items])
    test_x = np.stack([pixels(Image.fromarray(t[..., 0])) for t in test_x])
    y = data.labels
    tr, va = stratified_split(y, data.classes, 0.2, 0)  # porter's own split
    loaded = keras.models.load_model(path)
    base = keras.Model(loaded.input, loaded.get_layer(layer).output)
    base.trainable = False
    inp = keras.Input(x.shape[1:])
    h = base(keras.layers.Rescaling(1.0 / 255)(inp), training=False)  # BatchNorm (if any) stays in inference mode
    if pool:
        h = keras.layers.GlobalAveragePooling2D()(h)
    elif len(h.shape) > 2:  # N x 1 x 1 x C: porter flattens it
        h = keras.layers.Flatten()(h)
    model = keras.Model(inp, keras.layers.Dense(len(data.classes), activation="softmax")(h))
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(x[tr], y[tr], batch_size=32, epochs=HEAD_EPOCHS, validation_data=(x[va], y[va]), verbose=0)
    head_s = time.perf_counter() - start
    head_pred = model.predict(test_x, verbose=0).argmax(1)
    row = {"head_wall_s": round(head_s, 3),
           "head_test_accuracy": float((np.array(data.classes).astype(int)[head_pred] == test_y).mean())}
    if unfrozen:
        t = time.perf_counter()
        base.trainable = True
        kinds = (keras.layers.Conv2D, keras.layers.DepthwiseConv2D, keras.layers.Dense)  # BatchNorm stays frozen
        weighted = [l for l in base.layers if l.weights and isinstance(l, kinds)]
        for l in base.layers:
            l.trainable = l in weighted[-unfrozen:]
        model.compile(optimizer=keras.optimizers.Adam(FINETUNE_LR), loss="sparse_categorical_crossentropy",
                      metrics=["accuracy"])
        model.fit(x[tr], y[tr], batch_size=32, epochs=FINETUNE_EPOCHS, validation_data=(x[va], y[va]), verbose=0)
        row["finetune_wall_s"] = round(head_s + time.perf_counter() - t, 3)
        row["layers"] = [l.name for l in weighted[-unfrozen:]]
    pred = np.array(data.classes).astype(int)[model.predict(test_x, verbose=0).argmax(1)]
    row["test_accuracy"] = float((pred == test_y).mean())
    row["wall_s"] = row.get("finetune_wall_s", row["head_wall_s"])
    return row


# porter only: a real pretrained TF.js graph-model (no Keras layers, so no Keras recipe to compare with), the
# emotion classifier of @vladmandic/human (oarriaga's mini-Xception, 64x64 grey, pixels to -1..1), from npm
GRAPH_TASKS = {"emotion": ("human/emotion", "tf")}


def run_graph_task(name: str, work: Path, unfreeze: list[int], copies: int) -> dict:
    import porter
    from bench_tfjs_zoo import unpack_models

    folder, preset = GRAPH_TASKS[name]
    cache = Path("/tmp/porter-zoo")
    cache.mkdir(parents=True, exist_ok=True)
    model_json = unpack_models(cache)[folder] / "model.json"
    d = work / name
    test_x, test_y = write_split(CLASSES, d, copies)
    src = d / "backbone.onnx"
    porter.convert(str(model_json), src, preprocess=preset, force=True)
    rows = {0: porter_run(src, d / "train", d / "p0.onnx", test_x, test_y)}
    for n in unfreeze:
        rows[n] = porter_run(src, d / "train", d / f"p{n}.onnx", test_x, test_y, unfreeze=n)
    return {"task": f"{name} ({folder}, real pretrained) -> digits 5-9, {copies} copies per training image",
            "train_images": len(list((d / "train").glob("*/*.png"))), "test_images": int(len(test_y)),
            "porter": rows}


def run_task(name: str, work: Path, unfreeze: list[int]) -> dict:
    import porter

    path, layer, pool, size, channels = TASKS[name]
    d = work / name
    test_x, test_y = write_split(CLASSES, d, 1)
    path = path or nsfwjs_mobilenet(d)
    src = d / "backbone.onnx"
    porter.convert(str(path), src, preprocess="unit", force=True)
    row: dict = {"task": f"{name} (pretrained 0-4) -> digits 5-9", "train_images": len(list((d / "train").glob("*/*.png"))),
                 "test_images": int(len(test_y)), "porter": {}, "keras": {}}
    row["porter"][0] = porter_run(src, d / "train", d / "p0.onnx", test_x, test_y)
    row["keras"][0] = keras_recipe(path, layer, pool, d / "train", test_x, test_y, 0, size, channels)
    for n in unfreeze:
        p = porter_run(src, d / "train", d / f"p{n}.onnx", test_x, test_y, unfreeze=n)
        row["porter"][n] = p
        row["keras"][n] = keras_recipe(path, layer, pool, d / "train", test_x, test_y, p["layers"], size, channels)
    n = max(unfreeze)
    row["porter_augment"] = porter_run(src, d / "train", d / "pa.onnx", test_x, test_y, unfreeze=n,
                                       augment="crop,rotate", views=2)
    row["porter_augment"]["unfreeze"] = n
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--unfreeze", default="1,2,3")
    p.add_argument("--json", action="store_true")
    p.add_argument("--graph-tasks", default="",
                   help=f"also run these porter-only tasks on real TF.js graph-models ({', '.join(GRAPH_TASKS)})")
    p.add_argument("--copies", type=int, default=1,
                   help="training images per original for the graph tasks (the original plus jittered copies)")
    args = p.parse_args(argv)
    import keras  # noqa: F401 - both frameworks imported before any clock starts
    import torch  # noqa: F401
    import torch._dynamo  # noqa: F401 - torch.optim's first optimizer imports it (~1.3 s): part of the framework, as
    # Keras's optimizers are part of `import keras`

    unfreeze = [int(v) for v in args.unfreeze.split(",")]
    work = Path(tempfile.mkdtemp(prefix="porter-bench-partial-"))
    rows = []
    graph_rows = []
    try:
        for name in filter(None, args.tasks.split(",")):
            rows.append(run_task(name, work, unfreeze))
        for name in filter(None, args.graph_tasks.split(",")):
            graph_rows.append(run_graph_task(name, work, unfreeze, args.copies))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps(rows + graph_rows, indent=2))
        return 0
    ok = True
    for r in graph_rows:
        print(f"\n{r['task']}: {r['train_images']} train / {r['test_images']} test images (porter only)")
        po = r["porter"]
        for n in po:
            label = "head only" if n == 0 else f"unfreeze {n} ({po[n]['layers']} layers)"
            kept = f"  [{po[n]['kept']}, best epoch {po[n]['best_epoch']}]" if n else ""
            gain = f"  {100 * (po[n]['test_accuracy'] - po[0]['test_accuracy']):+.2f} points" if n else ""
            print(f"  {label:<26} {po[n]['test_accuracy']:>8.4f} {po[n]['wall_s']:>7.2f} s{gain}{kept}")
    for r in rows:
        print(f"\n{r['task']}: {r['train_images']} train / {r['test_images']} test images")
        po, ke = r["porter"], r["keras"]
        print(f"  {'run':<26} {'porter test acc':>15} {'porter s':>9} {'Keras test acc':>15} {'Keras s':>8}")
        for n in po:
            label = "head only" if n == 0 else f"unfreeze {n} ({po[n]['layers']} layers)"
            kept = f"  [{po[n]['kept']}, best epoch {po[n]['best_epoch']}]" if n else ""
            print(f"  {label:<26} {po[n]['test_accuracy']:>15.4f} {po[n]['wall_s']:>9.2f} "
                  f"{ke[n]['test_accuracy']:>15.4f} {ke[n]['wall_s']:>8.2f}{kept}")
        a = r["porter_augment"]
        print(f"  {'unfreeze %d + augment' % a['unfreeze']:<26} {a['test_accuracy']:>15.4f} {a['wall_s']:>9.2f}")
        for n in [n for n in po if n]:
            keras_gain = ke[n]["test_accuracy"] - ke[0]["test_accuracy"]
            porter_gain = po[n]["test_accuracy"] - po[0]["test_accuracy"]
            checks = [
                (f"unfreeze {n}: porter gain over head-only {100 * porter_gain:+.2f} points where Keras gains "
                 f"{100 * keras_gain:+.2f}", keras_gain <= 0.005 or porter_gain > 0),
                (f"unfreeze {n}: porter - Keras test acc {100 * (po[n]['test_accuracy'] - ke[n]['test_accuracy']):+.2f} "
                 f"points (>= -1)", po[n]["test_accuracy"] >= ke[n]["test_accuracy"] - 0.01),
                (f"unfreeze {n}: Keras / porter time {ke[n]['wall_s'] / po[n]['wall_s']:.1f}x (>= 3x)",
                 ke[n]["wall_s"] >= 3 * po[n]["wall_s"]),
            ]
            for text, passed in checks:
                ok &= passed
                print(f"    {'ok  ' if passed else 'MISS'} {text}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
