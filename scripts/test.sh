#!/usr/bin/env bash
# Runs every test that can run on this machine (GPU-marked tests are skipped without CUDA).
set -euo pipefail
cd "$(dirname "$0")/.."
# Tests start servers and 2-rank jobs beside pytest: one OpenMP thread per process avoids the
# oversubscription that makes CPU torch ops 10-50x slower on a 2-core machine.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
[ -x .venv/bin/python ] && . .venv/bin/activate
# Test files spread over the cores (pytest-xdist, one file per worker at a time: module fixtures and
# the 2-rank jobs a file starts stay together); files with slow tests start first (tests/conftest.py).
# K2SYS_TEST_WORKERS=0 runs everything in one process.
workers=${K2SYS_TEST_WORKERS:-$(python -c "import os; print(min(4, len(os.sched_getaffinity(0))))")}
par=()
if [ "$workers" -gt 1 ] && python -c "import xdist" 2>/dev/null; then
  par=(-n "$workers" --dist loadfile)
fi
if python -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  exec python -m pytest -q -ra "${par[@]}" "$@"
fi
# No GPU: Triton kernels run in the interpreter, GPU-marked tests are deselected.
export TRITON_INTERPRET=1
exec python -m pytest -q -ra -m "not gpu" "${par[@]}" "$@"
