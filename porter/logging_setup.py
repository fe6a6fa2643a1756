"""Keep framework start-up chatter (TF/absl/CUDA probing) off the user's terminal unless --debug."""

from __future__ import annotations

import logging
import os
import warnings


def quiet_frameworks(debug: bool = False) -> None:
    set_quiet(not debug)
    if debug:
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("ABSL_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    warnings.filterwarnings("ignore")
    for name in ("tensorflow", "tf2onnx", "absl", "keras", "torch.onnx", "onnxscript", "h5py"):
        logging.getLogger(name).setLevel(logging.ERROR)


_QUIET = False


def set_quiet(quiet: bool) -> None:
    global _QUIET
    _QUIET = quiet


def is_quiet() -> bool:
    """Whether porter runs as the quiet CLI (framework chatter off the terminal; --debug turns it back on)."""
    return _QUIET


def heavy_import(name: str):
    """Import a framework module; when quiet, silence the C++ start-up lines it writes straight to fd 2."""
    import importlib
    import sys

    # TensorFlow's oneDNN kernels crash (SIGSEGV) on some real graph-models on AVX-512/AMX CPUs (the blazeface
    # model of @vladmandic/human, for one) and change results by round-off; porter runs TF only as the parity
    # reference, so it asks for the plain kernels. Set TF_ENABLE_ONEDNN_OPTS=1 to override.
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    if name in sys.modules or not _QUIET:
        return importlib.import_module(name)
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        return importlib.import_module(name)
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
