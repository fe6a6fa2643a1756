"""Shared test setup: markers gpu/network/slow skip cleanly where the machine lacks them."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# tests never read or fill the user's cache (~/.cache/porter); single tests point it at their own tmp_path
os.environ["PORTER_CACHE"] = tempfile.mkdtemp(prefix="porter-test-cache-")


def _cuda_available() -> bool:
    try:
        import onnxruntime as ort

        if "CUDAExecutionProvider" not in ort.get_available_providers():
            return False
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10)
        return out.returncode == 0 and "GPU" in out.stdout
    except (OSError, subprocess.SubprocessError, ImportError):
        return False


def _network_available() -> bool:
    if os.environ.get("PORTER_TEST_NETWORK") != "1":
        return False  # opt-in: CI and this workplace have no internet
    try:
        socket.create_connection(("github.com", 443), timeout=3).close()
        return True
    except OSError:
        return False


def pytest_collection_modifyitems(config, items):
    cuda = _cuda_available()
    net = _network_available()
    for item in items:
        if "gpu" in item.keywords and not cuda:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU with onnxruntime's CUDAExecutionProvider"))
        if "network" in item.keywords and not net:
            item.add_marker(pytest.mark.skip(reason="needs the internet (set PORTER_TEST_NETWORK=1)"))


@pytest.fixture
def isolated_cache(tmp_path, monkeypatch) -> Path:
    """$PORTER_CACHE of this test alone (feature caches, optimized models), so no test sees another's entries.
    Modules that need it say ``pytestmark = pytest.mark.usefixtures("isolated_cache")``."""
    path = tmp_path / "cache"
    monkeypatch.setenv("PORTER_CACHE", str(path))
    return path


@pytest.fixture
def fixtures_dir() -> Path:
    return FIXTURES


def run_porter(*args: str, cwd: Path | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run the porter CLI in a subprocess, as a user would."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "porter", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=timeout, env=env)


def run_main(capsys, *argv) -> tuple[int, str, str]:
    """porter's CLI in this process: (exit code, stdout, stderr)."""
    from porter.cli import main

    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def porter_cli():
    return run_porter
