"""Summarise an ncu source-page CSV (SASS view): where a kernel's warps stall, per instruction.

    ncu -i rep.ncu-rep --page source --print-source sass --csv > sass.csv
    python tools/device/ncu_stalls.py sass.csv [top]

Prints the columns found, the total stall samples, and the `top` instructions by samples with
their share and the per-reason columns that are non-zero on that line.
"""

import csv
import sys


def number(text):
    try:
        return float(text.replace(",", ""))
    except (AttributeError, ValueError):
        return 0.0


def main(path, top):
    with open(path, newline="") as f:
        lines = [line for line in f if line.strip()]
    start = next(i for i, line in enumerate(lines) if "Source" in line and "Address" in line)
    rows = list(csv.DictReader(lines[start:]))
    cols = list(rows[0].keys())
    print("columns:", len(cols))
    key = next(c for c in cols if c.startswith("Warp Stall Sampling (All"))
    total = sum(number(r[key]) for r in rows) or 1.0
    print(f"{len(rows)} SASS lines, {total:.0f} stall samples")
    reasons = [c for c in cols if c.startswith("stall_") or "Stall" in c and c != key]
    for r in sorted(rows, key=lambda r: -number(r[key]))[:top]:
        parts = [f"{c}={r[c]}" for c in reasons if number(r[c]) > 0]
        print(f"{100 * number(r[key]) / total:5.1f}% {r.get('Address', r.get('# Address', ''))} {r['Source'][:70]:70s} {' '.join(parts)[:160]}")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 40)
