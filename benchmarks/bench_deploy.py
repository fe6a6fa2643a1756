"""Issue 19 benchmark: porter's deployment targets against what they replace, measured side by side in one run.

    .venv/bin/python benchmarks/bench_deploy.py [--images 1000] [--node-images 200] [--pairs 2] [--json OUT]

The model: a real pretrained MobileNetV2 (nsfwjs 4.3.0's TF.js layers-model from npm, 224x224 RGB, 5 classes),
converted by porter with parity. The images: photo-like 320x240 JPEGs (bench_runtime.make_images).

Ray:  ``porter predict MODEL DIR --ray -o ray.parquet`` (a local Ray, 2 actors on this machine's 2 cores) vs
      ``porter predict MODEL DIR -o local.parquet``, each a new process, order alternating over --pairs: the wall
      clocks (their ratio is Ray's overhead on one machine), the Ray run's time to first result (as it prints it),
      and whether every label and score agrees.
Node: the ``porter export --node`` package under node (onnxruntime-node; decoding, resizing and normalizing in JS)
      vs ``porter predict``'s pipeline in process (porter.load + iter_predictions, warm) on the same --node-images
      JPEGs: img/s and label agreement.
TF.js: the same model.json under node with @tensorflow/tfjs 4.22 (its CPU backend, what a Node service without
      native bindings runs), model.predict on batches of 8 after a warm-up, vs onnxruntime on the converted model at
      batch 8 (porter.load(...).run_batched): img/s of the model alone, no decoding on either side.

Needs node, npm (the registry) and fixtures/tfjs/node_modules (npm install in fixtures/tfjs); not part of CI.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))
TFJS = ROOT / "fixtures" / "tfjs" / "tfjs_fixtures.js"

import numpy as np  # noqa: E402

PORTER = [sys.executable, "-m", "porter"]


def log(msg: str = "") -> None:
    print(msg, flush=True)


def porter_cmd(*args: str) -> tuple[float, str]:
    t0 = time.perf_counter()
    r = subprocess.run([*PORTER, *map(str, args)], capture_output=True, text=True, timeout=900)
    seconds = time.perf_counter() - t0
    if r.returncode not in (0, 1):
        raise RuntimeError(f"porter {' '.join(map(str, args[:3]))} failed: {r.stderr.strip()[-400:]}")
    return seconds, r.stderr


def settle(limit_s: float = 30.0) -> None:
    """Wait until the last Ray's processes have exited: a shutting-down raylet and its workers take CPU from
    whatever runs next (measured: the next run ~3 s slower on 1000 images)."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < limit_s:
        if subprocess.run(["pgrep", "-f", "raylet|gcs_server|ray::"], capture_output=True).returncode != 0:
            return
        time.sleep(0.5)


def ray_section(model: Path, photos: Path, n: int, pairs: int, work: Path) -> dict:
    import pyarrow.parquet as pq

    local_s, ray_s, first, ray_rate, local_rate = [], [], [], [], []
    for i in range(pairs):
        order = ("local", "ray") if i % 2 == 0 else ("ray", "local")
        for kind in order:
            settle()
            out = work / f"{kind}.parquet"
            if kind == "local":
                s, err = porter_cmd("predict", model, photos, "-o", out, "--force")
                local_s.append(s)
                local_rate.append(float(re.search(r"\(([\d.,]+)/s\)", err).group(1).replace(",", "")))
            else:
                s, err = porter_cmd("predict", model, photos, "--ray", "-o", out, "--force")
                ray_s.append(s)
                m = re.search(r"\(([\d.,]+) img/s, first result after ([\d.]+) s\)", err)
                ray_rate.append(float(m.group(1).replace(",", "")))
                first.append(float(m.group(2)))
                plan = re.search(r"on Ray: (.*)", err).group(1)
        log(f"  pair {i + 1}: local {local_s[-1]:.2f} s, Ray {ray_s[-1]:.2f} s")
    a = pq.read_table(work / "local.parquet").to_pylist()
    b = pq.read_table(work / "ray.parquet").to_pylist()
    same_labels = [x["path"] for x in a] == [x["path"] for x in b] and all(x["label"] == y["label"] for x, y in zip(a, b))
    score_diff = max(abs(x["score"] - y["score"]) for x, y in zip(a, b))
    row = {"images": n, "plan": plan, "local_wall_s": statistics.median(local_s), "ray_wall_s": statistics.median(ray_s),
           "local_own_img_s": statistics.median(local_rate), "ray_own_img_s": statistics.median(ray_rate),
           "ray_first_result_s": statistics.median(first), "labels_equal": same_labels, "max_score_diff": score_diff,
           "pairs": pairs, "all_local_s": local_s, "all_ray_s": ray_s}
    row["overhead"] = row["ray_wall_s"] / row["local_wall_s"]
    return row


NODE_TIMING = """
const pkg = require('./index.js');
(async () => {
  const files = JSON.parse(require('fs').readFileSync(process.argv[1], 'utf8'));
  const t0 = process.hrtime.bigint();
  const m = await pkg.load();
  const loaded = Number(process.hrtime.bigint() - t0) / 1e9;
  await m.predict(files.slice(0, 8), { topK: 1 });  // warm-up
  const t1 = process.hrtime.bigint();
  const out = await m.predict(files, { topK: 1 });
  const seconds = Number(process.hrtime.bigint() - t1) / 1e9;
  console.log(JSON.stringify({ loaded, seconds, labels: out.map((p) => p.label), scores: out.map((p) => p.score) }));
})().catch((e) => { console.error(e); process.exit(1); });
"""


def node_section(model: Path, files: list[Path], work: Path) -> dict:
    import porter
    from porter.export.node import DEPENDENCIES

    pkg = work / "node_pkg"
    shutil.rmtree(pkg, ignore_errors=True)
    s, err = porter_cmd("export", model, "--node", pkg)
    deps = work / "npm"
    deps.mkdir(exist_ok=True)
    (deps / "package.json").write_text(json.dumps({"name": "deps", "private": True, "dependencies": DEPENDENCIES}))
    subprocess.run(["npm", "install", "--ignore-scripts", "--no-audit", "--no-fund"], cwd=deps, check=True,
                   capture_output=True, timeout=600)
    (pkg / "node_modules").symlink_to(deps / "node_modules", target_is_directory=True)
    listing = work / "files.json"
    listing.write_text(json.dumps([str(f) for f in files]))
    r = subprocess.run(["node", "-e", NODE_TIMING, str(listing)], cwd=pkg, capture_output=True, text=True,
                       timeout=900)
    if r.returncode != 0:
        raise RuntimeError(f"node: {r.stderr.strip()[-400:]}")
    got = json.loads(r.stdout)
    p = porter.load(model, device="cpu")
    list(p.iter_predictions(files[:8]))  # warm-up, as node's
    t0 = time.perf_counter()
    want = list(p.iter_predictions(files, top_k=1))
    porter_s = time.perf_counter() - t0
    agree = float(np.mean([str(w.label) == str(g) for w, g in zip(want, got["labels"])]))
    diff = max(abs(w.score - g) for w, g in zip(want, got["scores"]))
    return {"images": len(files), "node_img_s": len(files) / got["seconds"], "porter_img_s": len(files) / porter_s,
            "node_load_s": got["loaded"], "label_agreement": agree, "max_score_diff": diff,
            "ratio": (len(files) / got["seconds"]) / (len(files) / porter_s)}


def tfjs_section(model: Path, tfjs_dir: Path, batch: int, batches: int) -> dict:
    import porter

    r = subprocess.run(["node", str(TFJS), "time-predict", str(tfjs_dir), str(batch), str(batches)],
                       capture_output=True, text=True, cwd=TFJS.parent, timeout=1800)
    if r.returncode != 0:
        raise RuntimeError(f"TF.js: {r.stderr.strip()[-400:]}")
    tj = json.loads(r.stdout)
    p = porter.load(model, device="cpu", batch_size=batch)
    x = np.random.default_rng(7).uniform(0, 1, size=(batch, 224, 224, 3)).astype(np.float32)
    p.run_batched(x)
    times = []
    for _ in range(20):
        t0 = time.perf_counter()
        p.run_batched(x)
        times.append(time.perf_counter() - t0)
    tfjs_rate = batch / statistics.median(tj["seconds"])
    ort_rate = batch / statistics.median(times)
    return {"runtime": tj["runtime"], "batch": batch, "tfjs_img_s": tfjs_rate, "ort_img_s": ort_rate,
            "speedup": ort_rate / tfjs_rate, "tfjs_batches": tj["seconds"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--node-images", type=int, default=200)
    ap.add_argument("--pairs", type=int, default=2)
    ap.add_argument("--tfjs-batches", type=int, default=2)
    ap.add_argument("--cache", type=Path, default=Path("/tmp/porter-zoo"))
    ap.add_argument("--skip", nargs="*", default=(), choices=("ray", "node", "tfjs"))
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    from bench_runtime import make_images
    from bench_tfjs_zoo import unpack_models

    import porter

    work = Path(tempfile.mkdtemp(prefix="porter-bench-deploy-"))
    tfjs_dir = unpack_models(args.cache)["nsfwjs/mobilenet_v2"]
    model = work / "mobilenetv2.onnx"
    result = porter.convert(f"tfjs:{tfjs_dir / 'model.json'}", model, preprocess="unit", force=True)
    log(f"model: nsfwjs 4.3.0 MobileNetV2 -> {model} ({result.parity.summary() if result.parity else 'no parity'})")
    photos = work / "photos"
    files = make_images(photos, args.images)
    log(f"{len(files)} JPEGs 320x240 in {photos}")
    rows: dict = {}
    if "ray" not in args.skip:
        log("Ray: porter predict --ray vs porter predict, the same images, each a new process")
        rows["ray"] = r = ray_section(model, photos, len(files), args.pairs, work)
        log(f"  local {r['local_wall_s']:.2f} s ({r['local_own_img_s']:.1f} img/s by its own line); Ray "
            f"{r['ray_wall_s']:.2f} s ({r['ray_own_img_s']:.1f} img/s, first result after {r['ray_first_result_s']:.2f} s; "
            f"{r['plan']}): overhead {r['overhead']:.2f}x; labels equal {r['labels_equal']}, max score diff "
            f"{r['max_score_diff']:.1e}")
    if "node" not in args.skip:
        from PIL import Image

        pngs = []
        for f in files[:args.node_images]:  # the same pixels losslessly: both sides decode them identically
            pngs.append(work / "png" / (f.stem + ".png"))
            pngs[-1].parent.mkdir(exist_ok=True)
            Image.open(f).save(pngs[-1])
        for kind, subset in (("jpeg", files[:args.node_images]), ("png", pngs)):
            log(f"Node: the exported package under node vs porter's pipeline in process ({kind})")
            rows[f"node_{kind}"] = r = node_section(model, subset, work)
            log(f"  node {r['node_img_s']:.1f} img/s vs porter {r['porter_img_s']:.1f} img/s: {r['ratio']:.2f}x; "
                f"labels agree {r['label_agreement']:.1%}, max score diff {r['max_score_diff']:.1e}")
    if "tfjs" not in args.skip:
        log("TF.js: model.predict under node vs onnxruntime, batch 8, model only")
        rows["tfjs"] = r = tfjs_section(model, tfjs_dir, 8, args.tfjs_batches)
        log(f"  {r['runtime']}: {r['tfjs_img_s']:.2f} img/s; onnxruntime {r['ort_img_s']:.1f} img/s: "
            f"{r['speedup']:.0f}x")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
