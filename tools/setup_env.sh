#!/usr/bin/env bash
# Installs what bsa_ext needs on a fresh machine, then bsa_ext itself (editable, so the
# tests import the libraries built beside the sources). Sourced by run_demo.sh and
# run_tests.sh; safe to run again (pip skips what is there, ninja rebuilds only changes).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}

if ! "$PY" -c "import torch" 2>/dev/null; then
  echo "== installing torch 2.14.1"
  "$PY" -m pip install -q "torch==2.14.1"
fi
"$PY" -m pip install -q "setuptools>=64" wheel ninja pytest numpy

echo "== building bsa_ext (log: build/install.log)"
mkdir -p build
if ! MAX_JOBS=${MAX_JOBS:-$(nproc)} "$PY" -m pip install -v --no-build-isolation -e . >build/install.log 2>&1; then
  tail -n 60 build/install.log
  echo "bsa_ext: build failed (full log: build/install.log)" >&2
  exit 1
fi
grep -h "bsa_ext build:" build/install.log | tail -n 1
