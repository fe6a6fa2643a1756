"""Issue 3 benchmark, measured side by side in one run.

`porter convert` (export + opset conversion + normalize + parity validation at batch 1 and 3 + metadata +
write) on MobileNetV2 built with ``weights=None``, vs calling ``torch.onnx.export`` directly on the same
in-memory module (the dynamo exporter, dynamic batch axis, written to a file). Both start from an already-built
model; a tiny model is exported through both paths first so one-time start-up costs (lazy imports, exporter
registries) are paid by neither. Target: <= 1.3x.

torchvision's MobileNetV2 is used when torchvision imports; otherwise the fixture hub's MobileNetV2 (the same
architecture, fixtures/torchhub/hubconf.py), and the script says which. A third line times the whole hub path,
``porter convert torchhub:fixtures/torchhub:mobilenet_v2`` (entry-point call included), against building the
model plus the direct export.

    .venv/bin/python benchmarks/bench_torchhub.py [--repeat 3]
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HUB = ROOT / "fixtures" / "torchhub"


def load_hubconf():
    spec = importlib.util.spec_from_file_location("bench_hubconf", HUB / "hubconf.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build_mobilenet(hubconf):
    try:
        import torchvision

        return torchvision.models.mobilenet_v2(weights=None).eval(), f"torchvision {torchvision.__version__} mobilenet_v2"
    except Exception as e:  # noqa: BLE001 - ImportError, or a torchvision that doesn't match torch
        return hubconf.mobilenet_v2(weights=None).eval(), f"fixture hub mobilenet_v2 (torchvision unavailable: {type(e).__name__})"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=3, help="interleaved runs of each path; the median is reported")
    args = ap.parse_args()

    import torch

    import porter

    hubconf = load_hubconf()
    model, label = build_mobilenet(hubconf)
    x = torch.randn(2, 3, 224, 224)
    shape = {None: (3, 224, 224)}

    def direct(module, example, path):
        program = torch.onnx.export(module, (example,), dynamo=True, dynamic_shapes=({0: torch.export.Dim("batch")},),
                                    verbose=False)
        program.save(str(path))

    keys = ("direct", "porter", "porter18", "direct_hub", "porter_hub")
    times: dict[str, list[float]] = {k: [] for k in keys}
    cpu: dict[str, list[float]] = {k: [] for k in keys}  # CPU seconds: steadier than wall time on a shared machine
    overhead: list[float] = []  # porter convert minus its export step (torch.onnx.export + opset conversion)
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)

        def timed(key, fn, *a, **k):
            t, c = time.perf_counter(), time.process_time()
            out = fn(*a, **k)
            times[key].append(time.perf_counter() - t)
            cpu[key].append(time.process_time() - c)
            return out

        # porter's own work beyond the exporter call: wrap the importer's export step to time it inside each run
        import porter.importers.torchhub as importer

        inner: list[float] = []
        real_export = importer.export

        def export_timed(*a, **k):
            t = time.perf_counter()
            try:
                return real_export(*a, **k)
            finally:
                inner.append(time.perf_counter() - t)

        importer.export = export_timed

        tiny = hubconf.small_cnn().eval()
        direct(tiny, torch.randn(2, 3, 32, 32), d / "warm_a.onnx")  # warm both paths
        porter.convert(tiny, d / "warm_b.onnx")
        for _ in range(args.repeat):
            timed("direct", direct, model, x, d / "direct.onnx")
            result = timed("porter", porter.convert, model, d / "porter.onnx", input_shapes=shape, force=True)
            overhead.append(times["porter"][-1] - inner[-1])
            timed("porter18", porter.convert, model, d / "porter18.onnx", input_shapes=shape, opset=18, force=True)
            timed("direct_hub", lambda: direct(hubconf.mobilenet_v2(weights=None).eval(), x, d / "direct_hub.onnx"))
            timed("porter_hub", porter.convert, f"torchhub:{HUB}:mobilenet_v2", d / "porter_hub.onnx", input_shapes=shape,
                  force=True)

    med = {k: statistics.median(v) for k, v in times.items()}
    mcpu = {k: statistics.median(v) for k, v in cpu.items()}

    def line(title, key, base):
        return (f"{title:<62} {med[key]:6.2f} s wall, {mcpu[key]:6.2f} s CPU"
                + ("" if key == base else f"   ratio {med[key] / med[base]:.2f}x wall, {mcpu[key] / mcpu[base]:.2f}x CPU"))

    print(f"model: {label}, 224x224, {sum(p.numel() for p in model.parameters()):,} parameters; torch {torch.__version__}; "
          f"median of {args.repeat} interleaved runs")
    print(line("torch.onnx.export (dynamo, dynamic batch, default opset)", "direct", "direct"))
    print(line("porter convert, opset 17 (default; parity at batch 1, 3)", "porter", "direct")
          + f"  (target <= 1.3x; parity max scaled diff {result.parity.max_scaled:.1e})")
    print(line("porter convert, opset 18 (no version conversion)", "porter18", "direct"))
    over = statistics.median(overhead)
    print(f"porter's work besides the export step (sample run, normalize, parity at batch 1 and 3, "
          f"metadata, write): {over:.2f} s -> {(med['direct'] + over) / med['direct']:.2f}x of the direct export")
    print(line("build from hub entry + torch.onnx.export", "direct_hub", "direct_hub"))
    print(line("porter convert torchhub:fixtures/torchhub:mobilenet_v2", "porter_hub", "direct_hub"))

if __name__ == "__main__":
    main()
