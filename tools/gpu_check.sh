#!/usr/bin/env bash
# GPU check (issue 12, item 4): everything this project can only verify on a CUDA device, in
# one bounded run (< 8 minutes: every part has its own `timeout`), written to one report file.
#
#   tools/gpu_check.sh [REPORT]         (make gpu-check)
#
# REPORT defaults to $OUT/gpu_report.md when $OUT is set, else ./gpu_report.md.
# Python: $PYTHON, else .venv/bin/python when `make setup` made one, else python3. The
# working tree is put first on PYTHONPATH, so mtl_plugins needs no install.
#
# Parts (seconds at most; a total budget, $GPU_CHECK_TOTAL_S or 470 s, cuts later ones short):
#   0. CUDA present? Without a CUDA device the script says so and exits 2 at once.
#   1. the CUDA-only tests: the engine's CUDA paths (aggregators on CUDA, vjp="batched",
#      float16 autocast with the loss scaler, the fused Gramian kernel; torch only) (75);
#      float16 AMP through the detectron2 adapter (MTLTrainer, ModelSideMTLRCNN under
#      AMPTrainer's GradScaler) (80) and through MTLOptimWrapper amp=True (60), for FT, STA,
#      ISTA and with gradient surgery;
#   2. one Mask R-CNN and one mmseg iteration on CUDA per allocation mode (FT, STA, ISTA),
#      beside the upstream iteration, in one process (50);
#   3. tools/benchmark_backward.py --device cuda, two runs with their differences (90);
#   4. tools/benchmark_step.py --device cuda, two runs, with peak CUDA memory (one process
#      per row, 8 at a time) (180; on an H200 the memory processes took most of it).
# On a machine without network (the `device` tool's), carry the stack that
# tools/gpu_stack.sh builds and put it on PYTHONPATH:
#   PYTHONPATH=$PWD/.gpu_stack PYTHON=python3 bash tools/gpu_check.sh
# A part whose framework does not import (detectron2; MMSegmentation with mmcv's compiled
# ops) is reported SKIPPED: on a fresh machine run `make setup` first where PyPI is
# reachable; docs/benchmarks.md says what runs on a machine without network. Exit status: 0
# when every part passed, 1 when a part failed or timed out, 2 without CUDA, 3 when parts
# were skipped.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
if [ -n "${1:-}" ]; then
  REPORT="$1"
elif [ -n "${OUT:-}" ]; then
  REPORT="$OUT/gpu_report.md"
else
  REPORT="$ROOT/gpu_report.md"
fi
if [ -n "${PYTHON:-}" ]; then
  PY="$PYTHON"
elif [ -x "$ROOT/.venv/bin/python" ]; then
  PY="$ROOT/.venv/bin/python"
else
  PY=python3
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
mkdir -p "$(dirname "$REPORT")"
LOGDIR="$(mktemp -d)"
SUMMARY=()
STATUS=0
START=$(date +%s)

{
  echo "# GPU check ($(date -u '+%Y-%m-%d %H:%M UTC'))"
  echo
  echo "- commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  echo "- python: $PY ($("$PY" --version 2>&1))"
} > "$REPORT"

# ---- 0. CUDA present?
if ! DEV="$(timeout 60 "$PY" -c 'import torch, sys
if not torch.cuda.is_available():
    sys.exit(1)
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name(0)}")' 2>&1)"; then
  MSG="no CUDA device: torch.cuda.is_available() is False (or torch does not import) with $PY; nothing to check here. ${DEV:+($DEV)}"
  echo "gpu_check: $MSG" >&2
  { echo; echo "**$MSG**"; } >> "$REPORT"
  exit 2
fi
echo "- device: $DEV" >> "$REPORT"
# stack NAME IMPORTS: 1 when `import IMPORTS` works, else 0 (and the reason in the report)
stack() {
  if timeout 60 "$PY" -c "import $2" > "$LOGDIR/stack" 2>&1; then
    echo "- $1: imports" >> "$REPORT"
    echo 1
  else
    echo "- $1: does not import, its parts are SKIPPED ($(tail -n 1 "$LOGDIR/stack"))" >> "$REPORT"
    echo 0
  fi
}
D2="$(stack detectron2 "detectron2, mtl_plugins.d2")"
MMSEG="$(stack MMSegmentation "mmseg.models, mmcv.ops, mtl_plugins.mmseg")"
FRAMEWORKS=()
[ "$D2" = 1 ] && FRAMEWORKS+=(d2)
[ "$MMSEG" = 1 ] && FRAMEWORKS+=(mmseg)
TOTAL_S="${GPU_CHECK_TOTAL_S:-470}"
DEADLINE=$(( START + TOTAL_S ))

# part NAME SECONDS NEEDED COMMAND...: run COMMAND under `timeout` (SECONDS, or what is left
# of the total budget), append its output; NEEDED=0 means it needs no framework
skip() {
  echo "SKIPPED: $2" >> "$REPORT"
  SUMMARY+=("| $1 | SKIPPED ($2) | 0 |")
  [ "$STATUS" = 0 ] && STATUS=3
}
part() {
  local name="$1" limit="$2" needed="$3"
  shift 3
  local log="$LOGDIR/part.log" verdict rc start took left
  {
    echo
    echo "## $name"
    echo
    echo "\`$*\`"
  } >> "$REPORT"
  case "$needed" in
    d2) [ "$D2" = 1 ] || { skip "$name" "detectron2 missing"; return; } ;;
    mmseg) [ "$MMSEG" = 1 ] || { skip "$name" "MMSegmentation missing"; return; } ;;
    any) [ "${#FRAMEWORKS[@]}" -gt 0 ] || { skip "$name" "no framework"; return; } ;;
  esac
  left=$(( DEADLINE - $(date +%s) ))
  if [ "$left" -lt 15 ]; then
    skip "$name" "the ${TOTAL_S} s budget is spent"
    return
  fi
  [ "$left" -lt "$limit" ] && limit="$left"
  echo "gpu_check: $name (at most ${limit} s) ..." >&2
  start=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" > "$log" 2>&1
  rc=$?
  took=$(( $(date +%s) - start ))
  case "$rc" in
    0) verdict="ok" ;;
    124|137) verdict="TIMEOUT"; STATUS=1 ;;
    *) verdict="FAIL (exit $rc)"; STATUS=1 ;;
  esac
  {
    echo
    echo "$verdict after ${took} s (limit ${limit} s)"
    echo
    echo '```'
    grep -v -i -E "warning|warn\(|^ +(import|return|warnings\.)" "$log" | tail -n 400
    echo '```'
  } >> "$REPORT"
  SUMMARY+=("| $name | $verdict | $took |")
  echo "gpu_check: $name: $verdict (${took} s)" >&2
}

PYTEST=("$PY" -m pytest -q -rs -p no:cacheprovider)
part "CUDA tests: engine" 75 0 "${PYTEST[@]}" tests/core/test_cuda_engine.py \
  tests/core/test_aggregation.py -k cuda
part "CUDA tests: float16 AMP through detectron2" 80 d2 "${PYTEST[@]}" tests/d2/test_cuda_amp.py
part "CUDA tests: float16 AMP through MMSegmentation" 60 mmseg "${PYTEST[@]}" \
  tests/mmseg/test_cuda_amp.py
part "One iteration per allocation mode on CUDA (${FRAMEWORKS[*]:-no framework})" 50 any \
  "$PY" tools/benchmark_step.py --device cuda --frameworks "${FRAMEWORKS[@]}" \
  --rows upstream ft sta ista --rounds 1 --steps 1 --warmup 1 --no-memory
part "benchmark_backward --device cuda (two runs)" 90 0 \
  "$PY" tools/benchmark_backward.py --device cuda --rounds 10 --steps 2 --repeat-runs 2
part "benchmark_step --device cuda (two runs, peak memory)" 180 any \
  "$PY" tools/benchmark_step.py --device cuda --frameworks "${FRAMEWORKS[@]}" --rounds 5 \
  --steps 1 --repeat-runs 2 --memory-jobs 8

{
  echo
  echo "## Summary"
  echo
  echo "| part | result | seconds |"
  echo "|---|---|---|"
  printf '%s\n' "${SUMMARY[@]}"
  echo
  echo "total: $(( $(date +%s) - START )) s"
} >> "$REPORT"
echo "gpu_check: report in $REPORT (exit $STATUS)" >&2
rm -rf "$LOGDIR"
exit "$STATUS"
