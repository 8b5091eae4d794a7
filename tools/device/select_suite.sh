#!/bin/bash
# One device call for the selection work: tests, compute-sanitizer, old-vs-new timings.
# Expects .sel_so/{_C,_cuda}.abi3.so (new) and .sel_so/old/ (baseline) built on the dev machine.
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-/tmp/out}
nvidia-smi --query-gpu=name --format=csv,noheader | tee $OUT/gpu
cp .sel_so/*.so bsa_ext/
timeout 100 python3 -m pytest python_tests/test_cuda.py -q -k "select or graph" -p no:cacheprovider 2>&1 | tail -15 | tee $OUT/pytest.log
timeout 60 compute-sanitizer --tool memcheck --error-exitcode 9 python3 tools/device/sanitize_select.py 2>&1 | tail -4 | tee $OUT/memcheck.log
timeout 40 compute-sanitizer --tool racecheck --error-exitcode 9 python3 tools/device/sanitize_select.py 2>&1 | tail -4 | tee $OUT/racecheck.log
timeout 40 python3 tools/device/bench_select.py --label new --profile 2>&1 | tee $OUT/bench_new.log
cp .sel_so/old/*.so bsa_ext/
timeout 40 python3 tools/device/bench_select.py --label old 2>&1 | tee $OUT/bench_old.log
cp .sel_so/*.so bsa_ext/
