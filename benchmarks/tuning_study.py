"""The preset tuning study; same as `python -m bsa_ext bench` (see bsa_ext/tuning.py).

    python benchmarks/tuning_study.py --write-docs docs/presets.md
"""

import sys

from bsa_ext.tuning import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
