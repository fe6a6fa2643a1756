"""The decode-ahead image pipeline: images decoded, resized and normalized in a thread pool while batches run.

``run_images`` drives one pass: ``plan_batches`` splits the sources, workers decode a few batches ahead (straight
into a ring of reused batch buffers when the input size is known), and each batch goes to ``run_batch`` on one of
``streams`` inference threads; results come back in order with per-source errors, and ``PipelineStats`` records
where the time went. It knows nothing of the Predictor: the caller hands it a ``run_batch`` callable.
"""

from __future__ import annotations

import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from ..errors import DataError, InferenceError
from ..imaging import describe_source, load_image, tensor_shape, to_tensor
from ..spec import PreprocessSpec


@dataclass(frozen=True)
class ImageLayout:
    """What decoded images become: the preprocessing and the channels the model takes."""

    spec: PreprocessSpec
    channels: int


@dataclass
class PipelineStats:
    """Where the time of one ``iter_predictions`` pass went: is decoding keeping up with inference?"""

    images: int = 0
    failed: int = 0
    seconds: float = 0.0  # first image submitted to last result yielded (the caller's own time included)
    inference_seconds: float = 0.0  # in the model (onnxruntime) and turning its outputs into predictions
    first_batch_seconds: float = 0.0  # decoding the first batch: nothing to run yet, so nothing to overlap
    decode_wait_seconds: float = 0.0  # after the first batch: a stream idle, waiting for images still decoding
    streams: int = 1  # concurrent inference streams (CPU pipelines; see Predictor.iter_predictions)

    @property
    def throughput(self) -> float:
        return self.images / self.seconds if self.seconds else 0.0

    def describe(self) -> str:
        def share(t: float) -> str:
            return f"{t / self.seconds:.0%}" if self.seconds else "-"

        failed = f", {self.failed} failed" if self.failed else ""
        streams = f" ({self.streams} streams)" if self.streams > 1 else ""
        return (f"{self.images} image{'' if self.images == 1 else 's'}{failed} in {self.seconds:.2f} s ({self.throughput:.1f}/s); inference busy "
                f"{share(self.inference_seconds / self.streams)} of the time{streams}, waiting for decoding "
                f"{share(self.decode_wait_seconds)} after the first batch ({self.first_batch_seconds:.2f} s)")

    def to_dict(self) -> dict[str, Any]:
        return {"images": self.images, "failed": self.failed, "seconds": round(self.seconds, 4),
                "throughput": round(self.throughput, 2), "inference_seconds": round(self.inference_seconds, 4),
                "first_batch_seconds": round(self.first_batch_seconds, 4),
                "decode_wait_seconds": round(self.decode_wait_seconds, 4), "streams": self.streams}


def plan_batches(n: int, batch_size: int, streams: int = 1, padded: bool = False) -> list[list[int]]:
    """Indices 0..n-1 in batches of ``batch_size``, the last ``streams`` of them sharing their images evenly.

    With one stream the last batch is simply short. With several, a short last batch would leave its stream idle
    while another runs a full one (on 2 cores: one core idle for most of a batch at the end of every run), so
    the tail is spread: 1000 images, batches of 32, 2 streams -> 30 x 32, then 20 + 20. ``padded``: the model
    takes exactly ``batch_size`` (short batches are padded), so spreading would only add padding: no change.
    """
    bounds = list(range(0, n, batch_size)) + [n]
    tail = len(bounds) - 1 - streams  # first batch of the tail
    if streams > 1 and not padded and tail >= 0 and n % batch_size:
        start = bounds[tail]
        share, extra = divmod(n - start, streams)
        bounds = bounds[:tail] + [start + k * share + min(k, extra) for k in range(streams)] + [n]
    return [list(range(a, b)) for a, b in zip(bounds, bounds[1:])]


def run_images(sources: Sequence[Any], layout: ImageLayout, *, batch_size: int, streams: int, padded: bool,
               run_batch: Callable[[np.ndarray, int], dict[str, np.ndarray]],
               postprocess: Callable[[dict[str, np.ndarray], list[int]], dict[int, Any]],
               stats: PipelineStats, errors: str = "report", names: Sequence[str] | None = None,
               decode_workers: int = 2, fast_decode: bool = False) -> Iterator[tuple[int, Any, DataError | None]]:
    """Yield ``(index, result, error)`` per source, in order (see ``Predictor.iter_outputs``).

    ``run_batch(batch, n)``: the model's named outputs for a float32 batch of ``n`` real images (it pads, casts and
    picks the stream's session itself); an InferenceError it raises fails that batch's sources. ``padded``: the
    model takes exactly ``batch_size``.
    """
    label = (lambda i: names[i]) if names is not None else (lambda i: describe_source(sources[i], i))
    spec, channels, target = layout.spec, layout.channels, layout.spec.size
    batches = plan_batches(len(sources), batch_size, streams, padded=padded)
    window = 2 + streams  # batches in flight: decoding ahead, or in inference
    # With a known size, workers normalize straight into a ring of reused batch buffers: no per-batch
    # allocation (fresh pages cost as much as a copy) and no concatenation on the inference thread. A batch's
    # buffer is reused once its inference is done, `window` batches later.
    ring = ([np.empty(tensor_shape(len(batches[0]), target, spec, channels), np.float32)
             for _ in range(min(window, len(batches)))] if target else None)

    def decode(i: int, k: int, row: int) -> np.ndarray | None:
        img = load_image(sources[i], target, name=label(i), fast_decode=fast_decode)
        if ring is not None:
            to_tensor([img], spec, channels, out=ring[k % len(ring)][row:row + 1])
            return None
        return to_tensor([img], spec, channels)

    def run(batch: np.ndarray, indices: list[int], failed: dict[int, DataError]) -> dict[int, Any]:
        try:
            out = run_batch(batch, len(indices))
        except InferenceError as e:  # the whole batch: each of its inputs reports it
            if errors == "raise":
                raise InferenceError(f"{label(indices[0])} (in a batch of {len(indices)}): {e}") from None
            failed.update((i, e) for i in indices)
            return {}
        return postprocess(out, indices)

    def infer(k: int, tensors: dict[int, np.ndarray | None], failed: dict[int, DataError]):
        started = time.perf_counter()
        idx = [i for i in batches[k] if i not in failed]
        results: dict[int, Any] = {}
        if ring is not None and idx:
            buf = ring[k % len(ring)]
            ok = [row for row, i in enumerate(batches[k]) if i not in failed]
            results = run(buf[:len(ok)] if len(ok) == len(batches[k]) else buf[ok], idx, failed)
        while ring is None and idx:  # consecutive images of one size form a batch (no fixed size)
            shape = tensors[idx[0]].shape
            same = [i for i in idx if tensors[i].shape == shape]
            idx = [i for i in idx if tensors[i].shape != shape]
            results.update(run(np.concatenate([tensors[i] for i in same]), same, failed))
        return results, time.perf_counter() - started

    stats.streams = streams
    start = time.perf_counter()
    decoding: dict[int, list[Future]] = {}
    running: deque[tuple[int, dict[int, DataError], Future]] = deque()
    next_decode = 0
    with ThreadPoolExecutor(max_workers=decode_workers, thread_name_prefix="porter-decode") as pool, \
            ThreadPoolExecutor(max_workers=streams, thread_name_prefix="porter-infer") as inference:

        def top_up(first_unfinished: int) -> None:
            nonlocal next_decode
            while next_decode < min(len(batches), first_unfinished + window):
                decoding[next_decode] = [pool.submit(decode, i, next_decode, row)
                                         for row, i in enumerate(batches[next_decode])]
                next_decode += 1

        top_up(0)
        try:
            for k, idx in enumerate(batches):
                tensors: dict[int, np.ndarray | None] = {}
                failed: dict[int, DataError] = {}
                waiting = time.perf_counter()
                for i, fut in zip(idx, decoding.pop(k)):
                    try:
                        tensors[i] = fut.result()
                    except DataError as e:
                        if errors == "raise":
                            raise
                        failed[i] = e
                waited = time.perf_counter() - waiting  # a stream's slot stood free meanwhile
                if k == 0:
                    stats.first_batch_seconds = waited
                else:
                    stats.decode_wait_seconds += waited
                if streams > 1:
                    running.append((k, failed, inference.submit(infer, k, tensors, failed)))
                else:  # one stream: run here, no hand-over
                    done: Future = Future()
                    done.set_result(infer(k, tensors, failed))
                    running.append((k, failed, done))
                # hand results out in order once every stream is busy (or nothing is left to start)
                while running and (len(running) >= streams or k == len(batches) - 1):
                    k0, failed0, fut0 = running.popleft()
                    results, seconds = fut0.result()
                    top_up(k0 + 1)  # its buffer is free: start decoding the batch that reuses it
                    stats.inference_seconds += seconds
                    stats.images += len(batches[k0])
                    stats.failed += len(failed0)
                    for i in batches[k0]:
                        yield (i, None, failed0[i]) if i in failed0 else (i, results[i], None)
                    stats.seconds = time.perf_counter() - start
        finally:  # an error, or a consumer that stopped early: drop the decoding nobody will read
            for rest in decoding.values():
                for f in rest:
                    f.cancel()
