#!/usr/bin/env bash
# Warp-stall profile of the sm90 forward at W720s: per-SASS-line stall samples (ncu source page),
# warp-state and throughput sections, and the SASS of every kernel. Usage: OUT=/dir bash tools/device/stall_profile.sh
set -u
OUT=${OUT:-/tmp/bsa_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=.
[ -f .device_so/build.tar.xz ] && tar -xJf .device_so/build.tar.xz -C bsa_ext/
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv
timeout -s KILL 200 python3 -m pytest python_tests -q -k graph -m "gpu or sm90" -p no:cacheprovider 2>&1 | tail -4
NCU=$(command -v ncu || echo /usr/local/cuda/bin/ncu)
timeout -s KILL 300 $NCU --kernel-name regex:"^forward_kernel$" --launch-count 1 --set full --import-source yes -o $OUT/fwd python3 tools/device/profile_w720s.py --once > $OUT/ncu_run.log 2>&1; tail -3 $OUT/ncu_run.log
$NCU -i $OUT/fwd.ncu-rep --page source --print-source sass --csv > /tmp/sass.csv 2>&1
python3 tools/device/ncu_stalls.py /tmp/sass.csv 45
$NCU -i $OUT/fwd.ncu-rep --page details --section WarpStateStats --section SpeedOfLight --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis > $OUT/details.txt 2>&1
grep -E "Stall|Warp Cycles|Issued|Throughput|Pipe|Bank|Shared" $OUT/details.txt | head -50
xz -T4 -c /tmp/sass.csv > $OUT/sass.csv.xz
CUOBJ=$(command -v cuobjdump || echo /usr/local/cuda/bin/cuobjdump)
$CUOBJ --dump-sass bsa_ext/_cuda.abi3.so 2>/dev/null | xz -T4 > $OUT/all.sass.xz; ls -la $OUT
