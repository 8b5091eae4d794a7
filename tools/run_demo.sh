#!/usr/bin/env bash
# Fresh machine to demo in one command: set-up, build, then `python -m bsa_ext demo`
# (the W720s workload on a GPU, a small LongCat-shaped problem on a CPU).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source tools/setup_env.sh
"${PYTHON:-python3}" -m bsa_ext info
echo
"${PYTHON:-python3}" -m bsa_ext demo "$@"
