"""``porter bench``: latency (p50/p95) and throughput per batch size, optionally beside the source framework.

Each batch size is warmed up, then timed for at least ``min_seconds`` (and ``min_runs`` runs). Inputs are the
model's seeded example inputs (smooth random images through the model's preprocessing, or normals), so
decoding is not part of the figure: ``porter predict`` overlaps decoding with inference and is measured
separately. On a GPU the inputs are placed on the device once and outputs stay there (IO binding), which
measures the model, not PCIe copies.

``streams=N`` (CPU) times N concurrent streams sharing the cores, as ``porter predict`` runs long jobs: each
stream runs batches back to back on a session with 1/N of the threads; latency is per run, throughput is the
streams' rates added up.

``source=`` (a callable returning a ``SourceModel``; ``porter.conversion.rebuild_source`` makes one from the card) times the
original framework model on the same inputs in the same process, reporting speed-up ratios and the max absolute
difference of the outputs. The runtime never rebuilds source models itself: it imports nothing from the importers.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from ..errors import UsageError
from ..graph.validate import difference
from . import session as S
from .predictor import Predictor


@dataclass(frozen=True)
class Timing:
    batch_size: int
    p50_ms: float
    p95_ms: float
    throughput: float  # items per second (batch / p50; concurrent streams: their rates added up)
    runs: int

    def to_dict(self) -> dict[str, Any]:
        return {"batch_size": self.batch_size, "p50_ms": round(self.p50_ms, 4), "p95_ms": round(self.p95_ms, 4),
                "throughput": round(self.throughput, 2), "runs": self.runs}


@dataclass
class BenchReport:
    model: str
    engine: str  # e.g. "onnxruntime cpu", "onnxruntime cuda fp16"
    providers: list[str]
    rows: list[Timing]
    source_engine: str | None = None
    source_rows: list[Timing] = field(default_factory=list)
    max_abs_diff: dict[int, float] = field(default_factory=dict)  # batch size -> max |onnx - source|
    notes: list[str] = field(default_factory=list)

    def speedup(self, batch_size: int) -> float | None:
        ours = next((r for r in self.rows if r.batch_size == batch_size), None)
        theirs = next((r for r in self.source_rows if r.batch_size == batch_size), None)
        if ours is None or theirs is None:
            return None
        return ours.throughput / theirs.throughput if theirs.throughput else None

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "engine": self.engine, "providers": self.providers,
                "rows": [r.to_dict() for r in self.rows], "source_engine": self.source_engine,
                "source_rows": [r.to_dict() for r in self.source_rows],
                "speedup": {r.batch_size: self.speedup(r.batch_size) for r in self.rows} if self.source_rows else {},
                "max_abs_diff": self.max_abs_diff, "notes": self.notes}

    def to_table(self) -> str:
        head = ["batch", "p50 ms", "p95 ms", "items/s"]
        if self.source_rows:
            head += [f"{self.source_engine} p50 ms", "p95 ms", "items/s", "speed-up", "max |diff|"]
        lines = [head]
        src = {r.batch_size: r for r in self.source_rows}
        for r in self.rows:
            cells = [str(r.batch_size), f"{r.p50_ms:.2f}", f"{r.p95_ms:.2f}", f"{r.throughput:.1f}"]
            if self.source_rows:
                s = src.get(r.batch_size)
                sp = self.speedup(r.batch_size)
                diff = self.max_abs_diff.get(r.batch_size)
                cells += ([f"{s.p50_ms:.2f}", f"{s.p95_ms:.2f}", f"{s.throughput:.1f}"] if s else ["-"] * 3)
                cells += [f"{sp:.2f}x" if sp else "-", f"{diff:.2g}" if diff is not None else "-"]
            lines.append(cells)
        widths = [max(len(row[i]) for row in lines) for i in range(len(head))]
        text = [f"{self.model}: {self.engine} ({S.describe_providers(self.providers)})"]
        for i, row in enumerate(lines):
            text.append("  ".join(c.rjust(w) if i else c.ljust(w) for c, w in zip(row, widths)).rstrip())
        text.extend(f"note: {n}" for n in self.notes)
        return "\n".join(text)


def measure(fn: Callable[[], Any], *, warmup: int = 3, min_seconds: float = 1.0, min_runs: int = 5,
            max_runs: int = 10_000) -> list[float]:
    """Seconds per call of ``fn`` after ``warmup`` calls, until ``min_seconds`` and ``min_runs`` are both met."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_runs and (len(times) < min_runs or time.perf_counter() - start < min_seconds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def summarize(times: Sequence[float], batch_size: int, throughput: float | None = None) -> Timing:
    """p50/p95 of ``times``; throughput ``batch_size / p50`` unless given (concurrent streams: their rates added up)."""
    arr = np.asarray(times)
    p50 = float(np.percentile(arr, 50))
    if throughput is None:
        throughput = batch_size / p50 if p50 else 0.0
    return Timing(batch_size, p50 * 1e3, float(np.percentile(arr, 95)) * 1e3, throughput, len(arr))


def parse_batch_sizes(text: str | Sequence[int]) -> tuple[int, ...]:
    if isinstance(text, str):
        try:
            sizes = tuple(int(p) for p in text.split(",") if p.strip())
        except ValueError:
            raise UsageError(f"bad batch sizes {text!r}: expected comma-separated integers such as 1,8,32") from None
    else:
        sizes = tuple(int(s) for s in text)
    if not sizes or any(s < 1 for s in sizes):
        raise UsageError(f"batch sizes must be positive integers, got {text!r}")
    return sizes


def measure_streams(fn: Callable[[], Any], streams: int, *, warmup: int = 3, min_seconds: float = 1.0,
                    min_runs: int = 5) -> list[list[float]]:
    """``streams`` threads calling ``fn`` back to back after ``warmup`` calls each and a common start: seconds per
    call, per thread. Every thread keeps going until ``min_seconds`` have passed and ``min_runs`` calls are done
    between them, so each one's calls ran beside the others' (only a thread's last call can end alone)."""
    times: list[list[float]] = [[] for _ in range(streams)]
    t0 = [0.0]
    start = threading.Barrier(streams, action=lambda: t0.__setitem__(0, time.perf_counter()))  # all warm: go
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            for _ in range(warmup):
                fn()
        except BaseException as e:  # noqa: BLE001 - handed to the caller below
            errors.append(e)
        start.wait()
        while not errors and (sum(map(len, times)) < min_runs or time.perf_counter() - t0[0] < min_seconds):
            s = time.perf_counter()
            try:
                fn()
            except BaseException as e:  # noqa: BLE001
                errors.append(e)
                break
            times[i].append(time.perf_counter() - s)

    threads = [threading.Thread(target=work, args=(i,), name=f"porter-bench-{i}") for i in range(streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return times


def bench(predictor: Predictor, batch_sizes: Sequence[int] | str = (1, 8, 32), *, warmup: int = 3,
          min_seconds: float = 1.0, min_runs: int = 5,
          source: "Callable[[], SourceModel] | None" = None, seed: int = 0, streams: int = 1) -> BenchReport:
    """Time ``predictor`` at each batch size, and the framework model beside it when ``source`` is given: a callable
    returning the SourceModel (``lambda: conversion.rebuild_source(predictor)``), called once the arguments are
    checked, since rebuilding takes seconds."""
    sizes = parse_batch_sizes(batch_sizes)
    if not isinstance(streams, int) or streams < 1:
        raise UsageError(f"streams must be a positive integer, got {streams!r}")
    if warmup < 0 or min_seconds < 0 or min_runs < 1:
        raise UsageError(f"warm-up runs and timed seconds can't be negative, nor timed runs under 1 (got warmup "
                         f"{warmup}, seconds {min_seconds}, runs {min_runs})")
    if streams > 1 and predictor.device != "cpu":
        raise UsageError(f"--streams is for the CPU (cores shared between concurrent runs); {predictor.name} runs on "
                         f"{predictor.device}, where one stream keeps the GPU busy: drop --streams")
    if streams > 1 and source is not None:
        raise UsageError("--streams and --against-source time different things (the source runs one batch at a "
                         "time); run them separately")
    fixed = predictor.fixed_batch
    source = source() if source is not None else None
    notes = []
    if fixed and any(b != fixed for b in sizes):
        notes.append(f"the model takes batches of exactly {fixed}; timing batch {fixed} only")
        sizes = (fixed,)
    engine = f"onnxruntime {predictor.device}" + (f" {predictor.precision_label}" if predictor.precision != "fp32" else "")
    if streams > 1:
        threads = predictor.stream_threads(streams)
        engine += f", {streams} concurrent streams of {threads} thread{'s' if threads > 1 else ''}"
    report = BenchReport(model=predictor.name, engine=engine, providers=list(predictor.providers), rows=[],
                         notes=notes + list(predictor.notes))
    if source is not None:
        report.source_engine = source.name
        report.notes.extend(source.notes)
    for b in sizes:
        need = sum(int(np.prod(predictor.concrete_shape(t, b))) * np.dtype(t.dtype if t.dtype != "unknown" else
                                                                               "float32").itemsize
                   for t in predictor.inputs)
        S.check_fits(need, f"batch size {b} (its inputs alone)", "give smaller --batch-sizes")
        feeds = predictor.example_inputs(b, seed=seed)
        predictor.run(feeds)  # checked once (a model that can't run these is one clear error); timed raw below
        if streams > 1:
            session = predictor.stream_session(streams)
            per_stream = measure_streams(lambda: session.run(None, feeds), streams, warmup=warmup,
                                         min_seconds=min_seconds, min_runs=min_runs)
            # the streams' rates added up (a wall clock would count the tail, where the last run ends alone)
            rate = sum(len(t) * b / sum(t) for t in per_stream if t)
            report.rows.append(summarize([x for t in per_stream for x in t], b, throughput=rate))
        else:
            report.rows.append(summarize(measure(_runner(predictor, feeds), warmup=warmup, min_seconds=min_seconds,
                                                 min_runs=min_runs), b))
        if source is not None:
            arrays = [feeds[n] for n in predictor.input_names]
            report.source_rows.append(summarize(measure(lambda: source.run(arrays), warmup=min(warmup, 2),
                                                        min_seconds=min_seconds, min_runs=min(min_runs, 3)), b))
            if source.compare:
                ours = predictor.run(feeds)
                theirs = source.run(arrays)
                diffs = [difference(ours[n], t).max_abs for n, t in zip(predictor.output_names, theirs) if np.size(t)]
                report.max_abs_diff[b] = max(diffs) if diffs else 0.0
    return report


def _runner(predictor: Predictor, feeds: dict[str, np.ndarray]) -> Callable[[], Any]:
    if predictor.device == "cpu":
        session = predictor.session
        return lambda: session.run(None, feeds)
    import onnxruntime as ort  # GPU: inputs on the device once, outputs stay there (IO binding)

    device_id = predictor.config.device_id
    on_gpu = {k: ort.OrtValue.ortvalue_from_numpy(v, "cuda", device_id) for k, v in feeds.items()}
    return lambda: predictor.run(on_gpu, output_device="cuda")


@dataclass
class SourceModel:
    """The framework model a converted model came from, runnable on the same arrays (see conversion.rebuild_source)."""

    name: str
    run: Callable[[Sequence[np.ndarray]], Sequence[np.ndarray]]
    compare: bool = True  # False when the weights differ (timing only)
    notes: list[str] = field(default_factory=list)
