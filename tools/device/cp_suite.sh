#!/usr/bin/env bash
# One 2-GPU device call for the context-parallel path: the new kernel ops' tests, the
# distributed tests (NCCL and gloo), and benchmarks/bench_cp.py for the current tree and,
# when .device_so/base_src.tar.gz + base_so.tar.xz are there (an older tree and its build),
# for that tree first, so before/after come from the same machine.
# Usage (repo root, kind nvidia-h100-x2): OUT=/dir bash tools/device/cp_suite.sh
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/bsa_out}; mkdir -p "$OUT"
[ -f .device_so/build.tar.xz ] && tar -xJf .device_so/build.tar.xz -C bsa_ext/
nvidia-smi -L > "$OUT/gpus.log" 2>&1
PYTHONPATH=. timeout 240 python3 -m pytest python_tests/test_cuda.py -q -k "${OPS_K:-pool or merge}" -p no:cacheprovider \
  > "$OUT/ops_tests.log" 2>&1
PYTHONPATH=. timeout 300 python3 -m pytest python_tests/test_distributed.py -q -rs -p no:cacheprovider \
  > "$OUT/dist_tests.log" 2>&1
if [ -f .device_so/base_src.tar.gz ] && [ -f .device_so/base_so.tar.xz ]; then
  BASE=/tmp/bsa_base; rm -rf "$BASE"; mkdir -p "$BASE"
  tar -xzf .device_so/base_src.tar.gz -C "$BASE" && tar -xJf .device_so/base_so.tar.xz -C "$BASE/bsa_ext/"
  (cd "$BASE" && BSA_COMMIT=${BASE_COMMIT:-base} PYTHONPATH="$BASE" timeout 300 torchrun --nproc_per_node=2 \
    benchmarks/bench_cp.py --out-dir "$OUT/base" > "$OUT/bench_base.log" 2>&1)
fi
PYTHONPATH=. timeout 300 torchrun --nproc_per_node=2 benchmarks/bench_cp.py --out-dir "$OUT/new" ${CP_ARGS:-} \
  > "$OUT/bench_new.log" 2>&1
for f in gpus ops_tests dist_tests; do echo "== $f"; tail -4 "$OUT/$f.log"; done
for f in bench_base bench_new; do [ -f "$OUT/$f.log" ] && { echo "== $f"; grep -A8 "^workload" "$OUT/$f.log"; tail -3 "$OUT/$f.log"; }; done
