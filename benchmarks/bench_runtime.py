"""Runtime benchmarks for issue 6, measured side by side in one run and printed as ratios.

    .venv/bin/python benchmarks/bench_runtime.py            # CPU section, predict section, GPU section if CUDA
    .venv/bin/python benchmarks/bench_runtime.py --quick    # fewer images and rounds (smoke run)

CPU: MobileNetV2 (keras.applications, weights=None, 224x224x3), converted with porter.convert, batch 32:
     onnxruntime (porter.load, device cpu) vs TensorFlow (tf.function of the same Keras model, oneDNN on) vs torch
     eager (a MobileNetV2 of the same architecture written below: torchvision isn't installed here, and the weights
     don't matter for speed). Rounds are interleaved (ORT, TF, torch, ORT, ...) so machine noise hits all three
     alike; each figure is the median over rounds. Target: ORT >= 2x the faster of TF and torch.
predict: `porter predict`'s pipeline (thread-pool decoding overlapped with inference, loaded as the CLI loads it) on JPEGs vs
     `porter bench` throughput at the same batch size, in process (rounds) and as the two commands a user runs, each a
     new process (--pairs, order alternating; the target is read on these). Target: >= 80%. Also shown: the pipeline's own inference
     streams (2 cores: two single-threaded sessions, see Predictor.iter_predictions) on tensors without decoding, so
     that the gain is seen to come from overlapping, not from streams being faster than `porter bench`.
camera: the same pipeline on 32 copies of a 4032x3024 photo-like JPEG (12 MP, what phones write), exact decoding vs
     --fast-decode (DCT-domain 1/2..1/8 scaling), with the largest score difference between the two. Reported.
GPU: when CUDA works: ORT CUDA fp32, ORT CUDA fp16 + IO binding, TensorRT fp32/fp16 vs torch eager fp32 on the GPU,
     batch 64. Targets: ORT CUDA fp32 >= torch fp32; ORT fp16 + IO binding >= 2x torch fp32. Otherwise prints
     "skipped: no CUDA".
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ["TF_ENABLE_ONEDNN_OPTS"] = "1"  # TensorFlow at its best on CPU (porter's CLI turns oneDNN logs off)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

RESULTS: dict = {}


def log(msg: str = "") -> None:
    print(msg, flush=True)


# --- a torch MobileNetV2 (torchvision's architecture, width 1.0, 1000 classes) ------------------------------------

def torch_mobilenet_v2():
    import torch
    from torch import nn

    def conv_bn(cin, cout, k, s, groups=1, act=True):
        layers = [nn.Conv2d(cin, cout, k, s, (k - 1) // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
        if act:
            layers.append(nn.ReLU6(inplace=True))
        return layers

    class InvertedResidual(nn.Module):
        def __init__(self, cin, cout, stride, expand):
            super().__init__()
            hidden = cin * expand
            layers = conv_bn(cin, hidden, 1, 1) if expand != 1 else []
            layers += conv_bn(hidden, hidden, 3, stride, groups=hidden) + conv_bn(hidden, cout, 1, 1, act=False)
            self.block = nn.Sequential(*layers)
            self.residual = stride == 1 and cin == cout

        def forward(self, x):
            return x + self.block(x) if self.residual else self.block(x)

    settings = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]
    layers = conv_bn(3, 32, 3, 2)
    cin = 32
    for t, c, n, s in settings:
        for i in range(n):
            layers.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
            cin = c
    layers += conv_bn(cin, 1280, 1, 1)
    model = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.2), nn.Linear(1280, 1000),
                          nn.Softmax(dim=1))
    torch.manual_seed(0)
    return model.eval()


# --- timing helpers ---------------------------------------------------------------------------------------------

def throughput(fn, batch: int, seconds: float, warmup: int = 2) -> tuple[float, float]:
    """(images per second from the median call, CPU milliseconds per image) after warm-up.

    CPU time (all threads of this process) is the figure that survives a loaded machine: wall-clock
    throughput drops when other processes take the cores, CPU time per image much less.
    """
    for _ in range(warmup):
        fn()
    times = []
    c0 = time.process_time()
    start = time.perf_counter()
    while len(times) < 3 or time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    cpu_ms = (time.process_time() - c0) / (len(times) * batch) * 1e3
    return batch / statistics.median(times), cpu_ms


def interleaved(engines: dict, batch: int, rounds: int, seconds: float) -> dict[str, tuple[float, float]]:
    """Round-robin over engines so that machine load hits all alike; medians over rounds."""
    per = {name: [] for name in engines}
    for r in range(rounds):
        for name, fn in engines.items():
            per[name].append(throughput(fn, batch, seconds, warmup=2 if r == 0 else 1))
    return {name: (statistics.median(v[0] for v in vals), statistics.median(v[1] for v in vals))
            for name, vals in per.items()}


def load_average() -> str:
    try:
        return ", ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "?"


# --- sections ---------------------------------------------------------------------------------------------------

def build_mobilenet(workdir: Path):
    import keras

    import porter

    keras.utils.set_random_seed(0)
    model = keras.applications.MobileNetV2(weights=None, input_shape=(224, 224, 3))
    calibrate_batchnorm(model)
    x = np.random.default_rng(2).uniform(-1, 1, size=(4, 224, 224, 3)).astype(np.float32)
    spread = float(np.max(np.abs(np.diff(model(x, training=False).numpy(), axis=0))))
    log(f"MobileNetV2 (random weights, calibrated BatchNorm): outputs for different inputs differ by up to {spread:.2e}")
    t0 = time.perf_counter()
    result = porter.convert(model, workdir / "mobilenet_v2.onnx", preprocess="tf", force=True)
    log(f"converted MobileNetV2 with porter.convert in {time.perf_counter() - t0:.1f} s "
        f"({result.parity.summary() if result.parity else 'no parity'})")
    return model, workdir / "mobilenet_v2.onnx"


def calibrate_batchnorm(model) -> None:
    """Set each BatchNorm's moving statistics to those of its input on smooth random images, layer by layer.

    Freshly initialised statistics (mean 0, variance 1) let activations die or saturate through 50 layers, so every
    input gets the same 1/1000 softmax and the ORT-vs-Keras difference printed below would compare constants.
    """
    import keras

    rng = np.random.default_rng(1)
    coarse = rng.uniform(-1, 1, size=(8, 7, 7, 3)).astype(np.float32)
    images = np.clip(np.repeat(np.repeat(coarse, 32, axis=1), 32, axis=2) + rng.normal(0, 0.2, (8, 224, 224, 3)),
                     -1, 1).astype(np.float32)
    norms = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    for layer in norms:  # in order: each one sees the already calibrated layers before it
        a = keras.Model(model.input, layer.input)(images, training=False).numpy()
        mean, var = a.mean(axis=(0, 1, 2)), a.var(axis=(0, 1, 2))
        gamma = rng.uniform(0.8, 1.2, mean.shape)
        beta = rng.normal(0.1, 0.2, mean.shape)
        layer.set_weights([gamma, beta, mean, var])


def cpu_section(keras_model, onnx_path: Path, batch: int, rounds: int, seconds: float) -> None:
    import tensorflow as tf
    import torch

    import porter
    from porter.runtime.session import cpu_threads

    threads = int(os.environ.get("PORTER_BENCH_THREADS", 0)) or None
    log(f"\n## CPU: MobileNetV2 224x224, batch {batch} "
        f"(onnxruntime {threads or cpu_threads()} threads, torch {torch.get_num_threads()} threads, TensorFlow "
        f"{tf.config.threading.get_intra_op_parallelism_threads() or 'default'} threads, "
        f"{len(os.sched_getaffinity(0))} CPUs visible, load average {load_average()})")
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, size=(batch, 224, 224, 3)).astype(np.float32)
    threads = int(os.environ.get("PORTER_BENCH_THREADS", 0)) or None
    p = porter.load(onnx_path, device="cpu", batch_size=batch, threads=threads)
    sess = p._session
    feeds = {p.input_names[0]: x}

    fn = tf.function(lambda t: keras_model(t, training=False))
    tx = tf.constant(x)

    tmodel = torch_mobilenet_v2()
    xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
    tmodel_cl = torch_mobilenet_v2().to(memory_format=torch.channels_last)
    xt_cl = xt.to(memory_format=torch.channels_last)

    def run_torch(model, inp):
        with torch.inference_mode():
            return model(inp).numpy()

    # parity of what we time: ORT vs the Keras model it came from
    diff = float(np.max(np.abs(sess.run(None, feeds)[0] - fn(tx).numpy())))
    res = interleaved({"onnxruntime": lambda: sess.run(None, feeds),
                       "tensorflow tf.function": lambda: fn(tx).numpy(),
                       "torch eager (NCHW)": lambda: run_torch(tmodel, xt),
                       "torch eager (channels_last)": lambda: run_torch(tmodel_cl, xt_cl)}, batch, rounds, seconds)
    ort_tp, ort_cpu = res["onnxruntime"]
    best = max(v[0] for k, v in res.items() if k != "onnxruntime")
    best_cpu = min(v[1] for k, v in res.items() if k != "onnxruntime")
    log("| engine | images/s | ORT speed-up | CPU ms per image | ORT CPU advantage |")
    log("| --- | ---: | ---: | ---: | ---: |")
    for name, (tp, cpu) in res.items():
        log(f"| {name} | {tp:.1f} | {ort_tp / tp:.2f}x | {cpu:.2f} | {cpu / ort_cpu:.2f}x |")
    log(f"ORT vs the fastest of TF and torch: {ort_tp / best:.2f}x by throughput, {best_cpu / ort_cpu:.2f}x by CPU "
        f"time (target >= 2x); max |ORT - Keras| = {diff:.2e}; load average {load_average()}")
    RESULTS["cpu"] = {"batch": batch, "engines": res, "ratio_vs_best": ort_tp / best,
                      "cpu_ratio_vs_best": best_cpu / ort_cpu, "max_abs_diff_vs_keras": diff,
                      "load_average": load_average()}


def photo_pixels(size: tuple[int, int], frequencies, rng, phase: float = 0.0, grain: float = 12.0) -> np.ndarray:
    """A photo-like uint8 image (smooth colour fields plus grain), so decoding costs what real photos cost."""
    yy, xx = np.mgrid[0:size[0], 0:size[1]].astype(np.float32)
    a, b, c = frequencies
    base = np.stack([np.sin(xx * a + phase), np.cos(yy * b - phase), np.sin((xx + yy) * c)], -1) * 100 + 128
    return np.clip(base + rng.normal(0, grain, base.shape), 0, 255).astype(np.uint8)


def make_images(folder: Path, n: int, size=(240, 320)) -> list[Path]:
    """``n`` photo-like JPEGs, each with its own colour fields."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        img = photo_pixels(size, rng.uniform(0.005, 0.05, 3), rng, phase=i)
        p = folder / f"photo_{i:04d}.jpg"
        Image.fromarray(img).save(p, quality=90)
        paths.append(p)
    return paths


def predict_section(onnx_path: Path, n_images: int, batch: int, rounds: int, seconds: float, workdir: Path,
                    pairs: int) -> None:
    import porter
    from porter.imaging import load_image, to_tensor
    from porter.runtime.bench import bench

    log(f"\n## porter predict on {n_images} JPEGs (320x240) vs porter bench, batch {batch}")
    paths = [str(x) for x in make_images(workdir / "images", n_images)]
    threads = int(os.environ.get("PORTER_BENCH_THREADS", 0)) or None
    # each loaded as its command loads it: `porter bench` with ORT's defaults, `porter predict` with spin=False
    # (its decoding threads need the cores that idle ORT workers would spin on)
    for_bench = porter.load(onnx_path, device="cpu", batch_size=batch, threads=threads)
    p = porter.load(onnx_path, device="cpu", batch_size=batch, threads=threads, spin=False)
    list(p.iter_predictions(paths))  # warm the sessions (streams included) and the page cache
    for_bench.run(for_bench.example_inputs(batch))  # and the bench session (its first run builds kernels)
    streams = p.last_stats.streams
    streams_only = streams_throughput(p, batch, streams, seconds) if streams > 1 else None
    # rounds alternate bench and predict so that load from other processes hits both alike
    bench_tp, pipe_tp, ratios, cpu_bench, cpu_pipe, waits, stream_tp = [], [], [], [], [], [], []
    for _ in range(rounds):
        c0 = time.process_time()
        row = bench(for_bench, [batch], min_seconds=seconds, warmup=1).rows[0]
        cpu_bench.append((time.process_time() - c0) / (row.runs * batch + batch))
        bench_tp.append(row.throughput)
        if streams_only:
            stream_tp.append(streams_only())
        c0, t0 = time.process_time(), time.perf_counter()
        results = list(p.iter_predictions(paths))
        pipe_tp.append(len(results) / (time.perf_counter() - t0))
        waits.append(p.last_stats.decode_wait_seconds / p.last_stats.seconds)
        cpu_pipe.append((time.process_time() - c0) / len(results))
        assert all(r.ok for r in results)
        ratios.append(pipe_tp[-1] / bench_tp[-1])
    # the two commands as a user runs them, each a new process, in pairs (order alternating): `porter bench` and
    # `porter predict DIR` (its own throughput line, and its wall clock with start-up and model load)
    cmd_bench, cli_inside, cli_tp = [], [], []
    for i in range(pairs):
        for step in ((0, 1) if i % 2 == 0 else (1, 0)):
            if step == 0:
                cmd_bench.append(run_bench_cli(onnx_path, batch, seconds))
            else:
                wall, inside = run_cli(onnx_path, workdir / "images", batch)
                cli_tp.append(n_images / wall)
                cli_inside.append(inside)
    cli_ratios = [p_ / b_ for p_, b_ in zip(cli_inside, cmd_bench)]
    wall_ratios = [w_ / b_ for w_, b_ in zip(cli_tp, cmd_bench)]

    t0 = time.perf_counter()
    for x in paths[:200]:
        to_tensor([load_image(x, (224, 224))], p.preprocess)
    decode_ms = (time.perf_counter() - t0) / 200 * 1e3

    b, q = statistics.median(bench_tp), statistics.median(pipe_tp)
    log("| measurement | images/s | CPU ms per image | vs bench |")
    log("| --- | ---: | ---: | ---: |")
    log(f"| porter bench (preprocessed tensors) | {b:.1f} | {statistics.median(cpu_bench) * 1e3:.2f} | 1.00 |")
    log(f"| predict pipeline in process (decode, resize, normalize, infer) | {q:.1f} | "
        f"{statistics.median(cpu_pipe) * 1e3:.2f} | {statistics.median(ratios):.2f} |")
    log(f"| `porter bench MODEL --batch-sizes {batch}` command | {statistics.median(cmd_bench):.1f} | - | 1.00 |")
    log(f"| `porter predict MODEL DIR` command: its own throughput line | {statistics.median(cli_inside):.1f} | - | "
        f"{statistics.median(cli_ratios):.2f} |")
    log(f"| `porter predict MODEL DIR` command: wall clock (start-up and model load included) | "
        f"{statistics.median(cli_tp):.1f} | - | {statistics.median(wall_ratios):.2f} |")
    if stream_tp:
        log(f"| the pipeline's {streams} inference streams alone (tensors, no decoding) | "
            f"{statistics.median(stream_tp):.1f} | - | {statistics.median(stream_tp) / b:.2f} |")
    log(f"predict pipeline / bench in process, per round: {', '.join(f'{r:.2f}' for r in ratios)} (median "
        f"{statistics.median(ratios):.2f}); porter predict / porter bench commands, per pair: "
        f"{', '.join(f'{r:.2f}' for r in cli_ratios)} (median {statistics.median(cli_ratios):.2f}; target >= 0.80; "
        f"wall clock {', '.join(f'{r:.2f}' for r in wall_ratios)}); by CPU time {statistics.median(cpu_bench) / statistics.median(cpu_pipe):.2f}; "
        f"decode+resize+normalize alone: {decode_ms:.2f} ms per image on one thread; inference waited for decoding "
        f"{statistics.median(waits):.1%} of the time; {streams} inference stream{'s' if streams > 1 else ''}; "
        f"load average {load_average()}")
    RESULTS["predict"] = {"images": n_images, "batch": batch, "bench": b, "pipeline": q, "cli": cli_tp,
                          "ratios": ratios, "bench_commands": cmd_bench, "cli_ratios": cli_ratios,
                          "wall_ratios": wall_ratios, "cli_inside": cli_inside, "decode_ms": decode_ms,
                          "decode_wait_share": statistics.median(waits),
                          "cpu_ms_bench": statistics.median(cpu_bench) * 1e3,
                          "cpu_ms_pipeline": statistics.median(cpu_pipe) * 1e3, "streams": streams,
                          "streams_alone": statistics.median(stream_tp) if stream_tp else None}


def run_bench_cli(onnx_path: Path, batch: int, seconds: float) -> float:
    """``porter bench MODEL --batch-sizes B`` as a user runs it: its items/s (read from ``--json``)."""
    cli = subprocess.run([sys.executable, "-m", "porter", "bench", str(onnx_path), "--device", "cpu",
                          "--batch-sizes", str(batch), "--seconds", str(seconds), "--json"], capture_output=True, text=True)
    if cli.returncode != 0:
        raise SystemExit(f"porter bench failed: {cli.stderr.strip()}")
    return float(json.loads(cli.stdout)["rows"][0]["throughput"])


def run_cli(onnx_path: Path, images: Path, batch: int) -> tuple[float, float]:
    """``porter predict DIR`` as a user runs it: (wall seconds, the images/s of its own stats line)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    t0 = time.perf_counter()
    cli = subprocess.run([sys.executable, "-m", "porter", "predict", str(onnx_path), str(images),
                          "--device", "cpu", "--batch-size", str(batch), "--format", "csv"],
                         capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    found = re.search(r"images in [0-9.]+ s \(([0-9.]+)/s\)", cli.stderr)
    if cli.returncode != 0 or not found:
        raise SystemExit(f"porter predict failed: {cli.stderr.strip()}")
    return wall, float(found.group(1))


def streams_throughput(p, batch: int, streams: int, seconds: float):
    """A measurement of ``p``'s pipeline streams on ready tensors: ``porter bench --streams`` in process."""
    from porter.runtime.bench import bench

    return lambda: bench(p, [batch], streams=streams, min_seconds=seconds, warmup=1).rows[0].throughput


def camera_section(onnx_path: Path, batch: int, workdir: Path) -> None:
    import shutil

    from PIL import Image

    import porter

    log(f"\n## porter predict on 32 camera-sized JPEGs (4032x3024), exact vs --fast-decode, batch {batch}")
    folder = workdir / "camera"
    folder.mkdir()
    pixels = photo_pixels((3024, 4032), (1 / 370, 1 / 230, 1 / 510), np.random.default_rng(0), grain=4)
    Image.fromarray(pixels).save(folder / "photo_00.jpg", quality=92)
    paths = [folder / "photo_00.jpg"] + [shutil.copy(folder / "photo_00.jpg", folder / f"photo_{i:02d}.jpg")
                                         for i in range(1, 32)]
    rows = {}
    for fast in (False, True):
        p = porter.load(onnx_path, device="cpu", batch_size=batch, fast_decode=fast)
        list(p.iter_predictions(paths[:4]))
        list(p.iter_predictions(paths))
        rows[fast] = p.last_stats
    from porter.imaging import load_image

    size = p.preprocess.size
    diff = np.abs(load_image(paths[0], size, fast_decode=True).astype(int) - load_image(paths[0], size))
    log("| decoding | images/s | inference busy | waiting for decoding |")
    log("| --- | ---: | ---: | ---: |")
    for fast, st in rows.items():
        log(f"| {'--fast-decode' if fast else 'exact'} | {st.throughput:.1f} | {st.inference_seconds / st.seconds:.0%} | "
            f"{(st.first_batch_seconds + st.decode_wait_seconds) / st.seconds:.0%} |")
    speedup = rows[True].throughput / rows[False].throughput
    log(f"--fast-decode: {speedup:.2f}x; the 224x224 pixels it feeds differ from exact decoding by at most "
        f"{diff.max()} levels of 255 (mean {diff.mean():.2f})")
    RESULTS["camera"] = {"exact": rows[False].to_dict(), "fast": rows[True].to_dict(), "speedup": speedup,
                         "max_pixel_diff": int(diff.max()), "mean_pixel_diff": float(diff.mean())}


def gpu_section(onnx_path: Path, batch: int, rounds: int, seconds: float) -> None:
    from porter.runtime.session import cuda_problem, tensorrt_problem

    log(f"\n## GPU: MobileNetV2 224x224, batch {batch}")
    problem = cuda_problem()
    if problem:
        log(f"skipped: no CUDA ({problem})")
        RESULTS["gpu"] = {"skipped": problem}
        return
    import onnxruntime as ort
    import torch

    import porter

    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, size=(batch, 224, 224, 3)).astype(np.float32)
    engines = {}

    def ort_engine(device, fp16):
        p = porter.load(onnx_path, device=device, fp16=fp16, batch_size=batch, max_batch=batch)
        on_gpu = {p.input_names[0]: ort.OrtValue.ortvalue_from_numpy(x, "cuda", 0)}
        return p, (lambda: p.run(on_gpu, output_device="cuda"))

    p32, engines["onnxruntime cuda fp32 (IO binding)"] = ort_engine("cuda", False)
    engines["onnxruntime cuda fp32 (host in/out)"] = lambda: p32.run({p32.input_names[0]: x})
    p16, engines["onnxruntime cuda fp16 (IO binding)"] = ort_engine("cuda", True)
    log(f"fp16 check: {p16.precision_report.describe()}")
    if tensorrt_problem() is None:
        try:
            _, engines["tensorrt fp32"] = ort_engine("tensorrt", False)
            _, engines["tensorrt fp16"] = ort_engine("tensorrt", True)
        except porter.PorterError as e:
            log(f"tensorrt: {e}")
    else:
        log(f"tensorrt: skipped ({tensorrt_problem()})")
    if torch.cuda.is_available():
        tmodel = torch_mobilenet_v2().cuda()
        xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).cuda()

        def run_torch():
            with torch.inference_mode():
                tmodel(xt)
            torch.cuda.synchronize()

        engines["torch eager fp32"] = run_torch
    else:
        log("torch has no CUDA here (CPU-only build): torch rows skipped")
    res = {name: v[0] for name, v in interleaved(engines, batch, rounds, seconds).items()}
    base = res.get("torch eager fp32")
    log("| engine | images/s | vs torch eager fp32 |")
    log("| --- | ---: | ---: |")
    for name, v in res.items():
        log(f"| {name} | {v:.1f} | {v / base:.2f}x |" if base else f"| {name} | {v:.1f} | - |")
    RESULTS["gpu"] = {"batch": batch, "images_per_s": res}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="200 images, 1 round, short timings")
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--gpu-batch", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--pairs", type=int, default=8, help="pairs of `porter bench` and `porter predict` commands")
    ap.add_argument("--seconds", type=float, default=3.0, help="timed seconds per engine per round")
    ap.add_argument("--threads", type=int, default=None,
                    help="threads for every engine (ORT, TF, torch); default: each one's own (ORT: fitted to the machine)")
    ap.add_argument("--json", help="also write the figures to this JSON file")
    ap.add_argument("--skip", action="append", default=[], choices=["cpu", "predict", "camera", "gpu"])
    args = ap.parse_args()
    if args.quick:
        args.images, args.rounds, args.seconds, args.pairs = 200, 1, 1.0, 1
    if args.threads:
        import tensorflow as tf
        import torch

        tf.config.threading.set_intra_op_parallelism_threads(args.threads)
        tf.config.threading.set_inter_op_parallelism_threads(1)
        torch.set_num_threads(args.threads)
        os.environ["PORTER_BENCH_THREADS"] = str(args.threads)
    with tempfile.TemporaryDirectory(prefix="porter-bench-") as tmp:
        work = Path(tmp)
        keras_model, onnx_path = build_mobilenet(work)
        if "cpu" not in args.skip:
            cpu_section(keras_model, onnx_path, args.batch, args.rounds, args.seconds)
        if "predict" not in args.skip:
            predict_section(onnx_path, args.images, args.batch, args.rounds, args.seconds, work, args.pairs)
        if "camera" not in args.skip:
            camera_section(onnx_path, args.batch, work)
        if "gpu" not in args.skip:
            gpu_section(onnx_path, args.gpu_batch, args.rounds, args.seconds)
    if args.json:
        Path(args.json).write_text(json.dumps(RESULTS, indent=2))


if __name__ == "__main__":
    main()
