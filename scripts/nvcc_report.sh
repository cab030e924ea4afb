#!/usr/bin/env bash
# Registers and spills of every CUDA kernel in csrc/cuda (nvcc -Xptxas -v, the CMake build's flags),
# for sm_80 and sm_90 by default; JSON with --json OUT; exit 1 when a kernel spills or a file fails.
# Needs nvcc (no GPU). Same as `k2sys kernels nvcc`; the normal build is untouched (for the report
# inside `pip install`, configure with -DK2SYS_PTXAS_VERBOSE=ON).
#
#   bash scripts/nvcc_report.sh --arch 80 90 --json /tmp/nvcc.json
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] && . .venv/bin/activate
exec python -m k2sys.kernels.cli nvcc "$@"
