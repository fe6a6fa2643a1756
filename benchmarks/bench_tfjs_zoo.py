"""Issue 13 benchmark: real TF.js models that others publish, converted by porter and compared with TF.js itself.

The models come from two npm packages (the registry is the one place this workplace can download from; users
fetch the same files from CDNs):

  @vladmandic/human 3.3.6   eleven graph-models of a face/body/hand pipeline: batch-1 exports (blazeface,
                            centernet, handlandmark), an SSD hand detector from the TF Object Detection API
                            (handtrack: uint8 [1, ?, ?, 3] input, while loops with TensorLists, NonMaxSuppressionV5,
                            Where, Select, TopKV2, 8 outputs), MoveNet (int32 [1, 192, 192, 3], ArgMax, GatherNd),
                            multi-output face models (facemesh, faceres), small classifiers (emotion, antispoof ...)
  nsfwjs 4.3.0              MobileNetV2 and InceptionV3 layers-models and a MobileNetV2 graph-model written by
                            TF.js Converter v1.7.4, shipped as browserified .js files (unwrapped here with node)

For each model, in one run: TF.js 4.22 under node (fixtures/tfjs/tfjs_fixtures.js golden) runs it on seeded inputs;
porter converts it (parity against TensorFlow on) and its ONNX runs the same inputs; the table shows whether it
converted, the batch plan, and the max scaled difference to TF.js over all outputs (integer outputs: mismatches).
Run with --porter-path to measure another checkout of porter (e.g. the previous release) on the same files.

Needs node and fixtures/tfjs/node_modules (npm install in fixtures/tfjs); not part of CI.

    .venv/bin/python benchmarks/bench_tfjs_zoo.py [--cache DIR] [--only NAME ...] [--porter-path DIR]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
import urllib.request
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "fixtures" / "tfjs" / "tfjs_fixtures.js"
PACKAGES = {
    "human": "https://registry.npmjs.org/@vladmandic/human/-/human-3.3.6.tgz",
    "nsfwjs": "https://registry.npmjs.org/nsfwjs/-/nsfwjs-4.3.0.tgz",
}
MAX_BYTES = 64 * 2**20
# dims for inputs the model leaves open (handtrack takes any image size)
INPUT_DIMS = {"handtrack": (256, 256, 3)}
UNWRAP_JS = r"""
const fs = require('fs'), path = require('path');
const [src, out] = process.argv.slice(1);
const unwrap = (m) => (m && m.default) || m;
const json = unwrap(require(path.resolve(src, 'model.min.js')));
fs.mkdirSync(out, { recursive: true });
fs.writeFileSync(path.join(out, 'model.json'), JSON.stringify(json));
for (const g of json.weightsManifest) for (const p of g.paths) {
  const s = unwrap(require(path.resolve(src, p + '.min.js')));
  fs.writeFileSync(path.join(out, p), typeof s === 'string' ? Buffer.from(s, 'base64') : Buffer.from(s));
}
"""


def download(url: str, cache: Path) -> bytes:
    path = cache / url.rsplit("/", 1)[-1]
    if not path.exists():
        cache.mkdir(parents=True, exist_ok=True)
        with urllib.request.urlopen(url, timeout=60) as r:
            data = r.read(MAX_BYTES + 1)
        if len(data) > MAX_BYTES:
            sys.exit(f"{url} is larger than {MAX_BYTES // 2**20} MiB")
        path.write_bytes(data)
    return path.read_bytes()


def safe_members(tar: tarfile.TarFile, prefix: str):
    for m in tar.getmembers():
        if m.isfile() and m.name.startswith(prefix) and ".." not in Path(m.name).parts:
            yield m


def unpack_models(cache: Path) -> dict[str, Path]:
    """name -> a directory holding model.json and its shards."""
    models: dict[str, Path] = {}
    with tarfile.open(fileobj=io.BytesIO(download(PACKAGES["human"], cache))) as tar:
        for m in safe_members(tar, "package/models/"):
            name = Path(m.name).name
            if not name.endswith(".json") or name == "models.json":
                continue
            stem = name[:-5]
            d = cache / "human" / stem
            if not (d / "model.json").exists():
                d.mkdir(parents=True, exist_ok=True)
                (d / "model.json").write_bytes(tar.extractfile(m).read())
                for g in json.loads((d / "model.json").read_text())["weightsManifest"]:
                    for p in g["paths"]:
                        (d / p).write_bytes(tar.extractfile(f"package/models/{p}").read())
            models[f"human/{stem}"] = d
    with tarfile.open(fileobj=io.BytesIO(download(PACKAGES["nsfwjs"], cache))) as tar:
        src = cache / "nsfwjs-src"
        for m in safe_members(tar, "package/dist/models/"):
            target = src / Path(m.name).relative_to("package/dist/models")
            if not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(tar.extractfile(m).read())
        for d in sorted(p for p in src.iterdir() if p.is_dir()):
            out = cache / "nsfwjs" / d.name
            if not (out / "model.json").exists():
                subprocess.run(["node", "-e", UNWRAP_JS, str(d), str(out)], check=True)
            models[f"nsfwjs/{d.name}"] = out
    return models


def tfjs_golden(d: Path, dims: tuple[int, ...] | None) -> dict:
    env = dict(os.environ)
    if dims:
        env["PORTER_GOLDEN_DIMS"] = ",".join(map(str, dims))
    r = subprocess.run(["node", str(SCRIPT), "golden", str(d)], capture_output=True, text=True, cwd=SCRIPT.parent,
                       env=env, timeout=600)
    if r.returncode != 0:
        raise RuntimeError(f"TF.js failed: {r.stderr.strip().splitlines()[-1][:200] if r.stderr.strip() else r.returncode}")
    return json.loads((d / "golden.json").read_text())


def measure(name: str, d: Path, porter) -> dict:
    import numpy as np
    import onnxruntime as ort

    row: dict = {"model": name}
    mj = json.loads((d / "model.json").read_text())
    row["format"] = mj.get("format") or ("graph-model" if "node" in mj["modelTopology"] else "layers-model")
    dims = INPUT_DIMS.get(name.split("/")[-1])
    try:
        meta = tfjs_golden(d, dims)
    except (RuntimeError, subprocess.TimeoutExpired) as e:
        row.update(status="TF.js can't run it", detail=str(e)[:120])
        return row
    row["outputs"] = len(meta["outputs"])
    options = {"input_shapes": {None: dims}} if dims else {}
    start = time.perf_counter()
    try:
        result = porter.convert(str(d / "model.json"), **options)
    except porter.PorterError as e:
        row.update(status="porter refused", detail=f"{type(e).__name__}: {str(e)[:160]}",
                   seconds=time.perf_counter() - start)
        return row
    except Exception as e:  # noqa: BLE001 - a crash is a result here too
        row.update(status="porter crashed", detail=f"{type(e).__name__}: {str(e)[:160]}",
                   seconds=time.perf_counter() - start)
        return row
    row["seconds"] = time.perf_counter() - start
    batch = getattr(result, "batch", None)
    row["batch"] = batch.mode + (f" {batch.size}" if batch.size else "") if batch is not None else "(not reported)"
    sess = ort.InferenceSession(result.model.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {i.name: np.load(d / g["file"]) for i, g in zip(sess.get_inputs(), meta["inputs"])}
    for i in sess.get_inputs():  # uint8 pixels: TF.js has no uint8 tensors and fed them as int32
        feeds[i.name] = feeds[i.name].astype({"tensor(uint8)": np.uint8, "tensor(int32)": np.int32}.get(i.type, np.float32))
    try:
        got = sess.run(None, feeds)
    except Exception as e:  # noqa: BLE001
        row.update(status="ONNX fails on TF.js's inputs", detail=str(e)[:160])
        return row
    worst, wrong = 0.0, 0
    by_name = dict(zip([o.name for o in sess.get_outputs()], got))
    for g, o in zip(got, meta["outputs"]):
        # by name where the names agree (a graph without a signature has no canonical output order), else by position
        g = by_name.get(o["name"].removesuffix(":0"), g)
        w = np.load(d / o["file"])
        if g.shape != w.shape:
            row.update(status="output shape differs from TF.js", detail=f"{o['name']}: {g.shape} vs {w.shape}")
            return row
        if w.dtype.kind == "i":
            wrong += int(np.sum(g != w))
        else:
            worst = max(worst, float(np.max(np.abs(g.astype(np.float64) - w)) / max(1.0, float(np.max(np.abs(w))))))
    row.update(status="converted", scaled_vs_tfjs=worst, int_mismatches=wrong)
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cache", default="/tmp/porter-zoo")
    ap.add_argument("--only", nargs="*")
    ap.add_argument("--porter-path", help="import porter from this checkout instead (a previous version, say)")
    ap.add_argument("--json", help="write the rows here too")
    args = ap.parse_args()
    if shutil.which("node") is None or not (SCRIPT.parent / "node_modules" / "@tensorflow" / "tfjs").exists():
        sys.exit("needs node and `npm install` in fixtures/tfjs (see fixtures/tfjs/make_fixtures.sh)")
    if args.porter_path:
        sys.path.insert(0, str(Path(args.porter_path).resolve()))
    import porter

    print(f"porter from {Path(porter.__file__).parent}")
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    models = unpack_models(cache)
    rows = []
    for name, d in models.items():
        if args.only and not any(o in name for o in args.only):
            continue
        row = measure(name, d, porter)
        rows.append(row)
        extra = (f"scaled diff vs TF.js {row['scaled_vs_tfjs']:.1e}, integer mismatches {row['int_mismatches']}"
                 if row["status"] == "converted" else row.get("detail", ""))
        print(f"{name:30s} {row['format']:13s} {row['status']:32s} {row.get('batch', ''):10s} "
              f"{row.get('seconds', 0):6.1f} s  {extra}", flush=True)
    ok = [r for r in rows if r["status"] == "converted"]
    graphs = [r for r in rows if r["format"] == "graph-model" and r["status"] != "TF.js can't run it"]
    print(f"converted {len(ok)}/{len(rows)}; graph-models {sum(r['status'] == 'converted' for r in graphs)}/"
          f"{len(graphs)}; within 1e-4 of TF.js: {sum(r['scaled_vs_tfjs'] <= 1e-4 and not r['int_mismatches'] for r in ok)}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
