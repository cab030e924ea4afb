#!/usr/bin/env bash
# Runs every test that can run on this machine (GPU-marked tests are skipped without CUDA).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] && . .venv/bin/activate
if python -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  exec python -m pytest -q -ra "$@"
fi
# No GPU: Triton kernels run in the interpreter, GPU-marked tests are deselected.
export TRITON_INTERPRET=1
exec python -m pytest -q -ra -m "not gpu" "$@"
