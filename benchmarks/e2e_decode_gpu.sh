#!/usr/bin/env bash
# Batch-1 decode on one GPU, in one call: the GPU tests of the fused decode ops and of the model paths that decode
# through them, then e2e_decode_ab.py (the decode ops A/B: graph step, end to end, products alone, kernel
# profile) and bench_end_to_end_gpu part d (decode at batch 1 and 32 with the default ops). Run from the
# repository root:  PYTHONPATH=src bash benchmarks/e2e_decode_gpu.sh
# DECODE_GPU_PARTS picks parts (tests, ab, e2e; all by default). Each part has a time limit; a failing part does not
# stop the others. JSON results go to $OUT if set (else benchmarks/results/h200), logs next to them.
set -u
cd "$(dirname "$0")/.." || exit 2
PY="${PYTHON:-python3}"
DEST="${OUT:-benchmarks/results/h200}"
mkdir -p "$DEST"
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"
export UAKV_RESULTS_DIR="$DEST"
PARTS=",$(printf %s "${DECODE_GPU_PARTS:-tests,ab,e2e}" | tr -d " "),"
failures=0

# part KEY LIMIT_SECONDS CMD...: unless KEY is left out of DECODE_GPU_PARTS, run CMD under a time limit.
part() {
  local key="$1" limit="$2" start rc
  shift 2
  case "$PARTS" in *",$key,"*) ;; *) return 0 ;; esac
  echo "[decode_gpu] $key (limit ${limit}s)" >&2
  start=$(date +%s)
  timeout --kill-after=5 "$limit" "$@" > "$DEST/decode_$key.log" 2>&1
  rc=$?
  echo "[decode_gpu] $key: exit $rc after $(( $(date +%s) - start )) s" >&2
  tail -n 6 "$DEST/decode_$key.log" | cut -c1-1500 >&2
  if [ "$rc" -ne 0 ]; then failures=$((failures + 1)); fi
}

part tests 100 "$PY" -m pytest -q -p no:cacheprovider tests/test_fused_decode_ops.py tests/test_model_runner_gpu.py \
  tests/test_scheduler_gpu.py tests/test_paged_llama_prefill.py tests/test_quant_gpu.py tests/test_presses_gpu.py \
  -k "${DECODE_TESTS_K:-not nothing}"
part ab 130 "$PY" benchmarks/e2e_decode_ab.py
part e2e 75 "$PY" benchmarks/bench_end_to_end_gpu.py --parts d --batches 1 32 --prompt-tokens 2048 --hf-budget-s 5 \
  --time-budget-s 65
exit "$failures"
