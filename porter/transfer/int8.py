"""``finetune --int8``: the fine-tuned model quantized as ``porter quantize`` does, calibrated on the training split
(a seeded draw of its images, through the model's preprocessing) and gated on the validation split, whose true
labels give both models' accuracy."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataError, PorterError
from .metrics import Int8Record


def int8_path(output: str | Path) -> Path:
    out = Path(output)
    stem = out.name[: -len(out.suffix)] if out.suffix else out.name
    return out.with_name(f"{stem}.int8.onnx")


def quantize_finetuned(merged, dataset, train_rows: np.ndarray, val_rows: np.ndarray, max_drop: float, seed: int,
                       log) -> tuple[Any, str | None]:
    """(the QuantizeResult, None), or (None, why int8 was refused) when the gate can't be met.

    ``train_rows`` / ``val_rows``: positions in ``dataset`` of the training and validation examples."""
    from ..quantization import DEFAULT_EVAL_SAMPLES, DEFAULT_SAMPLES
    from ..quantization import data as D
    from ..quantization.api import quantize_samples

    rng = np.random.default_rng(seed)
    cal_rows = np.sort(rng.permutation(train_rows)[:DEFAULT_SAMPLES])
    gate_rows = np.sort(rng.permutation(val_rows)[:DEFAULT_EVAL_SAMPLES])
    if len(gate_rows) < D.MIN_EVAL:
        raise DataError(f"--int8 gates on the validation split, which has {len(gate_rows)} examples; it needs at "
                        f"least {D.MIN_EVAL} (more data, or a larger --val-split)")

    def rows(fp32, index: np.ndarray) -> D.Samples:
        if dataset.kind == "vectors":
            return D.Samples({fp32.input_names[0]: dataset.x[index]}, [dataset.names[i] for i in index],
                             dataset.labels[index], dataset.classes)
        return D.load_samples(D.ImageList([dataset.items[i] for i in index], dataset.labels[index], dataset.classes,
                                          dataset.source), fp32)

    try:
        result = quantize_samples(merged, lambda fp32: (rows(fp32, cal_rows), rows(fp32, gate_rows)),
                                  max_drop=max_drop, log=lambda line: log(f"porter: int8: {line}"),
                                  record={"seed": seed, "calibration": "the fine-tuning's training split",
                                          "gate_data": "its validation split"})
    except PorterError as e:  # the gate refused it, or ORT could not quantize it: the fp32 model is still written
        return None, str(e)
    return result, None


def int8_metrics(result, refusal: str | None, path: Path | None) -> Int8Record:
    if result is None:
        return Int8Record(False, refused=refusal)
    a = result.agreement
    return Int8Record(path is not None, path=str(path) if path else None, method=result.method,
                      samples=result.samples, excluded=result.excluded, rounds=len(result.rounds), gate=a.to_dict(),
                      val_accuracy_fp32=a.accuracy_fp32, val_accuracy_int8=a.accuracy_int8)
