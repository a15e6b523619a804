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
# Parts (seconds at most):
#   0. CUDA present? Without a CUDA device the script says so and exits 2 at once.
#   1. the CUDA-only tests (60 + 150): the engine's CUDA paths (aggregators on CUDA,
#      vjp="batched", float16 autocast with the loss scaler; needs torch only), then float16
#      AMP through both adapters (MTLTrainer, ModelSideMTLRCNN under AMPTrainer's GradScaler,
#      MTLOptimWrapper amp=True) for FT, STA, ISTA and with gradient surgery;
#   2. one Mask R-CNN and one mmseg iteration on CUDA per allocation mode (FT, STA, ISTA),
#      beside the upstream iteration (60);
#   3. tools/benchmark_backward.py --device cuda, two runs with their differences (120);
#   4. tools/benchmark_step.py --device cuda with peak CUDA memory (150).
# Parts that need detectron2 / MMSegmentation are reported SKIPPED when the stack does not
# import (a fresh machine: run `make setup` first where PyPI is reachable; see
# docs/benchmarks.md for a machine without network). Exit status: 0 when every part passed,
# 1 when a part failed or timed out, 2 without CUDA, 3 when parts were skipped.
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
if timeout 120 "$PY" -c "import mmseg, mmcv, mmengine, detectron2" > "$LOGDIR/stack" 2>&1; then
  STACK=1
  echo "- stack: detectron2 and MMSegmentation import" >> "$REPORT"
else
  STACK=0
  echo "- stack: detectron2 / MMSegmentation do not import; their parts are SKIPPED ($(tail -n 1 "$LOGDIR/stack"))" >> "$REPORT"
fi

# part NAME SECONDS NEEDS_STACK COMMAND...: run it under `timeout`, append its output
part() {
  local name="$1" limit="$2" needs_stack="$3"
  shift 3
  local log="$LOGDIR/$(echo "$name" | tr -c 'a-zA-Z0-9' '_').log" verdict rc start
  {
    echo
    echo "## $name"
    echo
    echo "\`$*\` (limit ${limit} s)"
  } >> "$REPORT"
  if [ "$needs_stack" = 1 ] && [ "$STACK" = 0 ]; then
    echo "SKIPPED: detectron2 / MMSegmentation do not import" >> "$REPORT"
    SUMMARY+=("| $name | SKIPPED (stack missing) | 0 |")
    [ "$STATUS" = 0 ] && STATUS=3
    return
  fi
  echo "gpu_check: $name ..." >&2
  start=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" > "$log" 2>&1
  rc=$?
  local took=$(( $(date +%s) - start ))
  case "$rc" in
    0) verdict="ok" ;;
    124|137) verdict="TIMEOUT"; STATUS=1 ;;
    *) verdict="FAIL (exit $rc)"; STATUS=1 ;;
  esac
  {
    echo
    echo "$verdict after ${took} s"
    echo
    echo '```'
    grep -v -i -E "warning|warn\(|^ +(import|return|warnings\.)" "$log" | tail -n 80
    echo '```'
  } >> "$REPORT"
  SUMMARY+=("| $name | $verdict | $took |")
  echo "gpu_check: $name: $verdict (${took} s)" >&2
}

part "CUDA tests: engine" 60 0 \
  "$PY" -m pytest -q -rs -p no:cacheprovider tests/core/test_cuda_engine.py \
  tests/core/test_aggregation.py -k "cuda"
part "CUDA tests: float16 AMP through both adapters" 150 1 \
  "$PY" -m pytest -q -rs -p no:cacheprovider tests/d2/test_cuda_amp.py tests/mmseg/test_cuda_amp.py
part "One iteration per allocation mode on CUDA" 60 1 \
  "$PY" tools/benchmark_step.py --device cuda --rows upstream ft sta ista --rounds 1 --steps 1 \
  --warmup 1 --no-memory
part "benchmark_backward --device cuda (two runs)" 120 0 \
  "$PY" tools/benchmark_backward.py --device cuda --rounds 10 --steps 2 --repeat-runs 2
part "benchmark_step --device cuda" 150 1 \
  "$PY" tools/benchmark_step.py --device cuda --rounds 5 --steps 1

{
  echo
  echo "## Summary"
  echo
  echo "| part | result | seconds |"
  echo "|---|---|---|"
  printf '%s\n' "${SUMMARY[@]}"
} >> "$REPORT"
echo "gpu_check: report in $REPORT (exit $STATUS)" >&2
rm -rf "$LOGDIR"
exit "$STATUS"
