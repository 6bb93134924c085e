#!/usr/bin/env bash
# GPU suite: the GPU tests (pytest -m gpu: Triton kernels and the model runner; a standalone kernel runner when
# pytest is missing), then bench_paged_attention.py, bench_transfers.py and bench_end_to_end_gpu.py (Llama-3-8B
# shape, random weights). Run from anywhere; it works from the repository root:
#     PYTHONPATH=src bash benchmarks/gpu_suite.sh
#     GPU_SUITE_PARTS="e2e,attention" bash benchmarks/gpu_suite.sh     # only some parts
# Parts (names for GPU_SUITE_PARTS): tests, attention, transfers, e2e, serving; all but serving by default
# (serving alone fits one call: GPU_SUITE_PARTS=serving). Every part has a time limit (500 s for the default
# parts, at most 540 s with the kill grace; serving $SERVING_BUDGET_S + 40, default 330 s) and a failing part does not stop the others. JSON
# lines go to $OUT if set, else benchmarks/results/: one file per part plus gpu_suite.jsonl with one line per
# part (its result, or {"part": ..., "error": ...} with the tail of its log). Python: $PYTHON or python3.
set -u
cd "$(dirname "$0")/.." || exit 2
PY="${PYTHON:-python3}"
DEST="${OUT:-benchmarks/results}"
mkdir -p "$DEST"
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"
export UAKV_RESULTS_DIR="$DEST"
SUMMARY="$DEST/gpu_suite.jsonl"
: > "$SUMMARY"
failures=0
PARTS=",$(printf %s "${GPU_SUITE_PARTS:-tests,attention,transfers,e2e}" | tr -d " "),"

# record NAME RC SECONDS: append the part's last JSON line to the summary, or an error line with its log tail.
record() {
  "$PY" - "$1" "$2" "$3" "$DEST/$1.out" "$DEST/$1.log" >> "$SUMMARY" <<'EOF'
import json, sys
name, rc, took, out_path, log_path = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
def read(path):
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except OSError:
        return ""
lines = [l for l in read(out_path).splitlines() if l.startswith("{")]
if rc == 0 and lines:
    print(json.dumps({"part": name, "seconds": took, "result": json.loads(lines[-1])}))
else:
    why = "timed out" if rc in (124, 137) else f"exit status {rc}"
    print(json.dumps({"part": name, "seconds": took, "error": why,
                      "result": json.loads(lines[-1]) if lines else None, "log_tail": read(log_path)[-3000:]}))
EOF
}

# part NAME KEY LIMIT_SECONDS CMD...: unless KEY is left out of GPU_SUITE_PARTS, run CMD under a time limit,
# stdout to NAME.out, stderr to NAME.log.
part() {
  local name="$1" key="$2" limit="$3" start rc
  shift 3
  case "$PARTS" in
    *",$key,"*) ;;
    *) echo "[gpu_suite] $name skipped (not in GPU_SUITE_PARTS)" >&2; return 0 ;;
  esac
  echo "[gpu_suite] $name (limit ${limit}s)" >&2
  start=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" > "$DEST/$name.out" 2> "$DEST/$name.log"
  rc=$?
  record "$name" "$rc" "$(( $(date +%s) - start ))"
  if [ "$rc" -ne 0 ]; then failures=$((failures + 1)); echo "[gpu_suite] $name failed ($rc)" >&2; fi
}

"$PY" - >> "$SUMMARY" 2>/dev/null <<'EOF' || echo '{"part": "environment", "error": "torch did not import"}' >> "$SUMMARY"
import json, torch
env = {"torch": torch.__version__, "cuda": torch.cuda.is_available(),
       "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
for module in ("transformers", "xxhash", "redis"):  # the model runner and the tiers import them
    try:
        env[module] = getattr(__import__(module), "__version__", "present")
    except Exception as exc:  # reported, not fatal
        env[module] = repr(exc)
try:
    import pytest
    env["pytest"] = pytest.__version__
except Exception:  # the suite falls back to the standalone runner
    env["pytest"] = None
try:
    import triton
    env["triton"] = triton.__version__
except Exception as exc:  # reported, not fatal
    env["triton"] = repr(exc)
print(json.dumps({"part": "environment", "result": env}))
EOF

if "$PY" -c "import pytest" 2>/dev/null; then
  # pytest in-process with a tiny plugin, so that the part ends with one JSON line like the others.
  part gpu_tests tests 120 "$PY" - <<'EOF'
import json, sys
import pytest

class Collect:
    def __init__(self):
        self.passed, self.skipped, self.failed = 0, 0, []
    def pytest_collectreport(self, report):
        if report.failed:  # e.g. a module whose imports fail on this machine; the other files still run
            self.failed.append(f"{report.nodeid or report.fspath} (collect: {str(report.longrepr).splitlines()[-1][:200]})")
    def pytest_runtest_logreport(self, report):
        if report.failed:
            self.failed.append(f"{report.nodeid} ({report.when})")
        elif report.skipped:
            self.skipped += 1
        elif report.when == "call":
            self.passed += 1

files = ["tests"]  # every test marked gpu: kernels, paged cache, HF adapter, transfers, model runner
c = Collect()
code = int(pytest.main(["-q", "-m", "gpu", "-p", "no:cacheprovider", "--continue-on-collection-errors", *files],
                       plugins=[c]))
print(json.dumps({"tests": "all tests marked gpu", "exit_code": code, "passed": c.passed, "skipped": c.skipped,
                  "failed": c.failed}))
sys.exit(code)
EOF
else
  part gpu_tests tests 90 "$PY" tests/test_kernels_triton.py
fi

# Without CUDA (a dry run of this script) the benchmarks take their --quick sizes.
QUICK=""
"$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null || QUICK="--quick"
part bench_paged_attention attention 45 "$PY" benchmarks/bench_paged_attention.py --time-budget-s 25 $QUICK
part bench_transfers transfers 30 "$PY" benchmarks/bench_transfers.py $QUICK
part end_to_end_gpu e2e 335 "$PY" benchmarks/bench_end_to_end_gpu.py --time-budget-s 290 $QUICK
# The serving benchmark's GPU mode: our server (continuous batching) vs ModelRunner's fixed batch and transformers.
SERVING_MODE="--gpu"
[ -n "$QUICK" ] && SERVING_MODE="--gpu --dry-run-cpu"
SERVING_BUDGET_S="${SERVING_BUDGET_S:-290}"
part bench_serving serving "$((SERVING_BUDGET_S + 40))" "$PY" benchmarks/bench_serving.py $SERVING_MODE --time-budget-s "$SERVING_BUDGET_S"

echo "[gpu_suite] done: $failures part(s) failed; summary in $SUMMARY" >&2
cat "$SUMMARY"
exit "$failures"
