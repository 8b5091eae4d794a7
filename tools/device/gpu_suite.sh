#!/usr/bin/env bash
# One device call for the whole GPU side: `info`, every GPU-marked test, compute-sanitizer
# on tiny shapes (memcheck and racecheck, every selection kernel variant included, and the
# sm80 family with both K/V buffer variants on Hopper too), the demo. Libraries built on the
# CPU machine travel in .device_so/, as plain files or as build.tar.xz (the .so files compress
# ~20x, and what a device call carries is limited to 64 MiB).
# Usage (repo root): OUT=/dir [BENCH=W720s,W720 [BENCH_ARGS=--backward]] [NCU=1] bash tools/device/gpu_suite.sh
# BENCH adds benchmarks/bench_bsa.py on those workloads, writing its JSON lines to $OUT;
# NCU=1 adds an ncu report (speed of light, compute and memory sections) of the selection
# and forward kernels at W720s.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=.
OUT=${OUT:-/tmp/bsa_out}; mkdir -p "$OUT"
[ -f .device_so/build.tar.xz ] && tar -xJf .device_so/build.tar.xz -C bsa_ext/
[ -d .device_so ] && cp .device_so/*.so .device_so/*.json bsa_ext/ 2>/dev/null
CS=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
python3 -m bsa_ext info > "$OUT/info.log" 2>&1
timeout 420 python3 -m pytest python_tests -q -m "gpu or sm90" -rs --tb=short -p no:cacheprovider > "$OUT/gpu_tests.log" 2>&1
timeout 120 "$CS" --tool memcheck --kernel-name kns=bsa python3 tools/device/sanitize_small.py > "$OUT/memcheck.log" 2>&1
timeout 120 "$CS" --tool memcheck --kernel-name kns=bsa python3 tools/device/sanitize_select.py > "$OUT/memcheck_select.log" 2>&1
timeout 120 "$CS" --tool racecheck --kernel-name kns=bsa python3 tools/device/sanitize_small.py > "$OUT/racecheck.log" 2>&1
timeout 120 "$CS" --tool racecheck --kernel-name kns=bsa python3 tools/device/sanitize_select.py > "$OUT/racecheck_select.log" 2>&1
# On Hopper the lines above reach the sm90 kernels; the sm80 family, both K/V buffer variants:
for b in 1 2; do
  for tool in memcheck racecheck; do
    BSA_DISABLE_SM90=1 BSA_SM80_KV_BUFFERS=$b timeout 140 "$CS" --tool $tool --kernel-name kns=bsa \
      python3 tools/device/sanitize_small.py > "$OUT/${tool}_sm80_kv$b.log" 2>&1
  done
done
timeout 120 python3 -m bsa_ext demo > "$OUT/demo.log" 2>&1
if [ -n "${NCU:-}" ]; then
  NCU_BIN=$(command -v ncu || echo /usr/local/cuda/bin/ncu)
  timeout 240 "$NCU_BIN" --kernel-name regex:"^(pool_kernel|score_kernel|choose_kernel|forward_kernel)$" \
    --section SpeedOfLight --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis --section Occupancy \
    python3 tools/device/profile_w720s.py --once > "$OUT/ncu.log" 2>&1
fi
if [ -n "${BENCH:-}" ]; then
  timeout 240 python3 benchmarks/bench_bsa.py --workloads "$BENCH" ${BENCH_ARGS:-} --out-dir "$OUT" > "$OUT/bench.log" 2>&1
fi
cat "$OUT/info.log"; tail -n 15 "$OUT/gpu_tests.log"; tail -n 1 "$OUT/memcheck.log" "$OUT/memcheck_select.log" "$OUT/racecheck.log" "$OUT/racecheck_select.log" "$OUT"/*_sm80_kv*.log
cat "$OUT/demo.log"
[ -f "$OUT/bench.log" ] && sed -n '/^workload/,$p' "$OUT/bench.log"
