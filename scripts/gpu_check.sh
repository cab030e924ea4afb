#!/usr/bin/env bash
# One prepared GPU run (e.g. one H200), from a clean checkout with only what the repository installs:
# build the extensions, run the GPU-marked tests, compile every kernel, then the whole GPU path with
# figures as ratios to bounds measured in the same run. Logs and JSON go to $OUT (default
# /tmp/gpu_check); $OUT/gpu_check.json lists every stage (ok / failed / timeout / skipped + reason).
#
#   bash scripts/gpu_check.sh            # < 8 min on an H200 (each stage has its own timeout)
#
# Stages (JSON per stage in $OUT):
#   build, ext            pip install -e . (CUDA extension for sm_80/90); k2sys.ext.summary()
#   gpu_tests             every `-m gpu` test (compiled Triton kernels, CUDA extension, shm/IPC)
#   compile_sm90, nvcc    k2sys kernels compile --arch 90 (every kernel x config x dtype); nvcc -Xptxas -v
#   onload                pinned H2D onload (k2sys ring, trainer StateOffloader) / cudaMemcpy pinned (>= 0.9)
#   switch                colocated switch on one GPU, device bytes from cudaMemGetInfo before/after
#   moe                   fused MoE vs dense bf16 matmul of equal FLOPs (>= 0.35) and vs torch ref (>= 5x)
#   decode                native engine decode bytes/s vs HBM copy bandwidth, batch 1
#   mfu                   Megatron trainer model FLOP/s on k2-small vs a dense bf16 matmul
#   sglang, te            skipped with a reason unless SGLang / Transformer Engine are installed
# Optional: wheels the machine lacks (e.g. megatron-core) in .whl/ are installed to /tmp/site first;
# TUNE=1 adds a short tile-tuning stage. Exit status = number of failed stages (skips are not failures).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 OMP_NUM_THREADS=${OMP_NUM_THREADS:-8} PYTHONWARNINGS=ignore
PY=${PYTHON:-python3}
BUDGET=${BUDGET:-450}  # seconds; a stage that would start later is skipped (the whole run must fit 8 min)
START=$(date +%s)
failed=0
: >"$OUT/stages.tsv"
record() { printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$5" >>"$OUT/stages.tsv"; }
skip() { echo "-- skip $1: $2"; record "$1" skipped "" 0 "$2"; }
stage() {  # stage NAME SECONDS CMD...: run with a timeout, log to $OUT/NAME.log, echo the tail
  local name=$1 secs=$2; shift 2
  local now; now=$(date +%s)
  if [ $((now - START)) -ge "$BUDGET" ]; then skip "$name" "time budget ($BUDGET s) used up"; return; fi
  echo "== $(date +%T) $name (timeout ${secs}s)"
  local t0=$SECONDS
  timeout "$secs" "$@" >"$OUT/$name.log" 2>&1
  local rc=$? dt=$((SECONDS - t0)) status=ok
  tail -n 20 "$OUT/$name.log"
  if [ "$rc" -eq 124 ]; then status=timeout; elif [ "$rc" -ne 0 ]; then status=failed; fi
  [ "$status" = ok ] || { echo "!! $name: $status (exit $rc)"; failed=$((failed + 1)); }
  record "$name" "$status" "$rc" "$dt" ""
}
if compgen -G ".whl/*.whl" >/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv | tee "$OUT/gpu.txt"
ARCH=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n1 | tr -d '. ')
ARCH=${ARCH:-90}

stage build 240 $PY -m pip install -v --no-build-isolation --no-deps -e .  # CMake default: sm_80 + sm_90
stage ext 60 $PY -c "import json, k2sys.ext as e; s = e.summary(); print(json.dumps(s, indent=1)); \
assert e.HAS_CUDA, 'k2sys._cuda not usable'"
mapfile -t GPU_TESTS < <(grep -l "pytest.mark.gpu" tests/*.py)
stage gpu_tests 200 $PY -m pytest -q -ra -m gpu -p no:cacheprovider --junitxml="$OUT/gpu_tests.xml" "${GPU_TESTS[@]}"
stage compile_sm90 120 $PY -m k2sys.cli kernels compile --arch 90 --json "$OUT/compile_sm90.json" --quiet
if command -v nvcc >/dev/null || [ -x /usr/local/cuda/bin/nvcc ]; then
  stage nvcc 60 $PY -m k2sys.cli kernels nvcc --arch 80 90 --json "$OUT/nvcc.json"
else
  skip nvcc "no nvcc on this machine (the CUDA extension build above used the toolkit pip found)"
fi
stage onload 60 $PY benchmarks/gpu_path.py onload --gib 4 --json "$OUT/onload.json"
stage switch 120 $PY benchmarks/gpu_path.py switch --preset k2-small --json "$OUT/switch.json"
stage moe 150 $PY benchmarks/bench_moe.py --shapes ep8 tp8 --tokens 256 4096 --train-tokens 4096 --fp8 \
  --iters 10 --warmup 2 --json "$OUT/moe.json"
stage decode 90 $PY benchmarks/gpu_path.py decode --preset k2-small --json "$OUT/decode.json"
stage mfu 120 $PY benchmarks/gpu_path.py mfu --preset k2-small --json "$OUT/mfu.json"
if $PY -c "import sglang" >/dev/null 2>&1; then
  stage sglang 120 $PY -m pytest -q -ra -m gpu -p no:cacheprovider tests/test_sglang_adapter.py
else
  skip sglang "sglang is not installed (the repository does not install it; see docs/FACTS.md)"
fi
if $PY -c "import transformer_engine" >/dev/null 2>&1; then
  stage te 120 $PY benchmarks/gpu_path.py mfu --preset k2-small --steps 5 --json "$OUT/mfu_te.json"
else
  skip te "transformer_engine is not installed (the repository does not install it): trainer ran the local spec"
fi
if [ "${TUNE:-0}" = 1 ]; then
  stage tune_moe 240 $PY benchmarks/tune_moe.py --max-configs 8 --tokens 1 64 1024 4096 --out-dir "$OUT/configs"
fi

# ---- issue 12 (SGLang as the rollout engine): the tiny recipe with engine.kind=sglang on one GPU,
# colocated with the real sglang.launch_server (SGLangTensorSink, CUDA IPC), plus the CUDA payload
# tests; switch times, device memory per switch and the mismatch probe land in
# $OUT/sglang_recipe_switch.json. Needs sglang==0.5.23 installed whole (sgl_kernel); not installed here.
if $PY -c "import sglang, sgl_kernel" >/dev/null 2>&1; then
  stage sglang_recipe 420 env OUT="$OUT" $PY -m pytest -q -ra -m gpu -p no:cacheprovider \
    tests/test_sglang_recipe.py tests/test_sglang_payloads.py
else
  skip sglang_recipe "sglang with sgl_kernel is not installed (the recipe launches sglang.launch_server)"
fi

total=$(( $(date +%s) - START ))
$PY - "$OUT" "$total" "$ARCH" <<'EOF'
import json, os, sys
out, total, arch = sys.argv[1], int(sys.argv[2]), sys.argv[3]
stages = []
for line in open(os.path.join(out, "stages.tsv")):
    name, status, rc, secs, reason = line.rstrip("\n").split("\t")
    js = os.path.join(out, f"{name}.json")
    stages.append({"name": name, "status": status, "exit": int(rc) if rc else None, "seconds": int(secs),
                   "reason": reason or None, "log": f"{name}.log" if status != "skipped" else None,
                   "json": f"{name}.json" if os.path.exists(js) else None})
gpu = open(os.path.join(out, "gpu.txt")).read().strip().splitlines()[-1:] if os.path.exists(os.path.join(out, "gpu.txt")) else []
body = {"gpu": gpu[0] if gpu else None, "compute_capability": arch, "total_seconds": total, "stages": stages,
        "failed": sum(s["status"] in ("failed", "timeout") for s in stages)}
tmp = os.path.join(out, ".gpu_check.json.tmp")
with open(tmp, "w") as f:
    json.dump(body, f, indent=1)
os.replace(tmp, os.path.join(out, "gpu_check.json"))
print(json.dumps({s["name"]: s["status"] for s in stages}))
EOF
echo "== $(date +%T) done in ${total}s, $failed stage(s) failed; files in $OUT"
exit "$failed"
