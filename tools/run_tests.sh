#!/usr/bin/env bash
# Fresh machine to test results in one command: set-up, build, then the test suite.
# Without a GPU, GPU tests skip and Triton kernels run through Triton's CPU interpreter.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source tools/setup_env.sh
"${PYTHON:-python3}" -m pytest python_tests -q -rs "$@"
