#!/usr/bin/env bash
# Runs every test that can run on this machine (GPU-marked tests are skipped without CUDA).
set -euo pipefail
cd "$(dirname "$0")/.."
# Tests start servers and 2-rank jobs beside pytest: one OpenMP thread per process avoids the
# oversubscription that makes CPU torch ops 10-50x slower on a 2-core machine.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
[ -x .venv/bin/python ] && . .venv/bin/activate
if python -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  exec python -m pytest -q -ra "$@"
fi
# No GPU: Triton kernels run in the interpreter, GPU-marked tests are deselected.
export TRITON_INTERPRET=1
exec python -m pytest -q -ra -m "not gpu" "$@"
