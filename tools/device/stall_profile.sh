#!/usr/bin/env bash
# Warp-stall profile of one kernel: per-SASS-line stall samples (ncu source page) summarised by
# tools/device/ncu_stalls.py, the warp-state and throughput sections, and (once) the SASS of
# every kernel of the build.
# Usage: OUT=/dir [KERNEL=forward_kernel] [TARGET="tools/device/profile_w720s.py --once"] \
#        bash tools/device/stall_profile.sh
# e.g. KERNEL=dkdv_kernel TARGET="tools/device/profile_bwd.py T16-train --no-profile".
set -u
OUT=${OUT:-/tmp/bsa_out}; mkdir -p "$OUT"
KERNEL=${KERNEL:-forward_kernel}
TARGET=${TARGET:-tools/device/profile_w720s.py --once}
export PYTHONUNBUFFERED=1 PYTHONPATH=.
[ -f .device_so/build.tar.xz ] && tar -xJf .device_so/build.tar.xz -C bsa_ext/
NCU=$(command -v ncu || echo /usr/local/cuda/bin/ncu)
timeout -s KILL 300 $NCU --kernel-name regex:"^${KERNEL}$" --launch-count 1 --set full --import-source yes \
  -o "$OUT/$KERNEL" python3 $TARGET > "$OUT/ncu_run_$KERNEL.log" 2>&1; tail -3 "$OUT/ncu_run_$KERNEL.log"
$NCU -i "$OUT/$KERNEL.ncu-rep" --page source --print-source sass --csv > "/tmp/$KERNEL.csv" 2>&1
python3 tools/device/ncu_stalls.py "/tmp/$KERNEL.csv" 40 > "$OUT/stalls_$KERNEL.txt"; head -12 "$OUT/stalls_$KERNEL.txt" | cut -c1-150
$NCU -i "$OUT/$KERNEL.ncu-rep" --page details --section WarpStateStats --section SpeedOfLight \
  --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis --section Occupancy > "$OUT/details_$KERNEL.txt" 2>&1
grep -E "Duration|Throughput|Hit Rate|Issue Slots|Warp Cycles|Achieved Occupancy|Registers" "$OUT/details_$KERNEL.txt" | head -20
xz -T4 -c "/tmp/$KERNEL.csv" > "$OUT/$KERNEL.csv.xz"
rm -f "$OUT/$KERNEL.ncu-rep"
