#!/usr/bin/env bash
# Every CPU benchmark in one sequence, into benchmarks/results/ (or $OUT_DIR): the recorded figures
# of docs/benchmarks.md come from one run of this script on one machine, from a committed tree
# (each JSON's env says the commit and whether the tree was dirty). Nothing else should run on the
# machine meanwhile: every figure is a ratio measured in the same run, but a busy machine widens
# the spreads. ~30-40 min on the 2-core dev VM.
#
#   bash scripts/bench_all.sh "note describing the machine" [bench ...]
#
# With bench names (update switch train rollout agent decode load_memory moe fp8_quant
# fp8_tolerance) only those run. The agent benchmark needs the tiny-k2-agent SFT checkpoint and
# builds it (--build) when runs/tiny-k2-agent/sft_hf is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT_DIR=${OUT_DIR:-benchmarks/results}
NOTE=${1:-"$(nproc) cores, $(uname -m); nothing else running"}
shift || true
ALL=(update switch train rollout agent decode load_memory moe fp8_quant fp8_tolerance)
RUN=("${@:-${ALL[@]}}")
mkdir -p "$OUT_DIR"
for b in "${RUN[@]}"; do
  out="$OUT_DIR/bench_${b}_cpu.json"
  extra=()
  case "$b" in
    agent) extra=(--build) ;;
    moe) extra=(--repeats 20) ;;
    update|switch|train|rollout|decode|load_memory|fp8_quant|fp8_tolerance) ;;
    *) echo "bench_all: unknown benchmark '$b' (one of: ${ALL[*]})" >&2; exit 2 ;;
  esac
  echo "=== bench_$b -> $out ($(date -u +%H:%M:%S))"
  t0=$SECONDS
  "$PY" "benchmarks/bench_$b.py" --json "$out.tmp" --note "$NOTE" \
    "${extra[@]}"
  mv "$out.tmp" "$out"  # a run that fails leaves the previous record in place
  echo "=== bench_$b done in $((SECONDS - t0)) s"
done
