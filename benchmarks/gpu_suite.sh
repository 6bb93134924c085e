#!/usr/bin/env bash
# GPU suite of the kernels: the Triton tests (pytest -m gpu; a standalone runner when pytest is missing), then
# bench_paged_attention.py and bench_transfers.py. Run from anywhere; it works from the repository root:
#     PYTHONPATH=src bash benchmarks/gpu_suite.sh
# Every part has a time limit (about 5.5 minutes in all) and a failing part does not stop the others. JSON
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

# part NAME LIMIT_SECONDS CMD...: run CMD under a time limit, stdout to NAME.out, stderr to NAME.log.
part() {
  local name="$1" limit="$2" start rc
  shift 2
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
  part kernel_tests 140 "$PY" - <<'EOF'
import json, sys
import pytest

class Collect:
    def __init__(self):
        self.passed, self.skipped, self.failed = 0, 0, []
    def pytest_runtest_logreport(self, report):
        if report.failed:
            self.failed.append(f"{report.nodeid} ({report.when})")
        elif report.skipped:
            self.skipped += 1
        elif report.when == "call":
            self.passed += 1

files = ["tests/test_kernels_triton.py", "tests/test_kernels_reference.py", "tests/test_kernels_api.py",
         "tests/test_kernels_oracle.py"]
c = Collect()
code = int(pytest.main(["-q", "-m", "gpu", "-p", "no:cacheprovider", *files], plugins=[c]))
print(json.dumps({"tests": "kernels -m gpu", "exit_code": code, "passed": c.passed, "skipped": c.skipped,
                  "failed": c.failed}))
sys.exit(code)
EOF
else
  part kernel_tests 140 "$PY" tests/test_kernels_triton.py
fi

# Without CUDA (a dry run of this script) the benchmarks take their --quick sizes.
QUICK=""
"$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null || QUICK="--quick"
part bench_paged_attention 140 "$PY" benchmarks/bench_paged_attention.py --time-budget-s 110 $QUICK
part bench_transfers 50 "$PY" benchmarks/bench_transfers.py $QUICK

echo "[gpu_suite] done: $failures part(s) failed; summary in $SUMMARY" >&2
cat "$SUMMARY"
exit "$failures"
