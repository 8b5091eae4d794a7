#!/usr/bin/env bash
# One device call: GPU tests, compute-sanitizer (memcheck + racecheck) on tiny shapes, timings.
# Usage (repo root, built .so files present): OUT=/some/dir bash tools/device/device_check.sh [alt_cuda_so]
# With alt_cuda_so, the same timings also run against that build of bsa_ext/_cuda (A/B in one process pool).
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=.
OUT=${OUT:-/tmp/bsa_out}; mkdir -p "$OUT"
CS=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
nvidia-smi --query-gpu=name --format=csv,noheader > "$OUT/gpu.txt"
timeout 150 python3 -m pytest python_tests/test_cuda.py -q --maxfail=10 --tb=short -p no:cacheprovider > "$OUT/tests.log" 2>&1
timeout 50 "$CS" --tool memcheck --kernel-name kns=bsa python3 tools/device/sanitize_small.py > "$OUT/memcheck.log" 2>&1
timeout 50 "$CS" --tool racecheck --kernel-name kns=bsa python3 tools/device/sanitize_small.py > "$OUT/racecheck.log" 2>&1
timeout 120 python3 tools/device/time_kernels.py W720s W720s-c128 W720 W720s-cdf > "$OUT/timing.log" 2>&1
if [ $# -ge 1 ]; then
  rm -rf /tmp/bsa_alt && mkdir -p /tmp/bsa_alt && cp -r bsa_ext /tmp/bsa_alt/ && cp "$1" /tmp/bsa_alt/bsa_ext/_cuda.abi3.so
  (cd /tmp/bsa_alt && OUT= PYTHONPATH=/tmp/bsa_alt timeout 60 python3 "$OLDPWD/tools/device/time_kernels.py" W720s W720s-c128) > "$OUT/timing_alt.log" 2>&1
  if ! grep -q " passed" "$OUT/tests.log" || grep -q "failed" "$OUT/tests.log"; then
    (cd /tmp/bsa_alt && cp -r "$OLDPWD/python_tests" . && timeout 100 python3 -m pytest python_tests/test_cuda.py -q --tb=line -p no:cacheprovider) > "$OUT/tests_alt.log" 2>&1
  fi
fi
cat "$OUT/gpu.txt"; tail -6 "$OUT/tests.log"; tail -1 "$OUT/memcheck.log"; tail -1 "$OUT/racecheck.log"
tail -12 "$OUT/timing.log"; [ -f "$OUT/timing_alt.log" ] && { echo "--- alt build"; tail -8 "$OUT/timing_alt.log"; }
[ -f "$OUT/tests_alt.log" ] && { echo "--- alt tests"; tail -3 "$OUT/tests_alt.log"; }
true
