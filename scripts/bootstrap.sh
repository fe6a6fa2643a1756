#!/usr/bin/env bash
# Creates .venv with everything porter and its tests need. Idempotent: a second run only checks.
# Installs the CPU build of torch when no NVIDIA GPU is present, so a CPU machine does not pull
# several GB of CUDA wheels; pyproject.toml keeps torch's range open for users.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${PORTER_VENV:-.venv}
STAMP="$VENV/.porter-installed"
if [ -f "$STAMP" ] && [ "$STAMP" -nt pyproject.toml ]; then
  exit 0
fi
if [ ! -x "$VENV/bin/python" ]; then
  echo "porter: creating $VENV" >&2
  "$PY" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install -q --disable-pip-version-check --progress-bar off)
echo "porter: installing dependencies into $VENV (first run only; a few minutes)" >&2
"${PIP[@]}" --upgrade pip
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    "${PIP[@]}" "torch>=2.6"
  else
    # The CPU build: small, and on this project's machines it is already on disk.
    "${PIP[@]}" "torch==2.13.0" || "${PIP[@]}" "torch>=2.6" --index-url https://download.pytorch.org/whl/cpu
  fi
fi
# the optional extras too, so that their tests run (they skip cleanly where an extra has no device)
"${PIP[@]}" -e ".[dev,openvino,triton,ray]"
touch "$STAMP"
echo "porter: environment ready ($VENV/bin/porter)" >&2
