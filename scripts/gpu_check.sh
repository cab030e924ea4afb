#!/usr/bin/env bash
# One prepared GPU run (e.g. the device tool's H200): build the extensions, run the GPU-marked
# tests, the MoE benchmark and a short tile tuning; logs and JSON go to $OUT (default /tmp/gpu_check).
#
#   bash scripts/gpu_check.sh            # ~8-10 min on an H200, most of it Triton compiles
#
# Optional: wheels for packages the machine lacks (megatron-core for the trainer GPU tests) in
# .whl/ are installed to /tmp/site first. Every stage has its own timeout so one hang does not
# cost the rest; the exit status is the number of failed stages.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
PY=${PYTHON:-python3}
failed=0
stage() {  # stage NAME SECONDS CMD...: run with a timeout, log to $OUT/NAME.log, echo the tail
  local name=$1 secs=$2; shift 2
  echo "== $(date +%T) $name"
  timeout "$secs" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  tail -n 25 "$OUT/$name.log"
  [ "$rc" -eq 0 ] || { echo "!! $name exited $rc"; failed=$((failed + 1)); }
}
if compgen -G ".whl/*.whl" >/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
stage build 300 $PY -m pip install -v --no-build-isolation --no-deps -e .
stage ext 60 $PY -c "import json, k2sys.ext as e; print(json.dumps(e.summary(), indent=1))"
stage gpu_tests 240 $PY -m pytest -q -ra -m gpu tests/test_kernels_moe.py tests/test_kernels_router.py \
  tests/test_kernels_integration.py tests/test_ckpt_shm.py tests/test_ext_cuda.py
stage bench_moe 300 $PY benchmarks/bench_moe.py --json "$OUT/moe_h200.json" --fp8
stage tune_moe 300 $PY benchmarks/tune_moe.py --max-configs 8 --tokens 1 64 1024 4096 --out-dir "$OUT/configs"
echo "== $(date +%T) done, $failed stage(s) failed; files in $OUT"
exit "$failed"
