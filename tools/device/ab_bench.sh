#!/usr/bin/env bash
# A/B of two builds in one device call: benchmarks/bench_bsa.py on the build in
# .device_so/build.tar.xz ("new") and on .device_so/base_build.tar.xz ("base"), alternating,
# each process timing dense cuDNN beside it, so the ratios compare on the same card.
# Usage (repo root): OUT=/dir [WORKLOADS=W720s,W720] [ROUNDS=2] [BENCH_ARGS=...] \
#                    [NEWC=<commit>] [BASEC=<commit>] bash tools/device/ab_bench.sh
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/bsa_ab}
mkdir -p "$OUT/new" "$OUT/base" /tmp/basepkg
tar -xJf .device_so/build.tar.xz -C bsa_ext/
cp -r bsa_ext /tmp/basepkg/ && tar -xJf .device_so/base_build.tar.xz -C /tmp/basepkg/bsa_ext/
nvidia-smi --query-gpu=name --format=csv,noheader
run() {  # name, PYTHONPATH, commit
  echo "== $1"
  BSA_COMMIT=$3 PYTHONPATH=$2 timeout 240 python3 benchmarks/bench_bsa.py --workloads "${WORKLOADS:-W720s,W720}" \
    --impls cuda,dense_cudnn ${BENCH_ARGS:-} --out-dir "$OUT/$1" 2>&1 | sed -n '/^workload/,$p'
}
for _ in $(seq "${ROUNDS:-2}"); do
  run new . "${NEWC:-new}"
  run base /tmp/basepkg:. "${BASEC:-base}"
done
