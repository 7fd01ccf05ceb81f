#!/usr/bin/env bash
# Every GPU check and the benchmark in one device call:
#   bash tools/gpu_check.sh [all|tests|sanitize|bench] [bench flags, e.g. --quick]
# Logs go to $OUT (the device tool brings that folder back) or .out/; a short status
# table is printed last. Each stage has a time limit; `all` can outlast one 10-minute
# device call, so run `tests` + `sanitize` in one call and `bench` in the next.
set -u
cd "$(dirname "$0")/.."
stage=${1:-all}; shift || true
OUT=${OUT:-.out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD:$PWD/tests PYTHONUNBUFFERED=1
export FLASHMLA_JIT_CACHE_DIR=${FLASHMLA_JIT_CACHE_DIR:-/tmp/flashmla_jit_cache}
status=()
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import cuda.bindings, cupy, torch; print('cuda-bindings', cuda.bindings.__version__, '| cupy', cupy.__version__, '| torch', torch.__version__)"

if [[ $stage == all || $stage == tests ]]; then
  # every variant compiled first, in parallel (a fresh machine has an empty kernel cache)
  timeout 200 python3 -m flashmla_jit precompile --all --jobs "$(nproc)" 2>&1 | tail -1
  timeout 400 python3 -m pytest tests -q -rs --timeout 120 2>&1 | tee "$OUT/pytest.log" | tail -40
  status+=("pytest: $(tail -1 "$OUT/pytest.log")")
fi
if [[ $stage == all || $stage == sanitize ]]; then
  for tool in memcheck racecheck; do
    # --report-api-errors no: cuda-bindings probes cuGetProcAddress for entry points the
    # driver lacks at import, which memcheck would count as errors; kernel accesses are still checked.
    timeout 240 compute-sanitizer --tool $tool --report-api-errors no --error-exitcode 9 python3 tools/sanitize_case.py > "$OUT/sanitizer_$tool.log" 2>&1
    rc=$?
    status+=("compute-sanitizer $tool: rc=$rc, $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$OUT/sanitizer_$tool.log" | tail -1)")
    tail -4 "$OUT/sanitizer_$tool.log"
  done
  # Where racecheck's reports are (count, file:line of the first access): known ones sit in
  # decode_seesaw.cuh's named-barrier handoffs and epilogue (docs/PERF.md, v15).
  status+=("racecheck reports by line: $(grep 'Race reported' "$OUT/sanitizer_racecheck.log" |
    grep -oE '[a-z_]+\.cuh:[0-9]+' | sort | uniq -c | tr -s ' \n' ' ')")
  # racecheck itself on a race-free kernel in the seesaw's arrive / sync handoff pattern:
  # its reports on the seesaw epilogue are of the kind it gives here (tools/racecheck_arrive.py).
  for mode in sync arrive; do
    timeout 60 compute-sanitizer --tool racecheck --report-api-errors no python3 tools/racecheck_arrive.py $mode \
      > "$OUT/racecheck_arrive_$mode.log" 2>&1
    status+=("racecheck, race-free handoff ($mode): $(grep -E 'sums correct|wrong sums' "$OUT/racecheck_arrive_$mode.log" | tail -1), $(grep -E 'RACECHECK SUMMARY' "$OUT/racecheck_arrive_$mode.log" | tail -1)")
  done
fi
if [[ $stage == all || $stage == bench ]]; then
  timeout 420 python3 tools/bench.py "$@" --json "$OUT/bench.json" 2>&1 | tee "$OUT/bench.log" | tail -40
  status+=("bench: exit ${PIPESTATUS[0]}")
  timeout 60 python3 tools/host_profile.py > "$OUT/host_profile.log" 2>&1
fi
echo
printf '%s\n' "${status[@]}"
