"""The porter error hierarchy.

Every failure a user can cause is a ``PorterError`` whose message is one line that says what was wrong and
what to do. The CLI prints ``porter: error: <message>`` and exits with ``exit_code``; ``--debug`` adds the
traceback. Anything that is not a PorterError is a bug in porter.
"""

from __future__ import annotations

import re


def first_line(e: BaseException, limit: int = 300) -> str:
    """A foreign exception's message fit for a PorterError: its first line (its type name when empty), cut."""
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0][:limit]


def runtime_message(e: BaseException, limit: int = 400) -> str:
    """onnxruntime's own words, one line, without its '[ONNXRuntimeError] : 1 : FAIL :' prefix and the C++ source
    location and function signature it puts before the message."""
    text = " ".join(str(e).split()) or type(e).__name__
    text = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", text)
    text = re.sub(r"/onnxruntime_src/\S+ [^()]*\([^()]*\) ", "", text)
    return text[:limit]


class PorterError(Exception):
    """Base class: a user-facing failure with a one-line, actionable message."""

    exit_code = 1

    def __str__(self) -> str:  # one line, always
        return " ".join(super().__str__().split())


class UsageError(PorterError):
    """Bad options or arguments (the CLI's argparse errors use exit code 2 as well)."""

    exit_code = 2


class SourceError(PorterError):
    """A source reference that can't be parsed, found, or recognised."""


class ModelLoadError(PorterError):
    """A model file that exists but can't be read: truncated, corrupt, or of another kind."""


class UnsafeModelError(PorterError):
    """Loading would run code from the model file (Lambda layers, pickles) or from an untrusted repo."""


class UnsupportedError(PorterError):
    """Layers, ops or constructs porter (or the exporter underneath) can't convert; names every one."""


class ConversionError(PorterError):
    """The exporter failed for a reason other than unsupported ops."""


class ValidationError(PorterError):
    """The ONNX model does not compute what the source computes; names every failing output."""

    def __init__(self, message: str, report=None):
        super().__init__(message)
        self.report = report


class OutputError(PorterError):
    """The output can't be written: it exists (use --force) or its directory is missing."""


class DataError(PorterError):
    """Training or prediction data that can't be used: missing, empty, corrupt, or of the wrong shape."""


class InferenceError(DataError):
    """The model failed to run on an input (an image too small for its convolutions, say)."""


class NetworkError(PorterError):
    """A download failed: offline, HTTP error, timeout, or too large."""


class RuntimeSetupError(PorterError):
    """The requested device or execution provider is not available."""
