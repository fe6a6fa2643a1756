"""Accelerated inference on ONNX Runtime: sessions (session.py), the Predictor (predictor.py), benchmarks (bench.py)."""

from __future__ import annotations

from .predictor import PipelineStats, Prediction, Predictor, load

__all__ = ["PipelineStats", "Prediction", "Predictor", "load"]
