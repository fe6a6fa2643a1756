"""Several tasks in one `porter finetune` vs one run per task, on the same table of images.

    .venv/bin/python benchmarks/bench_multitask.py [--json]

Data: the digits 5-9 training split of bench_transfer (449 PNGs, 32x32 grey) as a CSV table with three targets:
``digit`` (5 classes), ``parity`` (even / odd) and ``ink`` (the mean pixel value, a number; regression); every
tenth ``parity`` cell is left blank (masked). Backbone: fixtures/backbone/backbone.keras converted to ONNX (pretrained
on digits 0-4). Measured in one process, each run with an empty feature cache (a per-task run extracts features
again: that is what N separate models cost): the three tasks jointly vs three single-task runs, and the three
tasks on a shared trainable trunk (``--shared-hidden 128``, trained jointly). Per-task validation
figures side by side (a regression task alone is split by a seeded shuffle, jointly stratified on the first
classification task, so its figure can differ by the split). Target (issue 17): N tasks cost <= 1.5x one task, with equal per-task figures.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "examples" / "digits"))
sys.path.insert(0, str(ROOT / "fixtures" / "backbone"))

from bench_transfer import write_split  # noqa: E402

TASKS = ["digit", "parity", "ink:regression"]


def table(work: Path) -> Path:
    import numpy as np
    from PIL import Image

    write_split((5, 6, 7, 8, 9), work, 1)
    files = sorted((work / "train").glob("*/*.png"))
    path = work / "digits.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "digit", "parity", "ink"])
        for i, p in enumerate(files):
            d = int(p.parent.name)
            ink = float(np.asarray(Image.open(p), np.float64).mean())
            w.writerow([str(p.relative_to(work)), d, "" if i % 10 == 0 else ("even" if d % 2 == 0 else "odd"),
                        f"{ink:.4f}"])
    return path


def figure(t) -> float:  # a porter.transfer.metrics.TaskMetrics
    return t.validation["accuracy"] if t.type == "classification" else t.validation["r2"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    import torch  # noqa: F401 - imported before any clock starts

    import porter
    from porter.transfer import finetune

    work = Path(tempfile.mkdtemp(prefix="porter-bench-multitask-"))
    try:
        src = work / "backbone.onnx"
        porter.convert(str(ROOT / "fixtures" / "backbone" / "backbone.keras"), src, preprocess="unit", force=True)
        data = table(work)
        finetune(src, data, tasks=["digit"], cache=False, progress=False)  # warm-up: first-use imports

        def timed(tasks):
            t = time.perf_counter()
            r = finetune(src, data, tasks=tasks, cache=False, progress=False)
            return time.perf_counter() - t, r

        joint_s, joint = timed(TASKS)
        singles = [timed([t]) for t in TASKS]
        t = time.perf_counter()
        trunk = finetune(src, data, tasks=TASKS, shared_hidden=128, cache=False, progress=False)
        trunk_s = time.perf_counter() - t
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rows = {"joint_s": round(joint_s, 3), "single_s": [round(s, 3) for s, _ in singles],
            "joint": {t.name: figure(t) for t in joint.metrics.tasks},
            "single": {r.metrics.tasks[0].name: figure(r.metrics.tasks[0]) for _, r in singles},
            "shared_trunk_s": round(trunk_s, 3), "shared_trunk": {t.name: figure(t) for t in trunk.metrics.tasks},
            "shared_trunk_epochs": trunk.metrics.shared_trunk.epochs_run}
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    one = sum(rows["single_s"]) / len(rows["single_s"])  # what one task costs, on average
    print(f"3 tasks jointly: {joint_s:.2f} s; one task per run: {', '.join(f'{s:.2f}' for s in rows['single_s'])} s "
          f"(sum {sum(rows['single_s']):.2f} s)")
    for name in rows["joint"]:
        print(f"  {name:<8} joint {rows['joint'][name]:.4f}  alone {rows['single'][name]:.4f}  "
              f"shared trunk (128 units) {rows['shared_trunk'][name]:.4f}")
    print(f"  shared trunk: {rows['shared_trunk_s']:.2f} s, {rows['shared_trunk_epochs']} epochs")
    ok = joint_s <= 1.5 * one and all(abs(rows["joint"][n] - rows["single"][n]) <= 0.01 for n in rows["joint"])
    print(f"  {'ok  ' if joint_s <= 1.5 * one else 'MISS'} joint / one single-task run (mean): {joint_s / one:.2f}x (<= 1.5x); "
          f"vs all three runs: {joint_s / sum(rows['single_s']):.2f}x")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
