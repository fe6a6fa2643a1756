"""Accelerated inference on ONNX Runtime: sessions (session.py), the Predictor (predictor.py), benchmarks (bench.py)."""

from __future__ import annotations

from .predictor import Prediction, Predictor, load

__all__ = ["Prediction", "Predictor", "load"]
