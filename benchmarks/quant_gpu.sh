#!/usr/bin/env bash
# Quantized KV on one GPU, in one call: the GPU tests of the quantized kernels and of promotion's mapped reads,
# then bench_quant_promotion, bench_quant_attention and bench_quant_decode (each with its bf16 baseline in the same run). Run from the
# repository root:  PYTHONPATH=src bash benchmarks/quant_gpu.sh
# QUANT_GPU_PARTS picks parts (tests, promotion, attention, decode; all by default); QUANT_PROMOTION_ARGS,
# QUANT_ATTENTION_ARGS, QUANT_DECODE_ARGS and QUANT_TESTS_K pass options on. Each part has a time limit; a failing part does not stop
# the others. JSON results go to $OUT if set (else benchmarks/results/h200), logs next to them.
set -u
cd "$(dirname "$0")/.." || exit 2
PY="${PYTHON:-python3}"
DEST="${OUT:-benchmarks/results/h200}"
mkdir -p "$DEST"
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"
export UAKV_RESULTS_DIR="$DEST"
PARTS=",$(printf %s "${QUANT_GPU_PARTS:-tests,attention,promotion,decode}" | tr -d " "),"
failures=0

# part KEY LIMIT_SECONDS CMD...: unless KEY is left out of QUANT_GPU_PARTS, run CMD under a time limit.
part() {
  local key="$1" limit="$2" start rc
  shift 2
  case "$PARTS" in *",$key,"*) ;; *) return 0 ;; esac
  echo "[quant_gpu] $key (limit ${limit}s)" >&2
  start=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" > "$DEST/quant_$key.log" 2>&1
  rc=$?
  echo "[quant_gpu] $key: exit $rc after $(( $(date +%s) - start )) s" >&2
  tail -n 4 "$DEST/quant_$key.log" | cut -c1-600 >&2
  if [ "$rc" -ne 0 ]; then failures=$((failures + 1)); fi
}

part tests 240 "$PY" -m pytest -q -x -p no:cacheprovider tests/test_kernels_quant_triton.py tests/test_quant_gpu.py \
  tests/test_tiers_mapped_reads.py tests/test_tiers_pinned_load.py tests/test_tiers_promotion_runs.py \
  -k "${QUANT_TESTS_K:-not nothing}"
# shellcheck disable=SC2086  # the ARGS variables are word lists on purpose
part promotion 200 "$PY" benchmarks/bench_quant_promotion.py ${QUANT_PROMOTION_ARGS:-}
# shellcheck disable=SC2086
part attention 300 "$PY" benchmarks/bench_quant_attention.py ${QUANT_ATTENTION_ARGS:-}
# shellcheck disable=SC2086
part decode 300 "$PY" benchmarks/bench_quant_decode.py ${QUANT_DECODE_ARGS:-}
exit "$failures"
