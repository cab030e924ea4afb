#!/usr/bin/env bash
# Fresh-machine install: a venv at .venv with CPU torch (or the CUDA torch already present on GPU
# nodes), k2sys built with its C++/CUDA extensions, and the test/dev dependencies.
#   K2SYS_VENV=path   venv location (default: .venv in the repo)
#   K2SYS_TORCH=spec  torch requirement (default: torch==2.13.0, the CPU wheel on CPU machines)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${K2SYS_VENV:-.venv}
PY=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
python -m pip install -q --upgrade pip
if ! python -c "import torch" 2>/dev/null; then
  # An unpinned torch pulls a multi-GB CUDA build: install the CPU wheel first on CPU machines.
  python -m pip install -q "${K2SYS_TORCH:-torch==2.13.0}"
fi
python -m pip install -q -e ".[dev]"
python -c "import k2sys, k2sys._C; from k2sys import ext; print('k2sys installed:', ext.summary())"
