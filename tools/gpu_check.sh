#!/usr/bin/env bash
# Every GPU check and the benchmark in one device call (tools/README: device tool):
#   bash tools/gpu_check.sh [--quick]
# Prints a short table last; full logs go to $OUT (or .out/).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-.out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD:$PWD/tests PYTHONUNBUFFERED=1
export FLASHMLA_JIT_CACHE_DIR=${FLASHMLA_JIT_CACHE_DIR:-/tmp/flashmla_jit_cache}
status=()
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import cuda.bindings, cupy, torch; print('cuda-bindings', cuda.bindings.__version__, '| cupy', cupy.__version__, '| torch', torch.__version__)"

timeout 900 python3 -m pytest tests -q -rs -x --timeout 300 2>&1 | tee "$OUT/pytest.log" | tail -25
status+=("pytest: $(tail -1 "$OUT/pytest.log")")

for tool in memcheck racecheck; do
  timeout 600 compute-sanitizer --tool $tool --error-exitcode 9 python3 tools/sanitize_case.py > "$OUT/sanitizer_$tool.log" 2>&1
  rc=$?
  status+=("compute-sanitizer $tool: rc=$rc, $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$OUT/sanitizer_$tool.log" | tail -1)")
  tail -3 "$OUT/sanitizer_$tool.log"
done

timeout 900 python3 tools/bench.py "$@" --json "$OUT/bench.json" 2>&1 | tee "$OUT/bench.log" | tail -40
echo
printf '%s\n' "${status[@]}"
